"""Segmentation metrics: overlap and surface metrics per label and per BraTS region, per case and per folder.

Metrics (all in physical units where a distance is involved; spacing is in millimetres):

``dice``         2|P n G| / (|P| + |G|)
``iou``          |P n G| / |P u G|
``precision``    |P n G| / |P|          (positive predictive value)
``sensitivity``  |P n G| / |G|          (recall)
``hd95_mm``      95th-percentile symmetric Hausdorff distance in mm: MONAI's
                 ``compute_hausdorff_distance(percentile=95, directed=False, spacing=...)``, i.e. the
                 larger of the two directed 95th percentiles of boundary-voxel distances
                 (P boundary -> G boundary, G boundary -> P boundary). The BraTS 2023+
                 ``brats-evaluation`` package (panoptica, after medpy) instead takes one 95th
                 percentile of both directions pooled, which usually lies between the two directed
                 percentiles, so it is mostly equal to or smaller than this value; both use the same
                 boundary voxels and distances.
``nsd``          normalised surface Dice at ``nsd_tolerance_mm`` (default 1 mm): MONAI's
                 ``compute_surface_dice`` - the fraction of boundary voxels of P and of G, counted
                 together, that lie within the tolerance of the other mask's boundary (boundary voxels
                 counted, not surfel areas).

Boundaries are the voxels that a 6-connected erosion removes; voxels on the image border count as
boundary. Distances use the voxel spacing, so anisotropic volumes are measured correctly.

Empty masks. MONAI returns NaN or inf when a mask is empty; a mean over cases must not be poisoned by
that, so the empty cases are decided here, before MONAI is called:

- both P and G empty (the structure is absent and correctly not predicted): every overlap metric 1,
  ``hd95_mm`` 0, ``nsd`` 1;
- exactly one empty (the structure was missed, or hallucinated): ``dice``, ``iou``, ``nsd`` 0 and
  ``hd95_mm`` = the diagonal of the image's field of view, sqrt(sum((size_i * spacing_i)^2)) mm,
  the largest distance the grid can hold (373.13 mm on the BraTS 240x240x155 grid at 1 mm, the
  penalty the BraTS challenges use). ``precision`` and ``sensitivity`` are 0: the one that is
  defined is 0 (P empty: sensitivity 0/|G|; G empty: precision 0/|P|) and the undefined 0/0 one is
  set to 0 as well, so that a missed or hallucinated structure scores 0 on every overlap metric
  instead of rewarding an empty prediction with a perfect precision.

The grid diagonal can be replaced by a fixed value (``empty_distance_mm``), e.g. 373.13 to compare
with BraTS numbers on another grid.

Structures. For the ``'brats'`` label set the results are keyed ``WT``, ``TC``, ``ET`` (the BraTS
regions WT = {1, 2, 4}, TC = {1, 4}, ET = {4}) and ``NCR``, ``ED`` (labels 1 and 2). The ET label and
the ET region are the same voxels and are reported once, as ``ET``. For the ``'lesion'`` set the
only structure is ``lesion`` (label 1). BraTS 2023 numbering (ET = 3) is accepted on input.

Lesion-wise (``lesion_wise=True``; ``evaluate_folders`` and so ``brainlesionsam evaluate`` do it by
default): the BraTS 2023 lesion-wise Dice and HD95 of WT, TC, ET (or of the lesion) and the TP, FN
and FP lesion counts, ``lesion_dice``, ``lesion_hd95_mm``, ``lesion_tp``, ``lesion_fn``,
``lesion_fp`` (``lesion_metrics`` has the rules: dilation, small lesions, the 374 mm penalty).

Flat (CSV) column names are ``<structure>_<metric>``, e.g. ``WT_dice``, ``ET_hd95_mm``, ``TC_lesion_dice``.

Arrays are indexed [z, y, x] (as ``sitk.GetArrayFromImage`` gives them), so the spacing argument
is ``spacing_zyx``: the reverse of SimpleITK's ``GetSpacing()`` (x, y, z).
"""
from __future__ import annotations

