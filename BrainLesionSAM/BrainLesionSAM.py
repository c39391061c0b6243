"""BrainLesionSAM: the 3D Slicer scripted module (Module, Widget, Logic, Test).

Layers (see ../../shared/DESIGN.md): the Widget below only wires Qt controls; all work is in
``BrainLesionSAMSlicer`` (MRML glue ``mrml``, ``logic.SegmentationLogic`` with its worker-thread
jobs, ``dependencies``), which imports no Qt and runs under the slicer-core wheel too; that in turn
uses the library ``BrainLesionSAMLib``. ``BrainLesionSAMLogic`` here is the Slicer-registered face of
``SegmentationLogic`` on ``slicer.mrmlScene``. Nothing is installed or imported heavily (torch) when
this file is imported: the first Segment checks and installs the requirements.
"""
import logging
import os
import sys
import traceback

import ctk
import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

_moduleFolder = os.path.dirname(os.path.abspath(__file__))
if _moduleFolder not in sys.path:
    sys.path.insert(0, _moduleFolder)

from BrainLesionSAMSlicer import dependencies, mrml  # noqa: E402  (needs the path above)
from BrainLesionSAMSlicer.logic import SegmentationLogic  # noqa: E402

COMMAND_LINE_EXAMPLE = ("Slicer --no-main-window --python-script BrainLesionSAM/Scripts/batch_segment.py "
                        "--input cases/ --output results/ --method unet2d")
MODALITY_SELECTORS = {"t1": "t1Selector", "t1ce": "t1ceSelector", "t2": "t2Selector", "flair": "flairSelector"}
CACHE_FOLDER_SETTING = "BrainLesionSAM/CacheFolder"
POLL_INTERVAL_MS = 100
POLL_WAIT_S = 0.05


#
# BrainLesionSAM
#


