"""The whole training chain learns: a tiny MaskSAM overfits a small real ACDC patch to a correct eval-mode
segmentation (``bench/overfit_patch.py``), and the CPU memory setting that makes such runs affordable.

The overfit test is a regression guard of the chain — dataset mapping, Hungarian matching, loss terms, optimiser
and the eval-mode combination of class and mask probabilities: break any of them (e.g. drop the "no object"
column before the softmax, or match queries at random) and the patch's Dice stays far below the bar.
"""

import copy
import importlib.util
import subprocess
import sys

import pytest

from helpers import REPO_ROOT

# A vit_t MaskSAM on one 64 x 64 ACDC slice at 2 mm (SAM frame x2, so its masks are 32 x 32), AdamW
# (configs/adamw.yaml's optimiser) at 6e-3; it stops once every class reaches 0.9 (iteration 107, about 80 s on
# the 2-core machine). Capped by iterations, not time, so a slower machine gives the same result.
TINY_OVERFIT = ["--backbone", "vit_t", "--image-size", "64", "--spacing", "2", "--sam-upsample", "2", "--depth", "1",
                "--num-queries", "4", "--optimizer", "adamw", "--lr", "6e-3", "--num-points", "4096",
                "--limit-cases", "10", "--iterations", "200", "--minutes", "0", "--stop-at", "0.9"]


def _overfit_module(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO_ROOT / "bench"))  # the script's own `common` import
    spec = importlib.util.spec_from_file_location("overfit_patch", REPO_ROOT / "bench" / "overfit_patch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_tiny_masksam_overfits_a_real_patch_to_a_correct_segmentation(tmp_path, monkeypatch, acdc_dir):
    bench = _overfit_module(monkeypatch)
    out_json, out_png = tmp_path / "overfit.json", tmp_path / "overfit.png"
    result = bench.main([*TINY_OVERFIT, "--dataset-dir", str(acdc_dir), "--json", str(out_json), "--png", str(out_png)])
    final = result["final_eval_forward_dice"]
    assert min(final.values()) >= 0.9, (final, result["history"][-1])
    # the Dice of a real net.eval() forward pass is the one computed from the train-mode sets
    assert result["eval_mode_check_max_abs_diff"] < 1e-4
    last = result["history"][-1]
    assert [round(d, 6) for d in last["dice"]] == [round(final[s], 6) for s in bench.STRUCTURES]
    first = result["history"][0]
    assert max(first["dice"]) < 0.5 and last["loss"] < 0.75 * first["loss"]  # it learned, it did not start there
    assert out_json.exists() and out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_patch_rule_picks_a_slab_with_every_class_on_every_slice(monkeypatch, acdc_dir):
    import nibabel as nib
    import numpy as np

    bench = _overfit_module(monkeypatch)
    choice = bench.choose_patch(acdc_dir, depth=2, limit=3)
    label = np.asarray(nib.load(str(acdc_dir / choice["label"])).dataobj)[:, :, choice["z"]:choice["z"] + 2]
    counts = [[int((label[:, :, z] == k).sum()) for z in range(2)] for k in (1, 2, 3)]
    assert min(min(c) for c in counts) == choice["score"] > 0


def test_keep_freed_memory_applies_on_a_cpu_run_only():
    from scripts.settings import keep_freed_memory

    assert keep_freed_memory("cuda:0") is False
    assert keep_freed_memory("cpu", enabled="false") is False
    # in a child process: the setting is process-wide and would change this test process's allocator
    code = ("import sys; sys.path.insert(0, 'masksam_bundle'); from scripts.settings import keep_freed_memory; "
            "import torch; assert keep_freed_memory('cpu') is True; x = torch.ones(2**25); del x; print('ok')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_the_memory_estimate_counts_the_kept_memory_on_cpu_only():
    from scripts.memory import KEEP_FREED_SHARE, estimate_peak_gb, load_table

    preset = dict(backbone="lite_medsam", image_size=256, sam_upsample=1, depth=4, num_queries=8, batch=1)
    plain, kept = estimate_peak_gb(**preset), estimate_peak_gb(**preset, keep_freed=True)
    activations = next(v for k, v in plain.parts.items() if k.startswith("activations"))
    assert kept.total_gb == pytest.approx(plain.total_gb + KEEP_FREED_SHARE * activations)
    assert 20.0 < kept.total_gb < 22.5  # measured: 18.4-20.8 GiB resident for this step with the memory kept
    # on a GPU the setting does nothing, so nothing is added (the table holds CPU fits only: relabel them)
    table = copy.deepcopy(load_table())
    for fit in table["fits"]:
        fit["device"] = "cuda"
    gpu = dict(preset, device="cuda", table=table)
    assert estimate_peak_gb(**gpu, keep_freed=True).total_gb == pytest.approx(estimate_peak_gb(**gpu).total_gb)