import csv
import math
import os
import re
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk
import torch
from monai.metrics import compute_hausdorff_distance, compute_surface_dice

from .conventions import ED, LABEL_SETS, NCR, REGIONS, to_brats2021
from .errors import GeometryError, InputImageError
from .io import IMAGE_SUFFIXES, LABEL_PATTERN, atomic_output, check_writable, discover_case, modality_from_name
from .lesion_metrics import LESION_METRIC_NAMES, LESION_STRUCTURES, lesion_wise as lesion_wise_scores

METRIC_NAMES: tuple[str, ...] = ("dice", "iou", "precision", "sensitivity", "hd95_mm", "nsd")
DEFAULT_NSD_TOLERANCE_MM = 1.0
# The BraTS grid (240 x 240 x 155 voxels of 1 mm) has this diagonal; the challenges use it as the
# HD95 of a missed or hallucinated structure. Pass it as ``empty_distance_mm`` to match their numbers.
BRATS_GRID_DIAGONAL_MM = math.sqrt(240.0 ** 2 + 240.0 ** 2 + 155.0 ** 2)

# Structure name -> label values it unites, per label set, in reporting order. The ET region is
# the ET label (REGIONS["ET"] == (ET,)), so one 'ET' entry covers both.
STRUCTURES: dict[str, dict[str, tuple[int, ...]]] = {
    "brats": {"WT": REGIONS["WT"], "TC": REGIONS["TC"], "ET": REGIONS["ET"], "NCR": (NCR,), "ED": (ED,)},
    "lesion": {"lesion": (1,)},
}

# Suffixes a label map (prediction or ground truth) may have; the DICOM suffix makes no sense here.
LABEL_SUFFIXES: tuple[str, ...] = tuple(s for s in IMAGE_SUFFIXES if s != ".dcm")


class MissingCaseWarning(UserWarning):
    """Some cases have a prediction but no ground truth (or the reverse) and were not evaluated."""


# ----------------------------------------------------------------------------------------------
# Binary metrics
# ----------------------------------------------------------------------------------------------

def image_diagonal_mm(shape_zyx: Sequence[int], spacing_zyx: Sequence[float]) -> float:
    """Diagonal of the field of view, sqrt(sum((size_i * spacing_i)^2)), in mm."""
    return float(math.sqrt(sum((float(n) * float(s)) ** 2 for n, s in zip(shape_zyx, spacing_zyx))))


def _check_spacing(spacing_zyx: Sequence[float], ndim: int) -> tuple[float, ...]:
    spacing = tuple(float(s) for s in spacing_zyx)
    if len(spacing) != ndim or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise ValueError(f"spacing_zyx must be {ndim} positive numbers (mm, array order), got {spacing_zyx!r}")
    return spacing


