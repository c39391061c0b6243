"""One synthetic training case, deterministic by seed: anatomy, lesions, contrast, acquisition.

The order of a case (each stage draws from its own stream of one ``SeedSequence``, so changing
how one stage draws leaves the others' draws unchanged):

1. the output grid (voxel size over a BraTS field of view) and the spatial transform;
2. the lesion plans (their mass effect enters the coordinate map);
3. the tissue fractions read through the coordinate map, the brain mask with its varied edge;
4. the lesion compartments on the output grid (the label map);
5. a smooth random partition of each tissue into two intensity sub-clusters, and enhancing vessels
   (a thin band of a random field inside the CSF, bright on T1CE like real cortical veins and dura);
6. per modality: the class means of :func:`~.contrast.draw_contrast` mixed by the partial-volume
   fractions (lesion edges smoothed by half a voxel), a voxel-wise texture scaled by each class's
   standard deviation, then :func:`~.acquisition.acquire` (its own stream per modality: every
   sequence has its own bias, noise and resolution).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from BrainLesionSAMLib.conventions import MODALITIES
from BrainLesionSAMLib.sample import spatial_noise

from .acquisition import acquire
from .anatomy import Grid, SpatialTransform, coordinate_map, draw_grid, sample_tissue
from .contrast import draw_contrast
from .lesions import LesionMasks, add_mass_effect, draw_lesions, plan_lesions
from .ranges import TRAINING, SynthesisRanges

_STAGES = ("grid", "anatomy", "lesions", "partition", "contrast") + tuple(f"acquire_{m}" for m in MODALITIES)
_SUBCLUSTER_CELL_MM = 35.0
_VESSEL_BAND = 0.12         # |field| below this inside CSF is a vessel: about a tenth of the CSF
_TEXTURE_SMOOTH_VOX = 0.8   # texture = white noise smoothed a little (tissue is not white noise)


@dataclass
class SyntheticCase:
    """Images (raw units) and label map (BraTS 2021 values 0/1/2/4) on one grid, plus what was drawn."""

    images: dict[str, sitk.Image]
    labels: sitk.Image
    info: dict = field(default_factory=dict)


def _streams(seed: int | Sequence[int]) -> dict[str, np.random.Generator]:
    entropy = [int(seed)] if np.isscalar(seed) else [int(s) for s in seed]
    children = np.random.SeedSequence(entropy).spawn(len(_STAGES))
    return {stage: np.random.default_rng(child) for stage, child in zip(_STAGES, children)}


def _class_fractions(tissue, masks: LesionMasks, grid: Grid, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Partial-volume fraction of every contrast class per voxel (they sum to 1 inside the brain)."""
    axes = grid.axes_mm()
    fractions: dict[str, np.ndarray] = {}
    for name, values in (("wm", tissue.wm), ("gm", tissue.gm), ("csf", tissue.csf)):
        share = 1.0 / (1.0 + np.exp(-2.5 * spatial_noise(rng, axes, _SUBCLUSTER_CELL_MM, 140.0)))
        fractions[f"{name}_a"] = values * share
        fractions[f"{name}_b"] = values * (1.0 - share)
    vessels = (np.abs(spatial_noise(rng, axes, 6.0, 140.0)) < _VESSEL_BAND) & (tissue.csf > 0.5)
    vessel = np.where(vessels, fractions["csf_a"] + fractions["csf_b"], 0.0).astype(np.float32)
    for name in ("csf_a", "csf_b"):
        fractions[name] = np.where(vessels, 0.0, fractions[name]).astype(np.float32)
    fractions["vessel"] = vessel
    fractions["residue"] = tissue.residue.astype(np.float32)
    lesion_total = np.zeros(grid.shape, np.float32)
    sigma = 0.5  # voxels: the partial volume of a lesion's outline
    for name in ("necrosis", "solid", "cyst", "edema", "enhancing"):
        mask = getattr(masks, name)
        fractions[name] = (ndimage.gaussian_filter(mask.astype(np.float32), sigma) * tissue.brain
                           if mask.any() else np.zeros(grid.shape, np.float32))
        lesion_total += fractions[name]
    over = lesion_total > 1.0
    for name in ("necrosis", "solid", "cyst", "edema", "enhancing"):
        fractions[name][over] /= lesion_total[over]
    remaining = np.clip(1.0 - lesion_total, 0.0, 1.0)
    for name in ("wm_a", "wm_b", "gm_a", "gm_b", "csf_a", "csf_b", "vessel", "residue"):
        fractions[name] = fractions[name] * remaining
    return fractions


