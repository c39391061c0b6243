"""DICOM SEG output (BrainLesionSAMLib/dicom_seg.py): a generated volume is written as a DICOM MR series
with pydicom (oblique, anisotropic, files named out of slice order), a label map on its grid goes out
as a DICOM SEG and comes back voxel for voxel; the command line writes one for DICOM input
(`segment --out *.dcm`, `batch --format dicom-seg`) and refuses it, in one line, for NIfTI input."""
from __future__ import annotations

import csv
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, SegmentationStorage, generate_uid

from BrainLesionSAMLib.cli import main
from BrainLesionSAMLib.conventions import LABEL_NAMES, from_brats2021
from BrainLesionSAMLib.dicom_seg import read_dicom_seg, write_dicom_seg
from BrainLesionSAMLib.errors import GeometryError, InputImageError
from BrainLesionSAMLib.io import copy_geometry, read_image
from BrainLesionSAMLib.terminology import ANATOMIC_REGION, SEGMENT_CATEGORY, SEGMENT_TYPES

from conftest import blob_case, oblique_direction

GEOMETRY = dict(spacing=(0.9, 1.1, 2.5), origin=(-20.0, 10.0, 5.0), direction=oblique_direction(25.0))


def write_dicom_series(image: sitk.Image, folder: Path, study_uid: str, frame_uid: str, series_number: int,
                       description: str) -> str:
    """``image`` as an MR Image Storage series, one file per slice, file names shuffled against the
    slice order (readers must sort by position). Returns the SeriesInstanceUID."""
    folder.mkdir(parents=True)
    array = np.round(sitk.GetArrayFromImage(image) * 10).astype(np.int16)
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    series_uid = generate_uid()
    names = np.random.default_rng(series_number).permutation(array.shape[0])
    for k in range(array.shape[0]):
        meta = pydicom.dataset.FileMetaDataset()
        meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID = MRImageStorage, ExplicitVRLittleEndian
        meta.MediaStorageSOPInstanceUID = generate_uid()
        ds = pydicom.dataset.FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Phantom^Generated", "BLSAM0001", "", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = \
            "20260101", "120000", "1", "", ""
        ds.Modality, ds.Manufacturer, ds.SeriesNumber, ds.InstanceNumber = "MR", "generated", series_number, k + 1
        ds.SeriesDescription = description
        ds.ImagePositionPatient = [round(float(v), 6) for v in image.TransformIndexToPhysicalPoint((0, 0, k))]
        ds.ImageOrientationPatient = [round(float(v), 8) for v in (*direction[:, 0], *direction[:, 1])]
        ds.PixelSpacing = [image.GetSpacing()[1], image.GetSpacing()[0]]
        ds.SliceThickness = image.GetSpacing()[2]
        ds.Rows, ds.Columns = array.shape[1], array.shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = array[k].tobytes()
        ds.save_as(folder / f"IM{names[k]:04d}.dcm", enforce_file_format=True)
    return series_uid


@pytest.fixture(scope="module")
def dicom_case(tmp_path_factory):
    """A case folder of four DICOM series (sub-folders t1, t1ce, t2, flair) of one study and frame of
    reference, the ground-truth labels on the T1CE series' grid and that series' UID."""
    images, labels = blob_case(**GEOMETRY)
    root = tmp_path_factory.mktemp("dicom_case") / "BLSAM_dicom"
    study, frame = generate_uid(), generate_uid()
    uids = {key: write_dicom_series(image, root / key, study, frame, number, key.upper())
            for number, (key, image) in enumerate(images.items(), 1)}
    reference = read_image(root / "t1ce")
    truth = copy_geometry(sitk.GetArrayFromImage(labels), reference)
    return {"root": root, "truth": truth, "series_uid": uids["t1ce"], "study_uid": study, "frame_uid": frame}


