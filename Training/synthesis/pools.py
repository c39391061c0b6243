"""Synthetic cases for training: a fresh pool of cases every few epochs, made while the last one trains.

``data.synthesis`` (see ``Training/config.py``) replaces a dataset folder. Pool ``p`` (the cases of
epochs ``p * pool_epochs`` to ``(p + 1) * pool_epochs - 1``) holds ``cases_per_pool`` cases, case
``i`` synthesised from the seed ``(seed, p, i)``; the validation cases come from the seeds
``(seed, VALIDATION_POOL, i)`` and never change. Every case is deterministic by its seed, so a
resumed run - on another machine too - regenerates exactly the pools it would have seen, and the
run resumes exactly.

A pool is written through the library's preprocessing into the same cache format as a dataset
(:func:`Training.cache.store_entry`), into ``<cache>/pool_<p>/``. While pool ``p`` trains, a
background process (one thread) writes pool ``p + 1``; pools older than the current one are
deleted, so the cache holds at most two.
"""
from __future__ import annotations

import multiprocessing
import os
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import SimpleITK as sitk

from BrainLesionSAMLib.preprocessing import prepare_case

from ..cache import CACHE_VERSION, store_entry, stored_key
from . import SYNTHESISER_VERSION
from .case import synthesise_case
from .ranges import SHIFTED, TRAINING, SynthesisRanges

VALIDATION_POOL = 999_999
LAYOUT = "synthetic"


def ranges_named(name: str) -> SynthesisRanges:
    """'training' or one of the shifted test ranges (``SHIFTED``)."""
    if name == "training":
        return TRAINING
    if name in SHIFTED:
        return SHIFTED[name]
    raise ValueError(f"unknown synthesis ranges {name!r}; use 'training' or one of {sorted(SHIFTED)}")


def pool_folder(cache_dir: str | os.PathLike, pool: int) -> Path:
    return Path(cache_dir) / ("validation" if pool == VALIDATION_POOL else f"pool_{pool:05d}")


def case_ids(pool: int, count: int) -> list[str]:
    prefix = "synth_val" if pool == VALIDATION_POOL else f"synth_p{pool:05d}"
    return [f"{prefix}_{i:04d}" for i in range(count)]


def _key(seed: int, pool: int, index: int, ranges: str) -> dict[str, Any]:
    return {"version": CACHE_VERSION, "synthesiser": SYNTHESISER_VERSION, "seed": [seed, pool, index],
            "ranges": ranges}


def write_case(cache_dir: str | os.PathLike, seed: int, pool: int, index: int, case_id: str,
               ranges: str = "training") -> Path:
    """Synthesise case (seed, pool, index) and store it as the cache entry ``case_id``."""
    case = synthesise_case((seed, pool, index), ranges_named(ranges))
    prepared = prepare_case(case.images)
    labels = sitk.GetArrayFromImage(case.labels).astype(np.uint8)
    return store_entry(prepared, labels, cache_dir, case_id, case_id, LAYOUT, _key(seed, pool, index, ranges), "brats")


def write_pool(cache_dir: str | os.PathLike, seed: int, pool: int, count: int, ranges: str = "training",
               log: Callable[[str], None] | None = None) -> list[str]:
    """Write the pool's missing or stale cases; returns its case ids (all present afterwards)."""
    folder = pool_folder(cache_dir, pool)
    folder.mkdir(parents=True, exist_ok=True)
    ids = case_ids(pool, count)
    todo = [i for i, case_id in enumerate(ids) if stored_key(folder, case_id) != _key(seed, pool, i, ranges)]
    for done, index in enumerate(todo, 1):
        write_case(folder, seed, pool, index, ids[index], ranges)
        if log is not None and (done % 10 == 0 or done == len(todo)):
            log(f"synthesised {done}/{len(todo)} case(s) of {folder.name}")
    return ids


def _write_pool_quietly(cache_dir: str, seed: int, pool: int, count: int, ranges: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        os.nice(5)  # the training in the foreground comes first
    except OSError:
        pass
    write_pool(cache_dir, seed, pool, count, ranges)


class PoolMaker:
    """Makes pool ``p + 1`` in a background process while pool ``p`` trains."""

    def __init__(self, cache_dir: str | os.PathLike, seed: int, count: int, ranges: str = "training",
                 log: Callable[[str], None] | None = None, background: bool = True):
        self.cache_dir, self.seed, self.count, self.ranges = str(cache_dir), seed, count, ranges
        self.log = log or (lambda message: None)
        self.background = background
        self.last_pool: int | None = None  # no pool after this one is made (None: not known yet)
        self._pending: dict[int, multiprocessing.Process] = {}

    def stop_after(self, last_pool: int) -> None:
        """The run needs no pool after ``last_pool``: one already being made beyond it is stopped
        (it would only take CPU from the training), and none is started."""
        self.last_pool = last_pool
        for pool in [p for p in self._pending if p > last_pool]:
            process = self._pending.pop(pool)
            process.terminate()
            process.join()

    def ready(self, pool: int) -> list[str]:
        """The case ids of ``pool``, written (waiting for the background process that makes it, or
        writing it here), then the next pool started in the background and older pools deleted."""
        process = self._pending.pop(pool, None)
        if process is not None:
            process.join()
            if process.exitcode != 0:
                self.log(f"the background synthesis of pool {pool} failed (exit {process.exitcode}); writing it here")
        ids = write_pool(self.cache_dir, self.seed, pool, self.count, self.ranges, self.log)
        self._drop_older_than(pool)
        wanted = self.last_pool is None or pool + 1 <= self.last_pool
        if self.background and wanted and pool + 1 not in self._pending:
            process = multiprocessing.get_context("spawn").Process(
                target=_write_pool_quietly, args=(self.cache_dir, self.seed, pool + 1, self.count, self.ranges),
                daemon=True)
            process.start()
            self._pending[pool + 1] = process
        return ids

    def _drop_older_than(self, pool: int) -> None:
        for folder in Path(self.cache_dir).glob("pool_*"):
            if int(folder.name.split("_")[1]) < pool:
                shutil.rmtree(folder, ignore_errors=True)

    def close(self) -> None:
        for process in self._pending.values():
            process.terminate()
            process.join()
        self._pending.clear()
