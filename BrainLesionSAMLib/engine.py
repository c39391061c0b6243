"""One inference engine for every method.

It batches axial slices (2D methods) or runs MONAI's sliding-window inference over patches
(3D methods), skips slices without brain, picks the device (CUDA when present, else CPU) and the
precision (below), reports progress as (fraction, message), stops cooperatively between
batches when asked, and maps the prediction back onto the reference grid voxel for voxel. A 3D
method with a working voxel size (``MethodFacts.working_spacing_mm``, e.g. MoME's CPU release at
2 mm) gets the case resized to it and its probabilities resized back before the argmax.

Precision (``precision``: 'fp32', 'bf16' or 'auto'). 'auto' is autocast on CUDA (bfloat16 where
supported, else float16) and on the CPU bfloat16 autocast only where both hold: the CPU computes
bfloat16 natively (:func:`cpu_has_native_bf16`) and the method's facts say it was measured safe
(``MethodFacts.cpu_bf16``: at least 1.2x faster with Dice unchanged, docs/benchmarks.md); else fp32.
The probabilities are float32 whatever the precision; the result says which one ran.

A box (``Box``, voxel indices of the reference grid) restricts the result for every method -
nothing outside it is labelled - and is the prompt of promptable methods on each slice it spans.

The result of a fully automatic method is cleaned: nothing outside the brain (the inputs' non-zero
mask), no whole-lesion component under ``min_component_ml`` and none whose mean lesion probability
is under ``min_component_confidence`` (``postprocessing``; both defaults are measured in
docs/generalisation.md). A box-prompted result is the user's box and is not cleaned.

``cascade`` (another engine, normally the default automatic model's) makes an automatic 2D run
cheaper: the cascade model segments the case first, and the method runs only on the axial slices
where that found a lesion, +- ``cascade_margin`` slices; every other slice is background. It is for
expensive automatic methods (SOFA: four TinyViT encodes per slice) and is off unless asked for: what
it costs in Dice is what the cascade model misses (docs/benchmarks.md).

Encoder runtime (``encoder_runtime``: 'auto', 'torch' or 'openvino'): on the CPU the hook-free
image encoder of SAM backbones (LiteMedSAM, SOFA, MedSAM) runs on OpenVINO when it is installed
('auto'), 2-2.5x faster at float32 with the same embeddings (``backbones.openvino_encoder``). It is
attached for the run only; the result's ``encoder_runtime`` says which ran.

``mirror_tta`` runs every network input a second time mirrored left-right and returns the mean of
the two passes with their voxel-wise disagreement as an uncertainty map (``uncertainty``).
"""
from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import SimpleITK as sitk
import torch

from .backbones.base import SamBackbone
from .backbones.openvino_encoder import OpenVINOEncoder, resolve_encoder_runtime
from .errors import BoxRequiredError, BrainLesionSAMError, CancelledError, GeometryError
from .methods import SegmentationMethod
from .postprocessing import (DEFAULT_MIN_COMPONENT_CONFIDENCE, DEFAULT_MIN_COMPONENT_ML, remove_small_components,
                             remove_unconfident_components)
from .preprocessing import PreparedCase, resize_volume, working_shape
from .uncertainty import disagreement, mirror_axis, mirror_network_box

CASCADE_MARGIN_SLICES = 2  # slices beyond the cascade model's lesion extent (its edges are the least sure)