def test_round_trip_keeps_masks_codes_and_the_reference(dicom_case, tmp_path):
    truth = dicom_case["truth"]
    assert truth.GetSize() == (45, 37, 21) and np.allclose(truth.GetSpacing(), GEOMETRY["spacing"])
    path = write_dicom_seg(truth, "brats", dicom_case["root"] / "t1ce", tmp_path / "seg.dcm", "unet2d")

    seg = hd.seg.segread(str(path))
    assert seg.SOPClassUID == SegmentationStorage and seg.SegmentationType == "BINARY"
    assert [item.SeriesInstanceUID for item in seg.ReferencedSeriesSequence] == [dicom_case["series_uid"]]
    assert seg.StudyInstanceUID == dicom_case["study_uid"] and seg.FrameOfReferenceUID == dicom_case["frame_uid"]
    assert seg.PatientID == "BLSAM0001" and seg.SeriesNumber == 1002  # T1CE is series 2
    described = [(d.SegmentNumber, d.SegmentLabel, d.SegmentedPropertyTypeCodeSequence[0].CodeValue,
                  d.SegmentedPropertyCategoryCodeSequence[0].CodeValue, d.AnatomicRegionSequence[0].CodeValue,
                  d.SegmentAlgorithmType, d.SegmentAlgorithmName) for d in seg.SegmentSequence]
    assert described == [(n, LABEL_NAMES["brats"][v], SEGMENT_TYPES["brats"][v].value, SEGMENT_CATEGORY.value,
                          ANATOMIC_REGION.value, "AUTOMATIC", "unet2d") for n, v in enumerate((1, 2, 4), 1)]
    assert [SEGMENT_TYPES["brats"][v].value for v in (1, 2, 4)] == ["6574001", "79654002", "C113842"]  # CID 7168

    labels, label_set = read_dicom_seg(path, dicom_case["root"] / "t1ce")
    assert label_set == "brats" and np.array_equal(labels, sitk.GetArrayFromImage(truth))
    assert set(np.unique(labels)) == {0, 1, 2, 4}

    # BraTS 2023 numbering (ET = 3) in, the same object out; a lesion mask as one 'Lesion' segment.
    as_2023 = copy_geometry(from_brats2021(sitk.GetArrayFromImage(truth), "brats2023"), truth)
    again, _ = read_dicom_seg(write_dicom_seg(as_2023, "brats", dicom_case["root"] / "t1ce", tmp_path / "s23.dcm"),
                              dicom_case["root"] / "t1ce")
    assert np.array_equal(again, labels)
    lesion = copy_geometry((sitk.GetArrayFromImage(truth) > 0).astype(np.uint8), truth)
    lesion_path = write_dicom_seg(lesion, "lesion", dicom_case["root"] / "t1ce", tmp_path / "lesion.dcm", "litemedsam")
    lesion_back, lesion_set = read_dicom_seg(lesion_path, dicom_case["root"] / "t1ce")
    assert lesion_set == "lesion" and np.array_equal(lesion_back, sitk.GetArrayFromImage(lesion))
    assert hd.seg.segread(str(lesion_path)).SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "52988006"


def test_empty_result_and_wrong_grid_or_series(dicom_case, tmp_path):
    truth = dicom_case["truth"]
    empty = copy_geometry(np.zeros(sitk.GetArrayFromImage(truth).shape, np.uint8), truth)
    labels, _ = read_dicom_seg(write_dicom_seg(empty, "brats", dicom_case["root"] / "t1ce", tmp_path / "e.dcm"),
                               dicom_case["root"] / "t1ce")
    assert not labels.any()
    shifted = sitk.Image(truth)
    shifted.SetOrigin(tuple(v + 2.0 for v in truth.GetOrigin()))
    with pytest.raises(GeometryError, match="not on the grid of the DICOM series.*origin"):
        write_dicom_seg(shifted, "brats", dicom_case["root"] / "t1ce", tmp_path / "x.dcm")
    assert not (tmp_path / "x.dcm").exists()
    written = write_dicom_seg(truth, "brats", dicom_case["root"] / "t1ce", tmp_path / "seg.dcm")
    with pytest.raises(InputImageError, match="does not reference the DICOM series"):
        read_dicom_seg(written, dicom_case["root"] / "flair")


