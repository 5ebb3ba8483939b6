"""Smoke tests of the benchmark scripts (bench/): each runs end to end at a tiny size so it cannot rot.

They check the JSON each script writes (keys present, figures positive, Dice in [0, 1]), not the speed: the
figures themselves live in masksam_bundle/docs/benchmarks.md.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
BENCH = REPO_ROOT / "bench"
sys.path.insert(0, str(BENCH))


def _run(script: str, *args: str, timeout: int = 120) -> None:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    proc = subprocess.run([sys.executable, str(BENCH / script), *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def _positive(record: dict, keys) -> None:
    for key in keys:
        assert isinstance(record.get(key), (int, float)) and record[key] > 0, (key, record.get(key))


def test_nnunet_like_plan_and_window_count():
    from common import nnunet_like_plan
    from monai.data.utils import dense_patch_slices
    from speed_memory import sliding_windows

    plan = nnunet_like_plan((256, 256, 4))
    # In-plane pooled 5 times (256 -> 8), the 4-slice depth never (it would drop below 4).
    assert plan["strides"] == [[1, 1, 1]] + [[2, 2, 1]] * 5
    assert plan["filters"] == [32, 64, 128, 256, 320, 320]
    # Synapse: depth 26 pooled once (13 is odd); AMOS: depth 9 never.
    assert [s[2] for s in nnunet_like_plan((256, 256, 26))["strides"]] == [1, 2, 1, 1, 1, 1]
    assert [s[2] for s in nnunet_like_plan((512, 512, 9))["strides"]] == [1] * 6
    for volume, roi in [((256, 256, 10), (256, 256, 4)), ((512, 512, 148), (256, 256, 26)), ((64, 96, 4), (64, 64, 2))]:
        interval = [max(int(r * 0.5), 1) for r in roi]
        assert sliding_windows(volume, roi) == len(dense_patch_slices(volume, roi, interval))


def test_speed_memory_tiny(tmp_path):
    out = tmp_path / "speed.json"
    _run("speed_memory.py", "--plan", "tiny", "--inprocess", "--repeats", "1", "--json", str(out))
    data = json.loads(out.read_text())
    assert {"environment", "args", "results", "ratios_to_dynunet", "elapsed_s"} <= set(data)
    by_model = {r["model"]: r for r in data["results"]}
    assert set(by_model) == {"dynunet", "swinunetr", "vit_t"}
    for name, r in by_model.items():
        if name == "swinunetr" and r["status"] == "not applicable":
            assert "einops" in r["reason"]  # the optional MONAI dependency is missing here
            continue
        assert r["status"] == "ok", r
        _positive(r, ["infer_patch_s", "train_step_s", "infer_volume_s", "peak_infer_gib", "peak_train_gib",
                      "params_total_m", "volume_windows"])
    ratios = data["ratios_to_dynunet"]["tiny/vit_t"]
    _positive(ratios, ["infer_patch_s", "train_step_s", "infer_volume_s"])


def test_speed_memory_figures_for_the_memory_estimator(tmp_path):
    """The compact per-configuration records (schema in speed_memory.FIGURES_SCHEMA), explicit attention."""
    out, figures = tmp_path / "speed.json", tmp_path / "figures.json"
    _run("speed_memory.py", "--preset", "tiny", "--models", "dynunet,vit_t", "--phases", "infer,train",
         "--explicit-attention", "--use-checkpoint", "--inprocess", "--warmup", "0", "--repeats", "1",
         "--json", str(out), "--figures-json", str(figures))
    data = json.loads(figures.read_text())
    assert set(data["schema"]) <= set(data["figures"][0]) | {"schema"}
    by_model = {f["backbone"]: f for f in data["figures"]}
    assert by_model["vit_t"]["fused"] is False and by_model["dynunet"]["fused"] is None
    assert by_model["vit_t"]["checkpointing"] is True and by_model["vit_t"]["batch"] == 1
    for f in by_model.values():
        assert f["status"] == "ok" and f["patch"] == [64, 64, 2]
        _positive(f, ["peak_rss_gb", "step_s", "infer_patch_s", "peak_infer_rss_gb"])
    assert json.loads(out.read_text())["results"][1]["fused_attention"] is False
    from report import attention_table

    table = attention_table(json.loads(out.read_text()))
    assert "| vit_t | explicit (before) | 1 | yes |" in table and "| dynunet | – | 1 | – |" in table


def test_attention_variants_tiny(tmp_path):
    out = tmp_path / "variants.json"
    _run("attention_variants.py", "--grid", "16", "--blocks", "global", "--variants", "explicit,fused", "--rounds", "1",
         "--warmup", "0", "--json", str(out), timeout=300)
    results = {r["variant"]: r for r in json.loads(out.read_text())["results"]}
    assert set(results) == {"explicit", "fused"}
    for r in results.values():
        assert r["status"] == "ok" and r["block"] == "global" and r["tokens"] == 256, r
        _positive(r, ["fwd_bwd_s", "speedup_vs_explicit", "max_rss_gib"])
    assert results["explicit"]["speedup_vs_explicit"] == 1.0


def test_dice_acdc_tiny(tmp_path, acdc_dir):
    out = tmp_path / "dice.json"
    _run("dice_acdc.py", "--tiny", "--train-seconds", "3", "--data-dir", str(acdc_dir), "--json", str(out))
    data = json.loads(out.read_text())
    assert data["val_volumes"] == 1 and data["train_volumes"] == 4
    assert set(data["models"]) == {"vit_t", "dynunet"}
    for r in data["models"].values():
        assert r["iterations"] >= 1
        _positive(r, ["train_wall_s", "eval_wall_s", "peak_train_gib"])
        assert set(r["dice"]) == {"RV", "Myo", "LV", "mean"}
        assert all(0.0 <= v <= 1.0 for v in r["dice"].values()), r["dice"]
        assert len(r["per_case"]) == 1


def test_gpu_figures_tiny_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    _run("gpu_figures.py", "--device", "cpu", "--tiny", "--repeats", "1", "--peak-tflops", "2.0", "--json", str(out))
    data = json.loads(out.read_text())
    results = data["results"]
    assert set(results) == {"vit_t fp32", "vit_t amp", "dynunet fp32", "dynunet amp", "vit_t amp+checkpoint",
                            "vit_t amp explicit-attention"}
    for label, r in results.items():
        _positive(r, ["train_iters_per_s", "train_slices_per_s", "peak_train_gib", "train_step_flops",
                      "train_step_tflops_per_s", "train_step_mfu"])
        assert r["peak_tflops"] == 2.0 and r["peak_source"] == "--peak-tflops"
        assert r["train_step_mfu"] == pytest.approx(r["train_step_tflops_per_s"] / 2.0, rel=0.02, abs=1e-3)
        assert r["precision"] == ("bf16" if r["amp"] else "fp32")
        if "checkpoint" not in label:
            _positive(r, ["infer_patch_s", "infer_patch_flops", "infer_patch_mfu", "peak_infer_gib"])
    # Checkpointing recomputes the encoder blocks: more executed FLOPs for the same step.
    assert results["vit_t amp+checkpoint"]["train_step_flops"] > results["vit_t amp"]["train_step_flops"]
    assert results["vit_t amp explicit-attention"]["fused_attention"] is False
    _positive(data["ratios_to_dynunet"]["vit_t fp32"], ["train_step_s", "infer_patch_s"])


def test_gpu_figures_refuses_cuda_without_a_gpu(tmp_path):
    if __import__("torch").cuda.is_available():
        pytest.skip("a CUDA device is present")
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_figures.py"), "--json", str(tmp_path / "x.json")],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr
    assert not (tmp_path / "x.json").exists()


def test_gpu_peak_table_by_device_name():
    from common import gpu_peak_tflops

    assert gpu_peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.5
    assert gpu_peak_tflops("NVIDIA H100 PCIe", "fp16") == 756.0
    assert gpu_peak_tflops("NVIDIA H200 NVL", "bf16") == 835.5
    assert gpu_peak_tflops("NVIDIA A100-SXM4-80GB", "tf32") == 156.0
    assert gpu_peak_tflops("NVIDIA GeForce RTX 4090", "bf16") is None


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs CUDA")
def test_gpu_figures_tiny_on_cuda(tmp_path):
    out = tmp_path / "gpu.json"
    _run("gpu_figures.py", "--tiny", "--repeats", "1", "--json", str(out))
    assert json.loads(out.read_text())["environment"]["gpu"]


def test_profile_forward_tiny(tmp_path):
    out = tmp_path / "profile.json"
    _run("profile_forward.py", "--backbone", "vit_t", "--image-size", "64", "--depth", "2", "--queries", "3",
         "--json", str(out))
    data = json.loads(out.read_text())
    _positive(data, ["forward_s"])
    assert {"image encoder (frozen SAM + adapters)", "prompt generator (3D U-Net decoder)"} <= set(data["modules_s"])
    assert data["top_ops"] and all(op["self_s"] >= 0 for op in data["top_ops"])


def test_gpu_acdc_accuracy_tiny_on_cpu(tmp_path, acdc_dir):
    """The one-shot GPU accuracy run at smoke size: figures JSON, both models evaluated, weight pieces that are
    at most 15 MiB each and load back into the network the manifest describes."""
    from monai.bundle import ConfigParser
    from scripts.pretrained import MANIFEST, load_trained_state, read_pieces

    _run("gpu_acdc_accuracy.py", "--tiny", "--device", "cpu", "--data-dir", str(acdc_dir), "--val-limit", "1",
         "--out", str(tmp_path), timeout=600)
    data = json.loads((tmp_path / "gpu_acdc_accuracy.json").read_text())
    assert {"environment", "command", "config_files", "recipe", "models", "elapsed_s", "train_volumes"} <= set(data)
    assert data["config_files"][:2] == ["train.yaml", "acdc.yaml"] and data["train_volumes"] == 4
    assert data["recipe"]["augmentation"][0] == "RandAffineCropByLabelClassesd"
    assert set(data["models"]) == {"vit_t", "dynunet"}
    for name, r in data["models"].items():
        assert r["iterations"] >= 1 and r["num_cases"] == 1, (name, r)
        _positive(r, ["train_wall_s", "eval_wall_s"])
        assert set(r["per_class"]) == {"RV", "Myo", "LV"} and 0.0 <= r["mean"]["dice"] <= 1.0
        assert all("hd95" in v for v in r["per_class"].values())
        assert (tmp_path / f"eval_{name}" / "metrics.json").is_file()
    pieces = sorted((tmp_path / "pretrained").glob("masksam.part*.pt"))
    assert len(pieces) == len(data["models"]["vit_t"]["weights"]["pieces"]) >= 2  # 24 MiB of fp16: two pieces
    assert all(p.stat().st_size <= 15 * 2**20 for p in pieces)
    manifest, tensors = read_pieces(str(tmp_path / "pretrained"))
    assert manifest["network"]["backbone"] == "vit_t" and (tmp_path / "pretrained" / MANIFEST).is_file()
    network = ConfigParser({"net": manifest["network"]}).get_parsed_content("net")
    load_trained_state(network, tensors)  # every trained key present with its shape


def test_tta_cost_tiny(tmp_path, acdc_dir):
    out = tmp_path / "tta.json"
    _run("tta_cost.py", "--preset", "tiny", "--volumes", "1", "--crop", "64,64,4", "--mirror-axes", "0",
         "--data-dir", str(acdc_dir), "--json", str(out))
    data = json.loads(out.read_text())
    assert data["mirror_axes"] == [0] and len(data["per_volume"]) == 1  # one axis: 2 passes per window
    _positive(data, ["median_plain_s", "median_mirrored_s", "ratio"])
    assert data["per_volume"][0]["shape"] == [64, 64, 4]
