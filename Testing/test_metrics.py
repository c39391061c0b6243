"""Segmentation metrics: hand-computed cases, independent references (brute-force boundary distances,
MONAI's metric classes, the official brats-evaluation package), empty-mask conventions, label
numbering, regions, files and folders."""
import csv
import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy.ndimage import binary_erosion, gaussian_filter
from scipy.spatial.distance import cdist

from BrainLesionSAMLib.conventions import from_brats2021
from BrainLesionSAMLib.errors import GeometryError, InputImageError, OutputPathError
from BrainLesionSAMLib.metrics import (BRATS_GRID_DIAGONAL_MM, METRIC_NAMES, MissingCaseWarning,
                                       binary_metrics, evaluate_case_files, evaluate_folders,
                                       evaluate_labels, flatten_results, image_diagonal_mm,
                                       result_columns)

from conftest import blob_case, make_image


# ---- independent references ------------------------------------------------------------------

def boundary_distances(a: np.ndarray, b: np.ndarray, spacing_zyx) -> tuple[np.ndarray, np.ndarray]:
    """Brute force: distance (mm) from every boundary voxel of a to the nearest boundary voxel of b,
    and the reverse. Boundary = voxels a 6-connected erosion removes (border voxels included)."""
    def points(mask):
        boundary = mask & ~binary_erosion(mask)
        return np.argwhere(boundary) * np.asarray(spacing_zyx, dtype=float)
    distances = cdist(points(a), points(b))
    return distances.min(axis=1), distances.min(axis=0)


def reference_hd95(a, b, spacing_zyx) -> float:
    d_ab, d_ba = boundary_distances(a, b, spacing_zyx)
    return max(np.percentile(d_ab, 95), np.percentile(d_ba, 95))


def reference_nsd(a, b, spacing_zyx, tolerance) -> float:
    d_ab, d_ba = boundary_distances(a, b, spacing_zyx)
    return ((d_ab <= tolerance).sum() + (d_ba <= tolerance).sum()) / (len(d_ab) + len(d_ba))


def random_blob(shape, seed, threshold=0.6):
    rng = np.random.default_rng(seed)
    smooth = gaussian_filter(rng.normal(size=shape), sigma=2.5)
    return smooth > np.quantile(smooth, threshold)


def tumour_labels(shape=(21, 37, 45)):
    """The conftest lesion (ED shell, ET ring, NCR core) as a [z, y, x] BraTS 2021 label map."""
    return sitk.GetArrayFromImage(blob_case(shape)[1]).astype(np.int32)


def perturbed(labels, seed=1):
    """A plausible imperfect prediction: shifted, with some NCR called ET and a false-positive speck."""
    pred = np.roll(labels, (1, -2, 1), axis=(0, 1, 2))
    rng = np.random.default_rng(seed)
    pred[(pred == 1) & (rng.random(pred.shape) < 0.3)] = 4
    pred[2:4, 2:4, 2:4] = 2
    return pred