# ----------------------------------------------------------------------------- command line

def run(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr
    return lines[0]


def test_segment_writes_a_dicom_seg_equal_to_the_label_volume(dicom_case, weights, tmp_path, capsys):
    common = ("segment", "--case-dir", dicom_case["root"], "--method", "unet2d", "--weights", weights, "--device", "cpu")
    code, _, err = run(capsys, *common, "--out", tmp_path / "labels.nii.gz")
    assert code == 0, err
    code, out, err = run(capsys, *common, "--out", tmp_path / "seg.dcm")
    assert code == 0, err
    assert f"wrote {tmp_path / 'seg.dcm'}" in out
    labels, label_set = read_dicom_seg(tmp_path / "seg.dcm", dicom_case["root"] / "t1ce")
    volume = sitk.ReadImage(str(tmp_path / "labels.nii.gz"))
    assert label_set == "brats" and labels.any()
    assert np.array_equal(labels, sitk.GetArrayFromImage(volume))
    # --format dicom-seg says the same as the .dcm suffix; an image-suffixed name is refused.
    code, _, err = run(capsys, *common, "--out", tmp_path / "seg2.dcm", "--format", "dicom-seg")
    assert code == 0, err
    code, _, err = run(capsys, *common, "--out", tmp_path / "seg.nii.gz", "--format", "dicom-seg")
    assert code == 1 and "name the output *.dcm" in one_error_line(err)


def test_dicom_seg_from_nifti_input_is_one_line_error(dicom_case, weights, tmp_path, capsys):
    images, _ = blob_case(**GEOMETRY)
    for key, image in images.items():
        sitk.WriteImage(image, str(tmp_path / f"{key}.nii.gz"))
    code, _, err = run(capsys, "segment", *(a for k in images for a in (f"--{k}", tmp_path / f"{k}.nii.gz")),
                       "--method", "unet2d", "--weights", weights, "--out", tmp_path / "seg.dcm")
    assert code == 1
    assert "needs the reference volume (T1CE) as a DICOM series folder" in one_error_line(err)
    assert "t1ce.nii.gz" in one_error_line(err)
    assert not list(tmp_path.glob("*seg*"))


def test_batch_writes_one_dicom_seg_per_dicom_case_and_fails_nifti_cases(dicom_case, weights, tmp_path, capsys):
    batch_in = tmp_path / "cases"
    batch_in.mkdir()
    (batch_in / "dicom_case").symlink_to(dicom_case["root"], target_is_directory=True)
    nifti_case = batch_in / "nifti_case"
    nifti_case.mkdir()
    images, _ = blob_case(**GEOMETRY)
    for key, image in images.items():
        sitk.WriteImage(image, str(nifti_case / f"nifti_case_{key}.nii.gz"))
    code, out, err = run(capsys, "batch", "--input", batch_in, "--output", tmp_path / "out", "--format", "dicom-seg",
                         "--method", "unet2d", "--weights", weights, "--device", "cpu")
    assert code == 1, err  # one case failed
    with open(tmp_path / "out" / "summary.csv", newline="") as handle:
        rows = {row["case"]: row for row in csv.DictReader(handle)}
    assert rows["dicom_case"]["status"] == "done" and rows["dicom_case"]["output"].endswith("dicom_case.dcm")
    assert rows["nifti_case"]["status"] == "failed" and "DICOM series folder" in rows["nifti_case"]["error"]
    labels, _ = read_dicom_seg(tmp_path / "out" / "dicom_case.dcm", dicom_case["root"] / "t1ce")
    assert labels.shape == sitk.GetArrayFromImage(dicom_case["truth"]).shape
    assert not (tmp_path / "out" / "nifti_case.dcm").exists()
