"""From files to a written label volume: the steps the command line, batch runs and the Slicer
logic share (method and weights, input checks, preprocessing, engine, safe writing)."""
from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import SimpleITK as sitk

from .catalogue import resolve_method
from .conventions import MODALITIES, from_brats2021
from .engine import Box, CancelCheck, InferenceEngine, ProgressCallback, SegmentationResult
from .errors import GeometryError, InputWarning
from .io import discover_case, write_image
from .methods import DEFAULT_METHOD, SegmentationMethod
from .postprocessing import DEFAULT_MIN_COMPONENT_CONFIDENCE, DEFAULT_MIN_COMPONENT_ML
from .preprocessing import PreparedCase, prepare_case


@dataclass
class CaseSegmentation:
    result: SegmentationResult
    case: PreparedCase
    timings: dict[str, float]

    @property
    def label_array(self) -> np.ndarray:
        return sitk.GetArrayFromImage(self.result.labels)


def case_inputs(case_dir: str | os.PathLike | None = None,
                files: Mapping[str, str | os.PathLike | None] | None = None) -> dict[str, Path]:
    """Modality paths from a case folder (found by name) overridden by explicitly given files."""
    inputs: dict[str, Path] = {}
    if case_dir is not None:
        inputs.update({k: v for k, v in discover_case(case_dir).items() if k in MODALITIES})
    for key, value in (files or {}).items():
        if value is not None:
            inputs[key] = Path(value)
    return inputs


def _box_text(box: Box) -> str:
    return ",".join(str(v) for v in (box.x0, box.y0, box.z0, box.x1, box.y1, box.z1))


def check_box_corners(box: Box) -> None:
    """An inverted box (a high corner before a low one) is an error: it would label nothing."""
    inverted = [f"{a}0 > {a}1 ({low} > {high})" for a, low, high in
                (("x", box.x0, box.x1), ("y", box.y0, box.y1), ("z", box.z0, box.z1)) if low > high]
    if inverted:
        raise GeometryError(f"box {_box_text(box)} is inverted: {', '.join(inverted)}; give the low corner "
                            "first, x0,y0,z0,x1,y1,z1 with x0 <= x1, y0 <= y1, z0 <= z1 (voxel indices, inclusive)")


def check_box(box: Box, case: PreparedCase) -> Box:
    """The box as the engine will use it: inverted, outside the volume or holding no brain voxel is an
    error; a box reaching outside the volume is clipped to it, with an InputWarning naming the result.
    (The engine clips too, silently: its callers - Slicer ROIs, the web page's box - stay inside.)"""
    check_box_corners(box)
    z, y, x = case.shape_zyx
    if box.x1 < 0 or box.y1 < 0 or box.z1 < 0 or box.x0 >= x or box.y0 >= y or box.z0 >= z:
        raise GeometryError(f"box {_box_text(box)} lies outside the image (size x,y,z = {x},{y},{z}); "
                            "give voxel indices inside the reference volume")
    clipped = box.clipped_to(case.shape_zyx)
    if clipped != box:
        warnings.warn(f"box {_box_text(box)} reaches outside the image (size x,y,z = {x},{y},{z}); it was "
                      f"clipped to {_box_text(clipped)}", InputWarning, stacklevel=2)
    if not (case.brain_mask & clipped.mask(case.shape_zyx)).any():
        raise GeometryError(f"box {_box_text(clipped)} holds no brain voxel (every modality is 0 there), so "
                            "the result would be empty; put the box on the lesion (voxel indices of the "
                            "reference volume)")
    return clipped


def segment_images(images: Mapping[str, sitk.Image | str | os.PathLike],
                   method: SegmentationMethod, device: str = "auto", box: Box | None = None,
                   progress: ProgressCallback | None = None, cancel: CancelCheck | None = None,
                   batch_size: int | None = None, return_probabilities: bool = False,
                   min_component_ml: float = DEFAULT_MIN_COMPONENT_ML, mirror_tta: bool = False,
                   precision: str = "auto", cascade: bool = False,
                   encoder_runtime: str = "auto",
                   min_component_confidence: float = DEFAULT_MIN_COMPONENT_CONFIDENCE) -> CaseSegmentation:
    """Check modalities against the method, preprocess, run the engine; nothing is written.
    ``min_component_ml``, ``min_component_confidence``: the engine's clean-up of automatic results (0
    keeps every component).
    ``mirror_tta``: also run every input mirrored left-right (twice the time); the result then
    carries the uncertainty map (``result.uncertainty``, BrainLesionSAMLib.uncertainty).
    ``precision``: 'fp32', 'bf16' or 'auto' (engine.resolve_precision); ``result.precision`` says which ran.
    ``cascade``: an automatic run of a 2D method runs it only near the slices where the default
    automatic model finds a lesion (engine ``cascade``); ignored with a box or for the default model itself.
    ``encoder_runtime``: 'auto', 'torch' or 'openvino' for SAM image encoders on the CPU (engine)."""
    method.facts.check_modalities([m for m in MODALITIES if images.get(m) is not None])
    if box is not None:
        check_box_corners(box)
    progress = progress or (lambda fraction, message: None)
    start = time.perf_counter()
    progress(0.0, "reading and preprocessing the volumes")
    case = prepare_case({m: v for m, v in images.items() if m in method.facts.modalities})
    preprocessing_time = time.perf_counter() - start
    box = check_box(box, case) if box is not None else None
    first = None
    if cascade and box is None and method.facts.spatial_dims == 2 and method.facts.name != DEFAULT_METHOD:
        first = InferenceEngine(resolve_method(DEFAULT_METHOD), device=device, batch_size=batch_size,
                                precision=precision)
    engine = InferenceEngine(method, device=device, batch_size=batch_size, min_component_ml=min_component_ml,
                             min_component_confidence=min_component_confidence,
                             precision=precision, cascade=first, encoder_runtime=encoder_runtime)
    result = engine.segment(case, box=box, progress=progress, cancel=cancel,
                            return_probabilities=return_probabilities, mirror_tta=mirror_tta)
    return CaseSegmentation(result, case, {"preprocessing_s": preprocessing_time, **result.timings})


def load_and_segment(images: Mapping[str, sitk.Image | str | os.PathLike], method_name: str,
                     weights: str | os.PathLike | None = None, **kwargs) -> CaseSegmentation:
    return segment_images(images, resolve_method(method_name, weights), **kwargs)


def write_labels(result: SegmentationResult, path: str | os.PathLike,
                 label_convention: str = "brats2021") -> Path:
    """Write the label volume atomically in the chosen numbering (ET = 4 or 3)."""
    image = result.labels
    if result.label_set == "brats" and label_convention != "brats2021":
        converted = sitk.GetImageFromArray(from_brats2021(sitk.GetArrayFromImage(image), label_convention))
        converted.CopyInformation(image)
        image = converted
    return write_image(image, path)
