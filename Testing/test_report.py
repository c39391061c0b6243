"""Lesion volumes, the QC picture, the volume files and the icon."""
import csv
import json
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest
import SimpleITK as sitk
from conftest import blob_case, oblique_direction

from BrainLesionSAMLib import report
from BrainLesionSAMLib.errors import OutputPathError
from BrainLesionSAMLib.report import (lesion_volumes, orient_for_display, write_qc_picture, write_report,
                                      write_volume_report)

ROOT = Path(__file__).resolve().parents[1]


def _arrays(images):
    return {key: sitk.GetArrayFromImage(image) for key, image in images.items()}


# ----------------------------------------------------------------------------- volumes

def test_cube_volume_with_anisotropic_spacing():
    labels = np.zeros((16, 20, 24), np.uint8)
    labels[2:12, 5:15, 8:18] = 2                     # 10 x 10 x 10 voxels
    volumes = lesion_volumes(labels, (2.0, 1.0, 1.0))  # (z, y, x) mm: 2 mm^3 per voxel
    assert volumes["Edema"] == pytest.approx(2.0)      # 1000 voxels * 2 mm^3 = 2000 mm^3 = 2 ml
    assert volumes["WT"] == pytest.approx(2.0)
    assert volumes["Necrotic core"] == volumes["Enhancing tumor"] == volumes["TC"] == volumes["ET"] == 0.0


def test_regions_add_up_to_hand_counts():
    rng = np.random.default_rng(3)
    labels = rng.choice(np.array([0, 1, 2, 4], np.uint8), size=(9, 11, 13), p=[0.5, 0.1, 0.3, 0.1])
    spacing = (2.5, 0.9, 1.1)
    voxel_ml = 2.5 * 0.9 * 1.1 / 1000
    count = {v: int((labels == v).sum()) for v in (1, 2, 4)}
    volumes = lesion_volumes(labels, spacing)
    assert set(volumes) == {"Necrotic core", "Edema", "Enhancing tumor", "WT", "TC", "ET"}
    assert volumes["Necrotic core"] == pytest.approx(count[1] * voxel_ml)
    assert volumes["Edema"] == pytest.approx(count[2] * voxel_ml)
    assert volumes["Enhancing tumor"] == pytest.approx(count[4] * voxel_ml)
    assert volumes["WT"] == pytest.approx((count[1] + count[2] + count[4]) * voxel_ml)
    assert volumes["TC"] == pytest.approx((count[1] + count[4]) * voxel_ml)
    assert volumes["ET"] == pytest.approx(volumes["Enhancing tumor"])
    assert volumes["WT"] == pytest.approx(volumes["Necrotic core"] + volumes["Edema"] + volumes["Enhancing tumor"])


def test_brats2023_enhancing_tumour_is_accepted():
    _, labels_image = blob_case()
    labels = sitk.GetArrayFromImage(labels_image)
    brats2023 = labels.copy()
    brats2023[labels == 4] = 3
    assert lesion_volumes(brats2023, (1.0, 1.0, 1.0)) == lesion_volumes(labels, (1.0, 1.0, 1.0))
    assert lesion_volumes(labels_image, (1.0, 1.0, 1.0)) == lesion_volumes(labels, (1.0, 1.0, 1.0))  # sitk.Image
    mixed = labels.copy()
    mixed[0, 0, 0] = 3
    with pytest.raises(ValueError, match="mixes"):
        lesion_volumes(mixed, (1.0, 1.0, 1.0))


def test_lesion_label_set_and_foreign_values():
    labels = np.zeros((4, 4, 4), np.uint8)
    labels[:2] = 1
    assert lesion_volumes(labels, (1.0, 2.0, 3.0), "lesion") == {"Lesion": pytest.approx(32 * 6 / 1000)}
    labels[0, 0, 0] = 2
    with pytest.raises(ValueError, match="does not have"):
        lesion_volumes(labels, (1.0, 1.0, 1.0), "lesion")
    with pytest.raises(ValueError, match="spacing"):
        lesion_volumes(labels, (1.0, 0.0, 1.0))


# ----------------------------------------------------------------------------- orientation

@pytest.mark.parametrize("direction", [(1, 0, 0, 0, 1, 0, 0, 0, 1), (-1, 0, 0, 0, -1, 0, 0, 0, 1),
                                       (0, 1, 0, 0, 0, 1, 1, 0, 0), (0, 0, -1, 1, 0, 0, 0, -1, 0),
                                       oblique_direction(20.0)])
def test_display_orientation_matches_simpleitk_dicom_orient(direction):
    array = np.random.default_rng(0).random((4, 5, 6)).astype(np.float32)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.0, 2.0, 3.0))
    image.SetDirection(direction)
    expected = sitk.DICOMOrient(image, "LPS")
    view, spacing = orient_for_display(array, (3.0, 2.0, 1.0), direction)
    np.testing.assert_array_equal(view, sitk.GetArrayFromImage(expected))
    assert spacing == tuple(reversed(expected.GetSpacing()))


