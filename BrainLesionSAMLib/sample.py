"""BraTS-like four-modality sample cases (T1, T1CE, T2, FLAIR + labels) built on real anatomy.

The anatomy is the MNI152 2009c (ICBM 152 nonlinear symmetric) template that ``nilearn`` ships with
its grey-matter and white-matter probability maps, loaded with nilearn's own loaders (no download).
CSF is what the brain mask holds beyond GM and WM. Everything outside the brain is zero, as in the
skull-stripped BraTS images.

The grid is the BraTS one: 240 x 240 x 155 voxels at 1 mm (``resolution=1``) or 120 x 120 x 78 at
2 mm (``resolution=2``), identity direction in SimpleITK's LPS world (what SimpleITK reads from a
BraTS NIfTI file). The origin is chosen so that **physical coordinates are MNI152 coordinates in
LPS**: the SimpleITK point (x, y, z) is MNI (RAS) point (-x, -y, z). The brain is centred in x and y;
the lowest 5 mm of the brain stem fall below the 155 mm field of view (BraTS crops there too).

A case is made in five steps, each vectorised with numpy / scipy.ndimage:

1. tissue fractions (GM, WM, CSF; partial volume, summing to 1 inside the brain) on the grid;
2. mass effect (optional): a smooth radial displacement pushes GM and WM away from the tumour
   centre, compressing sulci and ventricles;
3. tumour labels: an irregular core (a sphere whose radius varies with direction by random
   low-order harmonics scaled by ``irregularity``) made of a necrotic centre (NCR) inside an
   enhancing rim (ET) at least 3 mm (and 2 voxels) thick, wrapped in peritumoral oedema (ED) that
   reaches ``edema_extent_mm`` beyond the core along white matter, about a third of that into grey
   matter, and never into CSF (beyond a thin shell that always wraps the core);
4. intensities: every voxel is the partial-volume sum of its fractions times the value of each
   tissue and tumour compartment in ``CONTRAST`` (relative to white matter, times ``WM_LEVEL``), with
   a gentle texture inside the lesion;
5. acquisition: a smooth multiplicative bias field (``exp(bias * g)``, ``|g| <= 1``) and Rician
   noise of standard deviation ``noise`` x white-matter level, independently per modality.

Every random draw comes from the seed, so the same parameters give bit-identical arrays. Centre,
shapes, texture and bias fields are drawn in millimetres, so a seed gives the same tumour at 1 mm and
at 2 mm (up to voxelisation; the noise differs).
"""
from __future__ import annotations

import functools
import math
import os
import shutil
import uuid
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .conventions import BACKGROUND, ED, ET, MODALITIES, NCR, from_brats2021
from .errors import BrainLesionSAMError, OutputPathError
from .io import write_image

__all__ = [
    "SAMPLE_CASE_SEED", "STUDY_SEEDS_FROM", "CONTRAST", "WM_LEVEL", "GRID_SIZES", "SampleParameters",
    "SampleParameterError", "CaseExistsError", "reference_grid", "case_seed", "generate_case",
    "write_case", "generate_cases",
]

# The seed of "the embedded sample case" the demo segments (SampleParameters.random(SAMPLE_CASE_SEED)).
SAMPLE_CASE_SEED = 7
# Seeds below this belong to the demo, the tests and the docs; the phantom study (benchmarks/), and
# so the packaged unet2d weights that come from its run, trains and tests on seeds from here on.
STUDY_SEEDS_FROM = 20_000

# BraTS grid per resolution (mm): size in SimpleITK (x, y, z) order.
GRID_SIZES: dict[int, tuple[int, int, int]] = {1: (240, 240, 155), 2: (120, 120, 78)}
# MNI152 (RAS, mm) of the grid: x and y centred on the brain; the lowest slice at z = -67 mm, so the
# brain (z from -72 to 82 mm in the template) loses its lowest 5 mm of brain stem and keeps 5 mm of
# empty margin above the vertex.
_BRAIN_CENTRE_RAS_XY = (0.0, -17.0)
_LOWEST_SLICE_RAS_Z = -67.0

