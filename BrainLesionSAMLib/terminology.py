"""Standard codes of the segments BrainLesionSAM writes: the one table behind both the Slicer
segments' terminology (``BrainLesionSAMSlicer.mrml``) and the segment descriptions of the DICOM
Segmentation objects (``dicom_seg``).

The BraTS sub-regions take the codes of DICOM CID 7168 "Brain Lesion Segmentation Types With
Necrosis": necrosis SCT 6574001, edema SCT 79654002, enhancing lesion NCIt C113842. The single
lesion class is SCT 52988006 "Lesion". Every segment has the category SCT 49755003
"Morphologically Altered Structure" and the anatomic region SCT 12738006 "Brain".

Plain data, no imports beyond the label numbers: the Slicer glue reads it without highdicom.
"""
from __future__ import annotations

from typing import NamedTuple

from .conventions import ED, ET, NCR


class Code(NamedTuple):
    """A coded concept: coding scheme designator, code value, code meaning."""

    scheme: str
    value: str
    meaning: str


SEGMENT_CATEGORY = Code("SCT", "49755003", "Morphologically Altered Structure")
ANATOMIC_REGION = Code("SCT", "12738006", "Brain")
# Label set -> BraTS 2021 label value -> segmented property type.
SEGMENT_TYPES: dict[str, dict[int, Code]] = {
    "brats": {NCR: Code("SCT", "6574001", "Necrosis"), ED: Code("SCT", "79654002", "Edema"),
              ET: Code("NCIt", "C113842", "Enhancing Lesion")},
    "lesion": {1: Code("SCT", "52988006", "Lesion")},
}


def label_of(scheme: str, value: str) -> tuple[str, int] | None:
    """(label set, label value) of a segmented property type code, or None if it is not ours."""
    for label_set, types in SEGMENT_TYPES.items():
        for label, code in types.items():
            if (code.scheme, code.value) == (scheme, value):
                return label_set, label
    return None
