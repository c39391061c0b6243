"""Preprocessing with an exact inverse: from the user's volumes to network slices and back.

Steps (BrainSegDMIF section 4.2, SOFA's preprocessing):

1. choose a reference modality (T1CE, then FLAIR, T2, T1) - its grid is the output grid;
2. resample every other modality onto that grid in physical space (SimpleITK, linear), never by
   array resize; a modality that does not overlap the reference, or whose head / brain does not
   fall onto the reference's (not co-registered: :func:`check_coregistered`), is an error;
3. per modality: clip to the 0.5-99.5 percentiles of the brain (non-zero) voxels and min-max scale
   to [0, 255]; voxels outside the brain stay 0;
4. 2D methods: axial slices (array index z of SimpleITK's [z, y, x]) mapped to 256 x 256 by
   :class:`SliceGeometry` (zero padding when smaller, bilinear resize preserving the aspect ratio
   when larger); 3D methods use the [z, y, x] volume on the reference grid directly (patches), or
   resized to their working voxel size (:func:`resize_volume`, ``MethodFacts.working_spacing_mm``)
   and their probabilities resized back.

The inverse (:meth:`SliceGeometry.from_network`, :meth:`PreparedCase.to_reference_image`) maps
predictions back onto the reference grid voxel for voxel: the output has exactly the reference's
size, spacing, origin and direction. Where a slice is at most 256 x 256 the round trip is exact;
a larger slice is resized, so its probabilities are resized back (bilinear) before the argmax.
"""
from __future__ import annotations

import functools
import hashlib
import itertools
import math
import os
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from scipy import ndimage

from .conventions import MODALITIES, MODALITY_DISPLAY_NAMES, REFERENCE_PREFERENCE
from .errors import GeometryError, InputImageError, MissingModalityError
from .io import copy_geometry, read_image, validate_image

SLICE_SIZE = 256
CLIP_PERCENTILES = (0.5, 99.5)
# Co-registration check: resampled onto the reference grid, two modalities' head (or brain) masks
# must overlap with at least this Dice, unless one lies inside the other (skull-stripped vs not).
COREGISTRATION_MIN_DICE = 0.8
COREGISTRATION_MIN_CONTAINED = 0.95
OUTLINE_GRID = 64  # the masks are compared on every n-th voxel, about this many per axis


