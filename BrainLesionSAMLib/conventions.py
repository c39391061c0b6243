"""Names and numbers every layer shares: modality keys, BraTS labels and regions.

Labels follow BraTS 2020/2021: 0 background, 1 necrotic / non-enhancing core (NCR),
2 peritumoral edema (ED), 4 enhancing tumour (ET). BraTS 2023+ numbers ET as 3; it is accepted on
input (``to_brats2021``) and selectable on output (``from_brats2021``).
"""
from __future__ import annotations

import numpy as np

MODALITIES: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")
MODALITY_DISPLAY_NAMES = {"t1": "T1", "t1ce": "T1CE", "t2": "T2", "flair": "FLAIR"}
# Preference order for the reference grid the output is written on.
REFERENCE_PREFERENCE: tuple[str, ...] = ("t1ce", "flair", "t2", "t1")

BACKGROUND, NCR, ED, ET = 0, 1, 2, 4
ET_BRATS2023 = 3

# Label sets a method can declare. The network's class channel k means label value LABEL_SETS[s][k].
LABEL_SETS: dict[str, tuple[int, ...]] = {
    "brats": (BACKGROUND, NCR, ED, ET),
    "lesion": (BACKGROUND, 1),
}
LABEL_NAMES = {
    "brats": {NCR: "Necrotic core", ED: "Edema", ET: "Enhancing tumor"},
    "lesion": {1: "Lesion"},
}
# Colours (RGB 0-1) as in Slicer's BraTS terminology / common BraTS figures.
LABEL_COLORS = {
    "brats": {NCR: (1.0, 0.0, 0.0), ED: (0.0, 1.0, 0.0), ET: (1.0, 1.0, 0.0)},
    "lesion": {1: (1.0, 0.5, 0.0)},
}
# Evaluation regions (BraTS): whole tumour, tumour core, enhancing tumour.
REGIONS: dict[str, tuple[int, ...]] = {"WT": (NCR, ED, ET), "TC": (NCR, ET), "ET": (ET,)}


def to_brats2021(labels: np.ndarray) -> np.ndarray:
    """Accept BraTS 2023 numbering (ET = 3) and return BraTS 2021 numbering (ET = 4)."""
    values = set(np.unique(labels).tolist())
    if ET_BRATS2023 in values and ET in values:
        raise ValueError("label map mixes ET=3 (BraTS 2023) and ET=4 (BraTS 2021) numbering")
    if ET_BRATS2023 in values:
        labels = labels.copy()
        labels[labels == ET_BRATS2023] = ET
    return labels


def from_brats2021(labels: np.ndarray, convention: str) -> np.ndarray:
    """Return labels in ``convention`` ('brats2021': ET = 4, 'brats2023': ET = 3)."""
    if convention == "brats2021":
        return labels
    if convention == "brats2023":
        labels = labels.copy()
        labels[labels == ET] = ET_BRATS2023
        return labels
    raise ValueError(f"unknown label convention {convention!r}; use 'brats2021' or 'brats2023'")
