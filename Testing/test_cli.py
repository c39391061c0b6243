"""End-to-end tests of the ``brainlesionsam`` command line.

Everything runs in-process through ``BrainLesionSAMLib.cli.main([...])`` (return code + captured
stdout/stderr), except one subprocess call of the installed console script that shows what a user
sees in a shell on a user error. The cases are 2 mm BraTS-like sample cases (120 x 120 x 78) made
once per test session (conftest.py); the network is a small, randomly initialised (seeded) unet2d
given with ``--weights``: these tests check the mechanics (files, geometry, labels, errors), not
quality. Bad inputs, one test each, are in test_bad_inputs.py (the table in docs/bad_inputs.md).
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from BrainLesionSAMLib.cli import main
from BrainLesionSAMLib.methods import build_method

SEED = 3  # conftest's CLI_SEED: the cases (cases_root), the weights and sofa_weights are its session fixtures
CASE_IDS = [f"BLSAM_{SEED:04d}_000", f"BLSAM_{SEED:04d}_001"]
BRATS2021 = {0, 1, 2, 4}
VOXEL_ML = 2.0 * 2.0 * 2.0 / 1000.0


# ------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def case_dir(cases_root) -> Path:
    return cases_root / CASE_IDS[0]


@pytest.fixture(scope="module")
def full_run(case_dir, weights, tmp_path_factory):
    """`segment --case-dir ... --report DIR` once; several tests read its output."""
    out_dir = tmp_path_factory.mktemp("segment_case_dir")
    out = out_dir / "labels.nii.gz"
    report = out_dir / "report"
    code, stdout, stderr = run_cli_redirected(
        segment_args(weights, out, "--case-dir", str(case_dir), "--report", str(report)))
    return {"code": code, "stdout": stdout, "stderr": stderr, "out": out, "out_dir": out_dir, "report": report}


# ------------------------------------------------------------------------------------------- helpers

def run_cli(capsys, argv: list) -> tuple[int, str, str]:
    """main(argv) in-process: (return code, stdout, stderr) of this call alone."""
    capsys.readouterr()
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def run_cli_redirected(argv: list) -> tuple[int, str, str]:
    """As run_cli, for module-scoped fixtures (capsys is per test)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main([str(a) for a in argv])
    return code, stdout.getvalue(), stderr.getvalue()


def segment_args(weights: Path, out: Path, *inputs: str) -> list[str]:
    return ["segment", *inputs, "--method", "unet2d", "--weights", str(weights), "--out", str(out)]


def error_message(stderr: str) -> str:
    """The one 'error: ...' line the CLI prints (tqdm may have drawn progress before it)."""
    assert stderr.count("error: ") == 1, stderr
    message = stderr[stderr.index("error: "):].rstrip("\n")
    assert "\n" not in message, f"error message spans several lines: {message!r}"
    assert "Traceback" not in stderr
    return message


def read(path: Path) -> sitk.Image:
    return sitk.ReadImage(str(path))


