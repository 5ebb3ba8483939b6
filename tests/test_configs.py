"""Config layering (train.yaml generic, presets hold what differs), the ablation overlays of paper Table 4, the
workflow sections (initialize / run / finalize, with the README's run ids), the deterministic preprocessing chain
declared once, and the training guard against random SAM weights."""

import math
import time

import pytest
import torch
import torch.nn.functional as F
from monai.bundle import ConfigParser

from scripts.adapters import DConvAdapter, SliceFolded
from scripts.prompt_generator import default_decoder_channels

from helpers import BUNDLE, CONFIGS, cli, parser_for

# Table 4 of the paper: prompt mode, image-token adapter, prompt-token adapter, depth position embeddings.
ABLATION = {
    "B1": ("mask", "vanilla", "vanilla", False),
    "B2": ("box", "vanilla", "vanilla", False),
    "B3": ("mask_box", "vanilla", "vanilla", False),
    "B4": ("mask_avg_box", "vanilla", "vanilla", False),
    "B5": ("mask_avg_box", "vanilla", "vanilla", True),
    "B6": ("mask_avg_box", "dmlp_after_up", "dmlp_after_up", True),
    "B7": ("mask_avg_box", "dmlp_before_down", "dmlp_before_down", True),
    "B8": ("mask_avg_box", "dmlp", "dmlp", True),
    "B9": ("mask_avg_box", "dconv", "dmlp", True),
}
PLACEMENT = {"dmlp": "middle", "dmlp_after_up": "after_up", "dmlp_before_down": "before_down", "vanilla": None}


def cpu_parser(*names: str) -> ConfigParser:
    """The bundle configs ``names`` (in configs/) on the CPU."""
    return parser_for(names, device="$torch.device('cpu')")


def test_train_yaml_is_generic_and_acdc_yaml_holds_the_acdc_recipe():
    generic = cpu_parser("train.yaml")
    acdc = cpu_parser("train.yaml", "acdc.yaml")
    assert (generic["num_points"], generic["max_epochs"], generic["decoder_channels"]) == (12544, 1000, None)
    assert (acdc["num_points"], acdc["max_epochs"], acdc["decoder_channels"]) == (32768, 500, [256, 128, 128])
    criterion = acdc.get_parsed_content("loss").criterion
    assert criterion.num_points == 32768 and criterion.matcher.num_points == 32768
    assert criterion.box_key == "prompt_boxes"
    assert generic.get_parsed_content("loss").criterion.num_points == 12544
    # acdc.yaml repeats nothing train.yaml already says.
    acdc_only = ConfigParser.load_config_file(str(CONFIGS / "acdc.yaml"))
    for key, value in acdc_only.items():
        assert generic[key] != value, f"acdc.yaml repeats train.yaml's {key}: {value}"


@pytest.mark.parametrize("preset", ["acdc.yaml", "synapse.yaml", "amos.yaml"])
def test_preset_decoder_widths_are_the_release_widths_for_their_stage_count(preset):
    parser = cpu_parser("train.yaml", preset)
    side, up = parser["patch_size"][0], parser["sam_upsample"]
    grid = side * up // 16  # ViT embedding grid
    stages = int(math.log2(side / grid))
    assert list(parser["decoder_channels"]) == list(default_decoder_channels(stages))
    assert len(parser["decoder_channels"]) == stages + 1
    if preset == "amos.yaml":
        weights = parser.get_parsed_content("loss").criterion.weight_dict
        assert weights["loss_mask_bce"] == 1.2 and weights["loss_mask_dice"] == 1.2


def _blocky_label(generator: torch.Generator) -> torch.Tensor:
    coarse = torch.randint(0, 4, (1, 1, 8, 8, 4), generator=generator).float()
    return F.interpolate(coarse, size=(64, 64, 4), mode="nearest")


