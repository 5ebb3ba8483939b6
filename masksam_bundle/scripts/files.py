"""File I/O that never leaves half-written files and never loads code from a checkpoint.

Every write goes to a temporary file in the destination folder, is flushed to disk, and is then renamed over
the destination with ``os.replace`` (atomic on POSIX and Windows): a run killed mid-write leaves the previous
file intact and at most a stray ``.*.tmp*`` file behind.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import torch


@contextmanager
def _atomic_path(path: str, suffix: str = "") -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``, on failure remove it."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=f".tmp{suffix}", dir=folder)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write(path: str, write_fn: Callable[[str], Any], suffix: str = "") -> str:
    """Call ``write_fn(tmp_path)`` then atomically move the result to ``path``.

    ``suffix`` is appended to the temporary name for writers that choose the format from the extension
    (e.g. ``.nii.gz`` for nibabel)."""
    with _atomic_path(path, suffix) as tmp:
        write_fn(tmp)
    return path


def atomic_write_text(path: str, text: str) -> str:
    def _write(tmp):
        with open(tmp, "w") as f:
            f.write(text)

    return atomic_write(path, _write)


def atomic_torch_save(obj: Any, path: str) -> str:
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def safe_torch_load(path: str, map_location: Any = "cpu") -> Any:
    """``torch.load(weights_only=True)`` with errors that name the file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path!r} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, pickle with code objects, ...
        raise RuntimeError(
            f"cannot load checkpoint {path!r} with torch.load(weights_only=True): {type(e).__name__}: {e}. "
            "The file may be truncated or corrupt, or contain Python objects beyond tensors and plain containers."
        ) from e


def ensure_writable_dir(path: str, what: str = "output folder") -> str:
    """Create ``path`` if needed and check that files can be created in it, before any heavy work."""
    path = os.fspath(path)
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write_probe.", dir=path)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise PermissionError(f"{what} {path!r} cannot be written: {e.strerror or e}") from e
    return path


__all__ = ["atomic_write", "atomic_write_text", "atomic_torch_save", "safe_torch_load", "ensure_writable_dir"]