def array_of(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(read(path))


def assert_same_geometry(image: sitk.Image, reference: sitk.Image) -> None:
    assert image.GetSize() == reference.GetSize()
    np.testing.assert_allclose(image.GetSpacing(), reference.GetSpacing(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(image.GetOrigin(), reference.GetOrigin(), rtol=0, atol=1e-4)
    np.testing.assert_allclose(image.GetDirection(), reference.GetDirection(), rtol=0, atol=1e-6)


def leftovers(folder: Path) -> list[str]:
    """Hidden or temporary files a failed or finished write might have left behind."""
    return sorted(p.name for p in folder.rglob("*") if p.name.startswith(".") or ".part" in p.name)


def modality_file(case: Path, key: str) -> Path:
    return case / f"{case.name}_{key}.nii.gz"


def write_volume(array_zyx: np.ndarray, path: Path, like: sitk.Image | None = None) -> Path:
    image = sitk.GetImageFromArray(array_zyx)
    if like is not None:
        image.CopyInformation(like)
    sitk.WriteImage(image, str(path))
    return path


# ------------------------------------------------------------------------------------------- segment

def test_segment_case_dir_writes_labels_on_the_reference_grid_and_a_report(full_run, case_dir):
    assert full_run["code"] == 0, full_run["stderr"]
    out, report = full_run["out"], full_run["report"]
    assert f"wrote {out}" in full_run["stdout"]
    labels_image = read(out)
    assert_same_geometry(labels_image, read(modality_file(case_dir, "t1ce")))
    labels = sitk.GetArrayFromImage(labels_image)
    values = set(np.unique(labels).tolist())
    assert values <= BRATS2021
    assert values == BRATS2021, "the seeded test network should produce every label"

    case_id = case_dir.name
    png, json_path, csv_path = (report / f"{case_id}_qc.png", report / f"{case_id}_volumes.json",
                                report / f"{case_id}_volumes.csv")
    for path in (png, json_path, csv_path):
        assert path.is_file() and f"wrote {path}" in full_run["stdout"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Volumes in the report = an independent count of the written labels times the voxel volume.
    count = {value: int((labels == value).sum()) for value in (1, 2, 4)}
    expected = {"Necrotic core": count[1], "Edema": count[2], "Enhancing tumor": count[4],
                "WT": count[1] + count[2] + count[4], "TC": count[1] + count[4], "ET": count[4]}
    expected = {name: n * VOXEL_ML for name, n in expected.items()}
    payload = json.loads(json_path.read_text())
    assert payload["case"] == case_id and payload["method"] == "unet2d"
    assert "modality_weights" not in payload  # the baseline weighs nothing per case
    assert set(payload["volumes_ml"]) == set(expected)
    for name, volume in expected.items():
        assert payload["volumes_ml"][name] == pytest.approx(volume, abs=1e-5), name
    with open(csv_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert {row["name"]: float(row["volume_ml"]) for row in rows} == pytest.approx(expected, abs=1e-5)
    assert leftovers(full_run["out_dir"]) == []


def test_segment_report_shows_which_modality_each_sub_region_relied_on(capsys, monkeypatch, case_dir, weights,
                                                                      tmp_path):
    """A method's per-case modality weights (SOFA's attention, MoME's gate) reach the JSON report and
    the terminal, largest first."""
    from BrainLesionSAMLib.methods.unet2d import UNet2DBaseline

    relied_on = {"edema": {"t1": 0.1, "t1ce": 0.2, "t2": 0.3, "flair": 0.4},
                 "enhancing tumour": {"t1": 0.05, "t1ce": 0.8, "t2": 0.05, "flair": 0.1}}
    monkeypatch.setattr(UNet2DBaseline, "case_weights", lambda self: relied_on)
    out, report = tmp_path / "labels.nii.gz", tmp_path / "report"
    code, stdout, stderr = run_cli(capsys, segment_args(weights, out, "--case-dir", case_dir, "--report", report))
    assert code == 0, stderr
    payload = json.loads((report / f"{case_dir.name}_volumes.json").read_text())
    assert payload["modality_weights"] == relied_on
    assert "edema relied on: FLAIR 0.40, T2 0.30, T1CE 0.20, T1 0.10" in stdout
    assert "enhancing tumour relied on: T1CE 0.80, FLAIR 0.10" in stdout


def test_segment_explicit_files_follow_the_t1ce_grid_and_brats2023_numbering(capsys, case_dir, weights, tmp_path):
    # The T1CE is on its own grid (oblique, 2 x 2 x 2.5 mm, other origin); the other modalities are
    # not. The output must be on the T1CE's grid, whatever the others' grid is.
    original = read(modality_file(case_dir, "t1ce"))
    angle = np.deg2rad(10.0)
    direction = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    spacing = np.array([2.0, 2.0, 2.5])
    size = np.array([110, 112, 62])
    centre = np.array(original.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in original.GetSize()]))
    grid = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
    grid.SetSpacing(spacing.tolist())
    grid.SetDirection(direction.ravel().tolist())
    grid.SetOrigin((centre - direction @ ((size - 1) * spacing / 2)).tolist())
    t1ce = tmp_path / "patient_t1ce.nrrd"
    sitk.WriteImage(sitk.Resample(original, grid, sitk.Transform(), sitk.sitkLinear, 0.0), str(t1ce))

    out = tmp_path / "out" / "patient.nii.gz"
    out.parent.mkdir()
    code, stdout, stderr = run_cli(capsys, segment_args(
        weights, out, "--t1", modality_file(case_dir, "t1"), "--t1ce", t1ce, "--t2", modality_file(case_dir, "t2"),
        "--flair", modality_file(case_dir, "flair"), "--label-convention", "brats2023"))
    assert code == 0, stderr
    assert f"wrote {out}" in stdout
    labels_image = read(out)
    assert_same_geometry(labels_image, read(t1ce))
    values = set(np.unique(sitk.GetArrayFromImage(labels_image)).tolist())
    assert values <= {0, 1, 2, 3} and 4 not in values
    assert 3 in values, "ET must be written as 3 in the BraTS 2023 numbering"
    assert sorted(p.name for p in out.parent.iterdir()) == ["patient.nii.gz"]


def test_segment_box_labels_nothing_outside_the_box(capsys, full_run, case_dir, weights, tmp_path):
    x0, y0, z0, x1, y1, z1 = 30, 35, 25, 85, 90, 50
    out = tmp_path / "boxed.nii.gz"
    code, _, stderr = run_cli(capsys, segment_args(weights, out, "--case-dir", case_dir,
                                           "--box", f"{x0},{y0},{z0},{x1},{y1},{z1}"))
    assert code == 0, stderr
    labels_image = read(out)
    assert_same_geometry(labels_image, read(modality_file(case_dir, "t1ce")))
    labels = sitk.GetArrayFromImage(labels_image)
    inside = np.zeros(labels.shape, bool)
    inside[z0:z1 + 1, y0:y1 + 1, x0:x1 + 1] = True  # corners inclusive, array order [z, y, x]
    assert not labels[~inside].any(), "labels outside the box"
    assert labels[inside].any(), "the box holds lesion labels in the unrestricted run; it must here too"
    # unet2d is not promptable: inside the box the result is the unrestricted one.
    full = array_of(full_run["out"])
    agreement = np.mean(labels[inside] == full[inside])
    assert agreement > 0.999, agreement


def test_segment_flair_only(capsys, case_dir, weights, tmp_path):
    out = tmp_path / "flair_only.nii.gz"
    code, stdout, stderr = run_cli(capsys, segment_args(weights, out, "--flair", modality_file(case_dir, "flair")))
    assert code == 0, stderr
    labels_image = read(out)
    assert_same_geometry(labels_image, read(modality_file(case_dir, "flair")))
    assert set(np.unique(sitk.GetArrayFromImage(labels_image)).tolist()) <= BRATS2021


def test_segment_refuses_to_overwrite_unless_asked(capsys, case_dir, weights, tmp_path):
    out = tmp_path / "labels.nii.gz"
    out.write_bytes(b"an earlier result the user wants to keep")
    before = out.read_bytes()
    args = segment_args(weights, out, "--case-dir", case_dir, "--box", "40,40,30,60,60,34")

    code, stdout, stderr = run_cli(capsys, args)
    assert code == 1
    message = error_message(stderr)
    assert str(out) in message and "--overwrite" in message
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.nii.gz"]

    code, stdout, stderr = run_cli(capsys, args + ["--overwrite"])
    assert code == 0, stderr
    assert_same_geometry(read(out), read(modality_file(case_dir, "t1ce")))
    assert set(np.unique(array_of(out)).tolist()) <= BRATS2021
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.nii.gz"]


def test_segment_uncertainty_writes_the_map_and_keeps_existing_files(capsys, case_dir, weights, tmp_path):
    out, uncertainty, probabilities = tmp_path / "labels.nii.gz", tmp_path / "u.nii.gz", tmp_path / "p.nii.gz"
    inputs = ("--case-dir", case_dir, "--box", "30,35,25,85,90,32")
    args = segment_args(weights, out, *inputs, "--uncertainty", uncertainty, "--probabilities", probabilities)
    code, stdout, stderr = run_cli(capsys, args)
    assert code == 0, stderr
    assert f"wrote {uncertainty}" in stdout and f"wrote {probabilities}" in stdout
    reference = read(modality_file(case_dir, "t1ce"))
    assert_same_geometry(read(uncertainty), reference)
    values = array_of(uncertainty)
    assert values.dtype == np.float32 and values.min() >= 0.0 and values.max() <= 1.0
    assert values.max() > 0.0, "a random network disagrees with its mirror image somewhere"
    assert not values[:25].any() and not values[33:].any(), "the map is 0 outside the box"
    mean = array_of(probabilities)  # the two passes' mean: the labels are its argmax inside the box
    labels = array_of(out)
    np.testing.assert_array_equal(np.array([0, 1, 2, 4])[mean.argmax(-1)][25:33, 35:91, 30:86],
                                  labels[25:33, 35:91, 30:86])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.nii.gz", "p.nii.gz", "u.nii.gz"]

    before = uncertainty.read_bytes()
    code, stdout, stderr = run_cli(capsys, segment_args(weights, tmp_path / "new.nii.gz", *inputs,
                                                        "--uncertainty", uncertainty))
    assert code == 1 and str(uncertainty) in error_message(stderr) and "--uncertainty or add --overwrite" in stderr
    code, stdout, stderr = run_cli(capsys, segment_args(weights, tmp_path / "new.nii.gz", *inputs,
                                                        "--uncertainty", tmp_path / "u.txt"))
    assert code == 1 and "--uncertainty u.txt: name the volume .nii.gz" in error_message(stderr)
    assert uncertainty.read_bytes() == before and leftovers(tmp_path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.nii.gz", "p.nii.gz", "u.nii.gz"]
    code, _, stderr = run_cli(capsys, args + ["--overwrite"])
    assert code == 0, stderr


def test_batch_uncertainty_writes_one_map_per_case(capsys, cases_root, weights, tmp_path):
    batch_in = tmp_path / "in"
    shutil.copytree(cases_root / CASE_IDS[0], batch_in / CASE_IDS[0])
    batch_out = tmp_path / "out"
    code, _, stderr = run_cli(capsys, ["batch", "--input", batch_in, "--output", batch_out, "--method", "unet2d",
                                       "--weights", weights, "--uncertainty"])
    assert code == 0, stderr
    assert sorted(p.name for p in batch_out.iterdir()) == sorted(
        [f"{CASE_IDS[0]}.nii.gz", f"{CASE_IDS[0]}_uncertainty.nii.gz", "summary.csv"])
    assert_same_geometry(read(batch_out / f"{CASE_IDS[0]}_uncertainty.nii.gz"),
                         read(modality_file(cases_root / CASE_IDS[0], "t1ce")))


@pytest.mark.parametrize("value", ["0", "-1"])
def test_segment_rejects_a_batch_size_below_one(capsys, value, case_dir, weights, tmp_path):
    out = tmp_path / "labels.nii.gz"
    try:
        code, _, stderr = run_cli(capsys, segment_args(weights, out, "--case-dir", case_dir, "--batch-size", value))
    except SystemExit as error:  # argparse's refusal (status 2) is as good as the library's (1)
        code, stderr = error.code, capsys.readouterr().err
    assert code in (1, 2)
    assert "batch" in stderr.lower() and "Traceback" not in stderr
    assert list(tmp_path.iterdir()) == []


def test_batch_output_that_is_a_file_is_a_user_error(capsys, cases_root, weights, tmp_path):
    output = tmp_path / "results"
    output.write_text("a file where the output folder should be")
    code, _, stderr = run_cli(capsys, ["batch", "--input", cases_root, "--output", output, "--method", "unet2d",
                                       "--weights", weights])
    assert code == 1
    assert str(output) in error_message(stderr)
    assert output.read_text() == "a file where the output folder should be"


def test_bad_arguments_exit_with_status_2(capsys, weights, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["segment", "--method", "unet2d", "--weights", str(weights)])  # no --out
    assert exit_info.value.code == 2
    assert "--out" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["segment", "--flair", "x.nii.gz", "--method", "unet2d", "--out", str(tmp_path / "o.nii.gz"),
              "--label-convention", "brats2099"])
    assert exit_info.value.code == 2


def test_console_script_reports_a_user_error_on_stderr_with_status_1(case_dir, weights, tmp_path):
    script = Path(sys.executable).with_name("brainlesionsam")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "BrainLesionSAMLib.cli"]
    missing = tmp_path / "typo_flair.nii.gz"
    out = tmp_path / "labels.nii.gz"
    completed = subprocess.run(
        command + ["segment", "--t1ce", str(modality_file(case_dir, "t1ce")), "--flair", str(missing),
                   "--method", "unet2d", "--weights", str(weights), "--out", str(out)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert completed.returncode == 1, completed.stderr
    message = error_message(completed.stderr)
    assert str(missing) in message and "FLAIR" in message and "does not exist" in message
    assert completed.stdout == ""
    assert not out.exists() and leftovers(tmp_path) == []


# --------------------------------------------------------------------------------------------- batch

def test_batch_segments_every_case_skips_done_ones_and_isolates_a_broken_case(capsys, cases_root, weights, tmp_path):
    batch_in = tmp_path / "in"
    for case_id in CASE_IDS:
        shutil.copytree(cases_root / case_id, batch_in / case_id)
    # A broken case sorted between the good ones: its FLAIR is a damaged gzip stream.
    broken = batch_in / f"{CASE_IDS[0]}_corrupt"
    shutil.copytree(cases_root / CASE_IDS[0], broken)
    corrupt_flair = broken / f"{CASE_IDS[0]}_flair.nii.gz"
    corrupt_flair.write_bytes(b"\x1f\x8b\x08\x00" + bytes(range(256)) * 8)
    batch_out = tmp_path / "out"
    argv = ["batch", "--input", batch_in, "--output", batch_out, "--method", "unet2d", "--weights", weights]

    code, stdout, stderr = run_cli(capsys, argv)
    assert code != 0, "a failed case must make the run fail"
    expected_files = sorted([f"{c}.nii.gz" for c in CASE_IDS] + ["summary.csv"])
    assert sorted(p.name for p in batch_out.iterdir()) == expected_files
    assert leftovers(batch_out) == []
    for case_id in CASE_IDS:
        labels_image = read(batch_out / f"{case_id}.nii.gz")
        assert_same_geometry(labels_image, read(modality_file(cases_root / case_id, "t1ce")))
        assert set(np.unique(sitk.GetArrayFromImage(labels_image)).tolist()) <= BRATS2021
    rows = _summary(batch_out)
    assert [r["case"] for r in rows] == [CASE_IDS[0], broken.name, CASE_IDS[1]]
    status = {r["case"]: r for r in rows}
    assert status[CASE_IDS[0]]["status"] == status[CASE_IDS[1]]["status"] == "done"
    assert status[broken.name]["status"] == "failed"
    assert "FLAIR" in status[broken.name]["error"] and str(corrupt_flair) in status[broken.name]["error"]
    assert "damaged or incomplete" in status[broken.name]["error"]
    assert f"{broken.name}: failed" in stdout

    # Second run: the done cases are skipped (files untouched), the broken one fails again.
    stamps = {c: (batch_out / f"{c}.nii.gz").stat().st_mtime_ns for c in CASE_IDS}
    code, stdout, stderr = run_cli(capsys, argv)
    assert code != 0
    rows = {r["case"]: r for r in _summary(batch_out)}
    for case_id in CASE_IDS:
        assert rows[case_id]["status"].startswith("skipped"), rows[case_id]
        assert f"{case_id}: already done, skipped" in stdout
        assert (batch_out / f"{case_id}.nii.gz").stat().st_mtime_ns == stamps[case_id]
    assert rows[broken.name]["status"] == "failed"

    # Without the broken case everything is done (or skipped): status 0.
    shutil.rmtree(broken)
    code, stdout, stderr = run_cli(capsys, argv)
    assert code == 0, stderr
    assert all(r["status"].startswith("skipped") for r in _summary(batch_out))
    assert leftovers(batch_out) == []


def _summary(folder: Path) -> list[dict[str, str]]:
    with open(folder / "summary.csv", newline="") as handle:
        return list(csv.DictReader(handle))


# ------------------------------------------------------------------------------------------ evaluate

def test_evaluate_ground_truth_against_itself_and_a_miss(capsys, cases_root, tmp_path):
    pred = tmp_path / "pred"
    pred.mkdir()
    for case_id in CASE_IDS:
        shutil.copy(modality_file(cases_root / case_id, "seg"), pred / f"{case_id}.nii.gz")
    out = tmp_path / "metrics.csv"

    code, stdout, stderr = run_cli(capsys, ["evaluate", "--pred", pred, "--gt", cases_root, "--out", out])
    assert code == 0, stderr
    assert f"wrote {out}" in stdout and "WT_dice=1.0000" in stdout
    rows = _rows(out)
    assert [r["case"] for r in rows] == [*CASE_IDS, "mean", "sd"]
    for row in rows[:3]:
        for region in ("WT", "TC", "ET"):
            assert float(row[f"{region}_dice"]) == pytest.approx(1.0)
            assert float(row[f"{region}_hd95_mm"]) == pytest.approx(0.0)

    # An existing CSV is kept unless --overwrite is given.
    before = out.read_bytes()
    code, _, stderr = run_cli(capsys, ["evaluate", "--pred", pred, "--gt", cases_root, "--out", out])
    assert code == 1 and "--overwrite" in error_message(stderr)
    assert out.read_bytes() == before

    # The second case predicted empty: its Dice is 0 and the mean is 0.5.
    empty = array_of(pred / f"{CASE_IDS[1]}.nii.gz") * 0
    write_volume(empty, pred / f"{CASE_IDS[1]}.nii.gz", like=read(pred / f"{CASE_IDS[1]}.nii.gz"))
    code, _, stderr = run_cli(capsys, ["evaluate", "--pred", pred, "--gt", cases_root, "--out", out, "--overwrite"])
    assert code == 0, stderr
    rows = {r["case"]: r for r in _rows(out)}
    assert float(rows[CASE_IDS[0]]["WT_dice"]) == pytest.approx(1.0)
    assert float(rows[CASE_IDS[1]]["WT_dice"]) == pytest.approx(0.0)
    assert float(rows["mean"]["WT_dice"]) == pytest.approx(0.5)
    assert leftovers(tmp_path) == []


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


# ---------------------------------------------------------------------------------------------- info

def test_info_json_lists_methods_devices_and_versions(capsys):
    code, stdout, _ = run_cli(capsys, ["info", "--json"])
    assert code == 0
    info = json.loads(stdout)
    methods = {m["name"]: m for m in info["methods"]}
    unet = methods["unet2d"]
    assert unet["spatial_dims"] == 2 and unet["label_set"] == "brats" and unet["labels"] == [0, 1, 2, 4]
    assert unet["modalities"] == ["t1", "t1ce", "t2", "flair"] and unet["required_modalities"] == []
    assert unet["tolerates_missing"] is True and unet["promptable"] is False
    assert unet["input_size"] == [256, 256]
    model = build_method("unet2d")
    assert unet["parameters"]["total"] == sum(p.numel() for p in model.parameters())
    assert unet["parameters"]["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert unet["default_config"]["channels"] == list(model.default_config["channels"])
    assert "cpu" in [d["name"] for d in info["devices"]]
    assert info["versions"]["torch"] == torch.__version__
    assert info["versions"]["brainlesionsam"]

    code, stdout, _ = run_cli(capsys, ["info"])
    assert code == 0 and "unet2d" in stdout and f"{unet['parameters']['total']:,}" in stdout


# -------------------------------------------------------------------------------------------- sample

def test_sample_writes_the_brats_layout_reproducibly(capsys, cases_root, tmp_path):
    out = tmp_path / "samples"
    code, stdout, stderr = run_cli(capsys, ["sample", "--out", out, "--n", "2", "--seed", str(SEED), "--resolution", "2"])
    assert code == 0, stderr
    assert sorted(p.name for p in out.iterdir()) == CASE_IDS
    for case_id in CASE_IDS:
        assert f"wrote {out / case_id}" in stdout
        names = sorted(p.name for p in (out / case_id).iterdir())
        assert names == sorted(f"{case_id}_{k}.nii.gz" for k in ("t1", "t1ce", "t2", "flair", "seg"))
        for key in ("t1", "t1ce", "t2", "flair", "seg"):
            image = read(modality_file(out / case_id, key))
            assert image.GetSize() == (120, 120, 78) and image.GetSpacing() == (2.0, 2.0, 2.0)
            # Same seed, generated a second time (the module's cases): identical arrays.
            np.testing.assert_array_equal(sitk.GetArrayFromImage(image),
                                          array_of(modality_file(cases_root / case_id, key)))
        assert set(np.unique(array_of(modality_file(out / case_id, "seg"))).tolist()) <= BRATS2021

    # Existing cases are not overwritten.
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.nii.gz")}
    code, _, stderr = run_cli(capsys, ["sample", "--out", out, "--n", "1", "--seed", str(SEED), "--resolution", "2"])
    assert code == 1 and CASE_IDS[0] in error_message(stderr)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.nii.gz")} == before