# Signal of each compartment relative to normal white matter, per modality. Chosen from the usual
# appearance of glioblastoma on clinical 1.5/3 T sequences:
#  - T1 (spin echo / MPRAGE): WM > GM > CSF; water-rich tissue has long T1 and is dark, so necrosis
#    is nearly as dark as CSF and oedema slightly hypointense; the active rim is iso-/hypointense.
#  - T1CE: T1 after gadolinium. Only where the blood-brain barrier is broken (the enhancing rim)
#    does T1 shorten strongly: a very bright rim; necrosis stays dark, oedema nearly iso.
#  - T2: long T2 of free water: CSF brightest, necrosis and oedema equally bright (T2 alone cannot
#    tell them apart), GM > WM; the cellular rim is only intermediate, about grey matter (a dark ring between necrosis and
#    oedema).
#  - FLAIR: T2 weighting with the free-water (CSF) signal nulled: CSF dark, oedema brightest
#    (bound, not free, water), GM > WM, the rim about grey matter and necrosis close to brain tissue.
# So the rim is distinct only on T1CE, the oedema only on T2/FLAIR, the necrosis on T1CE/T2: no
# single modality separates all three sub-regions, as in real BraTS data.
CONTRAST: dict[str, dict[str, float]] = {
    #          tissue                              tumour
    "t1":    {"wm": 1.00, "gm": 0.72, "csf": 0.28, "ncr": 0.36, "et": 0.80, "ed": 0.80},
    "t1ce":  {"wm": 1.00, "gm": 0.74, "csf": 0.29, "ncr": 0.34, "et": 1.75, "ed": 0.88},
    "t2":    {"wm": 1.00, "gm": 1.35, "csf": 2.60, "ncr": 2.00, "et": 1.25, "ed": 2.00},
    "flair": {"wm": 1.00, "gm": 1.25, "csf": 0.28, "ncr": 1.10, "et": 1.20, "ed": 1.85},
}
# Normal white-matter signal per modality (arbitrary scanner units, of the order of BraTS files).
WM_LEVEL: dict[str, float] = {"t1": 700.0, "t1ce": 650.0, "t2": 300.0, "flair": 350.0}

_MIN_RIM_MM = 3.0          # enhancing rim at least this thick (and at least 2 voxels)
_MIN_EDEMA_SHELL_MM = 2.0  # oedema always wraps the core at least this thick (and 1 voxel)
_MASS_EFFECT_STRENGTH = 0.6  # k in r_source = r (1 - k exp(-r^2 / 2R^2)); k < 1 keeps it one-to-one
_LESION_TEXTURE = 0.06     # relative amplitude of the smooth texture inside the lesion
_BIAS_CELL_MM = 60.0       # the bias field varies over ~60 mm: a few smooth bumps across the head


class SampleParameterError(BrainLesionSAMError, ValueError):
    """A sample-case parameter is out of range (the message says which and the allowed values)."""


class CaseExistsError(OutputPathError):
    """The case folder exists already and overwriting was not asked for."""


@dataclass(frozen=True)
class SampleParameters:
    """Everything that defines one generated case; the same parameters give bit-identical images.

    seed: the random seed (int >= 0) of everything random: the centre when ``centre`` is None, the
        tumour's shape, the oedema's reach, the texture, the bias fields and the noise.
    centre: None for a random place in the white matter of a cerebral hemisphere, far enough from
        the brain surface for the tumour; else the tumour centre as a **physical point in mm** of the
        generated images (SimpleITK LPS, as ``image.TransformIndexToPhysicalPoint`` gives; equal to
        MNI152 coordinates with x and y negated). It must lie inside the brain.
    radius_mm: mean radius of the tumour core (NCR + ET), 3 to 60 mm.
    irregularity: 0 (a sphere) to 0.6; the relative size of the radius's random variation.
    necrosis_fraction: this fraction (0 to 0.9) of the core's volume is necrotic, the rest is the
        enhancing rim (0 gives a solid enhancing tumour without label 1); less when the rim's minimum
        thickness (3 mm, 2 voxels) leaves too little room in a small core.
    edema_extent_mm: how far the oedema reaches beyond the core in white matter (about a third in
        grey matter, not into CSF); 0 leaves only the thin shell that always wraps the core.
    mass_effect: push the surrounding tissue away from the tumour (True) or not (False).
    noise: standard deviation of the Rician noise as a fraction of the white-matter signal (0 to 0.5).
    bias: strength of the multiplicative bias field: it stays within exp(-bias)..exp(bias) (0 to 1).
    resolution: 1 (1 mm, 240 x 240 x 155) or 2 (2 mm, 120 x 120 x 78).
    label_convention: 'brats2021' (ET = 4) or 'brats2023' (ET = 3).
    """

    seed: int = 0
    centre: tuple[float, float, float] | None = None
    radius_mm: float = 22.0
    irregularity: float = 0.3
    necrosis_fraction: float = 0.35
    edema_extent_mm: float = 15.0
    mass_effect: bool = True
    noise: float = 0.03
    bias: float = 0.15
    resolution: int = 1
    label_convention: str = "brats2021"

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise SampleParameterError(f"seed must be an integer >= 0, not {self.seed!r}")
        object.__setattr__(self, "seed", int(self.seed))
        if self.centre is not None:
            centre = tuple(float(c) for c in self.centre)
            if len(centre) != 3 or not all(math.isfinite(c) for c in centre):
                raise SampleParameterError(
                    "centre must be None or three finite millimetre coordinates (x, y, z), "
                    f"not {self.centre!r}")
            object.__setattr__(self, "centre", centre)
        ranges = {"radius_mm": (3.0, 60.0), "irregularity": (0.0, 0.6), "necrosis_fraction": (0.0, 0.9),
                  "edema_extent_mm": (0.0, 60.0), "noise": (0.0, 0.5), "bias": (0.0, 1.0)}
        for name, (low, high) in ranges.items():
            value = getattr(self, name)
            if not isinstance(value, (int, float, np.number)) or not low <= float(value) <= high:
                raise SampleParameterError(f"{name} must be a number from {low} to {high}, not {value!r}")
            object.__setattr__(self, name, float(value))
        object.__setattr__(self, "mass_effect", bool(self.mass_effect))
        if self.resolution not in GRID_SIZES:
            raise SampleParameterError(
                f"resolution must be 1 (1 mm, 240x240x155) or 2 (2 mm, 120x120x78), not {self.resolution!r}")
        object.__setattr__(self, "resolution", int(self.resolution))
        if self.label_convention not in ("brats2021", "brats2023"):
            raise SampleParameterError(
                "label_convention must be 'brats2021' (ET = 4) or 'brats2023' (ET = 3), "
                f"not {self.label_convention!r}")

    @classmethod
    def random(cls, seed: int, resolution: int = 1, **overrides) -> "SampleParameters":
        """Realistic random tumour parameters derived from ``seed`` alone (deterministic).

        Radius 15-35 mm, irregularity 0.15-0.45, necrosis 15-55 % of the core, oedema 6-25 mm,
        mass effect in three cases out of four, noise 2-5 %, bias 0.05-0.3; the centre is drawn by
        ``generate_case`` (``centre=None``). ``overrides`` replace any of these fields.
        """
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise SampleParameterError(f"seed must be an integer >= 0, not {seed!r}")
        rng = np.random.default_rng([int(seed), 0x5A3E])
        drawn = dict(
            radius_mm=round(float(rng.uniform(15.0, 35.0)), 2),
            irregularity=round(float(rng.uniform(0.15, 0.45)), 3),
            necrosis_fraction=round(float(rng.uniform(0.15, 0.55)), 3),
            edema_extent_mm=round(float(rng.uniform(6.0, 25.0)), 2),
            mass_effect=bool(rng.random() < 0.75),
            noise=round(float(rng.uniform(0.02, 0.05)), 4),
            bias=round(float(rng.uniform(0.05, 0.3)), 3),
        )
        unknown = set(overrides) - {f.name for f in fields(cls)}
        if unknown:
            raise SampleParameterError(f"unknown sample parameter(s) {sorted(unknown)}; "
                                       f"known: {[f.name for f in fields(cls)]}")
        drawn.update(overrides)
        return cls(seed=int(seed), resolution=resolution, **drawn)