@pytest.mark.parametrize("step", sorted(ABLATION))
def test_ablation_overlay_builds_its_switches_and_trains_one_iteration(step):
    """Each overlay on the tiny preset: the network has the step's prompts, adapters and depth embeddings,
    and one SGD iteration of the configured loss gives every trainable parameter a gradient."""
    prompt_mode, image_kind, prompt_kind, depth_pos_embed = ABLATION[step]
    parser = cpu_parser("train.yaml", "tiny.yaml", f"ablation/{step}.yaml")
    parser["num_points"] = 2048  # fewer sampled pixels: the switches, not the sampling, are under test
    assert parser.get_parsed_content("model_settings")["prompt_mode"] == prompt_mode
    torch.manual_seed(0)
    net, loss_fn, optimizer = (parser.get_parsed_content(k) for k in ("network", "loss", "optimizer"))

    assert net.prompt_mode == prompt_mode
    assert (net.prompt_generator.box_head is None) == (prompt_mode == "mask")
    encoder_adapter = net.image_encoder.blocks[0].attn_adapter
    decoder_layer = net.decoder.transformer.layers[0]
    for adapter in (encoder_adapter, decoder_layer.image_adapter):
        if image_kind == "dconv":
            assert isinstance(adapter, DConvAdapter)
        else:
            assert isinstance(adapter, SliceFolded) and adapter.adapter.placement == PLACEMENT[image_kind]
    assert decoder_layer.self_attn_adapter.placement == PLACEMENT[prompt_kind]
    assert (net.image_encoder.depth_embed is not None) == depth_pos_embed
    assert (net.decoder.depth_pos_embed is not None) == depth_pos_embed
    if step == "B1":  # no learnable box: nothing for a box loss to train
        assert loss_fn.criterion.weight_dict["loss_box_l1"] == loss_fn.criterion.weight_dict["loss_box_giou"] == 0
    if step == "B2":  # no mask prompt: the aux masks are not supervised
        assert loss_fn.criterion.weight_dict["loss_aux_bce"] == loss_fn.criterion.weight_dict["loss_aux_dice"] == 0

    gen = torch.Generator().manual_seed(0)
    x, label = torch.randn(1, 1, 64, 64, 4, generator=gen), _blocky_label(gen)
    net.train()
    sets = net(x)
    if prompt_mode == "mask_avg_box":
        assert not torch.equal(sets["prompt_boxes"], sets["aux_boxes"])
    else:
        assert torch.equal(sets["prompt_boxes"], sets["aux_boxes"])
    before = [p.detach().clone() for p in optimizer.param_groups[0]["params"]]
    loss = loss_fn(sets, label)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss) and loss.item() > 0
    without_grad = [n for n, p in net.named_parameters() if p.requires_grad and p.grad is None]
    assert without_grad == []  # DDP with find_unused_parameters=false works for every step
    moved = sum(not torch.equal(b, p) for b, p in zip(before, optimizer.param_groups[0]["params"]))
    assert moved > 0.5 * len(before)


def test_training_vit_b_without_sam_checkpoint_stops_before_any_work(tmp_path, acdc_dir):
    out, models = tmp_path / "out", tmp_path / "models"
    start = time.monotonic()
    code, stdout, stderr = cli("run", "training", "--config_file", "['configs/train.yaml','configs/acdc.yaml']",
                               "--dataset_dir", acdc_dir, "--output_dir", out, "--ckpt_dir", models, timeout=300,
                               quiet=True)
    elapsed = time.monotonic() - start
    log = stdout + stderr
    assert code != 0
    assert "sam_checkpoint" in log and "sam_vit_b_01ec64.pth" in log and "allow_random_sam" in log, log[-3000:]
    # Refused before the output folders, the data and the network: nothing was created, no case was loaded.
    assert not out.exists() and not models.exists()
    assert "Loading dataset" not in log and "SupervisedTrainer" not in log
    print(f"refused after {elapsed:.1f} s (interpreter and MONAI start-up included)")


def test_inference_yaml_builds_the_network_an_ablation_overlay_trains():
    """A model trained with an overlay loads into inference.yaml's network with the same overlay."""
    overlay = "ablation/B1.yaml"
    trained = cpu_parser("train.yaml", "tiny.yaml", overlay).get_parsed_content("network_def")
    served = cpu_parser("inference.yaml", "tiny.yaml", overlay).get_parsed_content("network_def")
    served.load_state_dict(trained.state_dict(), strict=True)
    assert served.prompt_mode == "mask" and served.prompt_generator.box_head is None
    for preset in ("acdc.yaml", "synapse.yaml", "amos.yaml"):  # presets overlay inference.yaml too
        served_widths = cpu_parser("inference.yaml", preset)["decoder_channels"]
        assert served_widths == cpu_parser("train.yaml", preset)["decoder_channels"], preset
    full = cpu_parser("inference.yaml", "tiny.yaml").get_parsed_content("network_def")
    with pytest.raises(RuntimeError, match="box_head"):
        full.load_state_dict(trained.state_dict(), strict=True)


# ------------------------------------------------------------------------------ workflow sections, preprocessing


def test_configs_hold_plain_expressions_only():
    """No ``__import__(...)`` or ``setattr(...)`` tricks: what needs a module or a side effect is a function."""
    for path in sorted(CONFIGS.rglob("*.yaml")):
        text = path.read_text()
        assert "__import__(" not in text and "setattr(" not in text, path.name