def _signal(fractions: dict[str, np.ndarray], contrast: dict[str, tuple[float, float]], texture: np.ndarray) -> np.ndarray:
    """sum_c f_c * mean_c * (1 + sd_c * texture): noise-free image of one modality."""
    mean = np.zeros(texture.shape, np.float32)
    spread = np.zeros(texture.shape, np.float32)
    for name, fraction in fractions.items():
        m, sd = contrast[name]
        mean += np.float32(m) * fraction
        spread += np.float32(m * sd) * fraction
    return np.maximum(mean + spread * texture, 0.0)


def _texture(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    noise = ndimage.gaussian_filter(rng.standard_normal(shape, dtype=np.float32), _TEXTURE_SMOOTH_VOX)
    return noise / max(float(noise.std()), 1e-6)


def _image(array: np.ndarray, grid: Grid, pixel=None) -> sitk.Image:
    image = sitk.GetImageFromArray(array if pixel is None else array.astype(pixel))
    image.SetSpacing([float(s) for s in grid.spacing_zyx[::-1]])
    image.SetOrigin([float(o) for o in grid.origin_zyx[::-1]])
    return image


def synthesise_case(seed: int | Sequence[int], ranges: SynthesisRanges = TRAINING) -> SyntheticCase:
    """The case of ``seed`` (an int or a tuple of ints, e.g. (run seed, epoch, index)): the same
    seed and ranges give the same voxels on every machine."""
    rng = _streams(seed)
    grid = draw_grid(rng["grid"], ranges)
    transform = SpatialTransform.draw(rng["anatomy"], ranges)
    plans = plan_lesions(rng["lesions"], ranges, transform, grid)
    coordinates = coordinate_map(grid, transform, rng["anatomy"])
    add_mass_effect(coordinates, grid, transform, plans)
    tissue = sample_tissue(coordinates, grid, rng["anatomy"], ranges)
    del coordinates
    masks = draw_lesions(plans, grid, tissue, rng["lesions"])
    labels = masks.labels()
    labels[~tissue.brain] = 0
    fractions = _class_fractions(tissue, masks, grid, rng["partition"])
    contrast = draw_contrast(rng["contrast"], ranges)
    images, acquisition = {}, {}
    for modality in MODALITIES:
        stream = rng[f"acquire_{modality}"]
        signal = _signal(fractions, contrast[modality], _texture(stream, grid.shape))
        raw, acquisition[modality] = acquire(signal, tissue.brain, grid, stream, ranges)
        images[modality] = _image(raw, grid)
    voxel_ml = float(np.prod(grid.spacing_zyx)) / 1000.0
    info = {
        "spacing_zyx": [round(float(s), 3) for s in grid.spacing_zyx], "shape_zyx": list(grid.shape),
        "flip": transform.flip,
        "lesions": [{"kind": p.kind, "location": p.location, "planned_volume_ml": round(p.volume_ml, 3)}
                    for p in plans],
        "volume_ml": {"whole": round(float((labels > 0).sum()) * voxel_ml, 3),
                      "core": round(float(np.isin(labels, (1, 4)).sum()) * voxel_ml, 3),
                      "enhancing": round(float((labels == 4).sum()) * voxel_ml, 3)},
        "acquisition": acquisition,
    }
    return SyntheticCase(images, _image(labels, grid, np.uint8), info)