def case_seed(seed: int, index: int) -> int:
    """The seed of case ``index`` of ``generate_cases(..., seed=seed)`` (a hash of both, < 2**31)."""
    state = np.random.SeedSequence([int(seed), int(index), 0xCA5E]).generate_state(1, dtype=np.uint32)
    return int(state[0] >> 1)


def reference_grid(resolution: int = 1) -> sitk.Image:
    """An empty (uint8) image with the geometry of generated cases at ``resolution`` mm."""
    if resolution not in GRID_SIZES:
        raise SampleParameterError(f"resolution must be 1 or 2, not {resolution!r}")
    size = GRID_SIZES[resolution]
    spacing = float(resolution)
    image = sitk.Image(size, sitk.sitkUInt8)
    image.SetSpacing((spacing,) * 3)
    image.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    # LPS x = -RAS x, LPS y = -RAS y: centre the grid on the brain's (x, y) centre.
    origin_x = -_BRAIN_CENTRE_RAS_XY[0] - (size[0] - 1) / 2 * spacing
    origin_y = -_BRAIN_CENTRE_RAS_XY[1] - (size[1] - 1) / 2 * spacing
    image.SetOrigin((origin_x, origin_y, _LOWEST_SLICE_RAS_Z))
    return image


@dataclass(frozen=True)
class _Anatomy:
    """Tissue fractions on the BraTS grid, arrays [z, y, x] (read-only: cached and shared)."""

    gm: np.ndarray
    wm: np.ndarray
    brain: np.ndarray           # bool
    surface_distance: np.ndarray  # mm to the nearest voxel outside the brain
    wm_smooth: np.ndarray       # WM fraction smoothed over ~4 mm, for choosing tumour centres
    reference: sitk.Image


def _nilearn_image_to_sitk(nifti) -> sitk.Image:
    """nilearn (RAS, array [x, y, z]) -> SimpleITK (LPS, array [z, y, x]) with the same world."""
    data = np.asarray(nifti.get_fdata(), dtype=np.float32)
    affine = np.asarray(nifti.affine, dtype=float)
    image = sitk.GetImageFromArray(np.ascontiguousarray(data.transpose(2, 1, 0)))
    ras_to_lps = np.diag([-1.0, -1.0, 1.0])
    matrix = ras_to_lps @ affine[:3, :3]
    spacing = np.linalg.norm(matrix, axis=0)
    image.SetSpacing(tuple(float(s) for s in spacing))
    image.SetDirection(tuple(float(v) for v in (matrix / spacing).ravel()))
    image.SetOrigin(tuple(float(v) for v in ras_to_lps @ affine[:3, 3]))
    return image


