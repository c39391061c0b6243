"""Training-state checkpoints (for exact resume) and the run's logs.

A training checkpoint ``<run>/checkpoints/step_XXXXXXXX.pt`` holds everything a resumed run needs
to continue exactly where the interrupted one was: the method's weights, optimiser, LR scheduler,
gradient scaler, every process's random-number state (torch CPU and CUDA, numpy, python), the step,
the best validation score so far and the resolved config. It is written by rank 0 with
``io.atomic_output`` (temporary file, renamed on success), so a run killed while writing leaves the
previous checkpoint intact; the newest ``keep_checkpoints`` are kept. Files are read back with
``torch.load(weights_only=True)``: nothing in them is unpickled as code.

These checkpoints are for training only; the release format is the library's safetensors checkpoint
(``BrainLesionSAMLib.checkpoints.save_checkpoint``), which the trainer writes as ``best`` /
``final`` and :mod:`Training.export` packages.
"""
from __future__ import annotations

import csv
import json
import random
import re
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from BrainLesionSAMLib.io import atomic_output

STATE_FORMAT = 1
STEP_FILE = re.compile(r"step_(\d{8})\.pt")


def capture_rng(device: torch.device) -> dict[str, Any]:
    """This process's random-number states in a form ``torch.load(weights_only=True)`` accepts."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(cached)]}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def checkpoint_files(run_dir: Path) -> list[Path]:
    """Training checkpoints of a run, oldest first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if STEP_FILE.fullmatch(p.name))


def save_state(run_dir: Path, state: dict[str, Any], keep: int) -> Path:
    folder = Path(run_dir) / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{state['step']:08d}.pt"
    with atomic_output(path) as temporary:
        torch.save({"format": STATE_FORMAT, **state}, temporary)
    for old in checkpoint_files(run_dir)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_latest_state(run_dir: Path, map_location: torch.device | str = "cpu") -> dict[str, Any] | None:
    """The newest readable training checkpoint of ``run_dir``, or None when there is none."""
    for path in reversed(checkpoint_files(run_dir)):
        try:
            state = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as error:  # a damaged file: fall back to the one before
            warnings.warn(f"training checkpoint {path} cannot be read ({error}); trying the one before", stacklevel=2)
            continue
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"{path} has training-checkpoint format {state.get('format')}, expected {STATE_FORMAT}")
        state["path"] = str(path)
        return state
    return None


class RunLogger:
    """Scalars to ``<run>/metrics.csv`` (step, epoch, name, value, seconds) and, when importable, to
    TensorBoard (``<run>/tensorboard``). Only rank 0 creates one. On resume the CSV loses the rows
    of steps after the resumed checkpoint (they are about to be recomputed)."""

    COLUMNS = ("step", "epoch", "name", "value", "seconds")

    def __init__(self, run_dir: Path, resume_step: int | None, log=print):
        self.path = Path(run_dir) / "metrics.csv"
        self.start = time.time()
        if resume_step is not None and self.path.exists():
            with open(self.path, newline="", encoding="utf-8") as handle:
                rows = [row for row in csv.DictReader(handle) if int(row["step"]) <= resume_step]
            with atomic_output(self.path) as temporary:
                with open(temporary, "w", newline="", encoding="utf-8") as handle:
                    writer = csv.DictWriter(handle, fieldnames=self.COLUMNS)
                    writer.writeheader()
                    writer.writerows(rows)
        elif not self.path.exists() or resume_step is None:
            with atomic_output(self.path) as temporary:
                temporary.write_text(",".join(self.COLUMNS) + "\n", encoding="utf-8")
        self.handle = open(self.path, "a", newline="", encoding="utf-8")
        self.writer = csv.writer(self.handle)
        self.tensorboard = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log("TensorBoard is not installed (pip install tensorboard): logging to metrics.csv only")
        else:
            self.tensorboard = SummaryWriter(str(Path(run_dir) / "tensorboard"),
                                             purge_step=None if resume_step is None else resume_step + 1)

    def scalars(self, step: int, epoch: int, values: dict[str, float]) -> None:
        seconds = round(time.time() - self.start, 3)
        for name, value in values.items():
            self.writer.writerow([step, epoch, name, repr(float(value)), seconds])
            if self.tensorboard is not None:
                self.tensorboard.add_scalar(name, float(value), step)
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def write_json(path: Path, value: Any) -> Path:
    with atomic_output(path) as temporary:
        temporary.write_text(json.dumps(value, indent=1, default=str) + "\n", encoding="utf-8")
    return path
