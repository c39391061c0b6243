"""Every bad input tried on the command line, one test each: an error is one ``error: ...`` line,
status 1 and nothing written; a warning is one ``warning: ...`` line saying what was done, and the
run goes on. ``docs/bad_inputs.md`` holds the table of them with their messages, and each test
checks that its row there is the message the user gets.

After changing a message, rewrite the table: ``.venv/bin/python Testing/test_bad_inputs.py``.
"""
from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from test_cli import leftovers, modality_file, read, run_cli_redirected, write_volume

REPOSITORY = Path(__file__).resolve().parents[1]
DOC = REPOSITORY / "docs" / "bad_inputs.md"
TABLE_START = "<!-- the table below is written by Testing/test_bad_inputs.py -->"
TABLE_END = "<!-- end of the table -->"
UNWRITABLE = Path("/proc")  # no file can be created there, not even by root (CI runs as root)
BOX_INSIDE = "30,35,25,85,90,50"  # a box on the lesion of the first case: few slices, quick


class Context:
    """Folders and files one bad input is built from; ``out`` is the segment command's --out."""

    def __init__(self, tmp_path: Path, cases_root: Path, weights: Path, sofa_weights: Path):
        self.input = tmp_path / "input"
        self.output = tmp_path / "output"
        self.input.mkdir()
        self.output.mkdir()
        self.cases_root = cases_root
        self.case = sorted(p for p in cases_root.iterdir() if p.is_dir())[0]
        self.t1ce = modality_file(self.case, "t1ce")
        self.reference = read(self.t1ce)
        self.weights = weights
        self.sofa_weights = sofa_weights
        self.out = self.output / "labels.nii.gz"

    def segment(self, *extra) -> list:
        # Later options win in argparse: a --method / --weights / --out in `extra` replaces these.
        return ["segment", "--method", "unet2d", "--weights", self.weights, "--out", self.out, *extra]

    def placeholders(self) -> dict[str, str]:
        """Paths in messages -> what the table shows (longest first: the case is inside the cases)."""
        return {str(self.sofa_weights): "SOFA_WEIGHTS", str(self.weights): "WEIGHTS", str(self.case): "CASE",
                str(self.cases_root): "CASES", str(self.input): "INPUT", str(self.output): "OUTPUT"}


@dataclass(frozen=True)
class BadInput:
    name: str
    outcome: str        # 'error' (status 1, nothing written) or 'warning' (status 0, the result written)
    build: object       # Context -> (argv, fragments the message must hold)


# --------------------------------------------------------------------------------------- the inputs

def _missing_file(ctx):
    return ctx.segment("--flair", ctx.input / "nowhere_flair.nii.gz"), ["FLAIR", "nowhere_flair.nii.gz", "does not exist"]


def _not_an_image(ctx):
    path = ctx.input / "notes_flair.nii.gz"
    path.write_text("these are my notes, not an image\n")
    return ctx.segment("--flair", path), ["FLAIR", str(path), "not a readable image"]


def _truncated_file(ctx):
    # An interrupted copy or download: the first half of a valid .nii.gz. SimpleITK zero-fills what
    # is missing, so the reader has to notice on its own.
    path = ctx.input / "truncated_flair.nii.gz"
    data = modality_file(ctx.case, "flair").read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return ctx.segment("--t1ce", ctx.t1ce, "--flair", path, "--box", BOX_INSIDE), ["FLAIR", str(path)]


def _constant_volume(ctx):
    path = write_volume(np.full((20, 30, 30), 7.0, np.float32), ctx.input / "constant_t2.nii.gz")
    return ctx.segment("--t1ce", ctx.t1ce, "--t2", path), ["T2", str(path), "constant"]


def _image_2d(ctx):
    path = write_volume(np.random.default_rng(0).random((40, 50), dtype=np.float32), ctx.input / "slice_t1.nii.gz")
    return ctx.segment("--t1", path), ["T1", str(path), "2D"]


def _image_4d(ctx):
    frames = [sitk.GetImageFromArray(np.random.default_rng(i).random((8, 9, 10), dtype=np.float32)) for i in range(3)]
    path = ctx.input / "series_t1.nii.gz"
    sitk.WriteImage(sitk.JoinSeries(frames), str(path))
    return ctx.segment("--t1", path), ["T1", str(path), "4D"]


