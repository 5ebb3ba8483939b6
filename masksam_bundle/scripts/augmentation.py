"""nnU-Net's default training augmentation where MONAI has no transform with the same behaviour.

nnU-Net v2 (``nnUNetTrainer.get_training_transforms``) treats thin-slab patches such as ACDC's 4×256×256 as
"dummy 2D": rotation and scaling act in-plane, low-resolution simulation ignores the slice axis. The
configuration in ``configs/train.yaml`` lists the full chain; the pieces MONAI lacks are here:

* :class:`RandAffineCropByLabelClassesd` — class-balanced patch centre (MONAI's ``RandCropByLabelClassesd``
  sampler), then rotation and scaling applied *before* the crop: the patch is resampled straight from the
  whole volume, so its corners hold image content, not zero fill.
* :class:`RandGaussianBlurd` — per-axis sigmas with reflecting borders (MONAI's ``GaussianSmooth`` pads with
  zeros, which pulls the border slices of a 4-slice patch towards 0).
* :class:`RandSimulateLowResolutiond` — nearest down-sampling and linear up-sampling along chosen axes only.
* :class:`RandGammad` — gamma drawn as nnU-Net draws it (half the time below 1, half above) with the
  inverted variant, on MONAI's ``AdjustContrast``.

All spatial shapes are MONAI channel-first ``(C, H, W, D)``; spatial axis indices count from H = 0.
"""

from __future__ import annotations

import math
from typing import Dict, Hashable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import KeysCollection
from monai.networks.layers import gaussian_1d
from monai.transforms import (
    Affine,
    AdjustContrast,
    MapTransform,
    RandCropByLabelClassesd,
    Randomizable,
    RandomizableTransform,
    SpatialCrop,
)
from monai.utils import convert_to_dst_type, ensure_tuple_rep

__all__ = [
    "RandAffineCropByLabelClassesd",
    "RandGaussianBlurd",
    "RandSimulateLowResolutiond",
    "RandGammad",
    "sample_nnunet_factor",
]


def sample_nnunet_factor(rng: np.random.RandomState, low: float, high: float) -> float:
    """nnU-Net's ``BGContrast`` draw: with probability 0.5 uniform in ``[low, 1)`` (when ``low < 1``), otherwise
    uniform in ``[max(low, 1), high)`` — so factors below and above 1 are equally likely."""
    if low < 1 and rng.uniform() < 0.5:
        return float(rng.uniform(low, 1.0))
    return float(rng.uniform(max(low, 1.0), high))


def _rotation_scaling(angle: float, scale: float, axes: Tuple[int, int], ndim: int) -> np.ndarray:
    """``ndim × ndim`` matrix rotating by ``angle`` in the plane of ``axes`` and scaling those axes by ``scale``
    (output coordinates -> input coordinates: ``scale > 1`` samples a larger region, objects look smaller)."""
    m = np.eye(ndim)
    a, b = axes
    c, s = math.cos(angle), math.sin(angle)
    m[a, a], m[a, b], m[b, a], m[b, b] = c * scale, -s * scale, s * scale, c * scale
    return m


