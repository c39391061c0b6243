"""The segmentation logic behind the Slicer panel, the module's self-test and the batch script.

    logic = SegmentationLogic(scene)
    outcome = logic.process({"t1ce": t1ceNode, "flair": flairNode}, "unet2d")           # blocking
    job = logic.process(inputs, "unet2d", waitForCompletion=False)                     # worker thread
    ... job.wait(0.05); job.progress; job.cancel() ...; outcome = job.finish()          # main thread
    logic.refine(inputs, "litemedsam", outcome.segmentationNode, segmentId, roiNode)   # box refinement
    logic.process(inputs, "unet2d", uncertainty=True).uncertaintyNode                 # + mirror-TTA map

Where the work runs. The network runs in a worker thread of Slicer's own process (not in a
PythonSlicer subprocess), because:

- box refinement must be fast the second time: the loaded model, the preprocessed case and the
  image-embedding cache (``engine.EmbeddingCache``) stay in memory between Segment and every
  Refine. A subprocess would reload torch, the weights and the volumes and re-encode every slice
  each time (a resident server process could keep them, at the price of a protocol, a lifecycle and
  a second copy of the volumes);
- the volumes go to the library as in-memory copies: no temporary files with patient data;
- cancellation is cooperative and prompt: the engine checks the cancel flag between batches (and
  the download between chunks), so Cancel takes effect within one batch and leaves nothing behind.

The price, and how it is paid: (1) Python code shares the GIL with Slicer's main thread - torch
releases it during every operator, and the panel's poll calls ``job.wait(0.05)``, which releases it
too, so the worker progresses even while the main thread is idle in Qt; (2) a crash in native code
would take Slicer down (a subprocess would survive it) - the engine catches CUDA out-of-memory and
turns it into an error message. MRML is never touched from the worker: the inputs are copied on the
main thread before it starts, and the result is written into the scene by ``Job.finish()`` on the
main thread, so the scene is untouched until the result is complete (and untouched after a
cancel or an error).
"""
from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import SimpleITK as sitk

from BrainLesionSAMLib.conventions import MODALITIES, MODALITY_DISPLAY_NAMES, REFERENCE_PREFERENCE
from BrainLesionSAMLib.errors import BrainLesionSAMError, CancelledError, GeometryError, MissingModalityError

from . import dependencies, mrml

ProgressCallback = Callable[[float, str], None]
CancelCheck = Callable[[], bool]

VOLUMES_TABLE_ROLE = "BrainLesionSAMVolumesTable"
CASE_WEIGHTS_TABLE_ROLE = "BrainLesionSAMCaseWeightsTable"
UNCERTAINTY_ROLE = "BrainLesionSAMUncertainty"  # the segmentation's uncertainty map (a scalar volume node)


@dataclass(frozen=True)
class MethodInfo:
    """What the panel shows about a method. From the registry when torch is installed, else from the
    model catalogue (``fromCatalogue``: promptable unknown until PyTorch is there)."""

    name: str
    title: str
    modalities: tuple[str, ...]
    requiredModalities: tuple[str, ...]
    labelSet: str
    promptable: bool | None
    cacheableEmbeddings: bool | None
    requiresBox: bool | None = False
    fromCatalogue: bool = False
    weightsProblem: str = ""   # '' when weights ship (a catalogue model), else why the method cannot run as is

    def modalityProblem(self, given) -> str:
        """'' when the given modalities suffice, else why not (the rule of MethodFacts.check_modalities)."""
        given = [m for m in given if m in MODALITIES]
        missing = [m for m in self.requiredModalities if m not in given]
        if missing:
            return (f"{self.name} needs {', '.join(MODALITY_DISPLAY_NAMES[m] for m in self.requiredModalities)}; "
                    f"missing: {', '.join(MODALITY_DISPLAY_NAMES[m] for m in missing)}")
        if not any(m in given for m in self.modalities):
            return f"{self.name} needs at least one of {', '.join(MODALITY_DISPLAY_NAMES[m] for m in self.modalities)}"
        return ""

    def modalitiesText(self) -> str:
        """'T1CE, FLAIR required; T1, T2 optional' style summary."""
        required = [MODALITY_DISPLAY_NAMES[m] for m in self.requiredModalities]
        optional = [MODALITY_DISPLAY_NAMES[m] for m in self.modalities if m not in self.requiredModalities]
        if not required:
            return f"any of {', '.join(optional)}"
        return ", ".join(required) + " required" + (f"; {', '.join(optional)} optional" if optional else "")


