"""Random anatomy: the MNI152 tissue maps under a random affine, elastic warp, flip and mass effect.

The template is the one the sample generator uses (``nilearn``'s MNI152 2009 GM/WM maps on the 1 mm
BraTS grid, :func:`BrainLesionSAMLib.sample.template_anatomy`); only the helpers are shared, every
random draw here comes from this package's own generators.

A case's output grid has its own voxel size (``SynthesisRanges.spacing_mm``) over a BraTS-like field
of view (240 x 240 x 155 mm). Each output voxel is mapped to a template point by one coordinate map
(affine about the brain centre, plus a smooth elastic displacement, plus the lesions' mass effect),
and the GM / WM fractions and the brain's signed distance are read there by linear interpolation.
The brain-mask edge moves by a random, spatially varying distance (a shrunk or a grown outline: BraTS
skull stripping is not the same everywhere).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from BrainLesionSAMLib.sample import spatial_noise, template_anatomy

from .ranges import SynthesisRanges

FIELD_OF_VIEW_MM = np.array([155.0, 240.0, 240.0])  # z, y, x (BraTS)
_ELASTIC_CELL_MM = 40.0


@functools.lru_cache(maxsize=1)
def template() -> dict[str, np.ndarray]:
    """The 1 mm template arrays [z, y, x]: gm, wm, signed distance to the brain surface (mm, > 0
    inside), and the template's origin (LPS, x y z)."""
    anatomy = template_anatomy(1)
    outside = ndimage.distance_transform_edt(~anatomy.brain).astype(np.float32)
    signed = np.where(anatomy.brain, anatomy.surface_distance, -outside).astype(np.float32)
    zz, yy, xx = np.nonzero(anatomy.brain)
    centre_index = np.array([zz.mean(), yy.mean(), xx.mean()])
    return {"gm": anatomy.gm, "wm": anatomy.wm, "signed_distance": signed,
            "origin_zyx": np.array(anatomy.reference.GetOrigin()[::-1], dtype=np.float64),
            "centre_zyx": centre_index}  # brain centre in template voxel indices (z, y, x)


