"""From files to a written label volume: the steps the command line, batch runs and the Slicer
logic share (method and weights, input checks, preprocessing, engine, safe writing)."""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import SimpleITK as sitk

from .checkpoints import load_method
from .conventions import MODALITIES, from_brats2021
from .engine import Box, CancelCheck, InferenceEngine, ProgressCallback, SegmentationResult
from .io import discover_case, write_image
from .methods import SegmentationMethod
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


def segment_images(images: Mapping[str, sitk.Image | str | os.PathLike],
                   method: SegmentationMethod, device: str = "auto", box: Box | None = None,
                   progress: ProgressCallback | None = None, cancel: CancelCheck | None = None,
                   batch_size: int | None = None, return_probabilities: bool = False) -> CaseSegmentation:
    """Check modalities against the method, preprocess, run the engine; nothing is written."""
    method.facts.check_modalities([m for m in MODALITIES if images.get(m) is not None])
    progress = progress or (lambda fraction, message: None)
    start = time.perf_counter()
    progress(0.0, "reading and preprocessing the volumes")
    case = prepare_case({m: v for m, v in images.items() if m in method.facts.modalities})
    preprocessing_time = time.perf_counter() - start
    engine = InferenceEngine(method, device=device, batch_size=batch_size)
    result = engine.segment(case, box=box, progress=progress, cancel=cancel,
                            return_probabilities=return_probabilities)
    return CaseSegmentation(result, case, {"preprocessing_s": preprocessing_time, **result.timings})


def load_and_segment(images: Mapping[str, sitk.Image | str | os.PathLike], method_name: str,
                     weights: str | os.PathLike | None = None, **kwargs) -> CaseSegmentation:
    return segment_images(images, load_method(method_name, weights), **kwargs)


def write_labels(result: SegmentationResult, path: str | os.PathLike,
                 label_convention: str = "brats2021") -> Path:
    """Write the label volume atomically in the chosen numbering (ET = 4 or 3)."""
    image = result.labels
    if result.label_set == "brats" and label_convention != "brats2021":
        converted = sitk.GetImageFromArray(from_brats2021(sitk.GetArrayFromImage(image), label_convention))
        converted.CopyInformation(image)
        image = converted
    return write_image(image, path)
