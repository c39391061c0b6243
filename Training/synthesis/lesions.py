"""Random lesions: 0-4 per case, 0.1-500 ml, anywhere in the brain, every compartment optional.

A lesion is planned first (place, size, type, how far its oedema reaches) so that its mass effect
can enter the anatomy's coordinate map; then it is drawn on the output grid:

- place: a template voxel of a location class - deep white matter, cortex, periventricular,
  infratentorial (cerebellum / brain stem), the midline (corpus callosum: a butterfly lesion
  crossing the hemispheres) or anywhere - mapped through the case's spatial transform;
- size: whole-lesion volume log-uniform; the core takes a random share of the radius (the rest is
  oedema), from a core-only lesion to a small core in a large oedema (metastasis-like);
- shape: a radius that varies with direction (random low-order lobes) and with position (a smooth
  3D field: infiltrative, lobulated outlines); the oedema reaches further along white matter than
  into grey matter, and not into CSF;
- compartments (BraTS 2021 labels, ``TYPES``): a necrotic centre in an enhancing rim; solid
  enhancing; non-enhancing solid tumour (label 1 without ET); a cyst with or without an enhancing
  rim; patchy enhancement in a non-enhancing core. Label 1 keeps what it is made of (necrosis, solid
  tumour or cyst fluid) in ``LesionMasks`` so that the contrast model can give each its own signal.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from BrainLesionSAMLib.sample import direction_function, evaluate_coarse, spatial_noise

from .anatomy import Grid, SpatialTransform, Tissue, template
from .ranges import SynthesisRanges

TYPES = ("necrotic_rim", "solid_enhancing", "non_enhancing", "cystic", "patchy")
_TYPE_PROBABILITIES = (0.35, 0.15, 0.2, 0.12, 0.18)
LOCATIONS = ("deep_white_matter", "cortical", "periventricular", "infratentorial", "midline", "anywhere")
_LOCATION_PROBABILITIES = (0.3, 0.15, 0.15, 0.12, 0.08, 0.2)
_MAX_MASS_EFFECT = 0.55  # k < 1 keeps the displacement one-to-one (as the sample generator's)


@dataclass
class LesionPlan:
    kind: str
    location: str
    centre_offset_mm: np.ndarray   # z, y, x from the output grid centre
    radius_mm: float               # whole lesion (volume-equivalent sphere)
    core_fraction: float           # core radius / whole radius (1: no oedema)
    irregularity: float
    infiltration: float
    rim_mm: float
    mass_effect: float
    volume_ml: float


@functools.lru_cache(maxsize=1)
def _location_candidates() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per location class: flat template indices (1 mm MNI152 on the BraTS grid) and how deep in
    the brain each lies (mm)."""
    maps = template()
    gm, wm, depth = maps["gm"], maps["wm"], maps["signed_distance"]
    brain = depth > 0
    csf = np.clip(1 - gm - wm, 0, 1) * brain
    wm_smooth = ndimage.gaussian_filter(wm, 3.0)
    z_mni = maps["origin_zyx"][0] + np.arange(gm.shape[0])
    x_lps = maps["origin_zyx"][2] + np.arange(gm.shape[2])
    ventricles = (ndimage.gaussian_filter(csf, 1.5) > 0.6) & (depth > 18)
    near_ventricles = ndimage.distance_transform_edt(~ventricles) if ventricles.any() else np.full(gm.shape, 99.0)
    low = (z_mni < -18)[:, None, None]
    masks = {
        "deep_white_matter": (wm_smooth > 0.6) & (depth > 12) & ~low,
        "cortical": (gm > 0.45) & (depth > 1.5) & (depth < 12) & ~low,
        "periventricular": (near_ventricles >= 2) & (near_ventricles <= 8) & (wm > 0.3),
        "infratentorial": low & (depth > 4) & ((gm + wm) > 0.5),
        "midline": (np.abs(x_lps) < 3)[None, None, :] & (wm_smooth > 0.5) & (depth > 8),
        "anywhere": depth > 3,
    }
    candidates = {}
    for name, mask in masks.items():
        indices = np.flatnonzero(mask)
        candidates[name] = (indices, depth.ravel()[indices])
    return candidates


def _centre_candidates(candidates: dict[str, tuple[np.ndarray, np.ndarray]], location: str,
                       radius_mm: float) -> np.ndarray:
    """Template voxels of ``location`` at least half the lesion's radius deep in the brain.

    Without this a large lesion centred just under the cortex is mostly cut off by the brain mask
    (v3 before this rule: 400 ml planned at a cortical place, 193 ml drawn; 262 ml infratentorial,
    49 ml drawn), and the largest tumours the range asks for would never be seen whole. Where the
    class has no voxel that deep (a 300 ml lesion in the cortex or the brain stem) the centre moves
    inward, to any voxel that deep, as a large cortical glioblastoma's centre lies in the white matter.
    """
    indices, depths = candidates[location]
    deep = indices[depths >= 0.5 * radius_mm]
    if deep.size == 0:
        indices, depths = candidates["anywhere"]
        deep = indices[depths >= min(0.5 * radius_mm, float(depths.max()))]
    return deep