@functools.lru_cache(maxsize=2)
def _anatomy(resolution: int) -> _Anatomy:
    """Load the MNI152 template's tissue maps with nilearn and resample them onto the BraTS grid.

    A 2 mm voxel averages about 2 x 2 x 2 template voxels: the 1 mm maps are smoothed with the
    Gaussian that brings a 1 mm box's variance to a 2 mm box's (sigma = sqrt((4 - 1) / 12) = 0.5 mm)
    before linear resampling.
    """
    from nilearn import datasets

    reference = reference_grid(resolution)
    spacing = float(resolution)
    maps = {}
    for name, loader in (("gm", datasets.load_mni152_gm_template), ("wm", datasets.load_mni152_wm_template),
                         ("brain", datasets.load_mni152_brain_mask)):
        image = _nilearn_image_to_sitk(loader(resolution=1))
        if name == "brain":  # the T1 threshold leaves a few voxels of the ventricles out: fill them
            filled = ndimage.binary_fill_holes(sitk.GetArrayViewFromImage(image) > 0.5).astype(np.float32)
            image = _with_geometry(filled, image)
        if spacing > 1:
            image = sitk.SmoothingRecursiveGaussian(image, math.sqrt((spacing ** 2 - 1) / 12.0))
        resampled = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        maps[name] = sitk.GetArrayFromImage(resampled)
    brain = maps["brain"] >= 0.5
    gm = np.clip(maps["gm"], 0.0, 1.0) * brain
    wm = np.clip(maps["wm"], 0.0, 1.0) * brain
    total = gm + wm
    over = total > 1.0
    gm[over] /= total[over]
    wm[over] /= total[over]
    surface_distance = ndimage.distance_transform_edt(brain, sampling=spacing).astype(np.float32)
    wm_smooth = ndimage.gaussian_filter(wm, 4.0 / spacing).astype(np.float32)
    arrays = dict(gm=gm.astype(np.float32), wm=wm.astype(np.float32), brain=brain,
                  surface_distance=surface_distance, wm_smooth=wm_smooth)
    for array in arrays.values():
        array.setflags(write=False)
    return _Anatomy(reference=reference, **arrays)