def _nan_voxels(ctx):
    array = sitk.GetArrayFromImage(ctx.reference).copy()
    array[40, 60, 60] = np.nan
    array[41, 60, 60] = np.inf
    # NRRD: SimpleITK's NIfTI reader turns NaN voxels into 0, so a .nii.gz could not carry them.
    path = write_volume(array, ctx.input / "nan_flair.nrrd", like=ctx.reference)
    return (ctx.segment("--t1ce", ctx.t1ce, "--flair", path, "--box", BOX_INSIDE),
            ["FLAIR", str(path), "1 NaN and 1 infinite voxel(s)", "set to 0"])


def _far_away_origin(ctx):
    image = read(modality_file(ctx.case, "flair"))
    image.SetOrigin(tuple(o + 5000.0 for o in image.GetOrigin()))
    path = ctx.input / "shifted_flair.nii.gz"
    sitk.WriteImage(image, str(path))
    return ctx.segment("--t1ce", ctx.t1ce, "--flair", path), ["FLAIR", str(path), "does not overlap"]


def _not_coregistered(ctx):
    # The case: a FLAIR on another grid (2.5 mm) whose origin is 50 mm off. It overlaps the
    # T1CE, so only the brains' positions tell that the two were never registered.
    flair = read(modality_file(ctx.case, "flair"))
    grid = sitk.Image([96, 96, 62], sitk.sitkFloat32)
    grid.SetSpacing((2.5, 2.5, 2.5))
    grid.SetOrigin(flair.GetOrigin())
    moved = sitk.Resample(flair, grid, sitk.Transform(), sitk.sitkLinear, 0.0)
    moved.SetOrigin(tuple(o + d for o, d in zip(moved.GetOrigin(), (50.0, 0.0, 0.0))))
    path = ctx.input / "moved_flair.nii.gz"
    sitk.WriteImage(moved, str(path))
    return (ctx.segment("--t1ce", ctx.t1ce, "--flair", path),
            ["FLAIR", str(path), "T1CE", str(ctx.t1ce), "not co-registered", "Dice", "x +50.0"])


def _unknown_method(ctx):
    return ctx.segment("--case-dir", ctx.case, "--method", "nosuchmethod"), ["unknown method 'nosuchmethod'", "unet2d"]


def _weights_of_another_method(ctx):
    return ctx.segment("--case-dir", ctx.case, "--weights", ctx.sofa_weights), [str(ctx.sofa_weights), "'sofa'", "'unet2d'"]


def _missing_weights(ctx):
    path = ctx.input / "nowhere.safetensors"
    return ctx.segment("--case-dir", ctx.case, "--weights", path), [str(path), "does not exist"]


def _no_input(ctx):
    return ctx.segment(), ["no input", "--case-dir", "--flair"]


def _box_not_six_numbers(ctx):
    return ctx.segment("--case-dir", ctx.case, "--box", "10,20,30"), ["box", "'10,20,30'", "six numbers"]


def _box_not_numbers(ctx):
    return ctx.segment("--case-dir", ctx.case, "--box", "a,b,c,d,e,f"), ["box", "'a,b,c,d,e,f'", "six numbers"]


def _box_with_infinity(ctx):
    return ctx.segment("--case-dir", ctx.case, "--box", "inf,0,0,10,10,10"), ["box", "inf"]


def _box_inverted(ctx):
    return ctx.segment("--case-dir", ctx.case, "--box", "10,10,10,5,5,5"), ["box 10,10,10,5,5,5", "inverted", "x0 > x1"]


def _box_outside_the_image(ctx):
    return ctx.segment("--case-dir", ctx.case, "--box", "500,500,500,600,600,600"), ["box", "outside the image"]


def _box_without_brain(ctx):
    return ctx.segment("--case-dir", ctx.case, "--box", "0,0,0,5,5,5"), ["box 0,0,0,5,5,5", "no brain voxel", "empty"]


def _box_reaching_outside(ctx):
    return (ctx.segment("--case-dir", ctx.case, "--box", "30,35,25,500,90,50"),
            ["box 30,35,25,500,90,50", "clipped to 30,35,25,119,90,50"])


def _output_folder_missing(ctx):
    ctx.out = ctx.output / "not_there" / "labels.nii.gz"
    return ctx.segment("--case-dir", ctx.case), [str(ctx.out.parent), "does not exist"]