def binary_metrics(pred: np.ndarray, gt: np.ndarray, spacing_zyx: Sequence[float],
                   nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM,
                   empty_distance_mm: float | None = None) -> dict[str, float]:
    """Every metric of ``METRIC_NAMES`` for one binary mask pair.

    Args:
        pred, gt: masks of the same shape, [z, y, x] (any dtype; non-zero is foreground).
        spacing_zyx: voxel size in mm along the array axes (reverse of SimpleITK's GetSpacing()).
        nsd_tolerance_mm: boundary tolerance of the normalised surface Dice.
        empty_distance_mm: ``hd95_mm`` when exactly one mask is empty; None = the image diagonal.

    Returns:
        {'dice', 'iou', 'precision', 'sensitivity', 'hd95_mm', 'nsd'} -> float (never NaN or inf;
        see the module docstring for the empty-mask convention).
    """
    pred = np.asarray(pred) != 0
    gt = np.asarray(gt) != 0
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground-truth shape {gt.shape}")
    spacing = _check_spacing(spacing_zyx, pred.ndim)
    if not (math.isfinite(nsd_tolerance_mm) and nsd_tolerance_mm >= 0):
        raise ValueError(f"nsd_tolerance_mm must be a finite number >= 0, got {nsd_tolerance_mm!r}")

    n_pred, n_gt = int(pred.sum()), int(gt.sum())
    if n_pred == 0 and n_gt == 0:
        return {"dice": 1.0, "iou": 1.0, "precision": 1.0, "sensitivity": 1.0, "hd95_mm": 0.0, "nsd": 1.0}
    if n_pred == 0 or n_gt == 0:
        penalty = image_diagonal_mm(pred.shape, spacing) if empty_distance_mm is None else float(empty_distance_mm)
        return {"dice": 0.0, "iou": 0.0, "precision": 0.0, "sensitivity": 0.0, "hd95_mm": penalty, "nsd": 0.0}

    # All four overlap ratios come from one confusion count; MONAI's DiceMetric would give only
    # one of them (and is cross-checked against this in the tests).
    true_positive = int(np.logical_and(pred, gt).sum())
    union = n_pred + n_gt - true_positive
    # MONAI wants one-hot [batch, class, *spatial] tensors; one foreground channel, no background.
    pred_t = torch.from_numpy(pred)[None, None]
    gt_t = torch.from_numpy(gt)[None, None]
    with warnings.catch_warnings():
        # MONAI 1.5+ warns about an argument its own get_edge_surface_distance passes; not ours to fix.
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        hd95 = compute_hausdorff_distance(pred_t, gt_t, include_background=True, percentile=95,
                                          directed=False, spacing=list(spacing))
        nsd = compute_surface_dice(pred_t.float(), gt_t.float(), class_thresholds=[float(nsd_tolerance_mm)],
                                   include_background=True, spacing=list(spacing))
    return {
        "dice": 2.0 * true_positive / (n_pred + n_gt),
        "iou": true_positive / union,
        "precision": true_positive / n_pred,
        "sensitivity": true_positive / n_gt,
        "hd95_mm": float(hd95.item()),
        "nsd": float(nsd.item()),
    }


# ----------------------------------------------------------------------------------------------
# Label maps
# ----------------------------------------------------------------------------------------------

def _check_label_values(labels: np.ndarray, label_set: str, what: str) -> None:
    allowed = set(LABEL_SETS[label_set])
    found = set(np.unique(labels).tolist())
    unexpected = sorted(found - allowed)
    if unexpected:
        hint = (" - is this a BraTS label map? use label_set='brats'" if label_set == "lesion"
                else " - BraTS labels are 0, 1 (NCR), 2 (ED), 4 (ET; 3 in BraTS 2023 numbering)")
        raise InputImageError(
            f"{what} has label values {unexpected} that the '{label_set}' label set does not define "
            f"(allowed: {sorted(allowed)}){hint}")


def evaluate_labels(pred: np.ndarray, gt: np.ndarray, spacing_zyx: Sequence[float], label_set: str = "brats",
                    nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM,
                    empty_distance_mm: float | None = None, lesion_wise: bool = False) -> dict[str, dict[str, float]]:
    """Metrics per structure of a label map pair.

    Args:
        pred, gt: integer label maps [z, y, x] of the same shape. For 'brats', values 0, 1, 2, 4
            (or 0, 1, 2, 3 in BraTS 2023 numbering); for 'lesion', 0 and 1.
        spacing_zyx: voxel size in mm along the array axes (reverse of SimpleITK's GetSpacing()).
        label_set: 'brats' or 'lesion' (keys of ``conventions.LABEL_SETS``).
        lesion_wise: also the BraTS 2023 lesion-wise metrics (``LESION_METRIC_NAMES``) of the
            structures in ``LESION_STRUCTURES`` (WT, TC, ET; the lesion).

    Returns:
        {structure: {metric: value}}; structures 'WT', 'TC', 'ET', 'NCR', 'ED' for 'brats',
        'lesion' for 'lesion'; metrics as in ``binary_metrics`` (and the lesion-wise ones).
    """
    if label_set not in STRUCTURES:
        raise ValueError(f"unknown label set {label_set!r}; use one of {sorted(STRUCTURES)}")
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape:
        raise GeometryError(f"prediction shape {pred.shape} differs from ground-truth shape {gt.shape}; "
                            "both label maps must lie on the same voxel grid")
    if label_set == "brats":
        try:
            pred, gt = to_brats2021(pred), to_brats2021(gt)
        except ValueError as error:
            raise InputImageError(f"{error}; use one numbering per label map") from None
    _check_label_values(pred, label_set, "prediction")
    _check_label_values(gt, label_set, "ground truth")
    results = {
        name: binary_metrics(np.isin(pred, values), np.isin(gt, values), spacing_zyx,
                             nsd_tolerance_mm=nsd_tolerance_mm, empty_distance_mm=empty_distance_mm)
        for name, values in STRUCTURES[label_set].items()
    }
    if lesion_wise:
        for name in LESION_STRUCTURES[label_set]:
            values = STRUCTURES[label_set][name]
            results[name].update(lesion_wise_scores(np.isin(pred, values), np.isin(gt, values), spacing_zyx).as_dict())
    return results