def cube(shape, lo, hi):
    mask = np.zeros(shape, bool)
    mask[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return mask


# ---- binary metrics, by hand -----------------------------------------------------------------

def test_overlap_metrics_of_cubes_by_hand():
    shape = (12, 12, 12)
    a = cube(shape, (2, 2, 2), (6, 6, 6))   # 4 x 4 x 4 = 64 voxels
    b = cube(shape, (3, 2, 2), (9, 6, 6))   # 6 x 4 x 4 = 96 voxels; overlap z 3..5: 3 x 4 x 4 = 48
    result = binary_metrics(a, b, (1.0, 1.0, 1.0))
    assert result["dice"] == pytest.approx(2 * 48 / (64 + 96))
    assert result["iou"] == pytest.approx(48 / (64 + 96 - 48))
    assert result["precision"] == pytest.approx(48 / 64)
    assert result["sensitivity"] == pytest.approx(48 / 96)
    assert set(result) == set(METRIC_NAMES)


def test_surface_metrics_of_shifted_cube_by_hand():
    # a 4^3 cube and the same cube one slice higher, slices 2 mm apart. Each has 56 boundary voxels.
    # The bottom slice of a (16 voxels) is 2 mm from b's boundary, the top slice of b likewise;
    # every other boundary voxel is 0 mm (lateral faces) or 1 mm (y/x neighbour) away.
    shape = (10, 10, 10)
    a = cube(shape, (2, 2, 2), (6, 6, 6))
    b = cube(shape, (3, 2, 2), (7, 6, 6))
    result = binary_metrics(a, b, (2.0, 1.0, 1.0), nsd_tolerance_mm=1.0)
    assert result["hd95_mm"] == pytest.approx(2.0)
    assert result["nsd"] == pytest.approx((40 + 40) / (56 + 56))
    assert binary_metrics(a, b, (2.0, 1.0, 1.0), nsd_tolerance_mm=2.0)["nsd"] == pytest.approx(1.0)
    # Spacing follows the array axes: the same shift along x (1 mm) is 1 mm.
    assert binary_metrics(a, np.roll(a, 1, axis=2), (2.0, 1.0, 1.0))["hd95_mm"] == pytest.approx(1.0)


def test_hd95_of_two_voxels_is_their_physical_distance():
    shape = (8, 9, 10)
    a = np.zeros(shape, bool)
    b = np.zeros(shape, bool)
    a[1, 2, 3] = True
    b[4, 6, 3] = True
    spacing_zyx = (2.5, 0.7, 1.3)
    distance = math.hypot(3 * 2.5, 4 * 0.7)
    result = binary_metrics(a, b, spacing_zyx)
    assert result["hd95_mm"] == pytest.approx(distance, rel=1e-6)
    assert result["dice"] == 0.0 and result["nsd"] == 0.0
    assert binary_metrics(a, b, spacing_zyx, nsd_tolerance_mm=distance + 1e-3)["nsd"] == pytest.approx(1.0)


# ---- binary metrics, against independent implementations --------------------------------------

@pytest.mark.filterwarnings("ignore:.*always_return_as_numpy:FutureWarning")  # MONAI-internal
@pytest.mark.parametrize("seed, spacing_zyx", [(0, (1.0, 1.0, 1.0)), (1, (3.0, 0.8, 1.1)), (2, (1.5, 2.0, 0.5))])
def test_random_blobs_match_brute_force_and_monai(seed, spacing_zyx):
    from monai.metrics import DiceMetric, HausdorffDistanceMetric, SurfaceDiceMetric

    shape = (14, 22, 26)
    pred, gt = random_blob(shape, seed), random_blob(shape, seed + 100)
    result = binary_metrics(pred, gt, spacing_zyx, nsd_tolerance_mm=1.5)

    # Brute-force pairwise distances between boundary voxels: no MONAI involved.
    assert result["hd95_mm"] == pytest.approx(reference_hd95(pred, gt, spacing_zyx), rel=1e-5)
    assert result["nsd"] == pytest.approx(reference_nsd(pred, gt, spacing_zyx, 1.5), rel=1e-5)

    # MONAI's cumulative metric classes, as a user of MONAI would call them.
    y_pred = torch.from_numpy(pred)[None, None].float()
    y = torch.from_numpy(gt)[None, None].float()
    dice = DiceMetric(include_background=True)(y_pred, y)
    hd95 = HausdorffDistanceMetric(include_background=True, percentile=95)(y_pred, y, spacing=list(spacing_zyx))
    nsd = SurfaceDiceMetric([1.5], include_background=True)(y_pred, y, spacing=list(spacing_zyx))
    assert result["dice"] == pytest.approx(dice.item(), rel=1e-6)
    assert result["hd95_mm"] == pytest.approx(hd95.item(), rel=1e-5)
    assert result["nsd"] == pytest.approx(nsd.item(), rel=1e-5)


# ---- empty masks -----------------------------------------------------------------------------

def test_empty_mask_conventions():
    shape = (5, 6, 7)
    spacing_zyx = (2.0, 1.0, 0.5)
    empty = np.zeros(shape, bool)
    some = cube(shape, (1, 1, 1), (3, 3, 3))
    diagonal = math.sqrt((5 * 2.0) ** 2 + (6 * 1.0) ** 2 + (7 * 0.5) ** 2)
    assert image_diagonal_mm(shape, spacing_zyx) == pytest.approx(diagonal)

    assert binary_metrics(empty, empty, spacing_zyx) == {
        "dice": 1.0, "iou": 1.0, "precision": 1.0, "sensitivity": 1.0, "hd95_mm": 0.0, "nsd": 1.0}
    missed = {"dice": 0.0, "iou": 0.0, "precision": 0.0, "sensitivity": 0.0, "hd95_mm": pytest.approx(diagonal),
              "nsd": 0.0}
    assert binary_metrics(empty, some, spacing_zyx) == missed          # structure missed
    assert binary_metrics(some, empty, spacing_zyx) == missed          # structure hallucinated
    assert binary_metrics(empty, some, spacing_zyx, empty_distance_mm=373.13)["hd95_mm"] == 373.13
    # The BraTS penalty is the diagonal of the BraTS grid.
    assert image_diagonal_mm((155, 240, 240), (1, 1, 1)) == pytest.approx(BRATS_GRID_DIAGONAL_MM)
    assert BRATS_GRID_DIAGONAL_MM == pytest.approx(373.13, abs=0.01)


def test_no_nan_or_inf_anywhere():
    gt = tumour_labels()
    pred = np.zeros_like(gt)
    for results in (evaluate_labels(pred, gt, (1, 1, 1)), evaluate_labels(gt, pred, (1, 1, 1)),
                    evaluate_labels(pred, pred, (1, 1, 1))):
        assert all(math.isfinite(v) for v in flatten_results(results).values())


# ---- labels and regions ----------------------------------------------------------------------

def test_regions_are_unions_of_labels():
    shape = (10, 10, 10)
    gt = np.zeros(shape, np.int32)
    gt[2:8, 2:8, 2:8] = 2
    gt[3:7, 3:7, 3:7] = 4
    gt[4:6, 4:6, 4:6] = 1
    # The prediction gets the whole tumour right but every sub-label wrong.
    pred = np.where(gt == 2, 1, np.where(gt > 0, 2, 0)).astype(np.int32)
    results = evaluate_labels(pred, gt, (1, 1, 1))
    assert list(results) == ["WT", "TC", "ET", "NCR", "ED"]
    assert results["WT"]["dice"] == 1.0 and results["WT"]["hd95_mm"] == 0.0
    for name in ("ET", "NCR", "ED"):
        assert results[name]["dice"] == 0.0
    # TC = {1, 4}: gt 64 voxels (4^3), pred = old edge shell 216 - 64 = 152 voxels, no overlap
    assert results["TC"]["dice"] == 0.0 and results["TC"]["precision"] == 0.0
    for name, values in (("WT", (1, 2, 4)), ("TC", (1, 4)), ("ET", (4,)), ("NCR", (1,)), ("ED", (2,))):
        assert results[name] == binary_metrics(np.isin(pred, values), np.isin(gt, values), (1, 1, 1))


def test_brats2023_numbering_is_accepted():
    gt = tumour_labels()
    pred = perturbed(gt)
    expected = evaluate_labels(pred, gt, (1.0, 1.2, 0.9))
    assert evaluate_labels(from_brats2021(pred, "brats2023"), from_brats2021(gt, "brats2023"),
                           (1.0, 1.2, 0.9)) == expected
    assert evaluate_labels(pred, from_brats2021(gt, "brats2023"), (1.0, 1.2, 0.9)) == expected
    mixed = gt.copy()
    mixed[0, 0, 0] = 3
    with pytest.raises(InputImageError, match="mixes ET=3"):
        evaluate_labels(pred, mixed, (1, 1, 1))


def test_label_values_are_checked_and_lesion_set():
    gt = tumour_labels()
    with pytest.raises(InputImageError, match=r"label values \[7\]"):
        evaluate_labels(np.where(gt == 2, 7, gt), gt, (1, 1, 1))
    with pytest.raises(InputImageError, match="label_set='brats'"):
        evaluate_labels(gt, gt, (1, 1, 1), label_set="lesion")
    lesion_gt = (gt > 0).astype(np.uint8)
    lesion_pred = (perturbed(gt) > 0).astype(np.uint8)
    results = evaluate_labels(lesion_pred, lesion_gt, (1, 1, 1), label_set="lesion")
    assert list(results) == ["lesion"]
    assert results["lesion"] == evaluate_labels(perturbed(gt), gt, (1, 1, 1))["WT"]
    assert list(flatten_results(results)) == result_columns("lesion")
    with pytest.raises(ValueError, match="unknown label set"):
        evaluate_labels(gt, gt, (1, 1, 1), label_set="organs")
    with pytest.raises(GeometryError, match="shape"):
        evaluate_labels(gt[:-1], gt, (1, 1, 1))
    with pytest.raises(ValueError, match="spacing_zyx"):
        evaluate_labels(gt, gt, (1, 1))


# ---- the official BraTS evaluation package -----------------------------------------------------

def test_agrees_with_official_brats_evaluation(tmp_path):
    """The BraTS 2023+ evaluation (brats-evaluation = panoptica with the 'gli' config) on one case.

    Its config numbers ET as 3 (and adds RC = 4, resection cavity), so the case is written in BraTS
    2023 numbering; its groups netc/snfh/et/tc/wt are our NCR/ED/ET/TC/WT.

    What is comparable, and why not everything is equal:
    - Dice: same definition, must agree exactly.
    - HD95: panoptica computes its *global* metrics without the voxel spacing (voxel units; BraTS
      data is 1 mm isotropic, so the case is too) and takes the 95th percentile of both directions'
      distances pooled (medpy), where we (MONAI) take the larger of the two directed 95th
      percentiles. Both are reproduced exactly from one brute-force set of boundary distances, so
      the boundaries and distances agree and only the reduction differs. They are often equal; a
      distant false-positive blob makes ours much larger (asserted below).
    - NSD: panoptica's global NSD uses a 0.5-voxel tolerance (no spacing given) and averages the two
      directed fractions instead of pooling them; reproduced the same way.
    - A missed structure: panoptica gives HD95 inf, which its CSV step turns into 373; we give the
      grid diagonal (373.13 mm on the BraTS grid).
    """
    pytest.importorskip("brats_evaluation")
    from brats_evaluation import config_path, evaluate_single_exam
    from panoptica import Panoptica_Evaluator

    gt = tumour_labels()
    pred = perturbed(gt)
    pred[pred == 1] = 0  # NCR missed entirely: the empty-prediction convention is compared as well
    pred[2:6, 2:6, 2:6] = 2  # a distant false-positive blob, where the two HD95 definitions part
    for name, labels in (("pred", pred), ("gt", gt)):
        sitk.WriteImage(make_image(from_brats2021(labels, "brats2023").astype(np.uint8)),
                        str(tmp_path / f"{name}.nii.gz"))
    evaluator = Panoptica_Evaluator.load_from_config(str(config_path("gli")))
    with pytest.warns(UserWarning):  # panoptica warns that its global NSD tolerance is 0.5 voxel
        official = evaluate_single_exam(str(tmp_path / "pred.nii.gz"), str(tmp_path / "gt.nii.gz"),
                                        "case", evaluator)
    assert "error" not in official, official.get("error")

    ours = evaluate_labels(pred, gt, (1.0, 1.0, 1.0))
    ours_half = evaluate_labels(pred, gt, (1.0, 1.0, 1.0), nsd_tolerance_mm=0.5)
    groups = {"WT": ("wt", (1, 2, 4)), "TC": ("tc", (1, 4)), "ET": ("et", (4,)), "ED": ("snfh", (2,))}
    for name, (group, values) in groups.items():
        theirs = official[group]
        assert ours[name]["dice"] == pytest.approx(theirs["global_bin_dsc"], abs=1e-12), name
        d_pg, d_gp = boundary_distances(np.isin(pred, values), np.isin(gt, values), (1, 1, 1))
        assert theirs["global_bin_hd95"] == pytest.approx(np.percentile(np.hstack([d_pg, d_gp]), 95)), name
        assert ours[name]["hd95_mm"] == pytest.approx(max(np.percentile(d_pg, 95), np.percentile(d_gp, 95)),
                                                      rel=1e-6), name
        assert theirs["global_bin_nsd"] == pytest.approx(((d_pg <= 0.5).mean() + (d_gp <= 0.5).mean()) / 2), name
        pooled = ((d_pg <= 0.5).sum() + (d_gp <= 0.5).sum()) / (len(d_pg) + len(d_gp))
        assert ours_half[name]["nsd"] == pytest.approx(pooled, rel=1e-6), name
    # The false-positive blob is a few percent of the prediction's boundary but far from the tumour:
    # the directed percentile (prediction -> truth) sees it, the pooled one dilutes it with the
    # truth -> prediction distances (about 14.7 mm vs 3.2 mm here).
    assert ours["WT"]["hd95_mm"] > official["wt"]["global_bin_hd95"] + 5
    # NCR missed: both score Dice 0 and NSD 0; HD95 is the maximal penalty in both.
    assert official["netc"]["global_bin_dsc"] == 0.0 and ours["NCR"]["dice"] == 0.0
    assert official["netc"]["global_bin_nsd"] == 0.0 and ours["NCR"]["nsd"] == 0.0
    assert official["netc"]["global_bin_hd95"] == math.inf
    assert ours["NCR"]["hd95_mm"] == pytest.approx(image_diagonal_mm(gt.shape, (1, 1, 1)))


# ---- files -----------------------------------------------------------------------------------

def write_labels(path, labels, **geometry):
    sitk.WriteImage(make_image(np.asarray(labels, np.uint8), **geometry), str(path))
    return path


def test_case_files_use_the_file_spacing(tmp_path):
    gt = tumour_labels()
    pred = perturbed(gt)
    geometry = dict(spacing=(0.9, 1.2, 2.0), origin=(-10.0, 5.0, 3.0))  # SimpleITK (x, y, z)
    results = evaluate_case_files(write_labels(tmp_path / "p.nii.gz", pred, **geometry),
                                  write_labels(tmp_path / "g.nrrd", gt, **geometry))
    assert results == evaluate_labels(pred, gt, (2.0, 1.2, 0.9))


def test_empty_prediction_file_is_evaluated_not_rejected(tmp_path):
    gt = tumour_labels()
    results = evaluate_case_files(write_labels(tmp_path / "p.nii.gz", np.zeros_like(gt)),
                                  write_labels(tmp_path / "g.nii.gz", gt))
    assert results["WT"]["dice"] == 0.0


@pytest.mark.parametrize("geometry, message", [
    (dict(spacing=(1.0, 1.0, 1.5)), "spacing"),
    (dict(origin=(0.0, 0.0, 2.0)), "origin"),
    (dict(direction=(0, 1, 0, 1, 0, 0, 0, 0, 1)), "direction"),
])
def test_mismatched_geometry_raises(tmp_path, geometry, message):
    gt = tumour_labels()
    write_labels(tmp_path / "g.nii.gz", gt)
    write_labels(tmp_path / "p.nii.gz", gt, **geometry)
    with pytest.raises(GeometryError, match=f"not on the same voxel grid.*{message}"):
        evaluate_case_files(tmp_path / "p.nii.gz", tmp_path / "g.nii.gz")
    write_labels(tmp_path / "small.nii.gz", gt[:, :-1])
    with pytest.raises(GeometryError, match="size"):
        evaluate_case_files(tmp_path / "small.nii.gz", tmp_path / "g.nii.gz")


def test_intensity_image_is_not_a_label_map(tmp_path):
    gt = tumour_labels()
    write_labels(tmp_path / "g.nii.gz", gt)
    sitk.WriteImage(make_image(np.random.default_rng(0).random(gt.shape).astype(np.float32)),
                    str(tmp_path / "t1.nii.gz"))
    with pytest.raises(InputImageError, match="not a label map"):
        evaluate_case_files(tmp_path / "t1.nii.gz", tmp_path / "g.nii.gz")
    with pytest.raises(InputImageError, match="does not exist"):
        evaluate_case_files(tmp_path / "missing.nii.gz", tmp_path / "g.nii.gz")


# ---- folders ---------------------------------------------------------------------------------

def small_case(seed):
    """A small tumour label map and an imperfect prediction of it, different per seed."""
    gt = tumour_labels((12, 16, 18))
    return perturbed(np.roll(gt, seed, axis=2), seed), gt


def read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def check_csv(path, rows, cases):
    written = read_csv(path)
    assert [r["case"] for r in written] == [*cases, "mean", "sd"]
    assert list(written[0]) == ["case", *result_columns("brats", lesion_wise=True)]  # evaluate's default
    for column in result_columns("brats", lesion_wise=True):
        values = np.array([float(r[column]) for r in written[: len(cases)]])
        assert float(written[-2][column]) == pytest.approx(values.mean())
        assert float(written[-1][column]) == pytest.approx(values.std(ddof=1))
        assert [float(r[column]) for r in written] == pytest.approx([float(r[column]) for r in rows], nan_ok=True)


def test_evaluate_folders_brats_layout(tmp_path):
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    pred_dir.mkdir()
    expected = {}
    for seed, case in enumerate(["BraTS2021_00002", "BraTS2021_00001"]):
        pred, gt = small_case(seed)
        (gt_dir / case).mkdir(parents=True)
        write_labels(gt_dir / case / f"{case}_seg.nii.gz", gt)
        image = (gt * 10 + 5).astype(np.float32)
        sitk.WriteImage(make_image(image), str(gt_dir / case / f"{case}_flair.nii.gz"))
        write_labels(pred_dir / f"{case}.nii.gz", pred)
        expected[case] = flatten_results(evaluate_labels(pred, gt, (1, 1, 1), lesion_wise=True))
    write_labels(pred_dir / "BraTS2021_00099.nii.gz", small_case(5)[0])  # no ground truth for it
    (pred_dir / "notes.txt").write_text("not an image")

    with pytest.warns(MissingCaseWarning, match="BraTS2021_00099"):
        rows = evaluate_folders(pred_dir, gt_dir, tmp_path / "metrics.csv")
    cases = ["BraTS2021_00001", "BraTS2021_00002"]
    assert [r["case"] for r in rows] == [*cases, "mean", "sd"]
    for row in rows[:2]:
        assert {k: v for k, v in row.items() if k != "case"} == pytest.approx(expected[row["case"]])
    check_csv(tmp_path / "metrics.csv", rows, cases)
    assert [p.name for p in tmp_path.iterdir() if p.is_file()] == ["metrics.csv"]  # no temporary left


def test_evaluate_folders_flat_layout_and_2023_names(tmp_path):
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    pred_dir.mkdir()
    gt_dir.mkdir()
    cases = ["BraTS-GLI-00001-000", "BraTS-GLI-00002-000", "case3"]
    for seed, case in enumerate(cases):
        pred, gt = small_case(seed)
        gt_name = {0: f"{case}-seg.nii.gz", 1: f"{case}_seg.nii.gz", 2: f"{case}.nii.gz"}[seed]
        write_labels(gt_dir / gt_name, from_brats2021(gt, "brats2023"))
        write_labels(pred_dir / f"{case}{'.nrrd' if seed == 2 else '.nii.gz'}", pred)
    sitk.WriteImage(make_image(np.arange(12 * 16 * 18, dtype=np.float32).reshape(12, 16, 18)),
                    str(gt_dir / "case3_t1.nii.gz"))  # an image beside the label maps is not a case
    write_labels(gt_dir / "case4_seg.nii.gz", small_case(4)[1])  # ground truth without prediction

    with pytest.warns(MissingCaseWarning, match="case4") as record:
        rows = evaluate_folders(pred_dir, gt_dir, tmp_path / "metrics.csv")
    assert not any("case3_t1" in str(w.message) for w in record)
    check_csv(tmp_path / "metrics.csv", rows, cases)
    pred, gt = small_case(2)
    assert rows[2]["WT_dice"] == pytest.approx(evaluate_labels(pred, gt, (1, 1, 1))["WT"]["dice"])


def test_evaluate_folders_errors(tmp_path):
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    pred_dir.mkdir()
    gt_dir.mkdir()
    pred, gt = small_case(0)
    write_labels(pred_dir / "a.nii.gz", pred)
    write_labels(gt_dir / "b_seg.nii.gz", gt)
    with pytest.raises(InputImageError, match="no case has both a prediction and a ground truth"):
        evaluate_folders(pred_dir, gt_dir, tmp_path / "metrics.csv")
    with pytest.raises(OutputPathError):
        evaluate_folders(pred_dir, gt_dir, tmp_path / "no_such_folder" / "metrics.csv")
    with pytest.raises(InputImageError, match="does not exist"):
        evaluate_folders(tmp_path / "nothing", gt_dir, tmp_path / "metrics.csv")

    # A failure part-way leaves no CSV behind.
    write_labels(gt_dir / "a_seg.nii.gz", gt[:, :-1])
    with pytest.raises(GeometryError), pytest.warns(MissingCaseWarning, match="no prediction"):
        evaluate_folders(pred_dir, gt_dir, tmp_path / "metrics.csv")
    assert not any(p.is_file() for p in tmp_path.iterdir())

    write_labels(pred_dir / "b.nrrd", pred)
    write_labels(pred_dir / "b.nii.gz", pred)
    with pytest.raises(InputImageError, match="two predictions for case b"):
        evaluate_folders(pred_dir, gt_dir, tmp_path / "metrics.csv")
