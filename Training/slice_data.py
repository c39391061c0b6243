"""2D training slices from cases, through the library's own preprocessing.

A slice set holds network-grid slices as uint8 (images [N, 4, 256, 256], class indices
[N, 256, 256]) so that a few thousand fit in memory. Lesion slices are balanced with an equal
number of brain slices without lesion, so the network learns to say 'nothing here' too.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch

from BrainLesionSAMLib.conventions import LABEL_SETS, MODALITIES, to_brats2021
from BrainLesionSAMLib.preprocessing import PreparedCase, prepare_case


@dataclass
class SliceSet:
    images: torch.Tensor   # [N, 4, 256, 256] uint8
    classes: torch.Tensor  # [N, 256, 256] uint8 class indices (channel order of the label set)
    available: torch.Tensor  # [N, 4] bool

    def __len__(self) -> int:
        return len(self.images)

    @staticmethod
    def concatenate(parts: list["SliceSet"]) -> "SliceSet":
        return SliceSet(torch.cat([p.images for p in parts]), torch.cat([p.classes for p in parts]),
                        torch.cat([p.available for p in parts]))


def labels_to_classes(labels: np.ndarray, label_set: str = "brats") -> np.ndarray:
    """Label values (BraTS 2021 or 2023 numbering) -> class indices 0..K-1 of ``label_set``."""
    labels = to_brats2021(labels)
    lookup = np.zeros(256, dtype=np.uint8)
    for index, value in enumerate(LABEL_SETS[label_set]):
        lookup[value] = index
    unknown = set(np.unique(labels).tolist()) - set(LABEL_SETS[label_set])
    if unknown:
        raise ValueError(f"label values {sorted(unknown)} are not in label set {label_set!r}")
    return lookup[labels]


def case_slices(case: PreparedCase, labels: np.ndarray, rng: np.random.Generator,
                background_ratio: float = 1.0, label_set: str = "brats") -> SliceSet:
    """Lesion slices of one case plus ``background_ratio`` times as many lesion-free brain slices."""
    classes = labels_to_classes(labels, label_set)
    lesion = np.flatnonzero(classes.any(axis=(1, 2)))
    empty = np.setdiff1d(case.brain_slices(), lesion)
    count = min(len(empty), int(round(background_ratio * len(lesion))))
    chosen = np.sort(np.concatenate([lesion, rng.choice(empty, size=count, replace=False)]))
    images = case.network_slices(chosen).round().clamp(0, 255).to(torch.uint8)
    network_classes = case.slice_geometry.to_network(classes[chosen], nearest=True).to(torch.uint8)
    available = torch.as_tensor(case.available).expand(len(chosen), -1).clone()
    return SliceSet(images, network_classes, available)


def slices_from_images(images: dict[str, sitk.Image], rng: np.random.Generator,
                       background_ratio: float = 1.0) -> SliceSet:
    """Slices of one case given as {'t1': image, ..., 'seg': label image}."""
    case = prepare_case({m: images[m] for m in MODALITIES if m in images})
    labels = sitk.GetArrayFromImage(images["seg"])
    return case_slices(case, labels, rng, background_ratio)