def _output_folder_not_writable(ctx):
    ctx.out = UNWRITABLE / "labels.nii.gz"
    return ctx.segment("--case-dir", ctx.case), [f"output folder {UNWRITABLE}", "not writable"]


def _output_is_a_folder(ctx):
    (ctx.output / "labels.nii.gz").mkdir()
    return ctx.segment("--case-dir", ctx.case, "--overwrite"), [str(ctx.out), "is a folder"]


def _report_folder_not_writable(ctx):
    return ctx.segment("--case-dir", ctx.case, "--report", UNWRITABLE / "report"), [str(UNWRITABLE), "not writable"]


def _probabilities_not_writable(ctx):
    return (ctx.segment("--case-dir", ctx.case, "--box", BOX_INSIDE, "--probabilities", UNWRITABLE / "p.nii.gz"),
            [f"output folder {UNWRITABLE}", "not writable"])


def _uncertainty_not_a_volume_name(ctx):
    return (ctx.segment("--case-dir", ctx.case, "--box", BOX_INSIDE, "--uncertainty", ctx.output / "uncertainty.txt"),
            ["--uncertainty", "uncertainty.txt", ".nii.gz"])


def _uncertainty_of_sagittal_slices(ctx):
    # The same FLAIR with its axes permuted: the voxels lie where they lay, but the array's slices
    # (axis k) now run left-right, across which a 2D method cannot mirror.
    path = ctx.input / "sagittal_flair.nii.gz"
    sitk.WriteImage(sitk.PermuteAxes(read(modality_file(ctx.case, "flair")), [2, 1, 0]), str(path))
    return (ctx.segment("--flair", path, "--uncertainty", ctx.output / "uncertainty.nii.gz"),
            ["left-right", "sagittal", "without the uncertainty map"])


def _batch_output_not_writable(ctx):
    return (["batch", "--input", ctx.cases_root, "--output", UNWRITABLE / "results", "--method", "unet2d",
             "--weights", ctx.weights], [str(UNWRITABLE), "not writable"])


def _evaluate_output_not_writable(ctx):
    return (["evaluate", "--pred", ctx.input, "--gt", ctx.cases_root, "--out", UNWRITABLE / "metrics.csv"],
            [f"output folder {UNWRITABLE}", "not writable"])


def _sample_output_not_writable(ctx):
    return ["sample", "--out", UNWRITABLE / "cases", "--resolution", "2"], [str(UNWRITABLE), "not writable"]


def _demo_output_not_writable(ctx):
    return ["demo", "--out", UNWRITABLE / "demo"], [str(UNWRITABLE), "not writable"]


BAD_INPUTS = [BadInput(*row) for row in (
    ("missing file", "error", _missing_file),
    ("not an image", "error", _not_an_image),
    ("truncated file", "error", _truncated_file),
    ("constant volume", "error", _constant_volume),
    ("2D image", "error", _image_2d),
    ("4D image", "error", _image_4d),
    ("NaN and infinite voxels", "warning", _nan_voxels),
    ("far-away origin", "error", _far_away_origin),
    ("not co-registered (FLAIR 50 mm off, 2.5 mm grid)", "error", _not_coregistered),
    ("unknown method", "error", _unknown_method),
    ("weights of another method", "error", _weights_of_another_method),
    ("missing weights", "error", _missing_weights),
    ("no input", "error", _no_input),
    ("box not six numbers", "error", _box_not_six_numbers),
    ("box not numbers", "error", _box_not_numbers),
    ("box with infinity", "error", _box_with_infinity),
    ("box inverted", "error", _box_inverted),
    ("box outside the image", "error", _box_outside_the_image),
    ("box without brain (empty)", "error", _box_without_brain),
    ("box reaching outside the image", "warning", _box_reaching_outside),
    ("output folder missing", "error", _output_folder_missing),
    ("output folder not writable", "error", _output_folder_not_writable),
    ("output is a folder", "error", _output_is_a_folder),
    ("report folder not writable", "error", _report_folder_not_writable),
    ("probabilities folder not writable", "error", _probabilities_not_writable),
    ("uncertainty map not named as a volume", "error", _uncertainty_not_a_volume_name),
    ("uncertainty map of sagittal slices (2D method)", "error", _uncertainty_of_sagittal_slices),
    ("batch output folder not writable", "error", _batch_output_not_writable),
    ("evaluate output not writable", "error", _evaluate_output_not_writable),
    ("sample output not writable", "error", _sample_output_not_writable),
    ("demo output not writable", "error", _demo_output_not_writable),
)]