class BrainLesionSAM(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "Brain Lesion SAM"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["BrainLesionSAM contributors"]
        self.parent.helpText = (
            "Multi-modal brain-lesion segmentation (T1, T1CE, T2, FLAIR) with Segment-Anything-based networks: "
            "necrotic core, edema and enhancing tumor (BraTS labels) or a single lesion class, refined with a box "
            "(ROI) for promptable methods.<br>Select the volumes (filled from their names), a method and "
            "click <b>Segment</b>; the first run installs PyTorch (PyTorch extension) and the other Python "
            "packages after asking. Headless: <code>" + COMMAND_LINE_EXAMPLE + "</code>."
        )
        self.parent.acknowledgementText = (
            "Built on Segment Anything (Meta AI), MedSAM/LiteMedSAM, MONAI, SimpleITK and PyTorch. The methods "
            "reproduce published multi-modal brain-lesion segmentation papers; cite them when you use their "
            "results. Not a medical device: for research use only."
        )


#
# BrainLesionSAMWidget
#


class BrainLesionSAMWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Qt wiring only: every decision is made by the logic (``BrainLesionSAMSlicer.logic``)."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._job = None
        self._jobKind = ""
        self._methods = {}

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/BrainLesionSAM.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = BrainLesionSAMLogic()
        self.ui.cacheFolderPathLineEdit.filters = ctk.ctkPathLineEdit.Dirs
        self.ui.cacheFolderPathLineEdit.currentPath = slicer.app.userSettings().value(CACHE_FOLDER_SETTING, "")
        self.logic.cacheFolder = self.ui.cacheFolderPathLineEdit.currentPath or None
        self.ui.weightsPathLineEdit.filters = ctk.ctkPathLineEdit.Files
        self.ui.weightsPathLineEdit.nameFilters = ["Weights (*.safetensors *.pth *.pt)"]
        self.ui.roiPlaceWidget.setMRMLScene(slicer.mrmlScene)
        self.ui.roiPlaceWidget.placeMultipleMarkups = slicer.qSlicerMarkupsPlaceWidget.ForcePlaceSingleMarkup
        self.ui.progressBar.hide()

        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.timeout.connect(self.onPoll)

        for name in MODALITY_SELECTORS.values():
            getattr(self.ui, name).connect("currentNodeChanged(vtkMRMLNode*)", self.updateButtons)
        self.ui.autoFillButton.clicked.connect(self.onAutoFill)
        self.ui.methodComboBox.currentIndexChanged.connect(self.onMethodChanged)
        self.ui.weightsComboBox.currentIndexChanged.connect(self.updateButtons)
        self.ui.weightsPathLineEdit.currentPathChanged.connect(self.updateButtons)
        self.ui.importWeightsButton.clicked.connect(self.onImportWeights)
        self.ui.segmentButton.clicked.connect(self.onSegment)
        self.ui.refineButton.clicked.connect(self.onRefine)
        self.ui.roiSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onRoiChanged)
        self.ui.segmentSelector.connect("currentSegmentChanged(QString)", self.updateButtons)
        self.ui.cacheFolderPathLineEdit.currentPathChanged.connect(self.onCacheFolderChanged)
        self.ui.batchSizeSpinBox.valueChanged.connect(self.onBatchSizeChanged)
        self.ui.clearCachesButton.clicked.connect(self.onClearCaches)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.NodeAddedEvent, self.onNodeAdded)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.populateMethods()
        self.populateDevices()
        self.onAutoFill()
        self.updateButtons()

    def cleanup(self):
        if self._job is not None:
            self._job.cancel()
        self._timer.stop()
        self.removeObservers()

    # ------------------------------------------------------------------ lists
    def populateMethods(self):
        current = self.ui.methodComboBox.currentData
        self.ui.methodComboBox.blockSignals(True)
        self.ui.methodComboBox.clear()
        try:
            infos = self.logic.methods()
        except Exception as error:  # noqa: BLE001 - shown, not fatal for the panel
            infos = []
            self.ui.statusLabel.text = f"Cannot list the methods: {error}"
        self._methods = {info.name: info for info in infos}
        for info in infos:
            suffix = (" (PyTorch not installed yet)" if info.fromCatalogue
                      else " (no weights ship)" if info.weightsProblem else "")
            self.ui.methodComboBox.addItem(f"{info.name}: {info.modalitiesText()}{suffix}", info.name)
            self.ui.methodComboBox.setItemData(self.ui.methodComboBox.count - 1, info.title, qt.Qt.ToolTipRole)
        index = self.ui.methodComboBox.findData(current) if current else -1
        self.ui.methodComboBox.setCurrentIndex(max(index, 0))
        self.ui.methodComboBox.blockSignals(False)
        self.onMethodChanged()

    def populateDevices(self):
        self.ui.deviceComboBox.clear()
        if not dependencies.torchAvailable():
            self.ui.deviceComboBox.addItem("auto", "auto")
            self.ui.deviceInfoLabel.text = "PyTorch is not installed yet; the first Segment installs it."
            return
        try:
            options, summary = self.logic.devices()
        except Exception as error:  # noqa: BLE001 - a broken torch install is reported, not fatal
            options, summary = [("auto", "auto")], f"PyTorch cannot report devices: {error}"
        for key, label in options:
            self.ui.deviceComboBox.addItem(label, key)
        self.ui.deviceInfoLabel.text = summary

    def currentMethod(self):
        return self._methods.get(self.ui.methodComboBox.currentData)

    def currentInputs(self):
        return {key: getattr(self.ui, name).currentNode() for key, name in MODALITY_SELECTORS.items()}

    def currentWeights(self):
        key = self.ui.weightsComboBox.currentData or ""
        if key == "file":
            return self.ui.weightsPathLineEdit.currentPath or None
        return None if key in ("default", "none") else key

    # ------------------------------------------------------------------ reactions
    def onAutoFill(self):
        for key, node in self.logic.guessInputs(slicer.mrmlScene).items():
            selector = getattr(self.ui, MODALITY_SELECTORS[key])
            if selector.currentNode() is None:
                selector.setCurrentNode(node)
        self.updateButtons()

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def onNodeAdded(self, caller, event, node):
        if node is not None and node.IsA("vtkMRMLScalarVolumeNode"):
            qt.QTimer.singleShot(0, self.onAutoFill)  # after the loader has named the node

    def onSceneEndClose(self, caller, event):
        if self._job is None:
            self.logic.clearCaches()
        self.updateButtons()

    def onMethodChanged(self, *args):
        info = self.currentMethod()
        self.ui.weightsComboBox.clear()
        if info is not None:
            for key, label in self.logic.weightsChoices(info.name):
                self.ui.weightsComboBox.addItem(label, key)
        self.updateButtons()

    def onRoiChanged(self, node):
        self.ui.roiPlaceWidget.setCurrentNode(node)
        self.updateButtons()

    def onCacheFolderChanged(self, path):
        slicer.app.userSettings().setValue(CACHE_FOLDER_SETTING, path)
        self.logic.cacheFolder = path or None

    def onBatchSizeChanged(self, value):
        self.logic.batchSize = int(value) or None  # 0 is shown as "auto": 8 on a GPU, 1 on the CPU

    def onClearCaches(self):
        with slicer.util.tryWithErrorDisplay("Cannot unload the model.", waitCursor=True):
            self.logic.clearCaches()
            self.ui.statusLabel.text = "Model and cached embeddings unloaded."

    def onImportWeights(self):
        key = self.ui.weightsComboBox.currentData or ""
        if not key.startswith("catalogue:"):
            slicer.util.errorDisplay("Choose the catalogue model that the file belongs to in 'Weights' first.")
            return
        path = qt.QFileDialog.getOpenFileName(self.parent, "Import weights file", "", "Weights (*.safetensors *.pth *.pt)")
        if not path:
            return
        with slicer.util.tryWithErrorDisplay("Importing the weights file failed.", waitCursor=True):
            destination = self.logic.importWeights(key[len("catalogue:"):], path)
            self.ui.statusLabel.text = f"Imported and verified: {destination}"

    def updateButtons(self, *args):
        running = self._job is not None
        info = self.currentMethod()
        given = [key for key, node in self.currentInputs().items() if node is not None]
        problem = "no method available" if info is None else info.modalityProblem(given)
        if not problem and self.ui.weightsComboBox.currentData == "file" and not self.ui.weightsPathLineEdit.currentPath:
            problem = "choose the weights file"
        if not problem and info.weightsProblem and self.ui.weightsComboBox.currentData != "file":
            problem = info.weightsProblem
        if not problem and info.requiresBox and self.ui.roiSelector.currentNode() is None:
            problem = f"{info.name} segments only inside a box: place an ROI (Box refinement)"
        self.ui.weightsPathLineEdit.enabled = self.ui.weightsComboBox.currentData == "file"
        self.ui.importWeightsButton.enabled = (self.ui.weightsComboBox.currentData or "").startswith("catalogue:")
        if info is not None:
            box = {True: "accepts a box (ROI)", False: "no box prompt", None: "box prompt: known once PyTorch is installed"}
            self.ui.methodInfoLabel.text = f"{info.title}. Modalities: {info.modalitiesText()}; {box[info.promptable]}."
        if problem:
            self.ui.methodInfoLabel.text = f"<span style='color:#c00000'>Cannot segment: {problem}.</span>"
        self.ui.segmentButton.text = "Cancel" if running and self._jobKind == "segment" else "Segment"
        self.ui.segmentButton.enabled = (running and self._jobKind == "segment") or (not running and not problem)
        self.ui.segmentButton.toolTip = problem or "Segment the selected volumes (click again to cancel)"

        refineProblem = problem
        if not refineProblem and info.promptable is not True:
            refineProblem = ("the method takes no box prompt; choose a promptable one" if info.promptable is False
                             else "install PyTorch first (click Segment)")
        if not refineProblem and self.ui.roiSelector.currentNode() is None:
            refineProblem = "place an ROI around the lesion"
        if not refineProblem and not self.ui.segmentSelector.currentSegmentID():
            refineProblem = "select the segment to refine"
        self.ui.refineButton.text = "Cancel" if running and self._jobKind == "refine" else "Refine"
        self.ui.refineButton.enabled = (running and self._jobKind == "refine") or (not running and not refineProblem)
        self.ui.refineInfoLabel.text = f"Cannot refine: {refineProblem}." if refineProblem and not running else ""

    # ------------------------------------------------------------------ running
    def _readyDependencies(self):
        """Install what is missing (after asking); False when the run cannot start now."""
        try:
            restart = self.logic.setupDependencies(
                confirm=lambda message: slicer.util.confirmOkCancelDisplay(message, "BrainLesionSAM"))
        except Exception as error:  # noqa: BLE001 - shown to the user
            slicer.util.errorDisplay(str(error), detailedText=traceback.format_exc())
            return False
        if restart:
            if slicer.util.confirmOkCancelDisplay("Slicer must restart to use the newly installed Python packages. "
                                                  "Restart now?", "BrainLesionSAM"):
                slicer.util.restart()
            return False
        if any(info.fromCatalogue for info in self._methods.values()):
            self.populateMethods()
            self.populateDevices()
        return True

    def onSegment(self):
        if self._job is not None:
            self._job.cancel()
            return
        if not self._readyDependencies():
            return
        info = self.currentMethod()
        roi = self.ui.roiSelector.currentNode() if info is not None and info.promptable else None
        self._start("segment", lambda: self.logic.process(
            self.currentInputs(), info.name, weights=self.currentWeights(), device=self.ui.deviceComboBox.currentData,
            outputSegmentation=self.ui.outputSegmentationSelector.currentNode(), box=roi, waitForCompletion=False,
            uncertainty=self.ui.uncertaintyCheckBox.checked))

    def onRefine(self):
        if self._job is not None:
            self._job.cancel()
            return
        if not self._readyDependencies():
            return
        info = self.currentMethod()
        self._start("refine", lambda: self.logic.refine(
            self.currentInputs(), info.name, self.ui.segmentSelector.currentNode(),
            self.ui.segmentSelector.currentSegmentID(), self.ui.roiSelector.currentNode(),
            weights=self.currentWeights(), device=self.ui.deviceComboBox.currentData, waitForCompletion=False))

    def _start(self, kind, startJob):
        try:
            self._job = startJob()
        except Exception as error:  # noqa: BLE001 - user errors carry their own advice
            slicer.util.errorDisplay(str(error), detailedText=traceback.format_exc())
            return
        self._jobKind = kind
        self.ui.progressBar.value = 0
        self.ui.progressBar.show()
        self.ui.statusLabel.text = "starting..."
        self._timer.start()
        self.updateButtons()

    def onPoll(self):
        job = self._job
        if job is None:
            self._timer.stop()
            return
        # Waiting on the job's event releases the GIL, so the worker thread runs even if Slicer's
        # main thread would otherwise hold it while idle in the Qt event loop.
        job.wait(POLL_WAIT_S)
        fraction, message = job.progress
        self.ui.progressBar.value = int(round(100 * fraction))
        self.ui.statusLabel.text = message
        if not job.done:
            return
        self._timer.stop()
        self._job, kind = None, self._jobKind
        self.ui.progressBar.hide()
        try:
            with slicer.util.WaitCursor():
                outcome = job.finish()
        except Exception as error:  # noqa: BLE001 - every failure ends up in the panel
            from BrainLesionSAMLib.errors import BrainLesionSAMError, CancelledError

            if isinstance(error, CancelledError):
                self.ui.statusLabel.text = "Cancelled; the scene was not changed."
            elif isinstance(error, BrainLesionSAMError):
                self.ui.statusLabel.text = f"Failed: {error}"
                slicer.util.errorDisplay(str(error))
            else:
                details = "".join(traceback.format_exception(type(error), error, error.__traceback__))
                logging.error(details)
                self.ui.statusLabel.text = f"Failed: {type(error).__name__}: {error}"
                slicer.util.errorDisplay(f"Unexpected error: {error}", detailedText=details)
        else:
            self.showOutcome(outcome, kind, job.elapsed)
        self.updateButtons()

    def showOutcome(self, outcome, kind, seconds):
        self.ui.volumesTableView.setMRMLTableNode(outcome.volumesTable)
        hasWeights = outcome.caseWeightsTable is not None and bool(outcome.caseWeights)
        self.ui.caseWeightsTableView.setMRMLTableNode(outcome.caseWeightsTable if hasWeights else None)
        self.ui.caseWeightsLabel.visible = self.ui.caseWeightsTableView.visible = hasWeights
        self.ui.segmentSelector.setCurrentNode(outcome.segmentationNode)
        if kind == "segment":
            self.ui.segmentSelector.setCurrentSegmentID(outcome.segmentIds[-1])
            self.ui.statusLabel.text = (f"Segmented with {outcome.method} on {outcome.device} in {seconds:.1f} s "
                                        f"into '{outcome.segmentationNode.GetName()}'.")
            if outcome.uncertaintyNode is not None:
                slicer.util.setSliceViewerLayers(foreground=outcome.uncertaintyNode, foregroundOpacity=0.5)
                self.ui.statusLabel.text += f" Uncertainty map: '{outcome.uncertaintyNode.GetName()}' (foreground)."
        else:
            changed = outcome.changedVoxels or {}
            self.ui.statusLabel.text = (f"Refined inside box {outcome.box} in {seconds:.1f} s "
                                        f"(network {outcome.timings.get('network_s', 0):.1f} s): "
                                        f"+{changed.get('added', 0)} / -{changed.get('removed', 0)} voxels. "
                                        f"Cached slice embeddings: {self.logic.embeddingCacheSize}.")


