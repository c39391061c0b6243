"""BrainLesionSAM: the 3D Slicer scripted module (skeleton).

This version registers the module, its icon and the library that ships inside it. It does not
segment yet: the panel (volume selectors, method, box prompt, Segment button) arrives with the Slicer
issue, and its logic will run the library's command line (``brainlesionsam segment``) in a separate
process, with the arguments ``BrainLesionSAMLogic.segmentCommandLine`` builds.

Imported by Slicer only; the library (BrainLesionSAMLib) never imports this file.
"""
import importlib.util
import os
import shutil
import sys

import ctk
import qt
import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)

COMMAND_LINE_EXAMPLE = (
    "brainlesionsam segment --t1 t1.nii.gz --t1ce t1ce.nii.gz --t2 t2.nii.gz --flair flair.nii.gz "
    "--method unet2d --out seg.nii.gz --report report/"
)


def libraryPath():
    """The folder holding the BrainLesionSAMLib package: beside this file when the extension is built
    or installed, the repository root when Slicer loads the module straight from the source tree."""
    here = os.path.dirname(os.path.abspath(__file__))
    for folder in (here, os.path.dirname(here)):
        if os.path.isfile(os.path.join(folder, "BrainLesionSAMLib", "__init__.py")):
            return folder
    raise ImportError("the BrainLesionSAMLib package is missing next to the BrainLesionSAM module; "
                      "reinstall the BrainLesionSAM extension")


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
            "Multi-modal brain-lesion segmentation (T1, T1CE, T2, FLAIR) with Segment-Anything-based "
            "networks: necrotic core, edema and enhancing tumor (BraTS labels) or a single lesion class.<br>"
            "<b>This version has no segmentation panel yet</b>; it arrives with the Slicer integration. "
            "Until then, segment with the library's command line, installed with this extension: "
            f"<code>{COMMAND_LINE_EXAMPLE}</code>, and load the resulting label volume as a segmentation."
        )
        self.parent.acknowledgementText = (
            "Built on Segment Anything (Meta AI), MONAI, SimpleITK and PyTorch. The methods reproduce "
            "published multi-modal brain-lesion segmentation papers; cite them when you use their results. "
            "Not a medical device: for research use only."
        )


#
# BrainLesionSAMWidget
#


class BrainLesionSAMWidget(ScriptedLoadableModuleWidget):
    """Shows what is installed and how to segment until the panel arrives; it has no Segment button."""

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        self.logic = BrainLesionSAMLogic()

        box = ctk.ctkCollapsibleButton()
        box.text = "Status"
        self.layout.addWidget(box)
        form = qt.QFormLayout(box)

        notice = qt.QLabel(
            "The segmentation panel is not part of this version. Segment with the command line:\n"
            + COMMAND_LINE_EXAMPLE)
        notice.wordWrap = True
        notice.setTextInteractionFlags(qt.Qt.TextSelectableByMouse)
        form.addRow(notice)
        for name, state in self.logic.installationStatus().items():
            form.addRow(f"{name}:", qt.QLabel(state))
        self.layout.addStretch(1)


#
# BrainLesionSAMLogic
#


class BrainLesionSAMLogic(ScriptedLoadableModuleLogic):
    """No Qt, no segmentation of its own: the library does the work, in a separate process."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        folder = libraryPath()
        if folder not in sys.path:
            sys.path.insert(0, folder)

    @staticmethod
    def installationStatus():
        """Library version and whether the Python packages it needs are installed (none is imported)."""
        import BrainLesionSAMLib

        status = {"BrainLesionSAMLib": f"{BrainLesionSAMLib.__version__} ({libraryPath()})"}
        for package, hint in (("torch", "install the PyTorch extension and its PyTorch"),
                              ("SimpleITK", "bundled with Slicer"),
                              ("segment_anything", "pip_install('segment-anything')"),
                              ("monai", "pip_install('monai')")):
            found = importlib.util.find_spec(package) is not None
            status[package] = "installed" if found else f"missing ({hint})"
        return status

    @staticmethod
    def segmentCommandLine(inputPaths, method, outputPath, device="auto", box=None, reportFolder=None):
        """Argument list of the ``brainlesionsam segment`` run that the panel's Segment button will start.

        inputPaths: modality key ('t1', 't1ce', 't2', 'flair') -> image file; box: (x0, y0, z0, x1, y1, z1)
        voxel indices of the reference volume. Run it with ``PYTHONPATH=libraryPath()``.
        """
        python = shutil.which("PythonSlicer") or sys.executable  # Slicer's own Python interpreter
        command = [python, "-m", "BrainLesionSAMLib.cli", "segment"]
        for key, path in inputPaths.items():
            command += [f"--{key}", str(path)]
        command += ["--method", method, "--device", device, "--out", str(outputPath)]
        if box is not None:
            command += ["--box", ",".join(str(int(v)) for v in box)]
        if reportFolder is not None:
            command += ["--report", str(reportFolder)]
        return command


#
# BrainLesionSAMTest
#


class BrainLesionSAMTest(ScriptedLoadableModuleTest):
    """Checks that the library ships with the module; segmentation tests come with the panel."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_LibraryShipsWithModule()
        self.test_SegmentCommandLine()

    def test_LibraryShipsWithModule(self):
        logic = BrainLesionSAMLogic()
        from BrainLesionSAMLib.conventions import LABEL_SETS, MODALITIES

        self.assertEqual(MODALITIES, ("t1", "t1ce", "t2", "flair"))
        self.assertEqual(LABEL_SETS["brats"], (0, 1, 2, 4))
        self.assertIn("BrainLesionSAMLib", logic.installationStatus())
        self.delayDisplay("BrainLesionSAMLib imports inside Slicer")

    def test_SegmentCommandLine(self):
        command = BrainLesionSAMLogic.segmentCommandLine(
            {"t1ce": "/data/t1ce.nii.gz", "flair": "/data/flair.nii.gz"}, "unet2d", "/data/seg.nii.gz",
            box=(1, 2, 3, 40, 50, 60))
        self.assertEqual(command[1:4], ["-m", "BrainLesionSAMLib.cli", "segment"])
        self.assertEqual(command[command.index("--box") + 1], "1,2,3,40,50,60")
        self.assertEqual(command[command.index("--flair") + 1], "/data/flair.nii.gz")
        self.delayDisplay("segment command line built")
