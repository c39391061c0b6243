"""BraTS 2023 lesion-wise metrics (BrainLesionSAMLib/lesion_metrics.py) against two yardsticks:

- the official ``brats-evaluation`` package (panoptica with its BraTS 'gli' config, called through
  ``evaluate_single_exam`` on NIfTI files, as the challenge does) on generated shared cases where
  its rules and the 2023 rules must agree: lesions far apart (no merging by the dilation), every
  predicted component overlapping one lesion or none and lying away from the others, every lesion
  above 50 voxels. There its per-lesion Dice and HD95, its TP/FN/FP counts and the lesion-wise
  scores formed from them (2023 formula, 374 for each miss and false positive) must equal ours to
  1e-6. brats-evaluation implements the BraTS 2024/2025 matching (one-to-one, by overlap, no
  dilation, no volume threshold), so it cannot check the 2023-only rules;
- for those (merging by dilation, a near miss that still counts, one component spanning two
  lesions, small lesions, empty masks, anisotropic voxels): ``brats2023_reference`` below, an
  independent transcription of the BraTS 2023 challenge's published algorithm (BraTS-2023-Metrics,
  ``get_lesion_wise_score`` / ``get_lesion_wise_results``, challenge BraTS-GLI: dilation 3, volume
  threshold 50) with whole-volume operations and cc3d components as there, and the per-pair HD95
  of brats-evaluation's panoptica in place of DeepMind's surface distance.
"""
from __future__ import annotations

import csv
import math
import warnings

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from BrainLesionSAMLib.conventions import from_brats2021
from BrainLesionSAMLib.lesion_metrics import LESION_METRIC_NAMES, lesion_wise
from BrainLesionSAMLib.metrics import evaluate_folders, evaluate_labels, result_columns

cc3d = pytest.importorskip("cc3d")  # installed with brats-evaluation (panoptica)
PENALTY = 374.0
REGIONS = {"WT": (1, 2, 4), "TC": (1, 4), "ET": (4,)}
OFFICIAL_GROUPS = {"WT": "wt", "TC": "tc", "ET": "et"}


# ---- the independent BraTS 2023 reference ------------------------------------------------------

def panoptica_hd95(pred: np.ndarray, gt: np.ndarray, spacing) -> float:
    from panoptica.metrics._surface_distances import _hd95_from_pair, _surface_distance_pair
    return float(_hd95_from_pair(*_surface_distance_pair(gt, pred, voxelspacing=tuple(spacing))))


def brats2023_reference(pred, gt, spacing, dilation=3, threshold=50.0):
    """The BraTS 2023 lesion-wise evaluation of one region, step for step as the challenge code."""
    struct = ndimage.generate_binary_structure(3, 2)
    voxel = float(np.prod(spacing))
    gt_cc = cc3d.connected_components(gt.astype(np.uint8), connectivity=26)
    pred_cc = cc3d.connected_components(pred.astype(np.uint8), connectivity=26)
    dilated_cc = cc3d.connected_components(
        ndimage.binary_dilation(gt, structure=struct, iterations=dilation).astype(np.uint8), connectivity=26)
    combined = np.zeros_like(dilated_cc)
    for comp in range(1, int(dilated_cc.max()) + 1):
        part = gt_cc * (dilated_cc == comp)
        combined[part > 0] = comp
    tp, pairs = [], []
    for comp in range(1, int(combined.max()) + 1):
        gt_tmp = combined == comp
        gt_dilated = ndimage.binary_dilation(gt_tmp, structure=struct, iterations=dilation)
        intersecting = [int(c) for c in np.unique(pred_cc * gt_dilated) if c != 0]
        tp += intersecting
        pred_tmp = np.isin(pred_cc, intersecting)
        dice = 2.0 * np.logical_and(pred_tmp, gt_tmp).sum() / (pred_tmp.sum() + gt_tmp.sum())
        hd95 = panoptica_hd95(pred_tmp, gt_tmp, spacing) if intersecting else math.inf
        pairs.append({"found": bool(intersecting), "volume": gt_tmp.sum() * voxel, "dice": dice,
                      "hd95": PENALTY if math.isinf(hd95) else hd95})
    fp = np.unique(pred_cc[np.isin(pred_cc, tp + [0], invert=True)])
    counted = [p for p in pairs if p["volume"] > threshold]
    denominator = len(counted) + len(fp)
    return {"lesion_dice": sum(p["dice"] for p in counted) / denominator if denominator else 1.0,
            "lesion_hd95_mm": (sum(p["hd95"] for p in counted) + PENALTY * len(fp)) / denominator if denominator else 0.0,
            "lesion_tp": float(sum(p["found"] for p in counted)),
            "lesion_fn": float(sum(not p["found"] for p in counted)),
            "lesion_fp": float(len(fp))}