@dataclass
class SegmentationOutcome:
    segmentationNode: Any
    segmentIds: list[str]
    volumesMl: dict[str, float]
    caseWeights: dict[str, dict[str, float]]
    timings: dict[str, float]
    device: str
    method: str
    labelSet: str
    result: Any                                   # BrainLesionSAMLib.engine.SegmentationResult
    box: tuple[int, ...] | None = None            # reference voxel box (x0, y0, z0, x1, y1, z1)
    changedVoxels: dict[str, int] | None = None   # refinement: voxels added / removed in the segment
    volumesTable: Any = None
    caseWeightsTable: Any = None
    uncertaintyNode: Any = None                   # scalar volume '<segmentation> uncertainty', if asked for


class Job:
    """A computation in a worker thread whose result is applied to the scene on the main thread.

    ``progress`` is the latest (fraction, message); ``wait(timeout)`` blocks without holding the GIL;
    ``cancel()`` asks the computation to stop; ``finish()`` (main thread, once ``done``) writes the
    result into the scene and returns the outcome, or raises the computation's error (CancelledError
    after a cancel). If the job is dropped without ``finish()`` nothing reaches the scene.
    """

    def __init__(self, work: Callable[[ProgressCallback, CancelCheck], Any], apply: Callable[[Any], Any],
                 cancel: CancelCheck | None = None, onDone: Callable[[], None] | None = None):
        self._work, self._apply, self._userCancel, self._onDone = work, apply, cancel, onDone
        self._cancelled = threading.Event()
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._progress: tuple[float, str] = (0.0, "starting")
        self._computed: Any = None
        self._error: BaseException | None = None
        self._outcome: Any = None
        self._finished = False
        self.startTime = time.perf_counter()
        self.elapsed = 0.0
        self._thread = threading.Thread(target=self._run, name="BrainLesionSAM", daemon=True)

    def start(self) -> "Job":
        self._thread.start()
        return self

    def _report(self, fraction: float, message: str) -> None:
        with self._lock:
            self._progress = (float(fraction), str(message))

    def _isCancelled(self) -> bool:
        return self._cancelled.is_set() or bool(self._userCancel and self._userCancel())

    def _run(self) -> None:
        try:
            self._computed = self._work(self._report, self._isCancelled)
        except BaseException as error:  # noqa: BLE001 - re-raised on the main thread by finish()
            self._error = error
        finally:
            self.elapsed = time.perf_counter() - self.startTime
            if self._onDone is not None:
                self._onDone()
            self._done.set()

    @property
    def progress(self) -> tuple[float, str]:
        with self._lock:
            return self._progress

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        self._cancelled.set()
        self._report(self.progress[0], "cancelling...")

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    def finish(self):
        if not self.done:
            raise RuntimeError("the job is still running; call finish() once it is done")
        if self._finished:
            return self._outcome
        self._finished = True
        if self._error is not None:
            raise self._error
        self._outcome = self._apply(self._computed)
        return self._outcome


@dataclass
class _Request:
    """Everything the worker needs, copied on the main thread."""

    kind: str                         # 'segment' or 'refine'
    method: str
    weightsKey: tuple
    device: str
    images: dict[str, sitk.Image]     # modalities the method accepts, world geometry
    nodes: dict[str, Any]
    referenceKey: str
    caseKey: tuple
    box: tuple[int, ...] | None
    output: Any = None                # segmentation node (segment: user-picked output; refine: target)
    segmentId: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    mirrorTta: bool = False           # also run mirrored: the result carries the uncertainty map