class RandAffineCropByLabelClassesd(Randomizable, MapTransform):
    """Class-balanced patch with in-plane rotation and isotropic in-plane scaling applied before the crop.

    For each of ``num_samples`` patches: the centre comes from MONAI's ``RandCropByLabelClassesd`` sampler
    (class ratios, precomputed ``indices_key``); with probability ``prob_rotate`` an angle is drawn uniformly
    from ``rotate_range`` and with probability ``prob_scale`` one factor from ``scale_range`` (uniform; the same
    factor on both in-plane axes, the slice axis is not scaled). If either was drawn, the ``spatial_size`` patch
    is resampled from the whole volume around the centre (MONAI ``Affine``, ``mode`` per key, ``padding_mode``
    only where the rotated patch leaves the volume); otherwise it is cropped exactly as ``SpatialCrop`` would.
    nnU-Net v2 defaults: ``prob_rotate = prob_scale = 0.2``, angle in ``[-pi, pi]``, scale in ``[0.7, 1.4]``.

    Args:
        keys: image and label keys, e.g. ``["image", "label"]``; each ``(C, H, W, D)``.
        label_key: the label the centres are drawn from.
        spatial_size: the patch ``[H, W, D]``.
        num_classes, ratios, indices_key, warn: as ``RandCropByLabelClassesd``.
        num_samples: patches per volume (a list of dicts is returned, as MONAI's crop samplers do).
        rotate_axes: the two spatial axes that span the rotation plane (H, W).
        mode: interpolation per key (``"bilinear"`` for images, ``"nearest"`` keeps labels integer class ids).
    """

    def __init__(
        self,
        keys: KeysCollection,
        label_key: str,
        spatial_size: Sequence[int],
        num_classes: Optional[int] = None,
        ratios: Optional[Sequence[float]] = None,
        indices_key: Optional[str] = None,
        num_samples: int = 1,
        prob_rotate: float = 0.2,
        rotate_range: Tuple[float, float] = (-math.pi, math.pi),
        prob_scale: float = 0.2,
        scale_range: Tuple[float, float] = (0.7, 1.4),
        rotate_axes: Tuple[int, int] = (0, 1),
        mode: Union[str, Sequence[str]] = ("bilinear", "nearest"),
        padding_mode: str = "zeros",
        warn: bool = False,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.spatial_size = [int(s) for s in spatial_size]
        if len(self.spatial_size) != 3 or min(self.spatial_size) < 1:
            raise ValueError(f"spatial_size must be [H, W, D] with positive sizes, got {list(spatial_size)}")
        if len(rotate_axes) != 2 or len(set(rotate_axes)) != 2 or not set(rotate_axes) <= {0, 1, 2}:
            raise ValueError(f"rotate_axes must be two different spatial axes out of (0, 1, 2), got {rotate_axes}")
        if not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"scale_range must be (low, high) with 0 < low <= high, got {scale_range}")
        self.label_key, self.indices_key = label_key, indices_key
        self.num_samples = int(num_samples)
        self.prob_rotate, self.rotate_range = float(prob_rotate), tuple(rotate_range)
        self.prob_scale, self.scale_range = float(prob_scale), tuple(scale_range)
        self.rotate_axes = tuple(int(a) for a in rotate_axes)
        self.mode = ensure_tuple_rep(mode, len(self.keys))
        self.padding_mode = padding_mode
        # MONAI's class-balanced sampler picks the centres (never crops here).
        self.sampler = RandCropByLabelClassesd(
            keys=label_key, label_key=label_key, spatial_size=self.spatial_size, ratios=ratios,
            num_classes=num_classes, num_samples=self.num_samples, indices_key=indices_key, warn=warn,
        )
        self.draws: List[Tuple[float, float]] = []

    def set_random_state(self, seed: Optional[int] = None, state: Optional[np.random.RandomState] = None):
        super().set_random_state(seed, state)
        # a seed of its own: with the same seed, the centre's class draw and the rotation draw would be equal
        self.sampler.set_random_state(seed=int(self.R.randint(np.iinfo(np.int32).max)))
        return self

    def randomize(self, data: Optional[Mapping] = None) -> None:
        """Draw (angle, scale) for each patch; ``(0.0, 1.0)`` where none is applied."""
        self.draws = []
        for _ in range(self.num_samples):
            angle = float(self.R.uniform(*self.rotate_range)) if self.R.uniform() < self.prob_rotate else 0.0
            scale = float(self.R.uniform(*self.scale_range)) if self.R.uniform() < self.prob_scale else 1.0
            self.draws.append((angle, scale))

    def patch_matrix(self, center: Sequence[int], in_shape: Sequence[int], angle: float, scale: float) -> np.ndarray:
        """4×4 matrix from the patch's centred voxel grid to MONAI's centred input grid.

        Patch voxel ``o`` samples input voxel ``center + M (o - size // 2)`` (``M`` = rotation·scale): the crop
        centre voxel (``size // 2``, as ``SpatialCrop`` centres) stays on the sampled ``center`` whatever the
        rotation, and ``M = I`` reproduces the plain crop voxel for voxel."""
        size = np.asarray(self.spatial_size, dtype=np.float64)
        m = np.eye(4)
        m[:3, :3] = _rotation_scaling(angle, scale, self.rotate_axes, 3)
        # MONAI's grids are centred: g = o - (size - 1) / 2 on the output, + (in_shape - 1) / 2 on the input.
        shift = size // 2 - (size - 1) / 2
        m[:3, 3] = np.asarray(center, dtype=np.float64) - m[:3, :3] @ shift - (np.asarray(in_shape) - 1) / 2
        return m

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> List[Dict[Hashable, torch.Tensor]]:
        d = dict(data)
        label = d[self.label_key]
        indices = d.get(self.indices_key) if self.indices_key else None
        self.sampler.randomize(label=label, indices=indices)
        self.randomize()
        in_shape = tuple(label.shape[1:])
        outputs = []
        for center, (angle, scale) in zip(self.sampler.cropper.centers, self.draws):
            out = dict(d)
            for key, mode in self.key_iterator(d, self.mode):
                if tuple(d[key].shape[1:]) != in_shape:
                    raise ValueError(f"{key} has spatial shape {tuple(d[key].shape[1:])}, {self.label_key} has "
                                     f"{in_shape}; both must share the grid the patch centre is drawn on")
                if angle == 0.0 and scale == 1.0:  # nothing to resample: an exact crop
                    out[key] = SpatialCrop(roi_center=center, roi_size=self.spatial_size)(d[key])
                else:
                    affine = self.patch_matrix(center, in_shape, angle, scale)
                    out[key] = Affine(affine=affine, spatial_size=self.spatial_size, mode=mode,
                                      padding_mode=self.padding_mode, image_only=True)(d[key])
            outputs.append(out)
        return outputs


