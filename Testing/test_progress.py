"""Progress on the console: a bar on a terminal, at most a line per stage or per 10 % in a log."""
from __future__ import annotations

import io

from BrainLesionSAMLib.progress import ConsoleProgress, stage_of
from test_cli import run_cli_redirected


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_a_line_per_stage_or_per_tenth():
    log = io.StringIO()
    progress = ConsoleProgress("case", stream=log, interactive=False)
    progress(0.0, "reading and preprocessing the volumes")
    for done in range(0, 300):
        progress(done / 300 * 0.95, f"unet2d: slices {done + 1}-{done + 1} of 300")
    progress(0.98, "writing the label volume")
    progress(1.0, "done")
    progress.close()
    lines = log.getvalue().splitlines()
    # 4 stages; the slice stage adds a line per tenth it crosses (0 %, 10 %, ..., 90 %).
    assert len(lines) <= 4 + 10, lines
    assert lines[0] == "case:   0% reading and preprocessing the volumes"
    assert lines[1] == "case:   0% unet2d: slices 1-1 of 300"
    assert "case:  10% unet2d: slices 33-33 of 300" in lines
    assert lines[-2:] == ["case:  98% writing the label volume", "case: 100% done"]


def test_the_bar_only_when_stdout_and_the_stream_are_terminals(monkeypatch):
    monkeypatch.setattr("sys.stdout", Terminal())
    assert ConsoleProgress("case", stream=Terminal()).bar is not None
    assert ConsoleProgress("case", stream=io.StringIO()).bar is None
    assert ConsoleProgress("case", stream=Terminal(), disable=True).bar is None
    monkeypatch.setattr("sys.stdout", io.StringIO())  # `brainlesionsam ... > log` with stderr on the terminal
    assert ConsoleProgress("case", stream=Terminal()).bar is None


def test_stages_are_messages_without_their_numbers():
    assert stage_of("unet2d: slices 9-16 of 120") == stage_of("unet2d: slices 17-24 of 120")
    assert stage_of("case 1/3: BLSAM_0003_000") == stage_of("case 2/3: BLSAM_0003_001")
    assert stage_of("reading") != stage_of("writing")


def test_segment_into_a_log_writes_a_few_progress_lines(cases_root, weights, tmp_path):
    """The issue's flood: one line per slice. A whole case (75 brain slices) now writes a dozen."""
    case = sorted(cases_root.iterdir())[0]
    out = tmp_path / "labels.nii.gz"
    code, stdout, stderr = run_cli_redirected(["segment", "--case-dir", case, "--method", "unet2d",
                                               "--weights", weights, "--out", out])
    assert code == 0, stderr
    progress_lines = [line for line in stderr.splitlines() if line.startswith(f"{case.name}:")]
    assert 4 <= len(progress_lines) <= 15, stderr
    assert any("slices" in line for line in progress_lines)
