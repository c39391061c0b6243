"""Lesion-wise Dice and HD95 by the rules of the BraTS 2023 challenge (glioma task, BraTS-GLI), with
the per-lesion detection counts.

Per region (WT, TC, ET; or the single lesion), on the binary masks P (prediction) and G (truth):

1. Lesions. G's connected components (26-connectivity) that fall into one connected component of
   G dilated ``dilation_iterations`` times (3; each time with the 18-connected 3x3x3 structuring
   element, SciPy's ``generate_binary_structure(3, 2)``) are one ground-truth lesion: lesions closer
   than the dilation are merged.
2. Matching. A predicted component (26-connectivity) matches every lesion whose own dilation (the
   same structuring element and iterations) it touches. The lesion is a true positive (TP) when
   at least one component matches it, else a false negative (FN); a predicted component that
   matches no lesion is a false positive (FP).
3. Per lesion. Dice and HD95 between the lesion and the union of the components matching it. A
   missed lesion scores Dice 0 and HD95 ``missed_hd95_mm`` (374).
4. Small lesions. A lesion of ``volume_threshold_mm3`` (50 mm^3) or less is left out of the scores
   and of the TP/FN counts; the components it matches are still not false positives.
5. Scores. With L the lesions above the threshold and F the false positives,
   ``lesion_dice = sum(Dice over L) / (|L| + |F|)`` and
   ``lesion_hd95_mm = (sum(HD95 over L) + 374 * |F|) / (|L| + |F|)``; with no lesion in L and no
   false positive (nothing to find, nothing found) Dice 1 and HD95 0.

HD95 of a pair is the 95th percentile (linear interpolation) of the boundary distances of both
directions pooled, in mm with the voxel spacing: what the official ``brats-evaluation`` package
(panoptica) computes, with the boundary of ``metrics`` (voxels a 6-connected erosion removes). The
BraTS 2023 scripts took DeepMind's surface-distance HD95 instead (surfel-area weighted, the larger of
the two directed percentiles): on the 69 matched lesions of the test's shared 1 mm cases the two
differ by 0.17 mm in the median and 0.55 mm at most, more where one side has distant outliers. The
global ``hd95_mm`` of ``metrics`` is MONAI's directed maximum and differs in the same way.

Matching, counts and scores are checked against an independent transcription of the BraTS 2023
algorithm and, on cases where the 2023 rules and brats-evaluation's one-to-one matching coincide,
against brats-evaluation itself (Testing/test_lesion_metrics.py).

Arrays are [z, y, x]; ``spacing_zyx`` is the reverse of SimpleITK's ``GetSpacing()``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import ndimage

BRATS2023_DILATION_ITERATIONS = 3
BRATS2023_VOLUME_THRESHOLD_MM3 = 50.0
BRATS2023_MISSED_HD95_MM = 374.0

# Per-structure columns, after the overlap and surface metrics: '<structure>_lesion_dice', ...
LESION_METRIC_NAMES: tuple[str, ...] = ("lesion_dice", "lesion_hd95_mm", "lesion_tp", "lesion_fn", "lesion_fp")
# The structures scored lesion-wise, per label set (BraTS scores its three regions).
LESION_STRUCTURES: dict[str, tuple[str, ...]] = {"brats": ("WT", "TC", "ET"), "lesion": ("lesion",)}

_COMPONENTS = ndimage.generate_binary_structure(3, 3)   # 26-connectivity
_DILATION = ndimage.generate_binary_structure(3, 2)     # 18-connected element of the challenge
_EROSION = ndimage.generate_binary_structure(3, 1)      # boundary: what a 6-connected erosion removes


@dataclass(frozen=True)
class LesionScore:
    """One ground-truth lesion: its size, how many predicted components matched it, Dice, HD95."""

    voxels: int
    volume_mm3: float
    matched_components: int
    dice: float
    hd95_mm: float
    counted: bool  # above the volume threshold: part of the scores and counts


@dataclass(frozen=True)
class LesionWiseResult:
    lesions: tuple[LesionScore, ...]
    false_positives: int
    missed_hd95_mm: float = BRATS2023_MISSED_HD95_MM

    @property
    def counted(self) -> list[LesionScore]:
        return [lesion for lesion in self.lesions if lesion.counted]

    @property
    def true_positives(self) -> int:
        return sum(lesion.matched_components > 0 for lesion in self.counted)

    @property
    def false_negatives(self) -> int:
        return sum(lesion.matched_components == 0 for lesion in self.counted)

    @property
    def dice(self) -> float:
        denominator = len(self.counted) + self.false_positives
        return 1.0 if denominator == 0 else sum(lesion.dice for lesion in self.counted) / denominator

    @property
    def hd95_mm(self) -> float:
        denominator = len(self.counted) + self.false_positives
        if denominator == 0:
            return 0.0
        return (sum(lesion.hd95_mm for lesion in self.counted) + self.missed_hd95_mm * self.false_positives) / denominator

    def as_dict(self) -> dict[str, float]:
        """{name: value} for ``LESION_METRIC_NAMES`` (counts as floats, like every CSV value)."""
        return {"lesion_dice": float(self.dice), "lesion_hd95_mm": float(self.hd95_mm),
                "lesion_tp": float(self.true_positives), "lesion_fn": float(self.false_negatives),
                "lesion_fp": float(self.false_positives)}


def pooled_hd95(pred: np.ndarray, gt: np.ndarray, spacing_zyx: Sequence[float]) -> float:
    """95th percentile of the boundary distances of both directions pooled (mm); both masks non-empty."""
    spacing = np.asarray(spacing_zyx, dtype=np.float64)
    pred_boundary = pred ^ ndimage.binary_erosion(pred, structure=_EROSION)
    gt_boundary = gt ^ ndimage.binary_erosion(gt, structure=_EROSION)
    gt_to_pred = ndimage.distance_transform_edt(~pred_boundary, sampling=spacing)[gt_boundary]
    pred_to_gt = ndimage.distance_transform_edt(~gt_boundary, sampling=spacing)[pred_boundary]
    return float(np.percentile(np.concatenate([gt_to_pred, pred_to_gt]), 95))


def _grown(box: tuple[slice, ...], margin: int, shape: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(max(s.start - margin, 0), min(s.stop + margin, n)) for s, n in zip(box, shape))


def _union(boxes: list[tuple[slice, ...]]) -> tuple[slice, ...]:
    return tuple(slice(min(b[axis].start for b in boxes), max(b[axis].stop for b in boxes))
                 for axis in range(len(boxes[0])))


def lesion_wise(pred: np.ndarray, gt: np.ndarray, spacing_zyx: Sequence[float],
                dilation_iterations: int = BRATS2023_DILATION_ITERATIONS,
                volume_threshold_mm3: float = BRATS2023_VOLUME_THRESHOLD_MM3,
                missed_hd95_mm: float = BRATS2023_MISSED_HD95_MM) -> LesionWiseResult:
    """BraTS 2023 lesion-wise scores of one binary mask pair (see the module docstring).

    Args:
        pred, gt: [z, y, x] masks of one shape (non-zero is foreground).
        spacing_zyx: voxel size in mm along the array axes.
        dilation_iterations: dilations that merge nearby lesions and widen the matching (3; 0: none).
        volume_threshold_mm3: lesions of at most this volume are not scored (50).
        missed_hd95_mm: HD95 of a missed lesion and of a false positive (374).
    """
    pred = np.asarray(pred) != 0
    gt = np.asarray(gt) != 0
    if pred.shape != gt.shape or pred.ndim != 3:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} must be 3D masks of one shape")
    spacing = tuple(float(s) for s in spacing_zyx)
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing_zyx must be 3 positive numbers (mm, array order), got {spacing_zyx!r}")
    if dilation_iterations < 0:
        raise ValueError(f"dilation_iterations must be >= 0, got {dilation_iterations}")
    voxel_volume = float(np.prod(spacing))

    pred_components, n_pred = ndimage.label(pred, structure=_COMPONENTS)
    if dilation_iterations:
        grouped, n_lesions = ndimage.label(ndimage.binary_dilation(gt, structure=_DILATION,
                                                                   iterations=dilation_iterations),
                                           structure=_COMPONENTS)
        lesions = np.where(gt, grouped, 0)
    else:
        lesions, n_lesions = ndimage.label(gt, structure=_COMPONENTS)
    lesion_boxes = ndimage.find_objects(lesions, max_label=n_lesions)
    pred_boxes = ndimage.find_objects(pred_components, max_label=n_pred)

    scores, matched_anywhere = [], set()
    for label, box in enumerate(lesion_boxes, 1):
        # The dilation reaches at most dilation_iterations voxels along each axis: this crop holds it.
        reach = _grown(box, dilation_iterations, gt.shape)
        lesion_reach = lesions[reach] == label
        if dilation_iterations:
            lesion_reach = ndimage.binary_dilation(lesion_reach, structure=_DILATION, iterations=dilation_iterations)
        matched = [int(c) for c in np.unique(pred_components[reach][lesion_reach]) if c]
        matched_anywhere.update(matched)
        # One voxel of margin: erosion and distances on the crop are those of the whole image.
        crop = _grown(_union([box] + [pred_boxes[c - 1] for c in matched]), 1, gt.shape)
        lesion = lesions[crop] == label
        voxels = int(lesion.sum())
        if matched:
            predicted = np.isin(pred_components[crop], matched)
            dice = 2.0 * int(np.logical_and(predicted, lesion).sum()) / (int(predicted.sum()) + voxels)
            hd95 = pooled_hd95(predicted, lesion, spacing)
        else:
            dice, hd95 = 0.0, float(missed_hd95_mm)
        volume = voxels * voxel_volume
        scores.append(LesionScore(voxels, volume, len(matched), dice, hd95, volume > volume_threshold_mm3))
    return LesionWiseResult(tuple(scores), n_pred - len(matched_anywhere), float(missed_hd95_mm))


__all__ = ["BRATS2023_DILATION_ITERATIONS", "BRATS2023_MISSED_HD95_MM", "BRATS2023_VOLUME_THRESHOLD_MM3",
           "LESION_METRIC_NAMES", "LESION_STRUCTURES", "LesionScore", "LesionWiseResult", "lesion_wise", "pooled_hd95"]
