"""The headless batch script (BrainLesionSAM/Scripts/batch_segment.py) run with plain Python and the
slicer-core wheel, as `Slicer --no-main-window --python-script` runs it in the application.

Two generated 2 mm cases (20 axial slices through the tumour) plus a broken one: the written .seg.nrrd files, reloaded into a fresh
scene, must equal the library's own label output voxel for voxel; a second run skips the finished
cases; any failed case makes the exit status non-zero.
"""
import csv
import gzip
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer")

REPOSITORY = Path(__file__).resolve().parent.parent
SCRIPT = REPOSITORY / "BrainLesionSAM" / "Scripts" / "batch_segment.py"
sys.path.insert(0, str(REPOSITORY / "BrainLesionSAM"))
from BrainLesionSAMSlicer import mrml  # noqa: E402

from BrainLesionSAMLib.io import discover_case, read_image  # noqa: E402
from BrainLesionSAMLib.pipeline import load_and_segment  # noqa: E402
from BrainLesionSAMLib.sample import SampleParameters, generate_case, write_case  # noqa: E402
from conftest import native_auto_precision  # noqa: E402


def run_script(*arguments, timeout=600):
    start = time.perf_counter()
    result = subprocess.run([sys.executable, str(SCRIPT), *map(str, arguments)], cwd=REPOSITORY,
                            capture_output=True, text=True, timeout=timeout)
    return result, time.perf_counter() - start


def generated_cases(folder: Path, seeds=(5, 6), slices=20) -> list[Path]:
    """Generated 2 mm cases cut to ``slices`` axial slices through the tumour (written by write_case)."""
    paths = []
    for seed in seeds:
        images = generate_case(SampleParameters.random(seed, resolution=2))
        tumour = sitk.GetArrayFromImage(images["seg"]).any(axis=(1, 2))
        centre = int(np.flatnonzero(tumour).mean())
        cut = slice(max(centre - slices // 2, 0), max(centre - slices // 2, 0) + slices)
        paths.append(write_case({key: image[:, :, cut] for key, image in images.items()}, folder, f"BLSAM_{seed:04d}"))
    return paths


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    cases = generated_cases(root / "cases")
    broken = root / "cases" / "BLSAM_broken"
    broken.mkdir()
    whole = (cases[0] / f"{cases[0].name}_flair.nii.gz").read_bytes()
    (broken / "broken_flair.nii.gz").write_bytes(gzip.compress(gzip.decompress(whole)[:50_000]))
    output = root / "output"
    first, seconds = run_script("--input", root / "cases", "--output", output, "--method", "unet2d",
                                "--device", "cpu", "--nifti")
    print(f"\nbatch_segment.py, 2 cases (2 mm, 20 slices) + 1 broken, unet2d, CPU: {seconds:.1f} s "
          "(plain Python + slicer-core, start-up included)")
    return {"cases": cases, "output": output, "first": first, "root": root}


def test_every_case_is_written_and_a_failed_case_makes_the_run_fail(batch):
    result, output = batch["first"], batch["output"]
    assert result.returncode == 1, result.stdout + result.stderr
    assert "BLSAM_broken: failed" in result.stdout and "incomplete" in result.stdout
    rows = list(csv.DictReader(open(output / "summary.csv")))
    assert [(r["case"], r["status"]) for r in rows] == [("BLSAM_0005", "done"), ("BLSAM_0006", "done"),
                                                        ("BLSAM_broken", "failed")]
    assert sorted(p.name for p in output.iterdir()) == [
        "BLSAM_0005.nii.gz", "BLSAM_0005.seg.nrrd", "BLSAM_0006.nii.gz", "BLSAM_0006.seg.nrrd",
        "summary.csv"]  # nothing half-written for the broken case, no temporary files


def test_written_segmentations_equal_the_library_output_voxel_for_voxel(batch):
    for case in batch["cases"]:
        files = {k: v for k, v in discover_case(case).items() if k != "seg"}
        with native_auto_precision():  # as the script's process picks it (bf16 on a CPU with native bf16)
            expected = load_and_segment(files, "unet2d", device="cpu").label_array
        assert (expected > 0).any()
        scene = slicer.vtkMRMLScene()
        reference = mrml.addVolumeNodeFromImage(scene, read_image(files["t1ce"]), "reference")
        loaded = mrml.readSegmentationFile(scene, batch["output"] / f"{case.name}.seg.nrrd")
        labels, label_set = mrml.labelsFromSegmentation(loaded, reference)
        assert label_set == "brats"
        assert np.array_equal(labels, expected), case.name
        names = [loaded.GetSegmentation().GetSegment(i).GetName() for i in loaded.GetSegmentation().GetSegmentIDs()]
        assert names == ["Necrotic core", "Edema", "Enhancing tumor"]
        nifti = sitk.ReadImage(str(batch["output"] / f"{case.name}.nii.gz"))
        assert np.array_equal(sitk.GetArrayFromImage(nifti), expected)
        truth = read_image(files["t1ce"])
        assert nifti.GetOrigin() == pytest.approx(truth.GetOrigin()) and nifti.GetSpacing() == truth.GetSpacing()


def test_second_run_skips_finished_cases(batch):
    output = batch["output"]
    stamps = {p.name: p.stat().st_mtime_ns for p in output.glob("*.seg.nrrd")}
    result, seconds = run_script("--input", batch["root"] / "cases", "--output", output, "--method", "unet2d",
                                 "--device", "cpu", "--nifti")
    assert result.returncode == 1  # the broken case still fails
    assert result.stdout.count("skipped (already done)") == 2
    assert {p.name: p.stat().st_mtime_ns for p in output.glob("*.seg.nrrd")} == stamps


def test_bad_setup_exits_non_zero_with_a_message(tmp_path):
    result, _ = run_script("--input", tmp_path / "missing", "--output", tmp_path / "out", "--method", "unet2d")
    assert result.returncode == 1 and "does not exist" in result.stderr
    (tmp_path / "cases" / "one").mkdir(parents=True)
    result, _ = run_script("--input", tmp_path / "cases", "--output", tmp_path / "out", "--method", "nosuch")
    assert result.returncode == 1 and "unknown method 'nosuch'" in result.stderr
    result, _ = run_script("--input", tmp_path / "cases")
    assert result.returncode == 2 and "--output" in result.stderr