# ----------------------------------------------------------------------------- files

def test_write_report_writes_three_consistent_files(tmp_path):
    images, labels_image = blob_case(spacing=(1.0, 1.2, 2.5))
    labels = sitk.GetArrayFromImage(labels_image)
    spacing = (2.5, 1.2, 1.0)
    extra = {"method": "unet2d", "device": "cpu", "inputs": {"t1": Path("/data/t1.nii.gz")}, "seconds": 1.5}
    paths = write_report(tmp_path, _arrays(images), labels, spacing, case_id="BraTS_001", extra=extra)

    assert paths == {"qc": tmp_path / "BraTS_001_qc.png", "json": tmp_path / "BraTS_001_volumes.json",
                     "csv": tmp_path / "BraTS_001_volumes.csv"}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in paths.values())

    picture = matplotlib.image.imread(paths["qc"])
    height, width, channels = picture.shape
    assert width >= 600 and height >= 4 * 150 and channels in (3, 4)
    assert picture[..., :3].std() > 0.05                        # not a blank canvas
    colourful = np.abs(picture[..., 0] - picture[..., 1]) > 0.3  # the red/green overlay is there
    assert colourful.mean() > 0.001

    volumes = lesion_volumes(labels, spacing)
    written = json.loads(paths["json"].read_text())
    assert written["volumes_ml"] == pytest.approx(volumes, abs=1e-6)
    assert written["method"] == "unet2d" and written["case"] == "BraTS_001"
    assert written["inputs"] == {"t1": "/data/t1.nii.gz"}
    with open(paths["csv"], newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows[0] == ["name", "volume_ml"]
    assert {name: float(value) for name, value in rows[1:]} == pytest.approx(volumes, abs=1e-6)


def test_qc_picture_rows_follow_the_given_modalities(tmp_path):
    images, labels_image = blob_case()
    arrays = _arrays(images)
    labels = sitk.GetArrayFromImage(labels_image)
    one = write_qc_picture({"flair": images["flair"]}, labels, (1.0, 1.0, 1.0), tmp_path / "one.png")
    empty = write_qc_picture({"t1": arrays["t1"], "t2": arrays["t2"]}, np.zeros_like(labels), (1.0, 1.0, 1.0),
                             tmp_path / "empty.png", label_set="lesion")
    assert matplotlib.image.imread(one).shape[0] < matplotlib.image.imread(empty).shape[0]
    with pytest.raises(ValueError, match="order"):  # an sitk.Image whose spacing disagrees: (x, y, z) given
        write_qc_picture({"flair": blob_case(spacing=(1.0, 1.0, 3.0))[0]["flair"]}, labels, (1.0, 1.0, 3.0),
                         tmp_path / "wrong.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.png", "one.png"]


def test_write_volume_report_standalone(tmp_path):
    volumes = {"Lesion": 1.23456789}
    json_path, csv_path = write_volume_report(volumes, tmp_path / "v.json", tmp_path / "v.csv", {"case": "c"})
    assert json.loads(json_path.read_text()) == {"case": "c", "volumes_ml": {"Lesion": 1.234568}}
    assert csv_path.read_text().splitlines() == ["name,volume_ml", "Lesion,1.234568"]


def test_unwritable_output_raises_and_leaves_nothing(tmp_path):
    images, labels_image = blob_case()
    arrays, labels = _arrays(images), sitk.GetArrayFromImage(labels_image)
    with pytest.raises(OutputPathError, match="does not exist"):
        write_report(tmp_path / "missing", arrays, labels, (1.0, 1.0, 1.0))
    assert not (tmp_path / "missing").exists()
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    with pytest.raises(OutputPathError):
        write_report(a_file, arrays, labels, (1.0, 1.0, 1.0))
    with pytest.raises(OutputPathError, match="plain file name"):
        write_report(tmp_path, arrays, labels, (1.0, 1.0, 1.0), case_id="../escape")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    images, labels_image = blob_case()
    arrays, labels = _arrays(images), sitk.GetArrayFromImage(labels_image)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    # the CSV is written last: the PNG and the JSON are complete by then and must still not appear
    monkeypatch.setattr(report.csv, "writer", disk_full)
    with pytest.raises(OutputPathError, match="No space left"):
        write_report(tmp_path, arrays, labels, (1.0, 1.0, 1.0), case_id="case")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- icon

def test_icon_files_are_identical_128px_pngs():
    root_icon = ROOT / "BrainLesionSAM.png"
    module_icon = ROOT / "BrainLesionSAM" / "Resources" / "Icons" / "BrainLesionSAM.png"
    assert root_icon.read_bytes() == module_icon.read_bytes()
    assert root_icon.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    picture = matplotlib.image.imread(root_icon)
    assert picture.shape == (128, 128, 4)
    assert picture[..., 3].min() == 0 and picture[..., 3].max() == 1  # transparent corners, opaque tile
