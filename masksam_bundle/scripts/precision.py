"""Mixed precision: which autocast dtype a device gets (config keys ``amp`` and ``amp_dtype``).

On CUDA, ``auto`` picks bfloat16 where the GPU supports it (Ampere and newer: no overflow, the gradient scaler
is not needed but harmless) and float16 otherwise (with MONAI's ``GradScaler``). On CPU the bundle runs float32:
MONAI's engines autocast on CUDA only, and bf16 autocast produced non-finite gradients in our CPU tests
(``docs/benchmarks.md``, "Memory and precision switches").
"""

from __future__ import annotations

from typing import Dict, Optional, Union

import torch

__all__ = ["AMP_DTYPES", "resolve_amp_dtype", "autocast_kwargs", "autocast"]

AMP_DTYPES = ("auto", "bfloat16", "float16")


def resolve_amp_dtype(device: Union[str, torch.device], amp_dtype: str = "auto") -> torch.dtype:
    """The autocast dtype for ``device``: ``auto`` -> bfloat16 where supported (CPU autocast's own dtype too),
    float16 on older GPUs.

    Raises:
        ValueError: ``amp_dtype`` is not one of :data:`AMP_DTYPES`, or bfloat16 is asked of a GPU without it.
    """
    if amp_dtype not in AMP_DTYPES:
        raise ValueError(f"amp_dtype must be one of {AMP_DTYPES}, got {amp_dtype!r}")
    device = torch.device(device)
    bf16_ok = device.type != "cuda" or (torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if amp_dtype == "auto":
        return torch.bfloat16 if bf16_ok else torch.float16
    if amp_dtype == "bfloat16" and not bf16_ok:
        raise ValueError(f"amp_dtype bfloat16 is not supported by {torch.cuda.get_device_name(device)}; use float16")
    return getattr(torch, amp_dtype)


def autocast_kwargs(device: Union[str, torch.device], amp_dtype: str = "auto") -> Dict[str, torch.dtype]:
    """``amp_kwargs`` for MONAI's ``SupervisedTrainer`` / ``SupervisedEvaluator`` (``{"dtype": ...}``)."""
    return {"dtype": resolve_amp_dtype(device, amp_dtype)}


def autocast(device: Union[str, torch.device], enabled: bool, amp_dtype: Optional[str] = "auto"):
    """``torch.autocast`` on CUDA with the resolved dtype; a no-op context on CPU or when disabled."""
    device = torch.device(device)
    on = bool(enabled) and device.type == "cuda"
    dtype = resolve_amp_dtype(device, amp_dtype or "auto") if on else None
    return torch.autocast("cuda", dtype=dtype, enabled=on)