@pytest.mark.parametrize("overlay,run_id,init_ids", [
    ("tiny.yaml", "training", ["set_determinism", "configure_determinism", "keep_freed_memory"]),
    ("evaluate.yaml", "evaluating", ["set_determinism", "keep_freed_memory"]),  # cuDNN autotuning stays off
    ("demo.yaml", "demo", ["set_determinism", "configure_determinism", "keep_freed_memory"]),
    ("multi_gpu_train.yaml", "training", ["init_process_group", "set_device", "set_determinism",
                                          "configure_determinism"]),
])
def test_run_ids_are_the_run_section_after_initialize(overlay, run_id, init_ids):
    parser = cpu_parser("train.yaml", overlay)
    parser.parse()  # resolves the `%run` macros
    assert parser[run_id] == parser["run"] and parser["run"][0] == "$@setup"
    assert parser["setup"][-1] == "$@initialize"  # a run id alone (get_parsed_content) also initializes
    initialize = parser["initialize"]
    assert len(initialize) == len(init_ids) and all(name in expr for name, expr in zip(init_ids, initialize))
    inference = cpu_parser("inference.yaml")
    inference.parse()
    assert inference["inference"] == inference["run"] and inference["run"][0] == "$@setup"
    assert "initialize" not in inference  # `run show --show EXPR` builds and writes nothing else


def test_bundle_run_initializes_once_runs_and_finalizes(tmp_path, acdc_dir):
    """``monai.bundle run training``'s order: initialize, the checks of setup (once), initialize again (same seed),
    the run, finalize. The trainer and the sections are replaced by recorders; the checks are real."""
    from monai.bundle import ConfigWorkflow

    out = tmp_path / "out"
    workflow = ConfigWorkflow(
        config_file=[str(CONFIGS / "train.yaml"), str(CONFIGS / "tiny.yaml")], run_id="training",
        **{"bundle_root": str(BUNDLE), "dataset_dir": str(acdc_dir), "output_dir": str(out),
           "ckpt_dir": str(out / "models"), "calls": "$[]", "initialize": ["$@calls.append('initialize')"],
           "setup#1": "$@calls.append('checks') or @last_checkpoint", "run#1": "$@calls.append('run')",
           "finalize": ["$@calls.append('finalize')"]})
    workflow.initialize()
    workflow.run()
    workflow.finalize()
    assert workflow.parser.get_parsed_content("calls") == ["initialize", "checks", "initialize", "run", "finalize"]
    assert (out / "models").is_dir()  # the real output check ran (and created the folders)


def test_multi_gpu_finalize_ends_the_process_group(monkeypatch):
    import torch.distributed as dist

    for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT="29533", RANK="0", WORLD_SIZE="1").items():
        monkeypatch.setenv(key, value)
    parser = cpu_parser("train.yaml", "tiny.yaml", "multi_gpu_train.yaml")
    try:
        parser.get_parsed_content("initialize")
        assert dist.is_initialized() and dist.get_backend() == "gloo"  # CPU: gloo
    finally:
        parser.get_parsed_content("finalize")
    assert not dist.is_initialized()


def test_deterministic_chain_is_declared_once_and_shared():
    """Validation (and evaluation, which overlays it) use ``preprocessing`` itself; training starts with its
    steps; settings given on the command line (here ``pixdim``) reach every chain."""
    parser = cpu_parser("train.yaml", "tiny.yaml")
    chain = parser.get_parsed_content("preprocessing")
    assert parser.get_parsed_content("validate#preprocessing") is chain
    train = parser.get_parsed_content("train#preprocessing").transforms
    n = len(chain.transforms)
    assert all(a is b for a, b in zip(train[:n], chain.transforms))
    assert type(train[n]).__name__ == "ClassesToIndicesd" and type(train[n + 1]).__name__ == "RandAffineCropByLabelClassesd"
    assert any(type(t).__name__ == "SpacingIgnoringPathsd" for t in chain.transforms)  # tiny.yaml's pixdim
    plain = cpu_parser("train.yaml", "tiny.yaml")
    plain["pixdim"] = None
    assert not any(type(t).__name__ == "SpacingIgnoringPathsd" for t in plain.get_parsed_content("train#preprocessing").transforms)
    evaluate = cpu_parser("train.yaml", "evaluate.yaml")
    assert evaluate.get_parsed_content("validate#preprocessing") is evaluate.get_parsed_content("preprocessing")


def test_configure_determinism_sets_algorithms_and_cudnn_autotuning():
    from scripts.settings import configure_determinism

    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
              torch.backends.cudnn.benchmark)
    try:
        assert configure_determinism("false") is False and torch.backends.cudnn.benchmark is True
        assert configure_determinism(True) is True and torch.backends.cudnn.benchmark is False
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        with pytest.raises(ValueError, match="deterministic must be true or false, got 'maybe'"):
            configure_determinism("maybe")
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.backends.cudnn.benchmark = before[2]
