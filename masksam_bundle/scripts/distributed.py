"""Distributed data parallel: the bare network inside a wrapper, and which process writes files and logs.

``configs/multi_gpu_train.yaml`` starts the process group in ``initialize`` and ends it in ``finalize``; the
handlers use :func:`is_rank_zero` so that one process saves checkpoints and logs.
"""

from __future__ import annotations

import torch

__all__ = ["unwrap", "is_rank_zero"]


def unwrap(network: torch.nn.Module) -> torch.nn.Module:
    """The bare module inside ``DistributedDataParallel`` / ``DataParallel`` (``network`` itself otherwise)."""
    inner = getattr(network, "module", None)
    return inner if isinstance(inner, torch.nn.Module) else network


def is_rank_zero() -> bool:
    """True outside a process group and on rank 0 inside one."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return not distributed or torch.distributed.get_rank() == 0
