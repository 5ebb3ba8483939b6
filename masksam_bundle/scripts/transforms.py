"""Preprocessing shared by training, validation, evaluation and inference.

``deterministic_transforms`` builds the non-random part (load, check, optional reorientation/resampling,
intensity normalisation, padding to the patch) once, so the four pipelines cannot drift apart; the random
nnU-Net-style augmentations are listed in ``configs/train.yaml`` where users tune them.
"""

from __future__ import annotations

import warnings
from typing import Hashable, List, Mapping, Optional, Sequence

import numpy as np
import torch
from monai.transforms import (
    ClassesToIndicesd,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    Orientationd,
    Spacingd,
    SpatialPadd,
)

from .cli import parse_flag
from .loss.dataset_mapping import invalid_label_values


def _filename(data: Mapping, key: Hashable) -> str:
    value = data[key]
    meta = getattr(value, "meta", None) or data.get(f"{key}_meta_dict", {}) or {}
    return str(meta.get("filename_or_obj", f"<{key}>"))


def _affine(data: Mapping, key: Hashable) -> Optional[np.ndarray]:
    affine = getattr(data[key], "affine", None)
    return None if affine is None else np.asarray(affine, dtype=np.float64)


class CheckLoadedCased(MapTransform):
    """Check one loaded case (channel-first) and raise errors that name the files.

    - image must be 3D with ``in_channels`` channels (a 2D image or a wrong channel count is refused);
    - image intensities must be finite (``fix_nonfinite=True`` replaces NaN/Inf by 0 with a warning instead);
    - label (when present): one channel, same spatial shape and affine as the image, values in 0..K-1.
    """

    def __init__(
        self,
        image_key: str = "image",
        label_key: Optional[str] = "label",
        num_classes: Optional[int] = None,
        in_channels: int = 1,
        fix_nonfinite: bool = False,
        affine_atol: float = 1e-3,
    ) -> None:
        keys = [image_key] + ([label_key] if label_key else [])
        super().__init__(keys, allow_missing_keys=True)
        self.image_key, self.label_key = image_key, label_key
        self.num_classes, self.in_channels = num_classes, int(in_channels)
        self.fix_nonfinite, self.affine_atol = parse_flag(fix_nonfinite, "fix_nonfinite"), affine_atol

    def __call__(self, data: Mapping) -> dict:
        d = dict(data)
        image = d[self.image_key]
        image_file = _filename(d, self.image_key)
        if image.ndim != 4:
            raise ValueError(
                f"{image_file}: expected a 3D volume (channel-first shape (C, H, W, D)), got shape "
                f"{tuple(image.shape)}; the model is 3D (2D images are not supported)"
            )
        if image.shape[0] != self.in_channels:
            raise ValueError(
                f"{image_file}: has {image.shape[0]} channel(s), the network expects in_channels={self.in_channels}"
            )
        finite = torch.isfinite(torch.as_tensor(image))
        if not bool(finite.all()):
            bad = int((~finite).sum())
            if not self.fix_nonfinite:
                raise ValueError(
                    f"{image_file}: {bad} NaN/Inf intensity value(s); clean the image or set fix_nonfinite=true "
                    "to replace them by 0"
                )
            warnings.warn(f"{image_file}: replaced {bad} NaN/Inf intensity value(s) by 0")
            d[self.image_key] = torch.nan_to_num(image, nan=0.0, posinf=0.0, neginf=0.0)
        if self.label_key and self.label_key in d:
            label = d[self.label_key]
            label_file = _filename(d, self.label_key)
            if label.ndim != 4 or label.shape[0] != 1 or tuple(label.shape[1:]) != tuple(image.shape[1:]):
                raise ValueError(
                    f"image and label shapes differ: {image_file} has shape {tuple(image.shape[1:])} "
                    f"({image.shape[0]} channel(s)), {label_file} has shape {tuple(label.shape)} (expected "
                    f"(1, {', '.join(map(str, image.shape[1:]))}))"
                )
            a_img, a_lab = _affine(d, self.image_key), _affine(d, self.label_key)
            if a_img is not None and a_lab is not None and not np.allclose(a_img, a_lab, atol=self.affine_atol):
                raise ValueError(
                    f"image and label affines differ: {image_file} has\n{np.round(a_img, 4)}\n"
                    f"{label_file} has\n{np.round(a_lab, 4)}"
                )
            if self.num_classes is not None:
                bad_values = invalid_label_values(label, self.num_classes)
                if bad_values:
                    raise ValueError(
                        f"{label_file}: label values {bad_values[:20]} are outside 0..{self.num_classes - 1} "
                        f"(num_classes K={self.num_classes}, background included)"
                    )
        return d