def plan_lesions(rng: np.random.Generator, ranges: SynthesisRanges, transform: SpatialTransform,
                 grid: Grid) -> list[LesionPlan]:
    if rng.random() < ranges.healthy_probability:
        return []
    count = int(rng.integers(max(1, ranges.lesion_count[0]), ranges.lesion_count[1] + 1))
    count = 1 if rng.random() < 0.6 else count  # most tumours come alone
    candidates = _location_candidates()
    shape = template()["gm"].shape
    plans = []
    for _ in range(count):
        location = str(rng.choice(LOCATIONS, p=_LOCATION_PROBABILITIES))
        volume = float(math.exp(rng.uniform(math.log(ranges.volume_ml[0]), math.log(ranges.volume_ml[1]))))
        if count > 1:
            volume = min(volume, 80.0)  # several lesions: metastasis-like sizes
        radius = (3 * volume * 1000 / (4 * math.pi)) ** (1 / 3)
        centres = _centre_candidates(candidates, location, radius)
        index = np.array(np.unravel_index(int(rng.choice(centres)), shape), dtype=np.float64)
        offset = transform.output_offset(index)
        half_fov = (np.array(grid.shape) - 1) / 2 * grid.spacing_zyx
        offset = np.clip(offset, -half_fov + 2, half_fov - 2)
        has_edema = rng.random() < 0.85
        plans.append(LesionPlan(
            kind=str(rng.choice(TYPES, p=_TYPE_PROBABILITIES)), location=location, centre_offset_mm=offset,
            radius_mm=radius, core_fraction=float(rng.uniform(0.25, 0.85)) if has_edema else 1.0,
            irregularity=float(rng.uniform(0.05, 0.45)), infiltration=float(rng.uniform(0.0, 0.35)),
            rim_mm=float(rng.uniform(1.5, 6.0)),
            mass_effect=float(rng.uniform(0, _MAX_MASS_EFFECT)) if radius > 12 and rng.random() < 0.7 else 0.0,
            volume_ml=volume))
    return plans


def add_mass_effect(coordinates: np.ndarray, grid: Grid, transform: SpatialTransform,
                    plans: list[LesionPlan]) -> None:
    """Push the anatomy away from each large lesion's centre (in place): the output voxel at offset d
    from the centre shows the template at d (1 - k exp(-|d|^2 / 2 R^2)), R the core radius."""
    matrix = transform.matrix.astype(np.float32)
    for plan in plans:
        if plan.mass_effect <= 0:
            continue
        core = plan.radius_mm * plan.core_fraction
        box = _box(grid, plan.centre_offset_mm, 3.5 * core)
        dz, dy, dx = _offsets(grid, box, plan.centre_offset_mm)
        shrink = np.float32(plan.mass_effect) * np.exp(-(dz * dz + dy * dy + dx * dx) / np.float32(2 * core * core))
        for axis in range(3):
            coordinates[(axis,) + box] -= shrink * (matrix[axis, 0] * dz + matrix[axis, 1] * dy + matrix[axis, 2] * dx)


def _box(grid: Grid, centre_mm: np.ndarray, half_mm: float) -> tuple[slice, ...]:
    centre = centre_mm / grid.spacing_zyx + (np.array(grid.shape) - 1) / 2
    half = np.ceil(half_mm / grid.spacing_zyx).astype(int) + 1
    return tuple(slice(max(0, int(round(c)) - h), min(n, int(round(c)) + h + 1))
                 for c, h, n in zip(centre, half, grid.shape))


def _offsets(grid: Grid, box: tuple[slice, ...], centre_mm: np.ndarray) -> tuple[np.ndarray, ...]:
    """Broadcastable (dz, dy, dx) mm from the lesion centre over ``box``."""
    axes = []
    for axis, s in enumerate(box):
        n = grid.shape[axis]
        values = ((np.arange(s.start, s.stop) - (n - 1) / 2) * grid.spacing_zyx[axis] - centre_mm[axis])
        shape = [1, 1, 1]
        shape[axis] = values.size
        axes.append(values.astype(np.float32).reshape(shape))
    return tuple(axes)


