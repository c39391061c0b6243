"""Clean-up of an automatic method's label map: connected components of the whole lesion that are
too small to be a lesion the model can see are dropped.

A 2D network decides every slice on its own, so its false positives are mostly specks of a few
voxels scattered through healthy tissue (docs/generalisation.md measured them: tens of components
per case). Components are taken on the whole-tumour mask (every label > 0, 26-connected, the BraTS
2023 convention); a component whose volume is below ``min_volume_ml`` loses all its labels. The
default threshold is the one measured by ``benchmarks/generalisation.py`` (docs/generalisation.md).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import ndimage

# Measured (benchmarks/generalisation.py, docs/generalisation.md): the threshold that removes most
# false-positive lesions while costing the least lesion sensitivity.
DEFAULT_MIN_COMPONENT_ML = 0.1


def remove_small_components(labels: np.ndarray, spacing_zyx: Sequence[float],
                            min_volume_ml: float = DEFAULT_MIN_COMPONENT_ML) -> np.ndarray:
    """``labels`` [Z, Y, X] with every whole-lesion component under ``min_volume_ml`` set to 0 (a copy)."""
    if min_volume_ml <= 0 or not labels.any():
        return labels.copy()
    components, count = ndimage.label(labels > 0, structure=np.ones((3, 3, 3), bool))
    voxel_ml = float(np.prod(spacing_zyx)) / 1000.0
    sizes = np.bincount(components.ravel(), minlength=count + 1) * voxel_ml
    keep = sizes >= min_volume_ml
    keep[0] = False
    return np.where(keep[components], labels, 0).astype(labels.dtype)
