"""Reading volumes (files and DICOM series), finding modalities by name, atomic writes."""
import os

import numpy as np
import pytest
import SimpleITK as sitk

from BrainLesionSAMLib.conventions import from_brats2021, to_brats2021
from BrainLesionSAMLib.errors import InputImageError, OutputPathError
from BrainLesionSAMLib.io import atomic_output, discover_case, modality_from_name, read_image, write_image

from conftest import make_image


@pytest.mark.parametrize("name, key", [
    ("BraTS20_Training_001_t1ce.nii.gz", "t1ce"), ("BraTS20_Training_001_t1.nii.gz", "t1"),
    ("BraTS20_Training_001_flair.nii.gz", "flair"), ("BraTS20_Training_001_t2.nii.gz", "t2"),
    ("BraTS-GLI-00000-000-t1c.nii.gz", "t1ce"), ("BraTS-GLI-00000-000-t1n.nii.gz", "t1"),
    ("BraTS-GLI-00000-000-t2w.nii.gz", "t2"), ("BraTS-GLI-00000-000-t2f.nii.gz", "flair"),
    ("patient_T1Gd.nrrd", "t1ce"), ("sub-01_FLAIR.nii", "flair"), ("sub-01_T1w.nii.gz", "t1"),
    ("scan.nii.gz", None), ("t1ce_notes.txt", "t1ce"),
])
def test_modality_names(name, key):
    assert modality_from_name(name) == key


def test_discover_brats_2021_and_2023_layouts(tmp_path):
    image = make_image(np.random.rand(4, 5, 6).astype(np.float32))
    for suffix in ("t1", "t1ce", "t2", "flair", "seg"):
        sitk.WriteImage(image, str(tmp_path / f"BraTS2021_00001_{suffix}.nii.gz"))
    found = discover_case(tmp_path)
    assert {k: v.name for k, v in found.items()} == {
        "t1": "BraTS2021_00001_t1.nii.gz", "t1ce": "BraTS2021_00001_t1ce.nii.gz",
        "t2": "BraTS2021_00001_t2.nii.gz", "flair": "BraTS2021_00001_flair.nii.gz",
        "seg": "BraTS2021_00001_seg.nii.gz"}
    other = tmp_path / "2023"
    other.mkdir()
    for suffix in ("t1n", "t1c", "t2w", "t2f", "seg"):
        sitk.WriteImage(image, str(other / f"BraTS-GLI-00001-000-{suffix}.nii.gz"))
    assert set(discover_case(other)) == {"t1", "t1ce", "t2", "flair", "seg"}


def test_two_candidates_for_one_modality_is_an_error(tmp_path):
    image = make_image(np.random.rand(4, 5, 6).astype(np.float32))
    sitk.WriteImage(image, str(tmp_path / "a_flair.nii.gz"))
    sitk.WriteImage(image, str(tmp_path / "b_t2f.nii.gz"))
    with pytest.raises(InputImageError, match="two files"):
        discover_case(tmp_path)


def test_dicom_series_folder_reads_with_its_geometry(tmp_path):
    array = (np.random.default_rng(0).random((6, 12, 10)) * 1000).astype(np.int16)
    image = make_image(array, spacing=(0.8, 0.9, 2.5), origin=(-10.0, 20.0, 30.0))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for z in range(array.shape[0]):
        slice_image = image[:, :, z]
        slice_image.SetMetaData("0020|0032", "\\".join(map(str, image.TransformIndexToPhysicalPoint((0, 0, z)))))
        slice_image.SetMetaData("0020|0037", "1\\0\\0\\0\\1\\0")
        slice_image.SetMetaData("0020|0013", str(z))
        slice_image.SetMetaData("0020|000e", "1.2.826.0.1.3680043.2.1125.1")
        slice_image.SetMetaData("0008|0060", "MR")
        writer.SetFileName(str(tmp_path / f"slice{z:03d}.dcm"))
        writer.Execute(slice_image)
    loaded = read_image(tmp_path, "T1")
    assert loaded.GetSize() == (10, 12, 6)
    np.testing.assert_allclose(loaded.GetSpacing(), (0.8, 0.9, 2.5), atol=1e-4)
    np.testing.assert_allclose(loaded.GetOrigin(), (-10, 20, 30), atol=1e-4)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(loaded), array.astype(np.float32))


def test_empty_folder_is_not_a_dicom_series(tmp_path):
    with pytest.raises(InputImageError, match="no DICOM series"):
        read_image(tmp_path, "FLAIR")


def test_missing_file_names_the_input(tmp_path):
    with pytest.raises(InputImageError, match="FLAIR file .*does not exist"):
        read_image(tmp_path / "nope.nii.gz", "FLAIR")


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.nii.gz"
    with pytest.raises(RuntimeError):
        with atomic_output(target) as temporary:
            temporary.write_bytes(b"partial")
            raise RuntimeError("simulated crash while writing")
    assert list(tmp_path.iterdir()) == []
    write_image(make_image(np.ones((3, 4, 5), np.uint8)), target)
    assert [p.name for p in tmp_path.iterdir()] == ["out.nii.gz"]


def test_unwritable_folder_is_reported(tmp_path, monkeypatch):
    # CI runs as root, which may write anywhere, so the permission answer is simulated.
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if mode == os.W_OK else real_access(path, mode))
    with pytest.raises(OutputPathError, match="not writable"):
        write_image(make_image(np.ones((3, 4, 5), np.uint8)), tmp_path / "x.nii.gz")
    assert list(tmp_path.iterdir()) == []


def test_missing_output_folder_is_reported(tmp_path):
    with pytest.raises(OutputPathError, match="does not exist"):
        write_image(make_image(np.ones((3, 4, 5), np.uint8)), tmp_path / "no" / "x.nii.gz")


def test_brats_2023_numbering_round_trip():
    labels = np.array([0, 1, 2, 3])
    assert to_brats2021(labels).tolist() == [0, 1, 2, 4]
    assert from_brats2021(to_brats2021(labels), "brats2023").tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        to_brats2021(np.array([3, 4]))


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_truncated_nifti_is_refused(tmp_path, suffix):
    path = tmp_path / f"whole{suffix}"
    sitk.WriteImage(make_image(np.random.rand(20, 30, 40).astype(np.float32)), str(path))
    assert read_image(path, "T2").GetSize() == (40, 30, 20)
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    with pytest.raises(InputImageError, match="T2 file .*(incomplete|damaged)"):
        read_image(cut, "T2")
