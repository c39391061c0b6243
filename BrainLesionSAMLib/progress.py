"""Progress of a long step on the console: a live bar on a terminal, a few plain lines in a log.

The engine, the sample generator and the catalogue report progress as ``(fraction, message)``
callbacks (``engine.ProgressCallback``). :class:`ConsoleProgress` shows them on stderr: when both
stdout and stderr are terminals, as a tqdm bar redrawn in place; otherwise (a log file, a pipe, a
batch or cluster job) it prints a line only when the stage changes or another 10 % is done, so a
case writes about a dozen lines instead of one per slice.
"""
from __future__ import annotations

import re
import sys
from typing import TextIO


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def stage_of(message: str) -> str:
    """What stays the same while a stage runs: the message without its numbers
    ('unet2d: slices 9-16 of 120' and 'unet2d: slices 17-24 of 120' are one stage)."""
    return re.sub(r"\d+", "#", message)


class ConsoleProgress:
    """A ``(fraction, message)`` callback that draws on ``stream`` (stderr by default).

    ``interactive``: a tqdm bar (True), one line per stage or per 10 % (False), or decide from
    whether stdout and ``stream`` are terminals (None). ``disable`` shows nothing.
    """

    def __init__(self, description: str, disable: bool = False, stream: TextIO | None = None,
                 interactive: bool | None = None):
        self.description = description
        self.stream = stream if stream is not None else sys.stderr
        self.disable = disable
        if interactive is None:
            interactive = _is_terminal(sys.stdout) and _is_terminal(self.stream)
        self.bar = None
        if interactive and not disable:
            from tqdm import tqdm
            self.bar = tqdm(total=100, desc=description, unit="%", leave=False, file=self.stream,
                            bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}")
        self._stage: str | None = None
        self._tenth = -1

    def __call__(self, fraction: float, message: str) -> None:
        if self.disable:
            return
        if self.bar is not None:
            self.bar.n = int(round(100 * fraction))
            self.bar.set_postfix_str(message, refresh=True)
            return
        tenth = int(10 * min(max(fraction, 0.0), 1.0) + 1e-9)
        stage = stage_of(message)
        if stage == self._stage and tenth <= self._tenth:
            return
        self._stage, self._tenth = stage, max(tenth, self._tenth)
        print(f"{self.description}: {100 * fraction:3.0f}% {message}", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