ProgressCallback = Callable[[float, str], None]
CancelCheck = Callable[[], bool]


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """'auto' -> CUDA when available, else CPU; 'cuda' without a usable GPU is an error."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise BrainLesionSAMError(
                "device 'cuda' was asked for but torch sees no CUDA GPU (CUDA build: "
                f"{torch.version.cuda or 'none'}); use --device cpu or auto, or install a CUDA "
                "build of torch that matches the driver")
        return torch.device(device)
    if device == "cpu":
        return torch.device("cpu")
    raise BrainLesionSAMError(f"unknown device {device!r}; use auto, cpu or cuda")


PRECISIONS = ("fp32", "bf16", "auto")


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX-BF16): only there can bf16
    autocast beat fp32; elsewhere torch emulates bfloat16, slower than fp32. Linux: the CPU's flags
    in ``cpuinfo``; where that file is missing or holds no flags: what torch's oneDNN reports."""
    try:
        with open(cpuinfo) as handle:
            flags = {flag for line in handle if line.startswith("flags") for flag in line.split(":", 1)[1].split()}
    except OSError:
        flags = set()
    if flags:
        return bool(flags & {"avx512_bf16", "amx_bf16"})
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_precision(precision: str, device: torch.device, cpu_bf16_safe: bool) -> str:
    """The precision a run uses: 'fp32', 'bf16' or 'fp16' (CUDA 'auto' without bfloat16).
    ``cpu_bf16_safe``: the method's ``MethodFacts.cpu_bf16``, read by 'auto' on the CPU only."""
    if precision not in PRECISIONS:
        raise BrainLesionSAMError(f"unknown precision {precision!r}; use {', '.join(PRECISIONS)}")
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if device.type == "cpu" and cpu_bf16_safe and cpu_has_native_bf16() else "fp32"


@dataclass(frozen=True)
class Box:
    """An axis-aligned box in voxel indices (i = x, j = y, k = z) of the reference grid, corners
    inclusive - what the CLI's --box and a Slicer ROI converted to IJK give."""

    x0: int
    y0: int
    z0: int
    x1: int
    y1: int
    z1: int

    @classmethod
    def parse(cls, text: str) -> "Box":
        try:
            values = [int(round(float(v))) for v in text.split(",")]
        except (ValueError, OverflowError):  # OverflowError: 'inf'
            values = []
        if len(values) != 6:
            raise GeometryError(f"box {text!r} is not six numbers x0,y0,z0,x1,y1,z1 (voxel indices)")
        return cls(*values)

    def clipped_to(self, shape_zyx: tuple[int, int, int]) -> "Box":
        """Order the corners and clip them to the grid; a box entirely outside is an error."""
        z, y, x = shape_zyx
        x0, x1 = sorted((self.x0, self.x1))
        y0, y1 = sorted((self.y0, self.y1))
        z0, z1 = sorted((self.z0, self.z1))
        if x1 < 0 or y1 < 0 or z1 < 0 or x0 >= x or y0 >= y or z0 >= z:
            raise GeometryError(f"box {self} lies outside the image (size x,y,z = {x},{y},{z}); "
                                "give voxel indices inside the reference volume")
        return Box(max(x0, 0), max(y0, 0), max(z0, 0), min(x1, x - 1), min(y1, y - 1), min(z1, z - 1))

    def mask(self, shape_zyx: tuple[int, int, int]) -> np.ndarray:
        mask = np.zeros(shape_zyx, dtype=bool)
        mask[self.z0:self.z1 + 1, self.y0:self.y1 + 1, self.x0:self.x1 + 1] = True
        return mask


class EmbeddingCache:
    """Image embeddings of cacheable methods, per (method, case content, axial slice).

    Reuse one cache (with one engine) across ``segment`` calls on the same case: a second box then
    re-runs only the prompt encoder and mask decoder on the slices already encoded. Embeddings are
    kept on the CPU so the cache costs no GPU memory. ``max_bytes`` bounds it; the oldest entries
    are dropped first.
    """

    def __init__(self, max_bytes: int = 4 * 2**30):
        self.max_bytes = max_bytes
        self._entries: dict[tuple, torch.Tensor] = {}
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: tuple) -> torch.Tensor | None:
        return self._entries.get(key)

    def put(self, key: tuple, embedding: torch.Tensor) -> None:
        embedding = embedding.detach().to("cpu", copy=True)
        self._entries[key] = embedding
        self._bytes += embedding.numel() * embedding.element_size()
        while self._bytes > self.max_bytes and len(self._entries) > 1:
            oldest = next(iter(self._entries))
            dropped = self._entries.pop(oldest)
            self._bytes -= dropped.numel() * dropped.element_size()

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0