@dataclass
class LesionMasks:
    """bool [Z, Y, X] per compartment; label 1 is necrosis | solid | cyst."""

    necrosis: np.ndarray
    solid: np.ndarray
    cyst: np.ndarray
    edema: np.ndarray
    enhancing: np.ndarray

    def labels(self) -> np.ndarray:
        """BraTS 2021 labels: 1 NCR (necrosis, non-enhancing solid tumour, cyst), 2 ED, 4 ET."""
        labels = np.zeros(self.edema.shape, np.uint8)
        labels[self.edema] = 2
        labels[self.necrosis | self.solid | self.cyst] = 1
        labels[self.enhancing] = 4
        return labels


def draw_lesions(plans: list[LesionPlan], grid: Grid, tissue: Tissue, rng: np.random.Generator) -> LesionMasks:
    empty = functools.partial(np.zeros, grid.shape, bool)
    masks = LesionMasks(empty(), empty(), empty(), empty(), empty())
    for plan in plans:
        _draw_one(plan, grid, tissue, rng, masks)
    return masks


def _draw_one(plan: LesionPlan, grid: Grid, tissue: Tissue, rng: np.random.Generator, masks: LesionMasks) -> None:
    core_radius = plan.radius_mm * plan.core_fraction
    reach = plan.radius_mm - core_radius
    outer = core_radius * (1 + 1.6 * plan.irregularity) * (1 + plan.infiltration) + 1.8 * reach + 4.0
    box = _box(grid, plan.centre_offset_mm, outer)
    dz, dy, dx = _offsets(grid, box, plan.centre_offset_mm)
    r = np.sqrt(dz * dz + dy * dy + dx * dx)
    lobes = direction_function(rng, 10, (1.0, 4.0))
    bumps = direction_function(rng, 12, (4.0, 9.0))

    def shape(z, y, x):
        length = np.maximum(np.sqrt(z * z + y * y + x * x), np.float32(1e-6))
        unit = (z / length, y / length, x / length)
        return (np.clip(lobes(unit) + 0.25 * bumps(unit), -1.6, 1.6),)

    (variation,) = evaluate_coarse(shape, (dz, dy, dx))
    field = spatial_noise(rng, (dz, dy, dx), max(3.0, core_radius / 2), outer + 4)
    radius = core_radius * (1 + plan.irregularity * variation) * (1 + plan.infiltration * np.clip(field, -2, 2) / 2)
    brain = tissue.brain[box]
    core = (r <= np.maximum(radius, 0.5 * core_radius)) & brain
    if not core.any():  # a tiny lesion between voxels: its centre voxel
        centre = tuple(int(np.argmin(np.abs(a.ravel()))) for a in (dz, dy, dx))
        core[centre] = brain[centre]
    inner_depth = ndimage.distance_transform_edt(core, sampling=grid.spacing_zyx)

    sub = {name: getattr(masks, name)[box] for name in ("necrosis", "solid", "cyst", "edema", "enhancing")}
    if plan.kind == "necrotic_rim":
        centre_part = inner_depth > plan.rim_mm
        sub["necrosis"] |= centre_part
        sub["enhancing"] |= core & ~centre_part
    elif plan.kind == "solid_enhancing":
        sub["enhancing"] |= core
    elif plan.kind == "non_enhancing":
        sub["solid"] |= core
    elif plan.kind == "cystic":
        rim = min(plan.rim_mm, 3.0) / 2
        centre_part = inner_depth > rim
        sub["cyst"] |= centre_part
        (sub["enhancing"] if rng.random() < 0.5 else sub["solid"])[core & ~centre_part] = True
    else:  # patchy enhancement in a non-enhancing core
        patches = spatial_noise(rng, (dz, dy, dx), max(2.0, core_radius / 3), outer + 4)
        enhancing = core & (patches > rng.uniform(-0.3, 0.8))
        sub["enhancing"] |= enhancing
        sub["solid"] |= core & ~enhancing
    if reach > 0:
        # Oedema follows white matter (reach x 1), less grey matter (x 0.35), no CSF; only the part
        # connected to the core, plus a thin shell that always wraps it.
        along = ndimage.gaussian_filter(tissue.wm[box] + 0.35 * tissue.gm[box], 1.0)
        noise = spatial_noise(rng, (dz, dy, dx), 10.0, outer + 4)
        limit = reach * along * np.clip(1 + 0.4 * noise, 0.2, 2.0) * 1.6
        outside = ndimage.distance_transform_edt(~core, sampling=grid.spacing_zyx)
        edema = ((outside <= limit) | (outside <= 1.0)) & brain & ~core
        components, _ = ndimage.label(edema | core)
        touching = np.unique(components[core])
        sub["edema"] |= edema & np.isin(components, touching[touching > 0])
    # A later lesion's core wins over an earlier lesion's oedema (and the other way round).
    lesion_core = sub["necrosis"] | sub["solid"] | sub["cyst"] | sub["enhancing"]
    sub["edema"] &= ~lesion_core
