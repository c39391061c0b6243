"""Mirror test-time augmentation (TTA) and the voxel-wise uncertainty map it gives.

With ``InferenceEngine.segment(..., mirror_tta=True)`` every network input (a batch of axial slices,
or a 3D patch) is run twice: as it is, and mirrored left-right (the patient's left-right axis, see
:func:`mirror_axis`), the mirrored prediction flipped back. The result's probabilities are the mean
of the two passes (its labels their argmax), and its uncertainty map is their disagreement
(:func:`disagreement`). A box prompt is mirrored with the image (:func:`mirror_network_box`), so a
promptable method sees the same box on the same anatomy in both passes.

The cost is a second pass of the network: about twice the inference time (docs/uncertainty.md),
so it is opt-in.
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch

from .errors import GeometryError

AXIS_NAMES = ("k (slice)", "j (row)", "i (column)")  # array axes z, y, x of SimpleITK's [z, y, x]


def mirror_axis(reference: sitk.Image, spatial_dims: int = 2) -> int:
    """The array axis (0 = z, 1 = y, 2 = x of the [z, y, x] array) that runs closest to the patient's
    left-right axis: the index axis whose direction has the largest component along physical x
    (LPS / RAS x). A 2D method mirrors inside its (axial) slices, so for it that axis must not be
    the slice axis z - a sagittally sliced volume is a GeometryError that says what to do."""
    direction = np.asarray(reference.GetDirection(), dtype=float).reshape(3, 3)
    index_axis = int(np.argmax(np.abs(direction[0])))  # column i of the direction matrix: index axis i
    axis = 2 - index_axis
    if spatial_dims == 2 and axis == 0:
        raise GeometryError(
            "mirror test-time augmentation (the uncertainty map) flips the patient's left-right axis, but in "
            "this reference volume that axis runs across its slices (sagittal slices), which a 2D method "
            "segments one by one; resample the volumes to axial slices, choose a 3D method, or segment "
            "without the uncertainty map")
    return axis


def mirror_network_box(boxes: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """Boxes [B, 4] (x0, y0, x1, y1; pixel edges, exclusive end: SAM's convention) on a ``size`` x
    ``size`` network grid, mirrored as the images are by ``flip(dim)`` of [B, C, H, W] (dim 3: x,
    dim 2: y). Pixel p goes to size - 1 - p, so the edges [a, b) go to [size - b, size - a)."""
    low, high = (0, 2) if dim == 3 else (1, 3)
    mirrored = boxes.clone()
    mirrored[:, low] = size - boxes[:, high]
    mirrored[:, high] = size - boxes[:, low]
    return mirrored


def disagreement(probabilities: np.ndarray, mirrored: np.ndarray) -> np.ndarray:
    """Voxel-wise total-variation distance 0.5 * sum_k |p_k - p'_k| between the class probabilities
    [K, ...] of the plain and the mirrored pass: float32 [...] in [0, 1].

    Why this measure: it is the disagreement between the two passes and nothing else - 0 exactly
    where they give the same distribution (however unsure each is), 1 where they put all their mass
    on different classes - and it bounds how far any class probability (so any region's soft
    volume) moves between them. The entropy of the mean would also be high where both passes agree
    on an unsure 50/50, which is the network's confidence, not mirror disagreement; it also needs a
    log K normalisation to stay in [0, 1]. For two classes the measure is |p_1 - p'_1|."""
    difference = np.subtract(probabilities, mirrored, dtype=np.float32)
    np.abs(difference, out=difference)
    distance = difference.sum(axis=0)
    distance *= 0.5
    return np.clip(distance, 0.0, 1.0, out=distance)