@dataclass
class Grid:
    """The output grid of a case: voxel size (z, y, x) in mm and shape; origin so that the grid is
    centred on the (moved) brain; identity direction in LPS."""

    spacing_zyx: np.ndarray
    shape: tuple[int, int, int]
    origin_zyx: np.ndarray

    def axes_mm(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable physical coordinates (z, y, x) of the voxel centres relative to the grid centre."""
        out = []
        for axis in range(3):
            n = self.shape[axis]
            values = (np.arange(n, dtype=np.float32) - (n - 1) / 2) * np.float32(self.spacing_zyx[axis])
            shape = [1, 1, 1]
            shape[axis] = n
            out.append(values.reshape(shape))
        return tuple(out)


def draw_grid(rng: np.random.Generator, ranges: SynthesisRanges) -> Grid:
    if rng.random() < ranges.iso_1mm_probability:
        spacing = np.ones(3)
    else:
        spacing = rng.uniform(*ranges.spacing_mm, size=3)
    shape = tuple(int(round(f / s)) for f, s in zip(FIELD_OF_VIEW_MM, spacing))
    origin = -(np.array(shape) - 1) / 2 * spacing
    return Grid(spacing, shape, origin)


def _rotation(angles: np.ndarray) -> np.ndarray:
    a, b, c = np.radians(angles)
    rz = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rx = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


@dataclass
class SpatialTransform:
    """Output physical offset p (mm from the grid centre, z y x) -> template voxel index
    q = centre + M p + elastic(p) (+ mass effect, added by the lesions)."""

    matrix: np.ndarray          # 3 x 3, output mm -> template voxels (1 mm)
    centre: np.ndarray          # template voxel index of the output grid centre
    elastic_amplitude: float
    flip: bool

    @classmethod
    def draw(cls, rng: np.random.Generator, ranges: SynthesisRanges) -> "SpatialTransform":
        rotation = _rotation(rng.uniform(*ranges.rotation_deg, size=3))
        scale = np.diag(rng.uniform(*ranges.scale, size=3))
        shear = np.eye(3)
        shear[np.triu_indices(3, 1)] = rng.uniform(*ranges.shear, size=3)
        forward = rotation @ shear @ scale  # template mm -> output mm
        flip = bool(rng.random() < ranges.flip_probability)
        mirror = np.diag([1.0, 1.0, -1.0 if flip else 1.0])
        inverse = mirror @ np.linalg.inv(forward)
        centre = template()["centre_zyx"] + rng.uniform(-6.0, 6.0, size=3)
        return cls(inverse, centre, float(rng.uniform(*ranges.elastic_mm)), flip)

    def template_point(self, offset_mm: np.ndarray) -> np.ndarray:
        """[..., 3] output offsets (mm) -> template voxel indices, without the elastic part."""
        return self.centre + offset_mm @ self.matrix.T

    def output_offset(self, template_index: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`template_point` (the elastic part is small and left out)."""
        return (np.asarray(template_index, dtype=np.float64) - self.centre) @ np.linalg.inv(self.matrix).T


def coordinate_map(grid: Grid, transform: SpatialTransform, rng: np.random.Generator) -> np.ndarray:
    """[3, Z, Y, X] float32 template voxel indices of every output voxel (affine + elastic)."""
    dz, dy, dx = grid.axes_mm()
    half = float(np.max(FIELD_OF_VIEW_MM)) / 2 + 10.0
    coordinates = np.empty((3,) + grid.shape, np.float32)
    m = transform.matrix.astype(np.float32)
    for axis in range(3):
        coordinates[axis] = np.float32(transform.centre[axis]) + m[axis, 0] * dz + m[axis, 1] * dy + m[axis, 2] * dx
        if transform.elastic_amplitude > 0:
            coordinates[axis] += np.float32(transform.elastic_amplitude) * spatial_noise(
                rng, (dz, dy, dx), _ELASTIC_CELL_MM, half)
    return coordinates


@dataclass
class Tissue:
    """Tissue fractions on the output grid (float32 [Z, Y, X]); brain is bool."""

    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    brain: np.ndarray
    residue: np.ndarray         # voxels the grown mask added beyond the true brain (skull-strip residue)
    depth_mm: np.ndarray        # signed distance to the template brain surface (mm, > 0 inside)


def sample_tissue(coordinates: np.ndarray, grid: Grid, rng: np.random.Generator,
                  ranges: SynthesisRanges) -> Tissue:
    maps = template()
    gm = ndimage.map_coordinates(maps["gm"], coordinates, order=1, mode="constant", cval=0.0)
    wm = ndimage.map_coordinates(maps["wm"], coordinates, order=1, mode="constant", cval=0.0)
    depth = ndimage.map_coordinates(maps["signed_distance"], coordinates, order=1, mode="constant", cval=-50.0)
    # The mask edge: a threshold on the signed distance that varies smoothly over the head.
    low, high = ranges.brain_edge_mm
    edge = rng.uniform(low, high) + 0.6 * spatial_noise(rng, grid.axes_mm(), 30.0, 140.0)
    brain = depth > np.clip(edge, low, high)
    residue = brain & (depth <= 0.0)
    gm = np.where(brain, np.clip(gm, 0, 1), 0).astype(np.float32)
    wm = np.where(brain, np.clip(wm, 0, 1), 0).astype(np.float32)
    total = gm + wm
    over = total > 1.0
    gm[over] /= total[over]
    wm[over] /= total[over]
    csf = np.where(brain & ~residue, np.clip(1.0 - gm - wm, 0.0, 1.0), 0.0).astype(np.float32)
    return Tissue(gm, wm, csf, brain, residue, depth.astype(np.float32))