def _with_geometry(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    return image


def _choose_centre(params: SampleParameters, rng: np.random.Generator) -> tuple[float, float, float]:
    """A physical point (LPS mm) in the white matter of a cerebral hemisphere, away from the surface.

    Candidates: smoothed WM fraction > 0.5, |MNI x| >= 10 mm + 0.4 radius (in one hemisphere), MNI z
    from -5 to 55 mm (cerebrum, above the tentorium), and at least the radius (plus half its
    irregularity) plus 3 mm from the brain surface; when no voxel is that deep, the deepest such voxels.
    Always drawn among the voxels of the 2 mm grid, so a seed puts the tumour at the same place at
    either resolution.
    """
    anatomy = _anatomy(2)
    origin = anatomy.reference.GetOrigin()
    spacing = anatomy.reference.GetSpacing()[0]
    shape = anatomy.brain.shape
    z_mm = origin[2] + spacing * np.arange(shape[0])
    x_lps = origin[0] + spacing * np.arange(shape[2])
    region = (anatomy.wm_smooth > 0.5)
    region &= ((z_mm >= -5.0) & (z_mm <= 55.0))[:, None, None]
    region &= (np.abs(x_lps) >= 10.0 + 0.4 * params.radius_mm)[None, None, :]
    depth = anatomy.surface_distance
    needed = params.radius_mm * (1.0 + 0.5 * params.irregularity) + 3.0
    candidates = np.flatnonzero(region & (depth >= needed))
    if candidates.size == 0:
        deepest = float(depth[region].max())
        candidates = np.flatnonzero(region & (depth >= 0.9 * deepest))
    z, y, x = np.unravel_index(candidates[rng.integers(candidates.size)], shape)
    return anatomy.reference.TransformIndexToPhysicalPoint((int(x), int(y), int(z)))


def _direction_function(rng: np.random.Generator, n_modes: int, frequencies: tuple[float, float]
                        ) -> Callable[[tuple[np.ndarray, ...]], np.ndarray]:
    """A smooth random function of direction (of unit vectors): a sum of cosines of u . v_k.

    Low frequencies give low-order lobes like spherical harmonics of degree 1-4; the sum is
    normalised to unit standard deviation (each random-phase cosine has variance 1/2).
    """
    directions = rng.normal(size=(n_modes, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    omegas = rng.uniform(*frequencies, size=n_modes)
    phases = rng.uniform(0, 2 * np.pi, size=n_modes)
    amplitudes = rng.normal(size=n_modes)
    amplitudes /= math.sqrt(0.5 * float(np.sum(amplitudes ** 2)))

    def evaluate(unit: tuple[np.ndarray, ...]) -> np.ndarray:
        total = np.zeros(unit[0].shape, np.float32)
        for v, omega, phase, amplitude in zip(directions, omegas, phases, amplitudes):
            projection = unit[0] * np.float32(v[0]) + unit[1] * np.float32(v[1]) + unit[2] * np.float32(v[2])
            total += np.float32(amplitude) * np.cos(np.float32(omega) * projection + np.float32(phase))
        return total

    return evaluate


def _linear_interpolation_matrix(fine: np.ndarray, coarse: np.ndarray) -> np.ndarray:
    """Matrix M with M @ values(coarse) = linear interpolation of the values at ``fine``."""
    position = np.interp(fine, coarse, np.arange(coarse.size, dtype=np.float64))  # coarse.size >= 2
    low = np.minimum(np.floor(position).astype(int), coarse.size - 2)
    weight = position - low
    matrix = np.zeros((fine.size, coarse.size), np.float32)
    rows = np.arange(fine.size)
    matrix[rows, low] = 1 - weight
    matrix[rows, low + 1] += weight
    return matrix


def _evaluate_coarse(function: Callable[..., tuple[np.ndarray, ...]], axes_mm: tuple[np.ndarray, ...],
                     step_mm: float = 2.0) -> tuple[np.ndarray, ...]:
    """Evaluate smooth fields ``function(dz, dy, dx)`` on a lattice of ``step_mm`` and interpolate
    them linearly onto the (finer) box ``axes_mm``: the cosines of the shape functions are the
    costly part of a case and vary over centimetres, not millimetres."""
    fine = [np.asarray(a, dtype=np.float64).ravel() for a in axes_mm]
    if min(float(np.diff(f).min()) if f.size > 1 else step_mm for f in fine) >= step_mm:
        return function(*axes_mm)
    coarse = [np.linspace(f[0], f[-1], max(2, int(math.ceil((f[-1] - f[0]) / step_mm)) + 1)) for f in fine]
    shaped = [c.astype(np.float32).reshape([-1 if i == axis else 1 for i in range(3)])
              for axis, c in enumerate(coarse)]
    matrices = [_linear_interpolation_matrix(f, c) for f, c in zip(fine, coarse)]
    results = []
    for field in function(*shaped):
        field = np.tensordot(matrices[0], field, axes=(1, 0))
        field = np.tensordot(field, matrices[1], axes=(1, 1))
        field = np.tensordot(field, matrices[2], axes=(1, 1))
        results.append(np.ascontiguousarray(field, dtype=np.float32))
    return tuple(results)


def _spatial_noise(rng: np.random.Generator, points_mm: tuple[np.ndarray, ...], cell_mm: float,
                   half_extent_mm: float) -> np.ndarray:
    """A smooth random 3D field of zero mean and unit standard deviation.

    ``points_mm`` are (z, y, x) coordinates in mm as broadcastable 1D axes, within
    ``half_extent_mm`` of 0. The field is a sum of Gaussian bumps of width ``cell_mm`` on the lattice
    ``cell_mm * k`` (k integer, |k cell| <= half extent + 2 cells) with standard-normal weights:
    smooth, without grid artefacts, and anchored in mm, so the same seed gives the same field at
    any resolution. Separable: three small matrix products instead of a filter over the volume.
    With width = lattice step, sum_k exp(-(t - k)^2) = sqrt(pi) for every t (to 1e-4), so the
    variance is pi^(3/2) everywhere and the normalisation is a constant, not a data statistic.
    """
    count = int(math.ceil(half_extent_mm / cell_mm)) + 2
    nodes = cell_mm * np.arange(-count, count + 1, dtype=np.float64)
    kernels = [np.exp(-0.5 * ((np.asarray(p, np.float64).ravel()[:, None] - nodes[None, :]) / cell_mm) ** 2)
               for p in points_mm]
    weights = rng.standard_normal((nodes.size,) * 3)
    field = np.tensordot(kernels[0], weights, axes=(1, 0))            # (z, ny, nx)
    field = np.tensordot(field, kernels[1], axes=(1, 1))              # (z, nx, y)
    field = np.tensordot(field, kernels[2], axes=(1, 1))              # (z, y, x)
    return (field / math.pi ** 0.75).astype(np.float32)


def _box(centre: np.ndarray, half_mm: float, spacing: float, shape: tuple[int, ...]) -> tuple[slice, ...]:
    half = int(math.ceil(half_mm / spacing)) + 1
    return tuple(slice(max(0, int(round(c)) - half), min(n, int(round(c)) + half + 1))
                 for c, n in zip(centre, shape))


def _offsets_mm(box: tuple[slice, ...], centre: np.ndarray, spacing: float) -> tuple[np.ndarray, ...]:
    """Broadcastable (dz, dy, dx) in mm from ``centre`` (voxel z, y, x) over ``box``."""
    axes = []
    for axis, (s, c) in enumerate(zip(box, centre)):
        values = ((np.arange(s.start, s.stop) - c) * spacing).astype(np.float32)
        shape = [1, 1, 1]
        shape[axis] = values.size
        axes.append(values.reshape(shape))
    return tuple(axes)


def _apply_mass_effect(gm: np.ndarray, wm: np.ndarray, brain: np.ndarray, centre: np.ndarray,
                       radius_mm: float, spacing: float) -> None:
    """Push tissue away from ``centre`` (in place): the tissue shown at distance r came from
    r (1 - k exp(-r^2 / 2R^2)). With k = 0.6 the boundary of the core (r = R) shows what lay at
    0.64 R, so the tissue between is pushed outwards, most within 2 R, nothing beyond 3.5 R; k < 1
    keeps the mapping one-to-one and smooth. The brain outline does not move (the skull holds it):
    GM and WM are resampled, CSF is recomputed as what is left, so sulci and ventricles near the
    tumour are compressed."""
    box = _box(centre, 3.5 * radius_mm, spacing, gm.shape)
    dz, dy, dx = _offsets_mm(box, centre, spacing)
    r2 = dz * dz + dy * dy + dx * dx
    shrink = np.float32(_MASS_EFFECT_STRENGTH) * np.exp(-r2 / np.float32(2 * radius_mm ** 2))
    moving = (shrink > 1e-3) & brain[box]
    index = np.nonzero(moving)
    factor = 1.0 - shrink[moving]
    starts = np.array([s.start for s in box], dtype=np.float32)
    coordinates = np.empty((3, index[0].size), np.float32)
    for axis in range(3):
        voxel = index[axis].astype(np.float32) + starts[axis]
        coordinates[axis] = centre[axis] + (voxel - centre[axis]) * factor
    for tissue in (gm, wm):
        sub = tissue[box]
        sub[moving] = ndimage.map_coordinates(tissue, coordinates, order=1, mode="nearest")
    total = gm[box] + wm[box]
    over = total > 1.0
    gm[box][over] /= total[over]
    wm[box][over] /= total[over]


def _tumour_labels(params: SampleParameters, centre: np.ndarray, gm: np.ndarray, wm: np.ndarray,
                   brain: np.ndarray, rng_shape: np.random.Generator, rng_edema: np.random.Generator
                   ) -> tuple[np.ndarray, tuple[slice, ...], float]:
    """BraTS labels (2021 numbering) inside a box around the tumour; returns (labels, box, the box's
    half extent in mm from the centre)."""
    spacing = float(params.resolution)
    radius = params.radius_mm
    irregularity = params.irregularity
    outer = radius * (1 + 1.6 * irregularity)
    half_extent = outer + 1.6 * params.edema_extent_mm + 3 * _MIN_EDEMA_SHELL_MM + 4.0
    box = _box(centre, half_extent, spacing, brain.shape)
    dz, dy, dx = _offsets_mm(box, centre, spacing)
    r = np.sqrt(dz * dz + dy * dy + dx * dx)

    # Core: radius R(u) = R (1 + irregularity (n_low(u) + 0.25 n_high(u))), clipped to stay positive.
    # The necrosis gets its own, milder shape so that the rim's thickness varies around the core.
    lobes = _direction_function(rng_shape, 10, (1.0, 4.0))
    bumps = _direction_function(rng_shape, 12, (4.0, 9.0))
    necrotic_lobes = _direction_function(rng_shape, 8, (1.0, 5.0))

    def shapes(z, y, x):
        length = np.maximum(np.sqrt(z * z + y * y + x * x), np.float32(1e-6))
        unit = (z / length, y / length, x / length)
        return (np.clip(lobes(unit) + 0.25 * bumps(unit), -1.6, 1.6),
                np.clip(necrotic_lobes(unit), -1.6, 1.6))

    variation, necrotic_shape = _evaluate_coarse(shapes, (dz, dy, dx))
    core_radius = radius * (1 + irregularity * variation)
    core = (r <= core_radius) & brain[box]

    # Necrosis: a level set of r / R_n(u), where R_n has its own (milder) shape so the rim's
    # thickness varies, inside the core eroded by the minimum rim thickness; the level is the one
    # that makes necrosis_fraction of the core's voxels necrotic (or all the eroded core if smaller).
    necrosis = np.zeros_like(core)
    if params.necrosis_fraction > 0:
        rim_voxels = max(2, int(math.ceil(_MIN_RIM_MM / spacing)))
        inner = ndimage.binary_erosion(core, _BALL, iterations=rim_voxels)
        level = r / (core_radius * (1 + 0.5 * irregularity * necrotic_shape))
        candidates = level[inner]
        wanted = int(round(params.necrosis_fraction * np.count_nonzero(core)))
        if wanted >= candidates.size:
            necrosis = inner
        elif wanted > 0:
            threshold = np.partition(candidates, wanted - 1)[wanted - 1]
            necrosis = inner & (level <= threshold)

    # Oedema: reach beyond the core scaled by the tissue (WM 1, GM 1/3, CSF 0) and a smooth random
    # field, plus a thin shell that always wraps the core; only the part connected to the core.
    points = (dz, dy, dx)
    reach_noise = _spatial_noise(rng_edema, points, 12.0, half_extent + 2 * spacing)
    tissue = ndimage.gaussian_filter(wm[box] + gm[box] / 3.0, 1.0 / spacing)
    reach = params.edema_extent_mm * tissue * np.clip(1 + 0.35 * (1 + irregularity) * reach_noise, 0.2, 2.0)
    beyond = r - core_radius  # radial distance beyond the core's surface (>= the true distance)
    shell_voxels = max(1, int(math.ceil(_MIN_EDEMA_SHELL_MM / spacing)))
    shell = ndimage.binary_dilation(core, _BALL, iterations=shell_voxels)
    edema = (shell | ((beyond >= 0) & (beyond <= reach))) & brain[box]
    components, _ = ndimage.label(edema | core)
    touching = np.unique(components[core])
    edema &= np.isin(components, touching[touching > 0])

    labels = np.zeros(core.shape, np.uint8)
    labels[edema] = ED
    labels[core] = ET
    labels[necrosis] = NCR
    return labels, box, half_extent + 2 * spacing


_BALL = ndimage.generate_binary_structure(3, 2)  # 18-connected: a rounder step than the 6-cross


def generate_case(params: SampleParameters) -> dict[str, sitk.Image]:
    """Generate one case: keys 't1', 't1ce', 't2', 'flair' (float32, >= 0, zero outside the brain)
    and 'seg' (uint8, in ``params.label_convention``), all on the same BraTS grid."""
    if not isinstance(params, SampleParameters):
        raise TypeError(f"generate_case takes SampleParameters, not {type(params).__name__}")
    anatomy = _anatomy(params.resolution)
    spacing = float(params.resolution)
    reference = anatomy.reference
    brain = anatomy.brain
    # Independent streams per purpose: switching mass_effect (say) changes nothing else.
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence([params.seed, 0xB2A1]).spawn(4)]
    rng_centre, rng_shape, rng_edema, rng_acquisition = streams

    physical_centre = params.centre if params.centre is not None else _choose_centre(params, rng_centre)
    centre = np.array(reference.TransformPhysicalPointToContinuousIndex(physical_centre))[::-1]
    nearest = tuple(int(round(i)) for i in centre)
    if not all(0 <= i < n for i, n in zip(nearest, brain.shape)) or not brain[nearest]:
        raise SampleParameterError(
            f"centre {params.centre} (mm, LPS) is outside the brain; give a physical point inside "
            "it (MNI152 coordinates with x and y negated) or None for a random place")

    gm = anatomy.gm.copy()
    wm = anatomy.wm.copy()
    if params.mass_effect:
        _apply_mass_effect(gm, wm, brain, centre, params.radius_mm, spacing)
    csf = np.clip(brain.astype(np.float32) - gm - wm, 0.0, 1.0)

    lesion, box, box_extent_mm = _tumour_labels(params, centre, gm, wm, brain, rng_shape, rng_edema)
    labels = np.zeros(brain.shape, np.uint8)
    labels[box] = lesion

    # Partial volume at the lesion's borders: each compartment's fraction is its smoothed indicator.
    sigma = 0.5  # voxels
    weights = {name: ndimage.gaussian_filter((lesion == value).astype(np.float32), sigma)
               for name, value in (("ncr", NCR), ("et", ET), ("ed", ED))}
    lesion_weight = weights["ncr"] + weights["et"] + weights["ed"]
    dz, dy, dx = _offsets_mm(box, centre, spacing)
    texture = 1 + _LESION_TEXTURE * _spatial_noise(rng_shape, (dz, dy, dx), 3.0, box_extent_mm)

    inside = np.nonzero(brain)
    grid_mm = tuple(o + spacing * np.arange(n, dtype=np.float64)  # physical (LPS) mm, z y x
                    for o, n in zip(reference.GetOrigin()[::-1], brain.shape))
    images: dict[str, sitk.Image] = {}
    for key in MODALITIES:
        values = CONTRAST[key]
        relative = values["gm"] * gm + values["wm"] * wm + values["csf"] * csf
        sub = relative[box]
        tumour = (values["ncr"] * weights["ncr"] + values["et"] * weights["et"]
                  + values["ed"] * weights["ed"]) * texture
        relative[box] = (1 - lesion_weight) * sub + tumour
        signal = relative[inside] * np.float32(WM_LEVEL[key])
        if params.bias > 0:
            field = _spatial_noise(rng_acquisition, grid_mm, _BIAS_CELL_MM, 160.0)[inside]
            field /= max(float(np.abs(field).max()), 1e-6)
            signal *= np.exp(np.float32(params.bias) * field)
        if params.noise > 0:
            sd = np.float32(params.noise * WM_LEVEL[key])
            real = signal + sd * rng_acquisition.standard_normal(signal.size, dtype=np.float32)
            imaginary = sd * rng_acquisition.standard_normal(signal.size, dtype=np.float32)
            signal = np.sqrt(real * real + imaginary * imaginary)  # Rician magnitude
        volume = np.zeros(brain.shape, np.float32)
        volume[inside] = signal
        images[key] = _with_geometry(volume, reference)
    labels[~brain] = BACKGROUND
    seg = _with_geometry(from_brats2021(labels, params.label_convention).astype(np.uint8), reference)
    images["seg"] = seg
    return images


def write_case(images: dict[str, sitk.Image], out_dir: str | os.PathLike, case_id: str,
               overwrite: bool = False) -> Path:
    """Write a case in the BraTS 2021 layout: ``<out_dir>/<case_id>/<case_id>_{t1,t1ce,t2,flair,seg}.nii.gz``.

    The files are written into a hidden temporary folder beside the case folder, which is renamed
    into place only when all five are written, so a failure leaves nothing half-written. An existing
    case folder raises ``CaseExistsError`` unless ``overwrite=True``. Returns the case folder.
    """
    keys = (*MODALITIES, "seg")
    missing = [k for k in keys if k not in images]
    if missing:
        raise ValueError(f"write_case needs images for {keys}; missing {missing}")
    if not case_id or any(sep in case_id for sep in ("/", "\\")) or case_id in (".", ".."):
        raise OutputPathError(f"case id {case_id!r} is not a usable folder name; use letters, digits, '_' or '-'")
    out_dir = Path(out_dir)
    case_dir = out_dir / case_id
    if case_dir.exists() and not overwrite:
        raise CaseExistsError(f"case folder {case_dir} exists already; choose another output folder or "
                              "case id, or allow overwriting (--overwrite on the command line, overwrite=True in Python)")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputPathError(
            f"cannot create output folder {out_dir} ({error.strerror}); choose another path") from None
    if not os.access(out_dir, os.W_OK):
        raise OutputPathError(f"output folder {out_dir} is not writable; choose another path")
    # Hidden names (discover_case skips them); os.mkdir, unlike mkdtemp, honours the umask.
    temporary = out_dir / f".{case_id}.{uuid.uuid4().hex}.part"
    temporary.mkdir()
    try:
        for key in keys:
            write_image(images[key], temporary / f"{case_id}_{key}.nii.gz")
        if case_dir.exists():
            old = out_dir / f".{case_id}.{uuid.uuid4().hex}.old"
            os.replace(case_dir, old)
            os.replace(temporary, case_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(temporary, case_dir)
    finally:
        if temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)
    return case_dir


def generate_cases(out_dir: str | os.PathLike, n: int, seed: int = 0, resolution: int = 1,
                   progress: Callable[[float, str], None] | None = None, overwrite: bool = False,
                   **overrides) -> list[Path]:
    """Generate and write ``n`` cases ``BLSAM_{seed:04d}_{i:03d}`` into ``out_dir``.

    Case i is ``generate_case(SampleParameters.random(case_seed(seed, i), resolution, **overrides))``:
    random but realistic parameters per case; ``overrides`` (e.g. ``label_convention='brats2023'``,
    ``noise=0``) fix any of them for every case. Existing case folders are refused before anything is
    generated unless ``overwrite=True``. ``progress(fraction, message)`` is called before each case
    and at the end. Returns the case folders.
    """
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise SampleParameterError(f"the number of cases must be an integer >= 1, not {n!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise SampleParameterError(f"seed must be an integer >= 0, not {seed!r}")
    progress = progress or (lambda fraction, message: None)
    out_dir = Path(out_dir)
    case_ids = [f"BLSAM_{seed:04d}_{i:03d}" for i in range(n)]
    if not overwrite:
        existing = [c for c in case_ids if (out_dir / c).exists()]
        if existing:
            raise CaseExistsError(f"case folder(s) {', '.join(existing)} exist already in {out_dir}; choose "
                                  "another output folder or seed, or allow overwriting (overwrite=True)")
    # Check every parameter before the first (slow) case.
    parameters = [SampleParameters.random(case_seed(seed, i), resolution=resolution, **overrides)
                  for i in range(n)]
    paths = []
    for i, (case_id, params) in enumerate(zip(case_ids, parameters)):
        progress(i / n, f"case {i + 1}/{n}: {case_id}")
        paths.append(write_case(generate_case(params), out_dir, case_id, overwrite=overwrite))
    progress(1.0, f"wrote {n} case{'s' if n > 1 else ''}")
    return paths


# Anatomy helpers the training synthesiser (Training/synthesis) shares; it draws its own randomness.
template_anatomy = _anatomy
spatial_noise = _spatial_noise
direction_function = _direction_function
evaluate_coarse = _evaluate_coarse
