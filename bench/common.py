"""Shared pieces of the benchmark scripts: environment, presets, model builders, timing and memory.

Import this module before ``torch`` is imported anywhere (it sets ``OMP_WAIT_POLICY=PASSIVE`` so idle OpenMP
threads do not spin on a shared machine) — every bench script does ``from common import ...`` first.

Figures are honest by construction:

* warm-up runs are executed and discarded, the reported value is the median of the timed runs, and the
  number of timed runs is recorded next to it (fewer than requested when a run's time allowance is short);
* peak memory is measured per phase: CUDA ``max_memory_allocated`` after ``reset_peak_memory_stats`` on a GPU,
  on CPU the process RSS sampled every few milliseconds by a background thread (it includes the weights, the
  Python interpreter and PyTorch's allocator caches);
* a figure measured at a smaller depth than the preset and scaled up is flagged ``"estimate": true``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import datetime
import inspect
import json
import math
import platform
import statistics
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLE_ROOT = REPO_ROOT / "masksam_bundle"
ACDC_DIR = REPO_ROOT.parent / "shared" / "data" / "acdc"
if str(BUNDLE_ROOT) not in sys.path:
    sys.path.insert(0, str(BUNDLE_ROOT))

import torch  # noqa: E402

GIB = 1024**3

# --------------------------------------------------------------------------------------------- presets
# Spec section 9. patch = (H, W, D) in MONAI order; volume = a representative whole volume for the
# sliding-window figure; sam_upsample per backbone (None: the backbone cannot take this patch).
PRESETS: Dict[str, Dict] = {
    "acdc": dict(
        patch=(256, 256, 4), num_queries=8, num_classes=4, batch=2, volume=(256, 256, 10),
        sam_upsample={"vit_b": 4, "vit_l": 4, "vit_h": 4, "lite_medsam": 1},
    ),
    "synapse": dict(
        patch=(256, 256, 26), num_queries=24, num_classes=9, batch=2, volume=(512, 512, 148),
        sam_upsample={"vit_b": 1, "vit_l": 1, "vit_h": 1, "lite_medsam": 1},
    ),
    "amos": dict(
        patch=(512, 512, 9), num_queries=24, num_classes=16, batch=2, volume=(512, 512, 100),
        sam_upsample={"vit_b": 1, "vit_l": 1, "vit_h": 1, "lite_medsam": None},
    ),
    # CI smoke size: vit_t, tiny DynUNet/SwinUNETR.
    "tiny": dict(
        patch=(64, 64, 2), num_queries=4, num_classes=3, batch=1, volume=(64, 96, 4),
        sam_upsample={"vit_t": 1}, tiny=True,
    ),
}
MASKSAM_BACKBONES = ("vit_b", "vit_l", "vit_h", "lite_medsam", "vit_t")
BASELINES = ("dynunet", "swinunetr")


def environment() -> Dict:
    """The machine and software a figure came from."""
    info = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "host_cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
        "cuda": torch.cuda.is_available(),
    }
    try:
        import monai

        info["monai"] = monai.__version__
    except ImportError:
        pass
    try:
        info["load_avg_1_5_15"] = [round(v, 2) for v in os.getloadavg()]
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / GIB, 1)
    return info


def cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# --------------------------------------------------------------------------------------------- models
def nnunet_like_plan(patch: Sequence[int], max_pools: int = 5, min_side: int = 4, base: int = 32,
                     max_filters: int = 320) -> Dict:
    """DynUNet topology the way nnU-Net plans it for a patch (voxel space, isotropic spacing assumed).

    Pool an axis while its side is even and stays >= ``min_side`` after pooling, at most ``max_pools`` times;
    kernel 3 everywhere, filters 32 doubling per stage capped at 320, transposed-conv upsampling with the
    stride of the stage.
    """
    sizes = list(patch)
    strides: List[List[int]] = [[1] * len(sizes)]
    pools = [0] * len(sizes)
    while len(strides) <= max_pools:
        # An odd side is not pooled further (the decoder's x2 upsampling must give the skip's size back).
        step = [2 if sizes[a] % 2 == 0 and sizes[a] // 2 >= min_side and pools[a] < max_pools else 1
                for a in range(len(sizes))]
        if all(s == 1 for s in step):
            break
        strides.append(step)
        sizes = [s // st for s, st in zip(sizes, step)]
        pools = [p + (st == 2) for p, st in zip(pools, step)]
    kernels = [[3] * len(patch) for _ in strides]
    filters = [min(base * 2**i, max_filters) for i in range(len(strides))]
    return dict(kernel_size=kernels, strides=strides, upsample_kernel_size=strides[1:], filters=filters)


def build_dynunet(patch: Sequence[int], num_classes: int, in_channels: int = 1, tiny: bool = False,
                  deep_supervision: bool = True):
    from monai.networks.nets import DynUNet

    plan = nnunet_like_plan(patch, max_pools=3 if tiny else 5, base=8 if tiny else 32)
    return DynUNet(
        spatial_dims=3, in_channels=in_channels, out_channels=num_classes, kernel_size=plan["kernel_size"],
        strides=plan["strides"], upsample_kernel_size=plan["upsample_kernel_size"], filters=plan["filters"],
        norm_name=("INSTANCE", {"affine": True}), deep_supervision=deep_supervision,
        deep_supr_num=2 if deep_supervision else 1, res_block=False,
    ), plan


def swin_patch(patch: Sequence[int]) -> List[int]:
    """SwinUNETR needs every side divisible by 32: the patch padded up to that."""
    return [int(math.ceil(s / 32) * 32) for s in patch]


def build_swinunetr(num_classes: int, in_channels: int = 1, tiny: bool = False):
    from monai.networks.nets import SwinUNETR

    try:
        import einops  # noqa: F401  (MONAI's SwinUNETR needs it at forward time)
    except ImportError as err:
        raise NotApplicable("SwinUNETR needs the optional package einops (pip install einops)") from err
    return SwinUNETR(in_channels=in_channels, out_channels=num_classes, feature_size=12 if tiny else 48,
                     depths=(1, 1, 1, 1) if tiny else (2, 2, 2, 2))


def build_masksam(backbone: str, preset: str, depth: Optional[int] = None, use_checkpoint: bool = False,
                  checkpoint: Optional[str] = None, fused_attention: bool = True):
    """MaskSAM for a preset. Without ``checkpoint`` the frozen SAM weights are random: they time the same as the
    official ones (the bench measures cost, not accuracy)."""
    from scripts import MaskSAM

    p = PRESETS[preset]
    up = p["sam_upsample"].get(backbone)
    if up is None:
        raise NotApplicable(f"{backbone} cannot take the {preset} patch {p['patch'][0]}x{p['patch'][1]}")
    extra = {}
    if checkpoint is None and "allow_random_sam" in inspect.signature(MaskSAM).parameters:
        extra["allow_random_sam"] = True  # the bundle refuses a random vit_b/l/h for training unless asked
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "built without a SAM checkpoint": random frozen weights time the same
        return MaskSAM(
            backbone=backbone, checkpoint=checkpoint, in_channels=1, num_classes=p["num_classes"],
            num_queries=p["num_queries"], num_slices=depth or p["patch"][2], image_size=p["patch"][0],
            sam_upsample=up, use_checkpoint=use_checkpoint, fused_attention=fused_attention, **extra,
        )


class NotApplicable(RuntimeError):
    """A model cannot run a preset (e.g. LiteMedSAM's fixed 256 frame on a 512 patch)."""


def deep_supervised_dice_ce(num_classes: int):
    """nnU-Net's loss for DynUNet/SwinUNETR: Dice + CE, over deep-supervision heads weighted 1, 1/2, 1/4."""
    from monai.losses import DiceCELoss

    dice_ce = DiceCELoss(to_onehot_y=True, softmax=True)

    def loss(out: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        if out.ndim == label.ndim + 1:  # DynUNet deep supervision: (B, heads, K, ...)
            heads = out.unbind(1)
            weights = [0.5**i for i in range(len(heads))]
            return sum(w * dice_ce(h, label) for w, h in zip(weights, heads)) / sum(weights)
        return dice_ce(out, label)

    return loss


def masksam_loss(num_classes: int):
    from scripts.loss import MaskSAMLoss

    return MaskSAMLoss(num_classes=num_classes)


def trainable_parameters(model: torch.nn.Module) -> List[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def sgd(model: torch.nn.Module, lr: float):
    """The paper's and nnU-Net's optimiser: SGD, momentum 0.99, Nesterov, weight decay 3e-5."""
    return torch.optim.SGD(trainable_parameters(model), lr=lr, momentum=0.99, nesterov=True, weight_decay=3e-5)


def amp_autocast(device, enabled: bool, amp_dtype: str = "auto"):
    """Autocast as the bundle uses it (``scripts.precision``): bf16 on CUDA where supported, else fp16; on CPU
    (bench only — the bundle runs CPU in fp32) bf16."""
    from scripts.precision import resolve_amp_dtype

    device = torch.device(device)
    return torch.autocast(device.type, dtype=resolve_amp_dtype(device, amp_dtype), enabled=enabled)


def train_step(model, loss_fn, optimiser, scaler, image, label, amp: bool, amp_dtype: str = "auto") -> torch.Tensor:
    """One training step as the bundle trains: forward (autocast) + loss + backward + clipping at 12 + step.

    The gradient scaler skips steps with non-finite gradients (bf16 autocast on CPU produced some); MONAI's
    trainer keeps one under bf16 too.
    """
    optimiser.zero_grad(set_to_none=True)
    with amp_autocast(image.device, amp, amp_dtype):
        out = model(image)
    loss = loss_fn(out, label)
    scaler.scale(loss).backward()
    scaler.unscale_(optimiser)
    torch.nn.utils.clip_grad_norm_(trainable_parameters(model), 12.0)
    scaler.step(optimiser)
    scaler.update()
    return loss.detach()


# --------------------------------------------------------------------------------------------- FLOPs
# Peak dense tensor-core TFLOPS (no sparsity) by GPU name, most specific first: NVIDIA data sheets.
# "fp32" is the non-tensor-core peak; TF32 is used for float32 runs when matmuls may use it.
GPU_PEAK_TFLOPS: List = [
    ("H200 NVL", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    ("H200", {"bf16": 989.5, "fp16": 989.5, "tf32": 494.5, "fp32": 67.0}),
    ("H100 NVL", {"bf16": 835.5, "fp16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0, "tf32": 378.0, "fp32": 51.0}),
    ("H100", {"bf16": 989.5, "fp16": 989.5, "tf32": 494.5, "fp32": 67.0}),  # SXM ("H100 80GB HBM3")
    ("A100", {"bf16": 312.0, "fp16": 312.0, "tf32": 156.0, "fp32": 19.5}),
]


def gpu_peak_tflops(device_name: str, precision: str) -> Optional[float]:
    """Dense peak TFLOPS of a GPU (by ``torch.cuda.get_device_name``) for ``bf16|fp16|tf32|fp32``; None if unknown."""
    for key, peaks in GPU_PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return peaks[precision]
    return None


def count_flops(fn: Callable[[], None]) -> int:
    """FLOPs ``fn`` executes, as ``torch.utils.flop_counter`` counts them (matmuls, convolutions, attention).

    The CPU flash-attention kernels are not in PyTorch's table; they are counted like the CUDA ones.
    """
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    def forward(query, key, value, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query, key, value)

    def backward(grad_out, query, key, value, *args, out_shape=None, **kwargs):
        return sdpa_backward_flop_count(grad_out, query, key, value)

    aten = torch.ops.aten
    extra = {aten._scaled_dot_product_flash_attention_for_cpu: forward,
             aten._scaled_dot_product_flash_attention_for_cpu_backward: backward}
    with FlopCounterMode(display=False, custom_mapping=extra) as counter:
        fn()
    return int(counter.get_total_flops())


# --------------------------------------------------------------------------------------------- data
def synthetic_pair(batch: int, patch: Sequence[int], num_classes: int, device, seed: int = 0):
    """A random image and a label holding every class in every slice (diagonal bands), ``(B, 1, H, W, D)``."""
    g = torch.Generator().manual_seed(seed)
    h, w, d = patch
    image = torch.rand(batch, 1, h, w, d, generator=g)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    bands = ((xx + yy).float() / (h + w - 1) * num_classes).floor().clamp_max(num_classes - 1)
    label = bands[None, None, :, :, None].expand(batch, 1, h, w, d).contiguous()
    return image.to(device), label.to(device)


# --------------------------------------------------------------------------------------------- measuring
def median(values: Sequence[float]) -> Optional[float]:
    return float(statistics.median(values)) if values else None


class PeakMemory:
    """Peak memory of one phase: CUDA max allocated on a GPU, sampled process RSS on CPU (GiB)."""

    def __init__(self, device: torch.device, interval: float = 0.004) -> None:
        self.device, self.interval = torch.device(device), interval
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    @staticmethod
    def rss_bytes() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, self.rss_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.peak_bytes = self.rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated()
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self.peak_bytes, self.rss_bytes())

    @property
    def gib(self) -> float:
        return round(self.peak_bytes / GIB, 3)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed_runs(fn: Callable[[], None], device, warmup: int, repeats: int, deadline: Optional[float] = None,
               label: str = "", log: Callable[[str], None] = print) -> Dict:
    """Run ``fn`` ``warmup`` times (discarded), then up to ``repeats`` timed times; median seconds.

    When ``deadline`` (a ``time.perf_counter()`` value) would be passed by the next run, stop early: at least
    one timed run is always made, and ``runs`` says how many were.
    """
    for i in range(warmup):
        t0 = time.perf_counter()
        fn()
        sync(device)
        log(f"  {label}: warm-up {i + 1}/{warmup} {time.perf_counter() - t0:.2f} s")
    times: List[float] = []
    for i in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
        log(f"  {label}: run {i + 1}/{repeats} {times[-1]:.2f} s")
        if deadline is not None and i + 1 < repeats and time.perf_counter() + times[-1] > deadline:
            log(f"  {label}: stopping after {i + 1} timed run(s) (time allowance)")
            break
    return {"median_s": round(median(times), 4), "runs": len(times), "all_s": [round(t, 4) for t in times]}


def write_json(path: Optional[str], data: Dict) -> None:
    if not path:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    tmp.replace(path)


def ratio(value: Optional[float], reference: Optional[float]) -> Optional[float]:
    if value is None or reference in (None, 0):
        return None
    return round(value / reference, 2)