#
# BrainLesionSAMLogic
#


class BrainLesionSAMLogic(ScriptedLoadableModuleLogic, SegmentationLogic):
    """The module's logic: ``SegmentationLogic`` (no Qt) on the application's scene.

    Use it from Python the same way as the panel does, e.g.
    ``BrainLesionSAMLogic().process({"t1ce": t1ce, "flair": flair}, "unet2d")``.
    """

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        SegmentationLogic.__init__(self, slicer.mrmlScene)

    @staticmethod
    def setupDependencies(confirm=None):
        """Install missing requirements (asks through ``confirm``); True when a restart is needed.
        Headless and --testing runs never prompt: they raise DependencyError with instructions."""
        return dependencies.ensureDependencies(confirm, interactive=dependencies.isInteractive())

    def importWeights(self, modelId, path):
        from BrainLesionSAMLib.catalogue import import_weights
        return import_weights(self.catalogue.get(modelId), path, self.cacheFolder)


#
# BrainLesionSAMTest
#


class BrainLesionSAMTest(ScriptedLoadableModuleTest):
    """The pytest scenario (Testing/test_slicer_*.py) inside the real application, kept light:
    one generated 2 mm case, unet2d in the worker thread, ROI box, .seg.nrrd round trip."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_SegmentInWorkerThread()
        self.setUp()
        self.test_RoiBoxAndSegmentationFile()

    def _loadCase(self):
        from BrainLesionSAMLib.sample import SampleParameters, generate_case

        images = generate_case(SampleParameters.random(3, resolution=2))
        images.pop("seg")
        nodes = {key: mrml.addVolumeNodeFromImage(slicer.mrmlScene, image, f"BLSAM_test_{key}")
                 for key, image in images.items()}
        return images, nodes

    def test_SegmentInWorkerThread(self):
        import numpy as np
        import SimpleITK as sitk
        from BrainLesionSAMLib.pipeline import load_and_segment

        self.delayDisplay("Segmenting a generated case in the worker thread")
        dependencies.requireDependencies()
        images, nodes = self._loadCase()
        logic = BrainLesionSAMLogic()
        self.assertEqual(logic.guessInputs(slicer.mrmlScene), nodes)
        job = logic.process(nodes, "unet2d", device="cpu", waitForCompletion=False)
        messages = set()
        while not job.wait(POLL_WAIT_S):
            messages.add(job.progress[1])
            slicer.app.processEvents()
        outcome = job.finish()
        self.assertTrue(any("slices" in m for m in messages), messages)
        segmentation = outcome.segmentationNode.GetSegmentation()
        self.assertEqual([segmentation.GetSegment(i).GetName() for i in outcome.segmentIds],
                         ["Necrotic core", "Edema", "Enhancing tumor"])
        labels, labelSet = mrml.labelsFromSegmentation(outcome.segmentationNode, nodes["t1ce"])
        expected = load_and_segment(images, "unet2d", device="cpu").label_array
        self.assertTrue(np.array_equal(labels, expected))
        self.assertEqual(labelSet, "brats")
        self.assertGreater(outcome.volumesMl["WT"], 0)
        self.assertEqual(sitk.GetArrayFromImage(outcome.result.labels).shape, labels.shape)
        if not slicer.app.commandOptions().noMainWindow:
            widget = slicer.modules.brainlesionsam.widgetRepresentation().self()
            widget.onAutoFill()
            self.assertIs(widget.ui.flairSelector.currentNode(), nodes["flair"])
        self.delayDisplay("Worker-thread segmentation passed")

    def test_RoiBoxAndSegmentationFile(self):
        import numpy as np

        self.delayDisplay("ROI box and .seg.nrrd round trip")
        images, nodes = self._loadCase()
        reference = nodes["t1ce"]
        roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "box")
        ijkToRas = mrml.ijkToRas(reference)
        low, high = ijkToRas @ np.array([10, 20, 30, 1.0]), ijkToRas @ np.array([40, 50, 35, 1.0])
        roi.SetCenter(*((low[:3] + high[:3]) / 2))
        roi.SetSize(*np.abs(high[:3] - low[:3]))
        self.assertEqual(mrml.roiToBox(roi, reference), (10, 20, 30, 40, 50, 35))
        labels = np.zeros(mrml.volumeShape(reference), np.uint8)
        labels[30:36, 20:51, 10:41] = 2
        labels[32:34, 30:40, 20:30] = 4
        segmentationNode = mrml.newSegmentationNode(slicer.mrmlScene, "test", reference)
        mrml.writeLabelsToSegmentation(segmentationNode, labels, reference, "brats", "test")
        path = os.path.join(slicer.app.temporaryPath, "BrainLesionSAM_test.seg.nrrd")
        if os.path.exists(path):
            os.remove(path)
        mrml.writeSegmentationFile(segmentationNode, path)
        loaded = mrml.readSegmentationFile(slicer.mrmlScene, path)
        self.assertTrue(np.array_equal(mrml.labelsFromSegmentation(loaded, reference)[0], labels))
        os.remove(path)
        self.delayDisplay("ROI box and segmentation file passed")