def _stage(progress: ProgressCallback, start: float, end: float) -> ProgressCallback:
    return lambda fraction, message: progress(start + (end - start) * min(max(fraction, 0.0), 1.0), message)


class SegmentationLogic:
    """No Qt: the scene is given; nodes are created in it only by ``Job.finish`` / blocking calls.

    cacheFolder: weights cache (None: $BRAINLESIONSAM_CACHE, else ~/.brainlesionsam/models).
    catalogue: a ``BrainLesionSAMLib.catalogue.Catalogue`` (None: the library's Models.json).
    """

    def __init__(self, scene, cacheFolder: str | os.PathLike | None = None, catalogue=None, batchSize: int | None = None):
        self.scene = scene
        self.cacheFolder = cacheFolder
        self.batchSize = batchSize
        self._catalogue = catalogue
        self._catalogueError = ""
        self._engine = None
        self._engineKey: tuple | None = None
        self._case = None
        self._caseKey: tuple | None = None
        self._busy = threading.Lock()

    # ------------------------------------------------------------------ what the panel lists
    @property
    def catalogue(self):
        """The model catalogue, or None (``catalogueError`` says why) - never raises."""
        if self._catalogue is None and not self._catalogueError:
            from BrainLesionSAMLib.catalogue import load_catalogue
            try:
                self._catalogue = load_catalogue()  # the library's Models.json (package data)
            except BrainLesionSAMError as error:
                self._catalogueError = str(error)
        return self._catalogue

    @property
    def catalogueError(self) -> str:
        return self._catalogueError

    def methods(self) -> list[MethodInfo]:
        """Registered methods (imports torch) or, before PyTorch is installed, the catalogue's."""
        if dependencies.torchAvailable():
            from BrainLesionSAMLib.methods import get_method_class, method_names

            infos = []
            for name in method_names():
                facts = get_method_class(name).facts
                infos.append(MethodInfo(facts.name, facts.title, tuple(facts.modalities),
                                        tuple(facts.required_modalities), facts.label_set, facts.promptable,
                                        facts.cacheable_embeddings, bool(getattr(facts, "requires_box", False)),
                                        weightsProblem=self.weightsProblem(name)))
            return infos
        seen: dict[str, MethodInfo] = {}
        for entry in (self.catalogue.entries if self.catalogue else ()):
            seen.setdefault(entry.method, MethodInfo(entry.method, entry.title, entry.modalities,
                                                     entry.required_modalities, entry.label_set, None, None, None,
                                                     fromCatalogue=True))
        return list(seen.values())

    def weightsProblem(self, method: str) -> str:
        """'' when the catalogue has weights for ``method``, else the reason it cannot segment without
        a weights file of the user's (shown in the panel; Segment stays disabled)."""
        if self.catalogue is None:
            return f"the model catalogue cannot be read ({self.catalogueError})"
        if self.catalogue.for_method(method):
            return ""
        return f"{method} ships no trained weights yet; choose a weights file of your own"

    def methodInfo(self, name: str) -> MethodInfo:
        for info in self.methods():
            if info.name == name:
                return info
        from BrainLesionSAMLib.errors import UnknownMethodError
        raise UnknownMethodError(f"unknown method '{name}'; available: {', '.join(i.name for i in self.methods())}")

    def weightsChoices(self, method: str) -> list[tuple[str, str]]:
        """(key, label): the method's catalogue models ('catalogue:<id>'), the method's own default
        when the catalogue has none ('default'), and a local file ('file')."""
        choices = []
        for entry in (self.catalogue.for_method(method) if self.catalogue else []):
            where = {"download": f"download {entry.size_mb:.0f} MB", "package": "installed",
                     "import": "import the file"}[entry.kind]
            experimental = "EXPERIMENTAL: " if entry.experimental else ""  # a budget too small for a useful model
            choices.append((f"catalogue:{entry.id}",
                            f"{experimental}{entry.title} - v{entry.version}, {where}, {entry.licence}"))
        if not choices:
            choices.append(("none", "no weights ship for this method"))
        choices.append(("file", "weights file..."))
        return choices

    @staticmethod
    def devices() -> tuple[list[tuple[str, str]], str]:
        """([(device key, label)], summary of what torch reports). Imports torch."""
        import torch

        cuda = torch.cuda.is_available()
        options = [("auto", "auto (" + ("GPU" if cuda else "CPU: no CUDA GPU found") + ")"),
                   ("cpu", f"CPU ({torch.get_num_threads()} threads)")]
        if cuda:
            for index in range(torch.cuda.device_count()):
                free, total = torch.cuda.mem_get_info(index)
                options.append((f"cuda:{index}", f"GPU {index}: {torch.cuda.get_device_name(index)}, "
                                                 f"{free / 2**30:.1f} of {total / 2**30:.1f} GiB free"))
            summary = f"torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s)"
        else:
            summary = (f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'none'}); no usable CUDA GPU, "
                       "segmentation runs on the CPU")
        return options, summary

    @staticmethod
    def guessInputs(scene) -> dict[str, Any]:
        return mrml.guessInputVolumes(scene)

    # ------------------------------------------------------------------ running
    def process(self, inputs: Mapping[str, Any], method: str, weights=None, device: str = "auto",
                outputSegmentation=None, box=None, waitForCompletion: bool = True,
                progressCallback: ProgressCallback | None = None, cancel: CancelCheck | None = None,
                uncertainty: bool = False):
        """Segment the whole case (or, for promptable methods, inside ``box``: an ROI node or a
        reference voxel box). The result goes into ``outputSegmentation`` when given (the user picked
        it), else into a new segmentation node. ``uncertainty``: mirror test-time augmentation (about
        twice the time), its map in a scalar volume node '<segmentation> uncertainty' linked to the
        segmentation (``outcome.uncertaintyNode``). Returns a SegmentationOutcome, or a started Job when
        ``waitForCompletion`` is False (``progressCallback`` is then called from the worker thread)."""
        return self._run(lambda: self._request("segment", inputs, method, weights, device, box, outputSegmentation,
                                               mirrorTta=uncertainty),
                         self._applySegmentation, waitForCompletion, progressCallback, cancel)

    def refine(self, inputs: Mapping[str, Any], method: str, segmentationNode, segmentId: str, roiNode,
               weights=None, device: str = "auto", waitForCompletion: bool = True,
               progressCallback: ProgressCallback | None = None, cancel: CancelCheck | None = None):
        """Re-run a promptable method inside the ROI and replace only segment ``segmentId`` inside
        the ROI's voxel box. A BraTS segment takes its own label from a BraTS method's output; any
        other combination takes the whole lesion (all non-zero labels)."""
        if segmentationNode is None or segmentationNode.GetSegmentation().GetSegment(segmentId or "") is None:
            raise GeometryError("select the segment to refine (a segmentation and one of its segments)")
        if roiNode is None:
            raise GeometryError("place an ROI (box) around the part of the lesion to refine")
        return self._run(lambda: self._request("refine", inputs, method, weights, device, roiNode, segmentationNode,
                                               segmentId),
                         self._applyRefinement, waitForCompletion, progressCallback, cancel)

    def clearCaches(self) -> None:
        """Forget the loaded model, the preprocessed case and the cached embeddings (frees memory)."""
        if not self._busy.acquire(blocking=False):
            raise BrainLesionSAMError("a segmentation is running; cancel it before clearing the caches")
        try:
            self._engine = self._engineKey = self._case = self._caseKey = None
        finally:
            self._busy.release()

    @property
    def busy(self) -> bool:
        return self._busy.locked()

    @property
    def embeddingCacheSize(self) -> int:
        cache = getattr(self._engine, "embedding_cache", None)
        return len(cache) if cache is not None else 0

    # ------------------------------------------------------------------ internals (main thread)
    def _request(self, kind, inputs, method, weights, device, box, output, segmentId=None,
                 mirrorTta: bool = False) -> _Request:
        dependencies.requireDependencies()
        info = self.methodInfo(method)
        given = {key: node for key, node in (inputs or {}).items() if node is not None}
        unknown = set(given) - set(MODALITIES)
        if unknown:
            raise MissingModalityError(f"unknown modality key(s) {sorted(unknown)}; use {list(MODALITIES)}")
        problem = info.modalityProblem(list(given))
        if problem:
            raise MissingModalityError(problem + "; select the missing volume(s) or choose another method")
        if kind == "refine" and not info.promptable:
            promptable = [i.name for i in self.methods() if i.promptable]
            raise BrainLesionSAMError(f"method '{method}' takes no box prompt, so it cannot refine inside an ROI; "
                                      f"choose a promptable method ({', '.join(promptable) or 'none installed'})")
        used = {key: given[key] for key in MODALITIES if key in given and key in info.modalities}
        referenceKey = next(key for key in REFERENCE_PREFERENCE if key in used)
        referenceNode = used[referenceKey]
        for key, node in used.items():
            if node.GetScene() is not self.scene:
                raise BrainLesionSAMError(f"the {MODALITY_DISPLAY_NAMES[key]} volume is not in this scene")
        if kind == "segment" and box is None and info.requiresBox:
            raise GeometryError(f"method '{method}' segments only inside a box: place an ROI around the lesion "
                                "(Box refinement section) and segment again, or choose a method that needs no box")
        voxelBox = None
        if box is not None:
            if not info.promptable:
                raise BrainLesionSAMError(f"method '{method}' takes no box prompt; clear the ROI or choose a "
                                          "promptable method")
            voxelBox = tuple(box) if isinstance(box, (tuple, list)) else mrml.roiToBox(box, referenceNode)
            if len(voxelBox) != 6:
                raise GeometryError(f"a box is six voxel indices (x0, y0, z0, x1, y1, z1), got {voxelBox}")
        caseKey = tuple((key, node.GetID(), node.GetImageData().GetMTime() if node.GetImageData() else 0,
                         tuple(np.round(mrml.ijkToRas(node), 9).ravel())) for key, node in used.items())
        images = {} if caseKey == self._caseKey else {key: mrml.imageFromVolumeNode(node) for key, node in used.items()}
        return _Request(kind, method, self._weightsKey(method, weights), str(device), images, used, referenceKey,
                        caseKey, voxelBox, output, segmentId, mirrorTta=bool(mirrorTta))

    def _weightsKey(self, method: str, weights) -> tuple:
        if weights is None or weights == "default" or weights == "":
            entries = self.catalogue.for_method(method) if self.catalogue else []
            return ("catalogue", entries[0].id) if entries else ("default", method)
        if isinstance(weights, str) and weights.startswith("catalogue:"):
            return ("catalogue", weights[len("catalogue:"):])
        if isinstance(weights, str) and self.catalogue is not None and weights in self.catalogue:
            return ("catalogue", weights)
        return ("file", str(Path(weights).expanduser().resolve()))

    def _run(self, makeRequest: Callable[[], _Request], apply, waitForCompletion, progressCallback, cancel):
        if not self._busy.acquire(blocking=False):
            raise BrainLesionSAMError("a segmentation is already running; wait for it to finish or cancel it")
        try:
            request = makeRequest()
        except BaseException:
            self._busy.release()
            raise
        applyOnMainThread = lambda computed: apply(request, computed)  # noqa: E731
        if not waitForCompletion:
            return Job(lambda progress, isCancelled: self._compute(request, progress, isCancelled),
                       applyOnMainThread, cancel, onDone=self._busy.release).start()
        try:
            computed = self._compute(request, progressCallback or (lambda fraction, message: None),
                                     cancel or (lambda: False))
        finally:
            self._busy.release()
        return applyOnMainThread(computed)

    # ------------------------------------------------------------------ worker side (no MRML)
    def _compute(self, request: _Request, progress: ProgressCallback, cancel: CancelCheck) -> dict:
        start = time.perf_counter()
        progress(0.0, f"loading {request.method}")
        engine = self._engineFor(request, _stage(progress, 0.0, 0.1), cancel)
        modelTime = time.perf_counter() - start
        if cancel():
            raise CancelledError("segmentation cancelled; nothing was changed")
        start = time.perf_counter()
        if request.caseKey != self._caseKey or self._case is None:
            from BrainLesionSAMLib.preprocessing import prepare_case

            progress(0.1, "reading and preprocessing the volumes")
            self._case, self._caseKey = None, None
            self._case = prepare_case(request.images, reference_modality=request.referenceKey)
            self._caseKey = request.caseKey
        preprocessingTime = time.perf_counter() - start
        from BrainLesionSAMLib.engine import Box

        box = Box(*request.box) if request.box is not None else None
        result = engine.segment(self._case, box=box, progress=_stage(progress, 0.15, 0.97), cancel=cancel,
                                mirror_tta=request.mirrorTta)
        timings = {"model_s": modelTime, "preprocessing_s": preprocessingTime, **result.timings}
        progress(0.98, "writing the segmentation")
        return {"result": result, "timings": timings, "device": result.device}

    def _engineFor(self, request: _Request, progress: ProgressCallback, cancel: CancelCheck):
        key = (request.method, request.weightsKey, request.device, self.batchSize)
        if key == self._engineKey and self._engine is not None:
            return self._engine
        from BrainLesionSAMLib.engine import EmbeddingCache, InferenceEngine

        self._engine = self._engineKey = None  # free the previous model first
        model = self._loadModel(request.method, request.weightsKey, progress, cancel)
        self._engine = InferenceEngine(model, device=request.device, batch_size=self.batchSize,
                                       embedding_cache=EmbeddingCache())
        self._engineKey = key
        return self._engine

    def _loadModel(self, method: str, weightsKey: tuple, progress: ProgressCallback, cancel: CancelCheck):
        from BrainLesionSAMLib import catalogue as catalogueModule
        from BrainLesionSAMLib.checkpoints import load_method
        from BrainLesionSAMLib.errors import WeightsError

        kind, value = weightsKey
        if kind == "catalogue":
            if self.catalogue is None:
                raise WeightsError(f"the model catalogue cannot be read ({self.catalogueError})")
            entry = self.catalogue.get(value)
            if entry.method != method:
                raise WeightsError(f"catalogue model '{entry.id}' is for method '{entry.method}', not '{method}'; "
                                   "choose weights made for the selected method")
            return catalogueModule.load_entry(entry, self.cacheFolder, progress, cancel)
        if kind == "file":
            progress(0.0, f"reading {Path(value).name}")
            return catalogueModule.load_weights_file(method, value)
        progress(0.0, f"loading the built-in weights of {method}")
        return load_method(method)

    # ------------------------------------------------------------------ applying (main thread)
    def _checkStillInScene(self, request: _Request) -> Any:
        for key, node in request.nodes.items():
            if node.GetScene() is not self.scene:
                raise BrainLesionSAMError(f"the {MODALITY_DISPLAY_NAMES[key]} volume was removed while the "
                                          "segmentation ran; nothing was written")
        return request.nodes[request.referenceKey]

    def _tables(self, segmentationNode, reference, caseWeights) -> tuple[Any, Any, dict[str, float]]:
        volumes = mrml.segmentVolumes(segmentationNode, reference)
        volumesTable = self._linkedTable(segmentationNode, VOLUMES_TABLE_ROLE, "lesion volumes")
        mrml.fillVolumesTable(volumesTable, volumes, mrml.voxelVolumeMl(reference))
        weightsTable = segmentationNode.GetNodeReference(CASE_WEIGHTS_TABLE_ROLE)
        if caseWeights:
            weightsTable = self._linkedTable(segmentationNode, CASE_WEIGHTS_TABLE_ROLE, "modality weights")
            mrml.fillCaseWeightsTable(weightsTable, caseWeights)
        return volumesTable, weightsTable, volumes

    def _linkedTable(self, segmentationNode, role: str, suffix: str):
        return self._linkedNode(segmentationNode, role, suffix, "vtkMRMLTableNode")

    def _linkedNode(self, segmentationNode, role: str, suffix: str, className: str):
        """The node the segmentation references under ``role`` (made by an earlier run: reused), else a
        new one named '<segmentation> <suffix>' (a unique name: a user's node is never replaced)."""
        node = segmentationNode.GetNodeReference(role)
        if node is None or node.GetScene() is not self.scene or not node.IsA(className):
            node = self.scene.AddNewNodeByClass(className,
                                                self.scene.GenerateUniqueName(f"{segmentationNode.GetName()} {suffix}"))
            segmentationNode.SetNodeReferenceID(role, node.GetID())
        return node

    def _applySegmentation(self, request: _Request, computed: dict) -> SegmentationOutcome:
        start = time.perf_counter()
        reference = self._checkStillInScene(request)
        result = computed["result"]
        output = request.output
        if output is None or output.GetScene() is not self.scene:
            output = mrml.newSegmentationNode(self.scene, f"{reference.GetName()} {request.method}", reference)
        labels = sitk.GetArrayFromImage(result.labels)
        ids = mrml.writeLabelsToSegmentation(output, labels, reference, result.label_set, request.method)
        volumesTable, weightsTable, volumes = self._tables(output, reference, result.case_weights)
        uncertaintyNode = None
        if result.uncertainty is not None:
            uncertaintyNode = self._linkedNode(output, UNCERTAINTY_ROLE, "uncertainty", "vtkMRMLScalarVolumeNode")
            mrml.writeMapOnReference(uncertaintyNode, sitk.GetArrayFromImage(result.uncertainty), reference)
        timings = {**computed["timings"], "apply_s": time.perf_counter() - start}
        return SegmentationOutcome(output, ids, volumes, dict(result.case_weights), timings, computed["device"],
                                   request.method, result.label_set, result, request.box, None, volumesTable,
                                   weightsTable, uncertaintyNode)

    def _applyRefinement(self, request: _Request, computed: dict) -> SegmentationOutcome:
        start = time.perf_counter()
        reference = self._checkStillInScene(request)
        segmentationNode = request.output
        if segmentationNode.GetScene() is not self.scene:
            raise BrainLesionSAMError("the segmentation was removed while the refinement ran; nothing was written")
        segment = segmentationNode.GetSegmentation().GetSegment(request.segmentId)
        if segment is None:
            raise BrainLesionSAMError("the segment was removed while the refinement ran; nothing was written")
        result = computed["result"]
        labels = sitk.GetArrayFromImage(result.labels)
        value = mrml.segmentTag(segment, mrml.LABEL_VALUE_TAG)
        segmentLabelSet = mrml.segmentTag(segment, mrml.LABEL_SET_TAG)
        if value is not None and segmentLabelSet == result.label_set == "brats":
            mask = labels == int(value)
        else:
            mask = labels > 0
        changed = mrml.updateSegmentInBox(segmentationNode, request.segmentId, mask, request.box, reference,
                                          request.method)
        volumesTable, weightsTable, volumes = self._tables(segmentationNode, reference, result.case_weights)
        timings = {**computed["timings"], "apply_s": time.perf_counter() - start}
        return SegmentationOutcome(segmentationNode, [request.segmentId], volumes, dict(result.case_weights), timings,
                                   computed["device"], request.method, result.label_set, result, request.box,
                                   changed, volumesTable, weightsTable)