def _blur_axis(img: torch.Tensor, kernel: torch.Tensor, axis: int) -> torch.Tensor:
    """1D convolution of ``img (C, *spatial)`` along spatial ``axis`` with reflecting borders (replicating where
    the axis is too short to reflect the kernel's radius)."""
    radius = (kernel.numel() - 1) // 2
    moved = img.movedim(axis + 1, -1)
    shape = moved.shape
    line = moved.reshape(-1, 1, shape[-1])
    pad_mode = "reflect" if shape[-1] > radius else "replicate"
    line = F.conv1d(F.pad(line, (radius, radius), mode=pad_mode), kernel.view(1, 1, -1).to(line))
    return line.reshape(shape).movedim(-1, axis + 1)


class _RandPerKeyd(RandomizableTransform, MapTransform):
    """One random draw per call (``draw``), applied to every key (``apply``) when the transform fires."""

    def __init__(self, keys: KeysCollection, prob: float, allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)

    def draw(self, data: Mapping) -> None:
        raise NotImplementedError

    def apply(self, key: Hashable, img: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def randomize(self, data: Mapping) -> None:
        super().randomize(None)
        if self._do_transform:
            self.draw(data)

    def __call__(self, data: Mapping) -> Dict:
        d = dict(data)
        self.randomize(d)
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            d[key] = self.apply(key, d[key])
        return d


class RandGaussianBlurd(_RandPerKeyd):
    """Gaussian blur with one sigma per spatial axis, each drawn uniformly from ``sigma_range`` (nnU-Net:
    ``(0.5, 1.0)``, axes independent), reflecting borders. Input ``(C, *spatial)``; all channels alike."""

    def __init__(self, keys: KeysCollection, prob: float = 0.1, sigma_range: Tuple[float, float] = (0.5, 1.0),
                 truncated: float = 3.0, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, prob, allow_missing_keys)
        self.sigma_range, self.truncated = tuple(sigma_range), float(truncated)
        self.sigmas: List[float] = []

    def draw(self, data: Mapping) -> None:
        first = next(self.key_iterator(data), None)
        ndim = data[first].ndim - 1 if first is not None else 0
        self.sigmas = [float(self.R.uniform(*self.sigma_range)) for _ in range(ndim)]

    def apply(self, key: Hashable, img: torch.Tensor) -> torch.Tensor:
        out = torch.as_tensor(img).float()
        for axis, sigma in enumerate(self.sigmas):
            kernel = gaussian_1d(torch.tensor(sigma), truncated=self.truncated)
            out = _blur_axis(out, kernel / kernel.sum(), axis)  # sums to 1: a constant image stays constant
        return _like(img, out)


class RandSimulateLowResolutiond(_RandPerKeyd):
    """Simulate a coarser acquisition along ``axes`` only: down-sample by a factor from ``zoom_range`` (the same
    on every listed axis; nearest-exact), then up-sample back (linear). nnU-Net: zoom ``(0.5, 1.0)``; for
    thin-slab ("dummy 2D") patches the slice axis is left alone, so ``axes = (0, 1)`` (H, W)."""

    def __init__(self, keys: KeysCollection, prob: float = 0.125, zoom_range: Tuple[float, float] = (0.5, 1.0),
                 axes: Sequence[int] = (0, 1), allow_missing_keys: bool = False) -> None:
        super().__init__(keys, prob, allow_missing_keys)
        self.zoom_range, self.axes = tuple(zoom_range), tuple(int(a) for a in axes)
        self.zoom = 1.0

    def draw(self, data: Mapping) -> None:
        self.zoom = float(self.R.uniform(*self.zoom_range))

    def apply(self, key: Hashable, img: torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(img).float()
        spatial = tuple(x.shape[1:])
        if len(spatial) not in (2, 3) or max(self.axes) >= len(spatial):
            raise ValueError(f"{key}: low-resolution axes {self.axes} need a (C, H, W[, D]) image, got "
                             f"{tuple(x.shape)}")
        low = [max(1, round(s * self.zoom)) if a in self.axes else s for a, s in enumerate(spatial)]
        small = F.interpolate(x[None], size=low, mode="nearest-exact")
        up = F.interpolate(small, size=spatial, mode="bilinear" if len(spatial) == 2 else "trilinear",
                           align_corners=False)
        return _like(img, up[0])


class RandGammad(_RandPerKeyd):
    """Gamma ``((x - min) / range) ** gamma * range + min`` with mean and std kept (MONAI ``AdjustContrast``);
    gamma drawn as nnU-Net draws it (:func:`sample_nnunet_factor`, range ``(0.7, 1.5)``). ``invert_image``
    applies it to ``-x`` (nnU-Net's inverted gamma, probability 0.1; the plain one has 0.3)."""

    def __init__(self, keys: KeysCollection, prob: float = 0.3, gamma: Tuple[float, float] = (0.7, 1.5),
                 invert_image: bool = False, retain_stats: bool = True, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, prob, allow_missing_keys)
        if not 0 < gamma[0] <= gamma[1]:
            raise ValueError(f"gamma must be (low, high) with 0 < low <= high, got {gamma}")
        self.gamma = tuple(gamma)
        self.adjust = AdjustContrast(gamma=1.0, invert_image=invert_image, retain_stats=retain_stats)
        self.gamma_value = 1.0

    def draw(self, data: Mapping) -> None:
        self.gamma_value = sample_nnunet_factor(self.R, *self.gamma)

    def apply(self, key: Hashable, img: torch.Tensor) -> torch.Tensor:
        return self.adjust(img, gamma=self.gamma_value)


def _like(reference, values: torch.Tensor):
    """``values`` with the type, dtype (and MetaTensor metadata) of ``reference``."""
    return convert_to_dst_type(values, reference)[0]