@dataclass
class SegmentationResult:
    labels: sitk.Image                      # label values of the method's label set, reference grid
    label_set: str
    probabilities: sitk.Image | None        # [Z,Y,X] vector image, one component per class
    device: str
    timings: dict[str, float] = field(default_factory=dict)
    # The method's per-case modality/expert weights (SegmentationMethod.case_weights), {} if none.
    case_weights: dict[str, dict[str, float]] = field(default_factory=dict)
    # Mirror TTA only (else None): float32 [Z,Y,X] disagreement of the two passes in [0, 1], reference
    # grid (uncertainty.disagreement); 0 where the result is not the network's (outside brain or box).
    uncertainty: sitk.Image | None = None
    precision: str = "fp32"                 # what the network ran in: 'fp32', 'bf16' or 'fp16' (resolve_precision)
    encoder_runtime: str = "torch"          # where SAM image encoders ran: 'torch' or 'openvino'


def default_batch_size(device: torch.device) -> int:
    """Slices (or patches) per forward pass when none is asked for: 8 on a GPU; 1 on the CPU, where
    batching gains nothing and costs 4-30 % per slice for every 2D method (docs/benchmarks.md)."""
    return 8 if device.type == "cuda" else 1


class InferenceEngine:
    """Runs a method over a :class:`PreparedCase`.

    batch_size: slices per forward pass for 2D methods (patches for 3D, as MONAI's sw_batch_size);
    None = :func:`default_batch_size` for the device.
    precision: 'fp32', 'bf16' (autocast) or 'auto' (:func:`resolve_precision`: autocast on CUDA, on the
    CPU bfloat16 only where it is native and the method is measured safe); ``self.precision`` is the
    resolved one. amp: the older switch, kept for its callers; given, it overrides ``precision``:
    True = autocast on CUDA and fp32 on the CPU (what it always did), False = fp32.
    min_component_ml: automatic methods drop whole-lesion components smaller than this (0: keep all).
    min_component_confidence: ... and those whose mean lesion probability is below this (0: keep all).
    encoder_runtime: 'auto', 'torch' or 'openvino' (the module docstring); ``self.encoder_runtime`` is
    the resolved one, 'openvino' only where the method has a SAM backbone.
    """

    def __init__(self, method: SegmentationMethod, device: str | torch.device = "auto",
                 batch_size: int | None = None, amp: bool | None = None, overlap: float = 0.5,
                 embedding_cache: EmbeddingCache | None = None,
                 min_component_ml: float = DEFAULT_MIN_COMPONENT_ML, precision: str = "auto",
                 cascade: "InferenceEngine | None" = None, cascade_margin: int = CASCADE_MARGIN_SLICES,
                 encoder_runtime: str = "auto",
                 min_component_confidence: float = DEFAULT_MIN_COMPONENT_CONFIDENCE):
        if batch_size is not None and batch_size < 1:
            raise BrainLesionSAMError(f"batch size must be at least 1, got {batch_size}")
        self.device = resolve_device(device)
        self.method = method.to(self.device).eval()
        self.batch_size = batch_size or default_batch_size(self.device)
        if amp is not None:
            precision = "auto" if amp and self.device.type == "cuda" else "fp32"
        self.precision = resolve_precision(precision, self.device, method.facts.cpu_bf16)
        self.overlap = overlap
        self.min_component_ml = float(min_component_ml or 0.0)
        self.min_component_confidence = float(min_component_confidence or 0.0)
        self.embedding_cache = embedding_cache if method.facts.cacheable_embeddings else None
        if cascade is not None and (cascade.method.facts.spatial_dims, method.facts.spatial_dims) != (2, 2):
            raise BrainLesionSAMError("a cascade picks axial slices: both its model and the method must be 2D")
        self.cascade = cascade
        self.cascade_margin = int(cascade_margin)
        self.backbones = [module for module in self.method.modules() if isinstance(module, SamBackbone)]
        runtime = resolve_encoder_runtime(encoder_runtime, self.device)
        self.encoder_runtime = runtime if self.backbones else "torch"
        self._fast_encoders = ([OpenVINOEncoder(backbone, "bf16" if self.precision == "bf16" else "fp32")
                                for backbone in self.backbones] if self.encoder_runtime == "openvino" else [])

    @contextlib.contextmanager
    def _fast_encoders_attached(self, progress: ProgressCallback):
        """The OpenVINO encoders on the method's backbones for one run (they convert at first use and
        say so through ``progress``)."""
        for backbone, encoder in zip(self.backbones, self._fast_encoders):
            encoder.notify = lambda message: progress(0.0, message)
            backbone.fast_encoder = encoder
        try:
            yield
        finally:
            for backbone, _ in zip(self.backbones, self._fast_encoders):
                backbone.fast_encoder = None

    def _autocast(self):
        if self.precision == "fp32":
            return torch.autocast(self.device.type, enabled=False)
        dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def segment(self, case: PreparedCase, box: Box | None = None,
                progress: ProgressCallback | None = None, cancel: CancelCheck | None = None,
                return_probabilities: bool = False, mirror_tta: bool = False) -> SegmentationResult:
        """Labels (and optionally probabilities) on the reference grid. ``mirror_tta``: run each
        input also mirrored left-right (twice the network time) - probabilities and labels are the
        two passes' mean, and the result carries their disagreement as ``uncertainty``."""
        facts = self.method.facts
        facts.check_modalities(case.modalities)
        if facts.requires_box and box is None:
            raise BoxRequiredError(
                f"method '{facts.name}' segments only inside a box: draw a box around the lesion (Slicer "
                "ROI, or --box x0,y0,z0,x1,y1,z1 in voxel indices) or choose a fully automatic method")
        progress = progress or (lambda fraction, message: None)
        cancel = cancel or (lambda: False)
        box = box.clipped_to(case.shape_zyx) if box is not None else None
        axis = mirror_axis(case.reference, facts.spatial_dims) if mirror_tta else None
        start = time.perf_counter()
        self.method.start_case()
        try:
            with torch.inference_mode(), self._fast_encoders_attached(progress):
                if facts.spatial_dims == 2:
                    passes = self._segment_slices(case, box, progress, cancel, axis)
                else:
                    passes = self._segment_patches(case, progress, cancel, axis)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            raise BrainLesionSAMError(
                f"the GPU ran out of memory with batch size {self.batch_size}; use a smaller "
                "--batch-size, close other GPU programs, or run on the CPU (--device cpu)") from None
        network_time = time.perf_counter() - start

        progress(0.98, "writing the label volume")
        start = time.perf_counter()
        labels_lookup = np.asarray(facts.labels, dtype=np.uint8)
        inside = case.brain_mask if box is None else case.brain_mask & box.mask(case.shape_zyx)
        uncertainty_image = None
        if axis is None:
            probabilities, = passes
        else:
            uncertainty = disagreement(*passes)
            uncertainty[~inside] = 0.0
            uncertainty_image = case.to_reference_image(uncertainty)
            probabilities = passes[0]  # the mean, in place: the volumes are large
            probabilities += passes[1]
            probabilities *= 0.5
        del passes
        labels = labels_lookup[probabilities.argmax(0)]
        labels[~inside] = 0
        if box is None and (self.min_component_ml > 0 or self.min_component_confidence > 0):  # automatic run
            cleaned = remove_small_components(labels, case.spacing_zyx, self.min_component_ml)
            if self.min_component_confidence > 0:
                cleaned = remove_unconfident_components(cleaned, 1.0 - probabilities[0], self.min_component_confidence)
            # removed specks become background in the probabilities too (not in place: ``inside`` may be
            # the case's own brain mask, which a second run on the same case must find unchanged)
            inside = inside & ((cleaned > 0) | (labels == 0))
            labels = cleaned
        label_image = case.to_reference_image(labels)
        probability_image = None
        if return_probabilities:
            probabilities[:, ~inside] = 0.0
            probabilities[0, ~inside] = 1.0
            probability_image = sitk.GetImageFromArray(np.moveaxis(probabilities, 0, -1), isVector=True)
            probability_image.CopyInformation(case.reference)
        progress(1.0, "done")
        return SegmentationResult(label_image, facts.label_set, probability_image, str(self.device),
                                  {"network_s": network_time, "postprocessing_s": time.perf_counter() - start},
                                  self.method.case_weights(), uncertainty_image, self.precision,
                                  self.encoder_runtime)

    def _segment_slices(self, case: PreparedCase, box: Box | None, progress: ProgressCallback,
                        cancel: CancelCheck, mirror: int | None = None) -> tuple[np.ndarray, ...]:
        """([K, Z, Y, X] float32 class probabilities on the reference grid,) - and those of the
        left-right mirrored pass, flipped back, when ``mirror`` is the array axis to mirror (1: y, 2: x)."""
        facts = self.method.facts
        geometry = case.slice_geometry
        num_classes = len(facts.labels)
        passes = [None] if mirror is None else [None, mirror + 1]  # flip dim of [N, C, H, W]
        probabilities = np.zeros((len(passes), num_classes) + case.shape_zyx, dtype=np.float32)
        probabilities[:, 0] = 1.0  # slices never run (no brain, outside the box) are background
        slices = case.brain_slices()
        if box is not None:
            slices = slices[(slices >= box.z0) & (slices <= box.z1)]
        elif self.cascade is not None:
            slices = slices[np.isin(slices, self.cascade_slices(case, cancel))]
        available = torch.as_tensor(case.available, device=self.device)
        network_box = None
        if box is not None:
            network_box = torch.tensor(geometry.box_to_network(box.x0, box.y0, box.x1, box.y1),
                                       dtype=torch.float32, device=self.device)
        for done in range(0, len(slices), self.batch_size):
            if cancel():
                raise CancelledError("segmentation cancelled; nothing was written")
            batch = slices[done:done + self.batch_size]
            progress(done / max(len(slices), 1) * 0.95,
                     f"{facts.name}: slices {done + 1}-{done + len(batch)} of {len(slices)}")
            boxes = network_box.expand(len(batch), 4) if (network_box is not None and facts.promptable) else None
            batch_available = available.expand(len(batch), -1)
            for index, flip in enumerate(passes):
                pass_boxes = boxes if flip is None or boxes is None else mirror_network_box(boxes, flip, geometry.size)
                batch_probabilities = self._slice_probabilities(case, batch, batch_available, pass_boxes, flip)
                probabilities[index][:, batch] = \
                    geometry.from_network(batch_probabilities).cpu().numpy().transpose(1, 0, 2, 3)
        if cancel():
            raise CancelledError("segmentation cancelled; nothing was written")
        return tuple(probabilities)

    def cascade_slices(self, case: PreparedCase, cancel: CancelCheck | None = None) -> np.ndarray:
        """Axial indices where the cascade model labels a lesion, +- ``cascade_margin`` slices."""
        labels = sitk.GetArrayFromImage(self.cascade.segment(case, cancel=cancel).labels)
        found = np.flatnonzero(labels.any(axis=(1, 2)))
        if not len(found):
            return found
        near = (found[:, None] + np.arange(-self.cascade_margin, self.cascade_margin + 1)[None]).ravel()
        return np.unique(np.clip(near, 0, case.shape_zyx[0] - 1))

    def _slice_probabilities(self, case: PreparedCase, batch: np.ndarray, available: torch.Tensor,
                             boxes: torch.Tensor | None, flip: int | None) -> torch.Tensor:
        """[N, K, 256, 256] float32 on the network grid for the batch's slices; ``flip``: the pass on
        the slices flipped along that dim (boxes already mirrored), its output flipped back."""
        with self._autocast():
            if self.embedding_cache is None:
                images = case.network_slices(batch, self.method.facts.context_slices).to(self.device)
                images = images if flip is None else images.flip(flip)
                batch_probabilities = self.method.predict_proba(images, available, boxes)
            else:
                embeddings = self._cached_embeddings(case, batch, available, flip)
                batch_probabilities = self.method.decode_proba(embeddings, available, boxes)
        batch_probabilities = batch_probabilities.float()
        return batch_probabilities if flip is None else batch_probabilities.flip(flip)

    def _cached_embeddings(self, case: PreparedCase, batch: np.ndarray, available: torch.Tensor,
                           flip: int | None = None) -> torch.Tensor:
        """Embeddings of the batch's slices (flipped along ``flip`` if given: the mirrored pass's own
        entries), encoding only those the cache does not hold."""
        mirrored = () if flip is None else (("mirror", flip),)
        keys = [(id(self.method), self.precision, self.encoder_runtime, case.fingerprint, int(z)) + mirrored
                for z in batch]
        missing = [i for i, key in enumerate(keys) if self.embedding_cache.get(key) is None]
        if missing:
            images = case.network_slices(batch[missing], self.method.facts.context_slices).to(self.device)
            images = images if flip is None else images.flip(flip)
            encoded = self.method.encode(images, available[missing])
            for i, embedding in zip(missing, encoded):
                self.embedding_cache.put(keys[i], embedding)
        return torch.stack([self.embedding_cache.get(key) for key in keys]).to(self.device)

    def _segment_patches(self, case: PreparedCase, progress: ProgressCallback,
                         cancel: CancelCheck, mirror: int | None = None) -> tuple[np.ndarray, ...]:
        """3D methods: MONAI sliding-window inference with Gaussian weighting on the reference grid, or
        on the method's working grid (``facts.working_spacing_mm``: the case resized to that voxel size,
        the probabilities resized back). With ``mirror`` (the array axis to mirror) each patch is also
        run flipped along it and the flipped-back prediction aggregated as K more channels: the same
        windows and weights for both passes (the aggregation is linear), so the two are split from one
        output."""
        from monai.inferers import sliding_window_inference

        facts = self.method.facts
        volume = torch.as_tensor(case.images[None], device=self.device)
        if facts.working_spacing_mm is not None:
            volume = resize_volume(volume, working_shape(case.shape_zyx, case.spacing_zyx, facts.working_spacing_mm))
        available = torch.as_tensor(case.available[None], device=self.device)

        def predictor(patches: torch.Tensor) -> torch.Tensor:
            if cancel():
                raise CancelledError("segmentation cancelled; nothing was written")
            patch_available = available.expand(len(patches), -1)
            with self._autocast():
                plain = self.method.predict_proba(patches, patch_available).float()
                if mirror is None:
                    return plain
                flip = mirror + 2  # dim of [B, C, D, H, W]
                mirrored = self.method.predict_proba(patches.flip(flip), patch_available).float().flip(flip)
            return torch.cat([plain, mirrored], dim=1)

        progress(0.0, f"{facts.name}: sliding window over {tuple(volume.shape[-3:])}")
        output = sliding_window_inference(
            volume, roi_size=facts.input_size, sw_batch_size=self.batch_size, predictor=predictor,
            overlap=self.overlap, mode="gaussian", progress=False)
        progress(0.95, f"{facts.name}: patches done")
        output = resize_volume(output, case.shape_zyx)[0].cpu().numpy().astype(np.float32)
        return (output,) if mirror is None else (output[:len(facts.labels)], output[len(facts.labels):])