class _NamedLoader:
    """Wrap ``LoadImage`` so that any read error names the file (a truncated ``.nii.gz`` otherwise fails with a
    bare ``EOFError: Compressed file ended before the end-of-stream marker was reached``)."""

    def __init__(self, loader) -> None:
        self.loader = loader

    def __call__(self, filename, reader: Optional[object] = None):
        try:
            return self.loader(filename, reader)
        except Exception as e:
            raise ValueError(f"{filename}: cannot be read ({type(e).__name__}: {e}); the file may be truncated "
                             "or corrupt, or not a NIfTI image") from e

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def __setattr__(self, name, value):  # e.g. MONAI Label sets ``_loader.image_only = False``
        if name == "loader":
            object.__setattr__(self, name, value)
        else:
            setattr(self.loader, name, value)


class NamedLoadImaged(LoadImaged):
    """``LoadImaged`` whose read errors name the file (see ``_NamedLoader``)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._loader = _NamedLoader(self._loader)


class SpacingIgnoringPathsd(Spacingd):
    """``Spacingd`` that ignores non-dict entries named ``<key>_*`` (a workaround for MONAI Label's ``image_path``).

    With monai 1.6.1, ``Spacingd`` copies the resampled image's metadata into every data key that starts with
    ``"<key>_"`` (meant for ``image_meta_dict``). MONAI Label puts the image's file path, a string, under
    ``image_path``, so plain ``Spacingd`` crashes there with ``'str' object has no attribute 'update'``. Those
    entries are set aside during the call and put back unchanged; everything else is ``Spacingd``.
    """

    def __call__(self, data, lazy: Optional[bool] = None):
        d = dict(data)
        aside = {
            k: d.pop(k)
            for k in list(d.keys())
            if isinstance(k, str) and not isinstance(d[k], dict)
            and any(k.startswith(f"{key}_") for key in self.keys)
        }
        out = super().__call__(d, lazy=lazy)
        out.update(aside)
        return out


def deterministic_transforms(
    keys: Sequence[str] = ("image", "label"),
    patch_size: Optional[Sequence[int]] = None,
    num_classes: Optional[int] = None,
    in_channels: int = 1,
    intensity: Optional[MapTransform] = None,
    orientation: Optional[str] = None,
    pixdim: Optional[Sequence[float]] = None,
    fix_nonfinite: bool = False,
    class_indices: bool = False,
) -> List:
    """Load, check, (reorient, resample,) normalise and pad to the patch.

    Args:
        keys: ``["image", "label"]`` for training/evaluation, ``["image"]`` for inference.
        patch_size: ``[H, W, D]``; volumes smaller than the patch in any axis are padded (inverted after
            inference by ``Invertd``, so predictions are cropped back).
        num_classes: K (background included), for the label-value check and class-balanced cropping.
        intensity: the normalisation transform (MRI z-score ``NormalizeIntensityd`` or CT window
            ``ScaleIntensityRanged``), applied to the image after resampling.
        orientation: e.g. ``"RAS"``; ``None`` keeps the stored orientation.
        pixdim: target spacing for ``Spacingd``; ``None`` keeps voxel space (ACDC).
        class_indices: precompute per-class voxel indices (``label_cls_indices``) for
            ``RandCropByLabelClassesd``, so cached datasets do not recompute them every crop.
    """
    keys = list(keys)
    label_key = "label" if "label" in keys else None
    image_only_modes = ["bilinear" if k == "image" else "nearest" for k in keys]
    xforms: List = [
        NamedLoadImaged(keys=keys, image_only=True),
        EnsureChannelFirstd(keys=keys),
        CheckLoadedCased("image", label_key, num_classes=num_classes, in_channels=in_channels,
                        fix_nonfinite=fix_nonfinite),
    ]
    if orientation:
        xforms.append(Orientationd(keys=keys, axcodes=orientation))
    if pixdim:
        xforms.append(SpacingIgnoringPathsd(keys=keys, pixdim=list(pixdim), mode=image_only_modes))
    if intensity is not None:
        xforms.append(intensity)
    xforms.append(EnsureTyped(keys=keys, dtype=torch.float32, track_meta=True))
    if patch_size is not None:
        xforms.append(SpatialPadd(keys=keys, spatial_size=list(patch_size), mode="constant"))
    if class_indices and label_key:
        if num_classes is None:
            raise ValueError("class_indices=True needs num_classes")
        xforms.append(ClassesToIndicesd(keys=label_key, num_classes=int(num_classes), indices_postfix="_cls_indices"))
    return xforms


__all__ = ["CheckLoadedCased", "NamedLoadImaged", "SpacingIgnoringPathsd", "deterministic_transforms"]
