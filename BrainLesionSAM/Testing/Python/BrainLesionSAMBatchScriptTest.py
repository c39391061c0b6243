"""Runs Scripts/batch_segment.py the way users do - a second Slicer process with --no-main-window
--python-script - on one generated 2 mm case (cut to 20 slices), and checks the exit status, the
summary and the written segmentation. The same scenario runs with plain Python + slicer-core in
Testing/test_slicer_batch.py; this one checks what only the application does (its argument
passing and exit status)."""
import csv
import os
import subprocess
import sys
import tempfile
import unittest

import slicer


class BrainLesionSAMBatchScriptTest(unittest.TestCase):
    def setUp(self):
        moduleFolder = os.path.dirname(slicer.modules.brainlesionsam.path)
        if moduleFolder not in sys.path:
            sys.path.insert(0, moduleFolder)
        self.script = os.path.join(moduleFolder, "Scripts", "batch_segment.py")
        slicer.mrmlScene.Clear()

    def test_batch_script_in_the_application(self):
        import numpy as np
        import SimpleITK as sitk
        import BrainLesionSAMSlicer  # noqa: F401  (puts BrainLesionSAMLib on sys.path)
        from BrainLesionSAMLib.io import read_image
        from BrainLesionSAMLib.sample import SampleParameters, generate_case, write_case
        from BrainLesionSAMSlicer import mrml

        with tempfile.TemporaryDirectory() as folder:
            images = generate_case(SampleParameters.random(5, resolution=2))
            tumour = np.flatnonzero(sitk.GetArrayFromImage(images["seg"]).any(axis=(1, 2)))
            start = max(int(tumour.mean()) - 10, 0)
            case = write_case({k: v[:, :, start:start + 20] for k, v in images.items()},
                              os.path.join(folder, "cases"), "BLSAM_0005")
            output = os.path.join(folder, "output")
            launcher = slicer.app.launcherExecutableFilePath or slicer.app.applicationFilePath()
            completed = subprocess.run(
                [launcher, "--no-splash", "--no-main-window", "--python-script", self.script,
                 "--input", os.path.join(folder, "cases"), "--output", output, "--method", "unet2d", "--device", "cpu"],
                capture_output=True, text=True, timeout=1800)
            self.assertEqual(completed.returncode, 0, completed.stdout[-3000:] + completed.stderr[-3000:])
            with open(os.path.join(output, "summary.csv")) as handle:
                self.assertEqual([row["status"] for row in csv.DictReader(handle)], ["done"])
            reference = mrml.addVolumeNodeFromImage(slicer.mrmlScene, read_image(os.path.join(case, "BLSAM_0005_t1ce.nii.gz")),
                                                    "reference")
            loaded = mrml.readSegmentationFile(slicer.mrmlScene, os.path.join(output, "BLSAM_0005.seg.nrrd"))
            labels, labelSet = mrml.labelsFromSegmentation(loaded, reference)
            self.assertEqual(labelSet, "brats")
            self.assertGreater(int((labels > 0).sum()), 0)


if __name__ == "__main__":
    unittest.main()