# ------------------------------------------------------------------------------------ running one

def one_line(stream: str, kind: str) -> str:
    """The one '<kind>: ...' line of ``stream`` (progress lines may stand around it)."""
    lines = [line for line in stream.splitlines() if line.startswith(f"{kind}: ")]
    assert len(lines) == 1, stream
    assert "Traceback" not in stream
    return lines[0]


def run_bad_input(bad: BadInput, ctx: Context) -> tuple[str, list[str]]:
    """Run it and check what every bad input must do; returns (the message line, its fragments)."""
    argv, fragments = bad.build(ctx)
    code, stdout, stderr = run_cli_redirected(argv)
    if bad.outcome == "error":
        assert code == 1, (stdout, stderr)
        assert "warning: " not in stderr and "wrote" not in stdout
        assert list(ctx.output.iterdir()) in ([], [ctx.output / "labels.nii.gz"]) and not ctx.out.is_file(), \
            "a failed run must leave the output folder as it was"
    else:
        assert code == 0, (stdout, stderr)
        assert "error: " not in stderr and ctx.out.is_file() and f"wrote {ctx.out}" in stdout
    assert leftovers(ctx.output) == []
    return one_line(stderr, bad.outcome), fragments


def table_row(bad: BadInput, message: str, ctx: Context) -> str:
    for path, placeholder in ctx.placeholders().items():
        message = message.replace(path, placeholder)
    assert "`" not in message and "\n" not in message
    what = "error, exit 1, nothing written" if bad.outcome == "error" else "warning, goes on"
    return f"| {bad.name} | {what} | `{message}` |"


def documented_rows() -> dict[str, str]:
    text = DOC.read_text(encoding="utf-8")
    table = text[text.index(TABLE_START) + len(TABLE_START):text.index(TABLE_END)]
    rows = table.strip().splitlines()[2:]  # after the header and its rule
    return {re.match(r"\| (.+?) \|", row).group(1): row for row in rows}


# -------------------------------------------------------------------------------------------- tests

@pytest.mark.parametrize("bad", BAD_INPUTS, ids=[b.name for b in BAD_INPUTS])
def test_bad_input(bad, cases_root, weights, sofa_weights, tmp_path):
    if "not writable" in bad.name and not UNWRITABLE.is_dir():
        pytest.skip(f"needs {UNWRITABLE}, a folder where no file can be created")
    ctx = Context(tmp_path, cases_root, weights, sofa_weights)
    message, fragments = run_bad_input(bad, ctx)
    for text in fragments:
        assert text in message, f"{text!r} not in {message!r}"
    assert documented_rows().get(bad.name) == table_row(bad, message, ctx), \
        "docs/bad_inputs.md is out of date: run .venv/bin/python Testing/test_bad_inputs.py"


def test_the_table_lists_exactly_the_inputs_tested():
    assert list(documented_rows()) == [b.name for b in BAD_INPUTS]


def write_table() -> None:
    """Run every bad input on freshly made cases and rewrite the table in docs/bad_inputs.md."""
    from conftest import write_cli_cases, write_relabelled_weights, write_small_unet

    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        cases = write_cli_cases(root / "cases")
        weights = write_small_unet(root / "unet2d_small.safetensors")
        sofa = write_relabelled_weights(weights, root / "sofa.safetensors", "sofa")
        rows = []
        for index, bad in enumerate(BAD_INPUTS):
            (root / f"row{index}").mkdir()
            ctx = Context(root / f"row{index}", cases, weights, sofa)
            message, _ = run_bad_input(bad, ctx)
            rows.append(table_row(bad, message, ctx))
    text = DOC.read_text(encoding="utf-8")
    head, tail = text[:text.index(TABLE_START) + len(TABLE_START)], text[text.index(TABLE_END):]
    table = ["| bad input | what happens | the message (paths: CASES, CASE, INPUT, OUTPUT, WEIGHTS, SOFA_WEIGHTS) |",
             "| --- | --- | --- |", *rows]
    DOC.write_text(head + "\n" + "\n".join(table) + "\n" + tail, encoding="utf-8")
    print(f"wrote {DOC} ({len(rows)} rows)")


if __name__ == "__main__":
    write_table()
