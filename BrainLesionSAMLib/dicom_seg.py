"""DICOM Segmentation (SEG) output: the label volume as a DICOM SEG object that references the DICOM
series it was segmented on, written and read with highdicom.

One binary segment per label of the label set (NCR, ED, ET for BraTS sub-regions; one lesion
otherwise), numbered 1, 2, 3 in that order, each described by the codes of
``terminology.SEGMENT_TYPES`` (DICOM CID 7168; the Slicer segments carry the same ones), category
"Morphologically Altered Structure", anatomic region "Brain", algorithm type AUTOMATIC with the
method as the algorithm's name. Frame k of a segment covers source image k of the series, so the
label volume must lie exactly on the series' grid: the reference volume read from that folder
(``io.read_image`` stacks the files in the order of ``io.dicom_series_files``), which is where the
pipeline writes its labels. Empty frames are left out, as highdicom does by default.

Reading back (:func:`read_dicom_seg`) maps each segment to its label value through its
segmented-property-type code, not through its number, and fills a [z, y, x] label map on the source
series' grid.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np
import SimpleITK as sitk

from . import __version__
from .conventions import LABEL_NAMES, LABEL_SETS, MODALITY_DISPLAY_NAMES, to_brats2021
from .errors import GeometryError, InputImageError, OutputPathError
from .io import atomic_output, dicom_series_files
from .terminology import ANATOMIC_REGION, SEGMENT_CATEGORY, SEGMENT_TYPES, Code, label_of

DICOM_SEG = "dicom-seg"
LABEL_VOLUME = "image"
OUTPUT_FORMATS = (LABEL_VOLUME, DICOM_SEG)
DICOM_SUFFIX = ".dcm"
# Offset from the source series number, a common convention for derived series.
SERIES_NUMBER_OFFSET = 1000
# Tolerances of the grid check (mm for positions and spacing; direction cosines unitless).
POSITION_TOLERANCE_MM = 1e-3
DIRECTION_TOLERANCE = 1e-4


def output_format(out: str | os.PathLike, requested: str | None = None) -> str:
    """'dicom-seg' or 'image' for the output path ``out``: ``requested`` if given, else by the
    suffix (``.dcm`` is a DICOM SEG). A DICOM SEG must be named ``*.dcm`` and a label volume not."""
    is_dicom_name = str(out).lower().endswith(DICOM_SUFFIX)
    if requested is None:
        return DICOM_SEG if is_dicom_name else LABEL_VOLUME
    if requested not in OUTPUT_FORMATS:
        raise ValueError(f"unknown output format {requested!r}; use one of {OUTPUT_FORMATS}")
    if requested == DICOM_SEG and not is_dicom_name:
        raise OutputPathError(f"--format dicom-seg writes a DICOM file: name the output *.dcm, not {Path(out).name}")
    if requested == LABEL_VOLUME and is_dicom_name:
        raise OutputPathError(f"{Path(out).name}: a .dcm output is a DICOM SEG (--format dicom-seg); name a label "
                              "volume .nii.gz, .nrrd or .mha")
    return requested


def source_series(inputs: Mapping[str, str | os.PathLike], modalities: tuple[str, ...] | list[str]) -> Path:
    """The DICOM series folder a DICOM SEG of this case references: the input of the reference
    modality (the one ``prepare_case`` chooses among ``modalities``, whose grid the labels lie on).
    Raises InputImageError when that input is not a DICOM series folder."""
    from .preprocessing import choose_reference

    given = [m for m in modalities if inputs.get(m) is not None]
    if not given:
        raise InputImageError("no input volume for this method; give the volumes it takes")
    reference = choose_reference(given)
    path = Path(inputs[reference])
    name = MODALITY_DISPLAY_NAMES.get(reference, reference)
    if not path.is_dir():
        raise InputImageError(f"DICOM SEG output needs the reference volume ({name}) as a DICOM series folder, but "
                              f"{name} is the file {path.name}; give its DICOM series, or write a label volume "
                              "(e.g. .nii.gz) instead")
    dicom_series_files(path, name)  # a folder without a DICOM series fails here, before any computing
    return path


def _read_headers(folder: Path) -> list:
    import pydicom

    return [pydicom.dcmread(str(f), stop_before_pixels=True) for f in dicom_series_files(folder, "DICOM series")]


def _check_on_series_grid(labels: sitk.Image, datasets: list, folder: Path) -> None:
    first = datasets[0]
    size = (int(first.Columns), int(first.Rows), len(datasets))
    orientation = np.asarray(first.ImageOrientationPatient, dtype=float)
    direction = np.asarray(labels.GetDirection(), dtype=float).reshape(3, 3)
    problems = []
    if tuple(labels.GetSize()) != size:
        problems.append(f"size {labels.GetSize()} vs {size}")
    if not np.allclose(labels.GetOrigin(), np.asarray(first.ImagePositionPatient, dtype=float),
                       atol=POSITION_TOLERANCE_MM):
        problems.append(f"origin {tuple(round(v, 3) for v in labels.GetOrigin())} vs first image position "
                        f"{tuple(round(float(v), 3) for v in first.ImagePositionPatient)}")
    if not np.allclose(direction[:, :2].T.ravel(), orientation, atol=DIRECTION_TOLERANCE):
        problems.append("orientation")
    row_spacing, column_spacing = (float(v) for v in first.PixelSpacing)
    if not np.allclose(labels.GetSpacing()[:2], (column_spacing, row_spacing), atol=POSITION_TOLERANCE_MM):
        problems.append(f"pixel spacing {labels.GetSpacing()[:2]} vs {(column_spacing, row_spacing)}")
    if problems:
        raise GeometryError(f"the label volume is not on the grid of the DICOM series {folder} ({'; '.join(problems)}); "
                            "a DICOM SEG can only reference the series that was segmented")


def _coded(code: Code):
    from highdicom.sr import CodedConcept

    return CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


def write_dicom_seg(labels: sitk.Image, label_set: str, source_folder: str | os.PathLike, path: str | os.PathLike,
                    method_name: str = "BrainLesionSAM", series_description: str | None = None) -> Path:
    """Write ``labels`` (on the grid of the DICOM series in ``source_folder``; BraTS 2021 or 2023
    numbering) as a binary DICOM SEG at ``path``, atomically. Returns ``path``."""
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    if label_set not in SEGMENT_TYPES:
        raise ValueError(f"unknown label set {label_set!r}; use one of {sorted(SEGMENT_TYPES)}")
    folder = Path(source_folder)
    datasets = _read_headers(folder)
    _check_on_series_grid(labels, datasets, folder)
    array = sitk.GetArrayFromImage(labels)
    if label_set == "brats":
        array = to_brats2021(array)
    values = LABEL_SETS[label_set][1:]
    unexpected = sorted(set(np.unique(array).tolist()) - {0, *values})
    if unexpected:
        raise ValueError(f"label values {unexpected} are not in the '{label_set}' label set {list(LABEL_SETS[label_set])}")
    algorithm = hd.AlgorithmIdentificationSequence(name=method_name, family=codes.cid7162.ArtificialIntelligence,
                                                   version=__version__)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number, segment_label=LABEL_NAMES[label_set][value],
            segmented_property_category=_coded(SEGMENT_CATEGORY),
            segmented_property_type=_coded(SEGMENT_TYPES[label_set][value]),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm,
            anatomic_regions=[_coded(ANATOMIC_REGION)])
        for number, value in enumerate(values, 1)]
    masks = np.stack([array == value for value in values], axis=-1)  # [frames, rows, columns, segments]
    source_number = int(getattr(datasets[0], "SeriesNumber", 0) or 0)
    segmentation = hd.seg.Segmentation(
        source_images=datasets, pixel_array=masks, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=pydicom.uid.generate_uid(),
        series_number=source_number + SERIES_NUMBER_OFFSET, sop_instance_uid=pydicom.uid.generate_uid(),
        instance_number=1, manufacturer="BrainLesionSAM", manufacturer_model_name=method_name,
        software_versions=__version__, device_serial_number="0",
        series_description=series_description or f"BrainLesionSAM {method_name} segmentation")
    with atomic_output(path) as temporary:
        segmentation.save_as(str(temporary))
    return Path(path)


def read_dicom_seg(path: str | os.PathLike, source_folder: str | os.PathLike) -> tuple[np.ndarray, str]:
    """A DICOM SEG written for the series in ``source_folder`` as a [z, y, x] label map on that
    series' grid (BraTS 2021 numbering) and its label set. Segments are recognised by their codes."""
    import highdicom as hd

    path, folder = Path(path), Path(source_folder)
    try:
        segmentation = hd.seg.segread(str(path))
    except (OSError, ValueError, AttributeError) as error:
        raise InputImageError(f"{path} is not a readable DICOM Segmentation ({error})") from None
    datasets = _read_headers(folder)
    series_uid = datasets[0].SeriesInstanceUID
    referenced = {item.SeriesInstanceUID for item in getattr(segmentation, "ReferencedSeriesSequence", [])}
    if series_uid not in referenced:
        raise InputImageError(f"{path} does not reference the DICOM series in {folder} (series {series_uid}); "
                              "give the series it was made for")
    numbers, label_values, label_sets = [], [], set()
    for description in segmentation.SegmentSequence:
        code = description.SegmentedPropertyTypeCodeSequence[0]
        found = label_of(code.CodingSchemeDesignator, code.CodeValue)
        if found is None:
            raise InputImageError(f"{path}: segment {description.SegmentNumber} has the type {code.CodeMeaning} "
                                  f"({code.CodingSchemeDesignator} {code.CodeValue}), which is not a BrainLesionSAM label")
        numbers.append(int(description.SegmentNumber))
        label_sets.add(found[0])
        label_values.append(found[1])
    if len(label_sets) != 1:
        raise InputImageError(f"{path} mixes the label sets {sorted(label_sets)}")
    pixels = segmentation.get_pixels_by_source_instance(
        source_sop_instance_uids=[d.SOPInstanceUID for d in datasets], segment_numbers=numbers,
        combine_segments=False, assert_missing_frames_are_empty=True)
    labels = np.zeros(pixels.shape[:3], dtype=np.uint8)
    for index, value in enumerate(label_values):
        labels[pixels[..., index] > 0] = value
    return labels, label_sets.pop()