def flatten_results(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """{structure: {metric: v}} -> {'<structure>_<metric>': v}, e.g. 'WT_dice' (one CSV row)."""
    return {f"{structure}_{metric}": value
            for structure, metrics in results.items() for metric, value in metrics.items()}


def result_columns(label_set: str = "brats", lesion_wise: bool = False) -> list[str]:
    """The flat column names ``flatten_results`` produces for ``label_set``, in order."""
    return [f"{structure}_{metric}" for structure in STRUCTURES[label_set]
            for metric in METRIC_NAMES + (LESION_METRIC_NAMES if lesion_wise and structure in
                                          LESION_STRUCTURES[label_set] else ())]


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------

def read_label_map(path: str | os.PathLike, what: str = "label map") -> sitk.Image:
    """Read a 3D integer label map.

    ``io.read_image`` is not used because it rejects constant volumes, and an all-background
    prediction (nothing found) is a legitimate input to evaluation.
    """
    path = Path(path)
    if not path.is_file():
        raise InputImageError(f"{what} file {path} does not exist; check the path")
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as error:
        last_line = str(error).strip().splitlines()[-1] if str(error).strip() else ""
        raise InputImageError(f"{what} file {path} is not a readable image ({last_line}); "
                              "give a NIfTI, NRRD or MHA label map") from None
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputImageError(f"{what} file {path} has {image.GetNumberOfComponentsPerPixel()} components "
                              "per voxel; a label map has one")
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
    if image.GetDimension() != 3:
        raise InputImageError(f"{what} file {path} is {image.GetDimension()}D; a 3D label map is needed")
    array = sitk.GetArrayViewFromImage(image)
    if not np.all(np.isfinite(array)) or not np.array_equal(array, np.round(array)):
        raise InputImageError(f"{what} file {path} has non-integer voxel values; it is an intensity "
                              "image, not a label map - check which file was given")
    return image


def check_same_grid(pred: sitk.Image, gt: sitk.Image, tolerance: float = 1e-4,
                    pred_what: str = "prediction", gt_what: str = "ground truth") -> None:
    """Raise GeometryError unless ``pred`` and ``gt`` have the same size and (within ``tolerance``,
    mm for spacing and origin) the same spacing, origin and direction."""
    problems = []
    if pred.GetSize() != gt.GetSize():
        problems.append(f"size {pred.GetSize()} vs {gt.GetSize()}")
    for name, a, b in (("spacing", pred.GetSpacing(), gt.GetSpacing()),
                       ("origin", pred.GetOrigin(), gt.GetOrigin()),
                       ("direction", pred.GetDirection(), gt.GetDirection())):
        if len(a) != len(b) or not np.allclose(a, b, rtol=0.0, atol=tolerance):
            problems.append(f"{name} {tuple(round(v, 6) for v in a)} vs {tuple(round(v, 6) for v in b)}")
    if problems:
        raise GeometryError(
            f"{pred_what} and {gt_what} are not on the same voxel grid ({'; '.join(problems)}); "
            "metrics compare voxel by voxel, so write the prediction on the ground truth's grid "
            "(the segmentation's reference volume) or resample it with nearest-neighbour interpolation")


def evaluate_case_files(pred_path: str | os.PathLike, gt_path: str | os.PathLike, label_set: str = "brats",
                        nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM,
                        empty_distance_mm: float | None = None, lesion_wise: bool = False) -> dict[str, dict[str, float]]:
    """``evaluate_labels`` on two label-map files that must share one voxel grid (else GeometryError)."""
    pred_image = read_label_map(pred_path, "prediction")
    gt_image = read_label_map(gt_path, "ground truth")
    check_same_grid(pred_image, gt_image, pred_what=f"prediction {pred_path}", gt_what=f"ground truth {gt_path}")
    spacing_zyx = tuple(reversed(gt_image.GetSpacing()))
    pred = sitk.GetArrayFromImage(pred_image).astype(np.int32)
    gt = sitk.GetArrayFromImage(gt_image).astype(np.int32)
    try:
        return evaluate_labels(pred, gt, spacing_zyx, label_set=label_set, nsd_tolerance_mm=nsd_tolerance_mm,
                               empty_distance_mm=empty_distance_mm, lesion_wise=lesion_wise)
    except InputImageError as error:
        raise InputImageError(f"{error} (prediction {pred_path}, ground truth {gt_path})") from None


# ----------------------------------------------------------------------------------------------
# Folders
# ----------------------------------------------------------------------------------------------

def _strip_suffix(name: str) -> str | None:
    lower = name.lower()
    for suffix in LABEL_SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return None


def _strip_seg(stem: str) -> str:
    for tag in ("_seg", "-seg"):
        if stem.lower().endswith(tag):
            return stem[: -len(tag)]
    return stem


def _looks_like_label(name: str) -> bool:
    return any(re.fullmatch(LABEL_PATTERN, token) for token in re.split(r"[_\-. ]+", name.lower()))


def _looks_like_modality(name: str) -> bool:
    return modality_from_name(name) is not None


def find_predictions(pred_dir: str | os.PathLike) -> dict[str, Path]:
    """Case id -> prediction file ``<pred_dir>/<case>.nii.gz`` (or .nii, .nrrd, .nhdr, .mha, .mhd)."""
    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise InputImageError(f"prediction folder {pred_dir} does not exist or is not a folder")
    found: dict[str, Path] = {}
    for entry in sorted(pred_dir.iterdir()):
        stem = _strip_suffix(entry.name)
        if entry.name.startswith(".") or not entry.is_file() or stem is None:
            continue
        if stem in found:
            raise InputImageError(f"two predictions for case {stem} in {pred_dir}: {found[stem].name} and "
                                  f"{entry.name}; keep one")
        found[stem] = entry
    return found


def find_ground_truths(gt_dir: str | os.PathLike) -> dict[str, Path]:
    """Case id -> ground-truth file, in either layout:

    - BraTS: ``<gt_dir>/<case>/`` holding the case's images and its label map (found by
      ``io.discover_case`` as key 'seg', e.g. ``<case>_seg.nii.gz`` or ``<case>-seg.nii.gz``);
    - flat: ``<gt_dir>/<case>.nii.gz`` or ``<gt_dir>/<case>_seg.nii.gz`` (also ``-seg``).
    """
    gt_dir = Path(gt_dir)
    if not gt_dir.is_dir():
        raise InputImageError(f"ground-truth folder {gt_dir} does not exist or is not a folder")
    found: dict[str, Path] = {}
    for entry in sorted(gt_dir.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            seg = discover_case(entry).get("seg")
            if seg is not None and seg.is_file():
                case, path = entry.name, seg
            else:
                continue
        else:
            stem = _strip_suffix(entry.name)
            if stem is None or (_looks_like_modality(entry.name) and not _looks_like_label(entry.name)):
                continue  # a flat folder may hold the cases' images beside their label maps
            case, path = _strip_seg(stem), entry
        if case in found:
            raise InputImageError(f"two ground-truth label maps for case {case} in {gt_dir}: "
                                  f"{found[case]} and {path}; keep one")
        found[case] = path
    return found


def _summary(rows: list[dict], columns: list[str]) -> list[dict]:
    values = np.array([[row[c] for c in columns] for row in rows], dtype=np.float64)
    mean = values.mean(axis=0)
    # Sample standard deviation (n - 1), as BraTS reports; undefined (NaN) for one case.
    sd = values.std(axis=0, ddof=1) if len(rows) > 1 else np.full(len(columns), np.nan)
    return [{"case": "mean", **dict(zip(columns, mean.tolist()))},
            {"case": "sd", **dict(zip(columns, sd.tolist()))}]


def evaluate_folders(pred_dir: str | os.PathLike, gt_dir: str | os.PathLike, out_csv: str | os.PathLike,
                     label_set: str = "brats", nsd_tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM,
                     empty_distance_mm: float | None = None, lesion_wise: bool = True) -> list[dict[str, str | float]]:
    """Evaluate every prediction in ``pred_dir`` that has a ground truth in ``gt_dir``; write a CSV.

    Predictions are ``<pred_dir>/<case>.nii.gz`` (or .nii, .nrrd, .mha, ...); ground truth is found
    as described in ``find_ground_truths``. Cases with a prediction but no ground truth, or the
    reverse, are not evaluated: they are named in a ``MissingCaseWarning`` (and are not in the means).

    The CSV (written atomically) has a column 'case' and the columns of ``result_columns`` (with the
    BraTS 2023 lesion-wise metrics and lesion counts unless ``lesion_wise`` is False); one
    row per evaluated case in case order, then a 'mean' row and an 'sd' row (sample standard
    deviation; NaN when only one case was evaluated).

    Returns:
        the rows written, as dicts (case rows, then 'mean' and 'sd').
    """
    if label_set not in STRUCTURES:
        raise ValueError(f"unknown label set {label_set!r}; use one of {sorted(STRUCTURES)}")
    check_writable(out_csv)  # fail before the (long) evaluation, not after it
    predictions = find_predictions(pred_dir)
    ground_truths = find_ground_truths(gt_dir)
    matched = sorted(set(predictions) & set(ground_truths))
    if not matched:
        raise InputImageError(
            f"no case has both a prediction and a ground truth: {len(predictions)} prediction(s) in "
            f"{pred_dir} (e.g. {sorted(predictions)[:3]}), {len(ground_truths)} ground truth(s) in {gt_dir} "
            f"(e.g. {sorted(ground_truths)[:3]}). Predictions must be named <case>.nii.gz and ground "
            "truth <gt_dir>/<case>/<case>_seg.nii.gz or <gt_dir>/<case>[_seg].nii.gz with the same <case>")
    no_truth = sorted(set(predictions) - set(ground_truths))
    no_prediction = sorted(set(ground_truths) - set(predictions))
    if no_truth:
        warnings.warn(f"{len(no_truth)} prediction(s) in {pred_dir} have no ground truth in {gt_dir} and were "
                      f"not evaluated: {', '.join(no_truth)}", MissingCaseWarning, stacklevel=2)
    if no_prediction:
        warnings.warn(f"{len(no_prediction)} case(s) in {gt_dir} have no prediction in {pred_dir} and were "
                      f"not evaluated: {', '.join(no_prediction)}", MissingCaseWarning, stacklevel=2)

    columns = result_columns(label_set, lesion_wise)
    rows: list[dict[str, str | float]] = []
    for case in matched:
        results = evaluate_case_files(predictions[case], ground_truths[case], label_set=label_set,
                                      nsd_tolerance_mm=nsd_tolerance_mm, empty_distance_mm=empty_distance_mm,
                                      lesion_wise=lesion_wise)
        rows.append({"case": case, **flatten_results(results)})
    rows += _summary(rows, columns)

    with atomic_output(out_csv) as temporary:
        with open(temporary, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=["case", *columns])
            writer.writeheader()
            writer.writerows(rows)
    return rows