def assert_matches_reference(pred, gt, spacing=(1.0, 1.0, 1.0)):
    ours = lesion_wise(pred, gt, spacing).as_dict()
    theirs = brats2023_reference(np.asarray(pred, bool), np.asarray(gt, bool), spacing)
    assert ours == pytest.approx(theirs, abs=1e-9)
    return ours


def box(shape, lo, hi):
    mask = np.zeros(shape, bool)
    mask[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return mask


# ---- the 2023-only rules ----------------------------------------------------------------------

SHAPE = (30, 40, 50)


def test_lesions_closer_than_the_dilation_are_one_lesion():
    a, b = box(SHAPE, (5, 5, 5), (12, 12, 12)), box(SHAPE, (5, 5, 16), (12, 12, 23))  # 4 voxels apart
    pred = box(SHAPE, (5, 5, 5), (12, 12, 11))
    result = lesion_wise(pred, a | b, (1, 1, 1))
    assert len(result.lesions) == 1 and result.lesions[0].voxels == 2 * 343
    assert result.dice == pytest.approx(2 * 294 / (294 + 686))
    assert (result.true_positives, result.false_negatives, result.false_positives) == (1, 0, 0)
    assert_matches_reference(pred, a | b)
    far = box(SHAPE, (5, 5, 30), (12, 12, 37))  # 18 voxels away: its own lesion, missed
    scores = assert_matches_reference(pred, a | far)
    assert (scores["lesion_tp"], scores["lesion_fn"]) == (1, 1)
    assert scores["lesion_dice"] == pytest.approx((2 * 294 / (294 + 343) + 0) / 2)


def test_a_near_miss_within_the_dilation_is_a_detection_not_a_false_positive():
    gt = box(SHAPE, (5, 5, 5), (12, 12, 12))
    pred = box(SHAPE, (5, 5, 14), (12, 12, 20))  # two voxels beside the lesion, no overlap
    scores = assert_matches_reference(pred, gt)
    assert (scores["lesion_tp"], scores["lesion_fn"], scores["lesion_fp"]) == (1, 0, 0)
    assert scores["lesion_dice"] == 0.0 and scores["lesion_hd95_mm"] < 20


def test_one_component_over_two_lesions_counts_for_both_and_small_lesions_are_not_scored():
    a, b = box(SHAPE, (5, 5, 5), (12, 12, 12)), box(SHAPE, (5, 5, 30), (12, 12, 37))
    bridge = box(SHAPE, (7, 7, 8), (10, 10, 34))
    scores = assert_matches_reference(bridge, a | b)
    assert (scores["lesion_tp"], scores["lesion_fn"], scores["lesion_fp"]) == (2, 0, 0)
    small = box(SHAPE, (20, 30, 40), (23, 33, 43))  # 27 voxels = 27 mm^3 <= 50: not scored
    scores = assert_matches_reference(a, a | small)
    assert (scores["lesion_tp"], scores["lesion_fn"], scores["lesion_dice"]) == (1, 0, 1.0)
    detected_small = assert_matches_reference(a | box(SHAPE, (20, 30, 40), (22, 32, 42)), a | small)
    assert detected_small["lesion_fp"] == 0  # its component matched a (small) lesion
    # At 2 mm the same 27 voxels are 216 mm^3: scored, and missed.
    scores = assert_matches_reference(a, a | small, spacing=(2.0, 2.0, 2.0))
    assert (scores["lesion_tp"], scores["lesion_fn"]) == (1, 1)


def test_empty_masks_and_misses():
    empty = np.zeros(SHAPE, bool)
    gt = box(SHAPE, (5, 5, 5), (12, 12, 12))
    assert assert_matches_reference(empty, empty) == {"lesion_dice": 1.0, "lesion_hd95_mm": 0.0, "lesion_tp": 0.0,
                                                      "lesion_fn": 0.0, "lesion_fp": 0.0}
    assert assert_matches_reference(gt, empty) == {"lesion_dice": 0.0, "lesion_hd95_mm": PENALTY, "lesion_tp": 0.0,
                                                   "lesion_fn": 0.0, "lesion_fp": 1.0}
    assert assert_matches_reference(empty, gt) == {"lesion_dice": 0.0, "lesion_hd95_mm": PENALTY, "lesion_tp": 0.0,
                                                   "lesion_fn": 1.0, "lesion_fp": 0.0}
    assert assert_matches_reference(gt, gt)["lesion_dice"] == 1.0


@pytest.mark.parametrize("seed", range(4))
def test_random_messy_cases_match_the_reference(seed):
    """Irregular blobs touching the image border, fragmenting predictions, anisotropic voxels."""
    rng = np.random.default_rng(seed)
    shape = (24, 36, 40)

    def blobs(threshold):
        field = ndimage.gaussian_filter(rng.normal(size=shape), sigma=2.0)
        return field > np.quantile(field, threshold)

    gt = blobs(0.9)
    pred = (np.roll(gt, int(rng.integers(-2, 3)), axis=2) & (rng.random(shape) > 0.15)) | blobs(0.97)
    spacing = tuple(float(v) for v in rng.choice([0.8, 1.0, 1.5, 2.5], 3))
    scores = assert_matches_reference(pred, gt, spacing)
    assert scores["lesion_tp"] + scores["lesion_fn"] >= 1


# ---- the official package on shared cases ----------------------------------------------------

def ellipsoid_distance(shape, centre, radii):
    z, y, x = np.ogrid[tuple(slice(0, n) for n in shape)]
    return sum(((axis - c) / r) ** 2 for axis, c, r in zip((z, y, x), centre, radii))


def shared_case(seed, shape=(48, 64, 78)):
    """Ground truth and prediction (BraTS 2021 labels) where both rule sets must agree: tumours with
    ED shell, ET ring and sometimes an NCR core in separate cells of a 2 x 2 x 3 grid; predictions
    shifted, rescaled, missed, or missing their ET; false-positive blobs in cells of their own."""
    rng = np.random.default_rng(seed)
    gt, pred = np.zeros(shape, np.uint8), np.zeros(shape, np.uint8)
    cells = [(z, y, x) for z in range(2) for y in range(2) for x in range(3)]
    order = rng.permutation(len(cells))
    cell = np.array(shape) / np.array([2, 2, 3])
    for index in order[:5]:  # tumours
        centre = (np.array(cells[index]) + 0.5) * cell
        radii = rng.uniform(5.0, 7.0, 3)
        necrosis = rng.random() < 0.6
        distance = ellipsoid_distance(shape, centre, radii)
        gt[distance < 1] = 2
        gt[distance < 0.6] = 4
        if necrosis:
            gt[distance < 0.2] = 1
        fate = rng.choice(["found", "found", "found", "missed", "no_et"])
        if fate == "missed":
            continue
        moved = ellipsoid_distance(shape, centre + rng.integers(-2, 3, 3), radii * rng.uniform(0.9, 1.1, 3))
        pred[moved < 1] = 2
        if fate == "found":
            pred[moved < rng.uniform(0.5, 0.7)] = 4
            if necrosis:
                pred[moved < 0.2] = 1
        else:
            pred[moved < 0.6] = 1  # the core called necrosis: TC found, ET missed
    for index in order[5:7]:  # false positives: oedema only, or with an enhancing core
        distance = ellipsoid_distance(shape, (np.array(cells[index]) + 0.5) * cell, rng.uniform(3.0, 4.5, 3))
        pred[distance < 1] = 2
        if rng.random() < 0.5:
            pred[distance < 0.5] = 4
    return pred, gt


def official_evaluation(pred_path, gt_path):
    from brats_evaluation import config_path, evaluate_single_exam
    from panoptica import Panoptica_Evaluator

    evaluator = Panoptica_Evaluator.load_from_config(str(config_path("gli")))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # panoptica's notes on its NSD tolerance and overlapping groups
        result = evaluate_single_exam(str(pred_path), str(gt_path), "case", evaluator)
    assert "error" not in result, result.get("error")
    return result


def assert_agrees_with_official(ours: dict, official: dict, per_lesion: dict):
    for region, group in OFFICIAL_GROUPS.items():
        theirs = official[group]
        tp, fn, fp = theirs["tp"], theirs["fn"], theirs["fp"]
        assert (ours[region]["lesion_tp"], ours[region]["lesion_fn"], ours[region]["lesion_fp"]) == (tp, fn, fp), region
        # Per lesion: brats-evaluation lists its reference instances (Dice, HD95 of the matched pair).
        mine = sorted((s.voxels, s.matched_components > 0, s.dice if s.matched_components else None,
                       s.hd95_mm if s.matched_components else None) for s in per_lesion[region].lesions)
        official_lesions = sorted((int(i["voxel_count"]), bool(i["is_matched"]), i.get("sq_dsc"), i.get("sq_hd95"))
                                  for i in theirs["reference_instances"])
        assert [m[:2] for m in mine] == [o[:2] for o in official_lesions], region
        for m, o in zip(mine, official_lesions):
            if m[1]:
                assert m[2] == pytest.approx(o[2], abs=1e-6) and m[3] == pytest.approx(o[3], abs=1e-6), region
        # The 2023 scores from the package's own numbers: its matched-pair means over (TP + FN + FP).
        total = tp + fn + fp
        sq_dsc = theirs["sq_dsc"] if tp else 0.0
        sq_hd95 = theirs["sq_hd95"] if tp else 0.0
        if total:
            assert ours[region]["lesion_dice"] == pytest.approx(sq_dsc * tp / total, abs=1e-6), region
            assert ours[region]["lesion_hd95_mm"] == pytest.approx((sq_hd95 * tp + PENALTY * (fn + fp)) / total,
                                                                   abs=1e-6), region


def test_agrees_with_official_brats_evaluation_on_shared_cases(tmp_path):
    pytest.importorskip("brats_evaluation")
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    pred_dir.mkdir(), gt_dir.mkdir()
    expected, checked = {}, {"tp": 0, "fn": 0, "fp": 0}
    for seed in range(6):
        case = f"BraTS-GLI-{seed:05d}-000"
        pred, gt = shared_case(seed)
        for folder, labels in ((pred_dir, pred), (gt_dir, gt)):  # the challenge's numbering: ET = 3
            sitk.WriteImage(sitk.GetImageFromArray(from_brats2021(labels, "brats2023")), str(folder / f"{case}.nii.gz"))
        per_lesion = {region: lesion_wise(np.isin(pred, v), np.isin(gt, v), (1, 1, 1)) for region, v in REGIONS.items()}
        for region, result in per_lesion.items():  # the shared cases' promise: nothing where the rules part
            assert all(s.counted and s.matched_components <= 1 for s in result.lesions), (seed, region)
        ours = evaluate_labels(pred, gt, (1.0, 1.0, 1.0), lesion_wise=True)
        assert_agrees_with_official(ours, official_evaluation(pred_dir / f"{case}.nii.gz", gt_dir / f"{case}.nii.gz"),
                                    per_lesion)
        for key in checked:
            checked[key] += sum(ours[r][f"lesion_{key}"] for r in REGIONS)
        expected[case] = ours
    # The cases exercise every kind of outcome.
    assert checked["tp"] >= 30 and checked["fn"] >= 3 and checked["fp"] >= 6, checked

    # The same files through `evaluate`: the CSV carries the lesion-wise columns with these values.
    rows = evaluate_folders(pred_dir, gt_dir, tmp_path / "metrics.csv")
    with open(tmp_path / "metrics.csv", newline="") as handle:
        header = next(csv.reader(handle))
    assert header == ["case", *result_columns("brats", lesion_wise=True)]
    assert {f"WT_{m}" for m in LESION_METRIC_NAMES} <= set(header) and "NCR_lesion_dice" not in header
    for row in rows[:-2]:
        for region in REGIONS:
            for metric in LESION_METRIC_NAMES:
                assert row[f"{region}_{metric}"] == pytest.approx(expected[row["case"]][region][metric], abs=1e-12)


def test_agrees_with_official_panoptica_on_anisotropic_voxels():
    """brats-evaluation's evaluator with the voxel spacing given (the challenge data is 1 mm, so its
    command never passes one): HD95 in mm must agree as well."""
    pytest.importorskip("brats_evaluation")
    from brats_evaluation import config_path
    from panoptica import Panoptica_Evaluator

    pred, gt = shared_case(11)
    spacing = (2.0, 0.9, 1.2)
    evaluator = Panoptica_Evaluator.load_from_config(str(config_path("gli")))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        groups = evaluator.evaluate(from_brats2021(pred, "brats2023"), from_brats2021(gt, "brats2023"),
                                    voxelspacing=spacing)
    official = {name: result.to_dict(True) for name, result in groups.items()}
    per_lesion = {region: lesion_wise(np.isin(pred, v), np.isin(gt, v), spacing) for region, v in REGIONS.items()}
    assert_agrees_with_official(evaluate_labels(pred, gt, spacing, lesion_wise=True), official, per_lesion)


# ---- the paper-style table ---------------------------------------------------------------------

def test_paper_table_carries_lesion_wise_metrics(tmp_path):
    from Training.evaluate import paper_table, table_markdown, write_results

    rows = []
    for seed in range(3):
        pred, gt = shared_case(seed)
        from BrainLesionSAMLib.metrics import flatten_results
        rows.append({"case": f"c{seed}", **flatten_results(evaluate_labels(pred, gt, (1, 1, 1), lesion_wise=True))})
    table = paper_table(rows, "brats")
    wt = next(entry for entry in table if entry["structure"] == "WT")
    assert wt["lesion_dice_mean"] == pytest.approx(100 * np.mean([r["WT_lesion_dice"] for r in rows]))
    assert wt["lesion_hd95_mm_mean"] == pytest.approx(np.mean([r["WT_lesion_hd95_mm"] for r in rows]))
    assert wt["lesion_tp_total"] == sum(r["WT_lesion_tp"] for r in rows)
    markdown = table_markdown(table)
    assert "Lesion-wise Dice (%)" in markdown and "Lesions TP / FN / FP" in markdown
    ncr_line = next(line for line in markdown.splitlines() if line.startswith("| NCR"))
    assert ncr_line.rstrip(" |").endswith("–")
    paths = write_results(tmp_path / "out", rows, "brats", {"title": "t"})
    with open(paths["per_case"], newline="") as handle:
        assert "ET_lesion_fp" in next(csv.reader(handle))