@dataclass(frozen=True)
class SliceGeometry:
    """How an axial slice of ``height`` x ``width`` voxels maps onto the ``size`` x ``size`` grid.

    Smaller slices are zero-padded (centred); larger ones are first scaled by ``scale`` (< 1, the
    same for both axes so anatomy keeps its aspect ratio) and then padded.
    """

    height: int
    width: int
    size: int = SLICE_SIZE

    @property
    def scale(self) -> float:
        return min(1.0, self.size / max(self.height, self.width))

    @property
    def scaled_shape(self) -> tuple[int, int]:
        if self.scale == 1.0:
            return self.height, self.width
        return (min(self.size, max(1, round(self.height * self.scale))),
                min(self.size, max(1, round(self.width * self.scale))))

    @property
    def padding(self) -> tuple[int, int]:
        """(top, left) zero padding on the network grid."""
        h, w = self.scaled_shape
        return (self.size - h) // 2, (self.size - w) // 2

    def to_network(self, slices: np.ndarray | torch.Tensor, nearest: bool = False) -> torch.Tensor:
        """[N, C, H, W] (or [N, H, W]) -> same on the network grid, float32 (int64 for ``nearest``)."""
        tensor = torch.as_tensor(np.ascontiguousarray(slices) if isinstance(slices, np.ndarray) else slices)
        squeeze = tensor.ndim == 3
        if squeeze:
            tensor = tensor[:, None]
        if tensor.shape[-2:] != (self.height, self.width):
            raise ValueError(f"slices of shape {tuple(tensor.shape[-2:])}, geometry expects "
                             f"{(self.height, self.width)}")
        tensor = tensor.float()
        if self.scale < 1.0:
            mode = "nearest-exact" if nearest else "bilinear"
            extra = {} if nearest else {"align_corners": False}
            tensor = F.interpolate(tensor, size=self.scaled_shape, mode=mode, **extra)
        h, w = self.scaled_shape
        top, left = self.padding
        out = tensor.new_zeros(tensor.shape[:2] + (self.size, self.size))
        out[..., top:top + h, left:left + w] = tensor
        if nearest:
            out = out.round().long()
        return out[:, 0] if squeeze else out

    def from_network(self, maps: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_network` for [N, K, size, size] maps (probabilities or logits)."""
        h, w = self.scaled_shape
        top, left = self.padding
        cropped = maps[..., top:top + h, left:left + w]
        if self.scale < 1.0:
            cropped = F.interpolate(cropped.float(), size=(self.height, self.width), mode="bilinear",
                                    align_corners=False)
        return cropped

    def labels_from_network(self, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
        """[N, size, size] class indices -> [N, H, W] class indices (one-hot through the inverse)."""
        if self.scale == 1.0:
            return self.from_network(labels[:, None])[:, 0]
        onehot = F.one_hot(labels.long(), num_classes).permute(0, 3, 1, 2).float()
        return self.from_network(onehot).argmax(1)

    def box_to_network(self, x0: float, y0: float, x1: float, y1: float) -> tuple[float, float, float, float]:
        """Map a box in slice voxel indices (x = column, y = row, inclusive corners) to network pixels
        (x0, y0, x1, y1), the convention of SAM's prompt encoder (pixel edges, exclusive end)."""
        top, left = self.padding
        s = self.scale
        return (x0 * s + left, y0 * s + top, (x1 + 1) * s + left, (y1 + 1) * s + top)


def working_shape(shape_zyx: tuple[int, ...], spacing_zyx: tuple[float, ...],
                  spacing_mm: float | tuple[float, ...]) -> tuple[int, int, int]:
    """The [z, y, x] shape that covers the field of view of a ``shape_zyx`` grid of ``spacing_zyx`` mm
    with ``spacing_mm`` voxels (one isotropic size - a 3D method's working grid,
    ``MethodFacts.working_spacing_mm`` - or one per axis)."""
    targets = (spacing_mm,) * len(shape_zyx) if isinstance(spacing_mm, (int, float)) else spacing_mm
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape_zyx, spacing_zyx, targets))


def resize_volume(volume: torch.Tensor, shape_zyx: tuple[int, ...], nearest: bool = False) -> torch.Tensor:
    """[B, C, Z, Y, X] resized to ``shape_zyx`` over the same field of view (voxel centres, not
    corners, aligned): trilinear for images and probabilities - halving the grid is then the mean of
    every 2 x 2 x 2 block, and probabilities still sum to 1 -, nearest for label maps."""
    if tuple(volume.shape[-3:]) == tuple(shape_zyx):
        return volume
    if nearest:
        return F.interpolate(volume, size=tuple(shape_zyx), mode="nearest-exact")
    return F.interpolate(volume, size=tuple(shape_zyx), mode="trilinear", align_corners=False)


def choose_reference(available: list[str] | tuple[str, ...]) -> str:
    for key in REFERENCE_PREFERENCE:
        if key in available:
            return key
    raise MissingModalityError("no modality given; give at least one of T1, T1CE, T2, FLAIR")


def _physical_corners(image: sitk.Image) -> list[tuple[float, ...]]:
    size = image.GetSize()
    return [image.TransformContinuousIndexToPhysicalPoint([c - 0.5 for c in corner])
            for corner in itertools.product(*[(0, s) for s in size])]


def check_overlap(moving: sitk.Image, reference: sitk.Image, what: str) -> None:
    """Raise GeometryError when ``moving``'s physical extent misses ``reference``'s grid entirely."""
    indices = np.array([reference.TransformPhysicalPointToContinuousIndex(p)
                        for p in _physical_corners(moving)])
    low, high = indices.min(0), indices.max(0)
    size = np.array(reference.GetSize())
    if np.any(high < -0.5) or np.any(low > size - 0.5):
        raise GeometryError(
            f"{what} does not overlap the reference volume in physical space (origin "
            f"{tuple(round(v, 1) for v in moving.GetOrigin())} vs "
            f"{tuple(round(v, 1) for v in reference.GetOrigin())}); the volumes are probably from "
            "different patients or sessions, or one has a wrong header - check the files")


def resample_to_reference(moving: sitk.Image, reference: sitk.Image, what: str = "image") -> sitk.Image:
    """Linear resampling of ``moving`` onto ``reference``'s grid in physical space (identity if same grid)."""
    if same_grid(moving, reference):
        return moving
    check_overlap(moving, reference, what)
    return sitk.Resample(moving, reference, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)


@dataclass(frozen=True)
class HeadOutline:
    """A volume's head (or, skull-stripped, brain) mask on every ``steps``-th voxel of its grid.

    The mask is the non-zero voxels where at least a tenth of the volume is exactly 0 (skull-stripped
    or masked data: the same brain the preprocessing uses), else the voxels above a tenth of the
    1-99 percentile range; enclosed holes (ventricles) are filled.
    """

    mask: np.ndarray                 # [z, y, x] bool, coarse
    steps: tuple[int, int, int]      # z, y, x

    @classmethod
    def of(cls, array_zyx: np.ndarray) -> "HeadOutline":
        steps = tuple(max(1, math.ceil(n / OUTLINE_GRID)) for n in array_zyx.shape)
        coarse = np.asarray(array_zyx[::steps[0], ::steps[1], ::steps[2]], dtype=np.float32)
        if np.mean(coarse == 0) >= 0.1:
            mask = coarse != 0
        else:
            low, high = np.percentile(coarse, (1, 99))
            mask = coarse > low + 0.1 * (high - low)
        return cls(ndimage.binary_fill_holes(mask), steps)

    def centre_mm(self, image: sitk.Image) -> np.ndarray | None:
        """Physical centre of the mask on ``image``'s grid (the grid it was made on), or None if empty."""
        if not self.mask.any():
            return None
        z, y, x = (np.argwhere(self.mask).mean(0) * self.steps).tolist()
        return np.array(image.TransformContinuousIndexToPhysicalPoint((x, y, z)))


def _field_of_view(moving: sitk.Image, reference: sitk.Image, steps: tuple[int, int, int]) -> np.ndarray:
    """[z, y, x] bool on the coarse reference grid: the points that lie inside ``moving``'s volume."""
    def index_to_physical(image):
        return np.array(image.GetDirection()).reshape(3, 3) @ np.diag(image.GetSpacing())

    size_zyx = tuple(reversed(reference.GetSize()))
    z, y, x = np.meshgrid(*[np.arange(0, n, step) for n, step in zip(size_zyx, steps)], indexing="ij")
    points = index_to_physical(reference) @ np.stack([x.ravel(), y.ravel(), z.ravel()]).astype(np.float64)
    points += np.array(reference.GetOrigin())[:, None]
    indices = np.linalg.solve(index_to_physical(moving), points - np.array(moving.GetOrigin())[:, None])
    inside = np.all((indices >= -0.5) & (indices <= np.array(moving.GetSize())[:, None] - 0.5), axis=0)
    return inside.reshape(x.shape)


def check_coregistered(moving: sitk.Image, on_reference: sitk.Image, reference: sitk.Image,
                       what: str, reference_what: str, reference_outline: HeadOutline | None = None) -> None:
    """Raise GeometryError when ``moving`` (resampled onto the reference grid: ``on_reference``) is not
    co-registered with ``reference``: inside ``moving``'s field of view their head masks overlap with a
    Dice under COREGISTRATION_MIN_DICE and neither lies (almost) inside the other. The message names
    both volumes and how far apart their heads' centres are."""
    reference_outline = reference_outline or HeadOutline.of(sitk.GetArrayViewFromImage(reference))
    steps = reference_outline.steps
    inside = _field_of_view(moving, reference, steps)
    fixed = reference_outline.mask & inside
    resampled = HeadOutline.of(sitk.GetArrayViewFromImage(on_reference)).mask
    if resampled.shape != fixed.shape:  # the coarse grids of the two arrays are the same by construction
        raise ValueError(f"outline shapes differ: {resampled.shape} vs {fixed.shape}")
    resampled &= inside
    sizes = int(fixed.sum()), int(resampled.sum())
    if min(sizes) == 0:
        return  # nothing to compare (no overlap is check_overlap's error; an empty head, normalisation's)
    common = int((fixed & resampled).sum())
    dice = 2 * common / sum(sizes)
    if dice >= COREGISTRATION_MIN_DICE or common / min(sizes) >= COREGISTRATION_MIN_CONTAINED:
        return
    centre, reference_centre = HeadOutline.of(sitk.GetArrayViewFromImage(moving)).centre_mm(moving), \
        reference_outline.centre_mm(reference)
    offset = ""
    if centre is not None and reference_centre is not None:
        dx, dy, dz = (round(float(v), 1) + 0.0 for v in centre - reference_centre)  # + 0.0: no '-0.0'
        offset = (f"; its head's centre is {math.hypot(dx, dy, dz):.1f} mm away from the reference's "
                  f"(x {dx:+.1f}, y {dy:+.1f}, z {dz:+.1f} mm)")
    raise GeometryError(
        f"{what} is not co-registered with the reference {reference_what}: resampled onto the reference "
        f"grid their head masks overlap with Dice {dice:.2f} (at least {COREGISTRATION_MIN_DICE} expected)"
        f"{offset}; register it to the reference first (e.g. Slicer's General Registration (BRAINS)) or "
        "check that both volumes come from the same patient and session")


def same_grid(a: sitk.Image, b: sitk.Image, tolerance: float = 1e-4) -> bool:
    return (a.GetSize() == b.GetSize()
            and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tolerance)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=tolerance)
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=tolerance))


def normalize_intensity(array: np.ndarray, what: str = "image") -> np.ndarray:
    """Percentile clip (0.5-99.5 over non-zero voxels) and min-max scale to [0, 255]; zeros stay 0."""
    brain = array != 0
    values = array[brain]
    if values.size == 0:
        raise InputImageError(f"{what} has no non-zero voxels; it holds no image")
    low, high = np.percentile(values, CLIP_PERCENTILES)
    if high <= low:
        raise InputImageError(f"{what} has (almost) the same value in every brain voxel; "
                              "it holds no usable contrast - check the file")
    out = np.zeros(array.shape, dtype=np.float32)
    out[brain] = (np.clip(values, low, high) - low) * (255.0 / (high - low))
    return out


def slices_with_context(images_czyx: np.ndarray, z_indices: np.ndarray | list[int], context: int = 0
                        ) -> np.ndarray:
    """[N, C * (2 * context + 1), Y, X] float32: for each z, the C channels of axial slices
    z - context, ..., z + context in that order (channel offset * C + c), so the centre slice is the
    block ``context``. Neighbours beyond the volume repeat its first / last slice, as a scanner's
    edge slice would look; the training sampler and the engine both build 2.5D input with this."""
    z_indices = np.asarray(z_indices, dtype=np.int64).reshape(-1)
    depth = images_czyx.shape[1]
    offsets = np.arange(-context, context + 1)
    neighbours = np.clip(z_indices[:, None] + offsets[None], 0, depth - 1)  # [N, 2k + 1]
    slices = np.asarray(images_czyx[:, neighbours.ravel()], dtype=np.float32)  # [C, N * (2k + 1), Y, X]
    channels, _, height, width = slices.shape
    slices = slices.reshape(channels, len(z_indices), len(offsets), height, width)
    return slices.transpose(1, 2, 0, 3, 4).reshape(len(z_indices), len(offsets) * channels, height, width)


@dataclass
class PreparedCase:
    """A case ready for any method: normalised volumes on the reference grid.

    images: [4, Z, Y, X] float32 in [0, 255], channels in ``MODALITIES`` order, zeros where missing.
    available: [4] bool, which channels hold a real modality.
    reference: the reference image (its grid is the output grid; pixel data not used).
    brain_mask: [Z, Y, X] bool, voxels non-zero in any available modality.
    """

    images: np.ndarray
    available: np.ndarray
    reference: sitk.Image
    reference_modality: str
    brain_mask: np.ndarray
    sources: dict[str, str] = field(default_factory=dict)

    @functools.cached_property
    def fingerprint(self) -> str:
        """Digest of the normalised images: identical content, identical cached embeddings."""
        digest = hashlib.blake2b(digest_size=16)
        digest.update(np.ascontiguousarray(self.available).tobytes())
        digest.update(str(self.images.shape).encode())
        digest.update(np.ascontiguousarray(self.images).tobytes())
        return digest.hexdigest()

    @property
    def shape_zyx(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        return tuple(reversed(self.reference.GetSpacing()))

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(m for m, a in zip(MODALITIES, self.available) if a)

    @property
    def slice_geometry(self) -> SliceGeometry:
        _, height, width = self.shape_zyx
        return SliceGeometry(height, width)

    def brain_slices(self) -> np.ndarray:
        """Indices z of axial slices that contain brain."""
        return np.flatnonzero(self.brain_mask.any(axis=(1, 2)))

    def network_slices(self, z_indices: np.ndarray | list[int], context: int = 0) -> torch.Tensor:
        """[N, 4 * (2 * context + 1), 256, 256] network input for the given axial slices: with
        ``context`` (2.5D methods, ``MethodFacts.context_slices``) each slice comes with its
        neighbours z - context .. z + context (see :func:`slices_with_context`)."""
        return self.slice_geometry.to_network(slices_with_context(self.images, z_indices, context))

    def to_reference_image(self, array_zyx: np.ndarray) -> sitk.Image:
        """Wrap a [Z, Y, X] array as an image with exactly the reference's geometry."""
        return copy_geometry(array_zyx, self.reference)


def prepare_case(images: Mapping[str, sitk.Image | str | os.PathLike],
                 reference_modality: str | None = None) -> PreparedCase:
    """Read (if paths), validate, resample onto the reference grid and normalise the given modalities.

    ``images`` maps modality keys ('t1', 't1ce', 't2', 'flair') to images or file paths; any
    non-empty subset is accepted here (whether a method can use it is the method's business).
    """
    unknown = set(images) - set(MODALITIES)
    if unknown:
        raise MissingModalityError(f"unknown modality key(s) {sorted(unknown)}; use {list(MODALITIES)}")
    given = [m for m in MODALITIES if images.get(m) is not None]
    if not given:
        raise MissingModalityError("no modality given; give at least one of T1, T1CE, T2, FLAIR")
    reference_modality = reference_modality or choose_reference(given)
    if reference_modality not in given:
        raise MissingModalityError(
            f"reference modality {MODALITY_DISPLAY_NAMES.get(reference_modality, reference_modality)} "
            "was not given; choose one of the given modalities")

    loaded: dict[str, sitk.Image] = {}
    sources: dict[str, str] = {}
    for key in given:
        value = images[key]
        name = MODALITY_DISPLAY_NAMES[key]
        if isinstance(value, sitk.Image):
            loaded[key] = validate_image(value, name)
            sources[key] = "<in memory>"
        else:
            loaded[key] = read_image(value, name)
            sources[key] = str(value)

    reference = loaded[reference_modality]
    size_zyx = tuple(reversed(reference.GetSize()))
    volumes = np.zeros((len(MODALITIES),) + size_zyx, dtype=np.float32)
    available = np.zeros(len(MODALITIES), dtype=bool)
    reference_what = f"{MODALITY_DISPLAY_NAMES[reference_modality]} ({sources[reference_modality]})"
    reference_outline = HeadOutline.of(sitk.GetArrayViewFromImage(reference)) if len(given) > 1 else None
    for key in given:
        name = MODALITY_DISPLAY_NAMES[key]
        image = resample_to_reference(loaded[key], reference, f"{name} ({sources[key]})")
        if key != reference_modality:
            check_coregistered(loaded[key], image, reference, f"{name} ({sources[key]})", reference_what,
                               reference_outline)
        index = MODALITIES.index(key)
        volumes[index] = normalize_intensity(sitk.GetArrayViewFromImage(image), f"{name} ({sources[key]})")
        available[index] = True
    brain_mask = (volumes[available] > 0).any(axis=0)
    geometry_only = sitk.Image(reference.GetSize(), sitk.sitkUInt8)
    geometry_only.CopyInformation(reference)
    return PreparedCase(volumes, available, geometry_only, reference_modality, brain_mask, sources)
