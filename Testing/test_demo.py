"""The README's main job: the demo on the embedded sample case, with the packaged baseline weights.

These tests measure the shipped weights on cases they were not trained on (they come from the
phantom study's unet2d run, whose cases have seeds from sample.STUDY_SEEDS_FROM on), scoring with the
library's metrics.
"""
import numpy as np
import pytest
import SimpleITK as sitk

from BrainLesionSAMLib.cli import main
from BrainLesionSAMLib.metrics import evaluate_labels
from BrainLesionSAMLib.pipeline import load_and_segment
from BrainLesionSAMLib.sample import SAMPLE_CASE_SEED, STUDY_SEEDS_FROM, SampleParameters, generate_case


def whole_tumour_dice(prediction: np.ndarray, truth_image: sitk.Image) -> float:
    truth = sitk.GetArrayFromImage(truth_image)
    return evaluate_labels(prediction, truth, tuple(reversed(truth_image.GetSpacing())))["WT"]["dice"]


def test_demo_writes_segmentation_report_and_scores_above_0_8(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    labels_path = out / "BLSAM_sample_unet2d.nii.gz"
    assert f"wrote {labels_path}" in printed and str(out.resolve()) in printed
    for name in ("BLSAM_sample_qc.png", "BLSAM_sample_volumes.json", "BLSAM_sample_volumes.csv"):
        assert (out / "report" / name).is_file()
    prediction = sitk.ReadImage(str(labels_path))
    truth = sitk.ReadImage(str(out / "cases" / "BLSAM_sample" / "BLSAM_sample_seg.nii.gz"))
    assert prediction.GetSize() == truth.GetSize() == (240, 240, 155)
    assert prediction.GetOrigin() == truth.GetOrigin() and prediction.GetDirection() == truth.GetDirection()
    assert whole_tumour_dice(sitk.GetArrayFromImage(prediction), truth) > 0.8
    # a second run re-uses its own folder without complaint
    assert main(["demo", "--out", str(out)]) == 0


def test_demo_refuses_a_folder_it_did_not_write(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    assert main(["demo", "--out", str(tmp_path)]) == 1
    assert "did not write" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


@pytest.mark.parametrize("seed", [SAMPLE_CASE_SEED + 1, 123])
def test_packaged_weights_generalise_to_fresh_cases(seed):
    assert seed < STUDY_SEEDS_FROM
    images = generate_case(SampleParameters.random(seed, resolution=1))
    segmentation = load_and_segment({k: v for k, v in images.items() if k != "seg"}, "unet2d", device="cpu")
    assert whole_tumour_dice(segmentation.label_array, images["seg"]) > 0.8
