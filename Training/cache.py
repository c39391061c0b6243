"""The preprocessed cache: every case once through the library's preprocessing, stored for fast
random access by the samplers.

A case is prepared by :func:`BrainLesionSAMLib.preprocessing.prepare_case` (reference grid,
resampling, 0.5-99.5 percentile clip, [0, 255]), so training sees exactly what inference sees. The
cache keeps the volumes on the reference grid; 2D samples become 256 x 256 network slices through
the same :class:`~BrainLesionSAMLib.preprocessing.SliceGeometry` the engine uses, 3D samples are
patches of the grid itself. One cache therefore serves 2D and 3D methods.

Layout: ``<cache>/<case_id>/`` holds

- ``images.npy``  uint8 [4, Z, Y, X], channels in ``MODALITIES`` order (zeros where missing). The
  [0, 255] floats are rounded, and a brain voxel that would round to 0 is stored as 1, so
  ``images > 0`` is exactly the preprocessing's brain mask;
- ``labels.npy``  uint8 [Z, Y, X], BraTS 2021 numbering (ET = 4; BraTS 2023's 3 is converted), or
  0/1 for lesion datasets; absent for a case without ground truth;
- ``foreground.npy`` int32 [N, 3] (z, y, x) of at most 20 000 lesion voxels (3D patch sampling);
- ``meta.json``   case id, patient, layout, source files and their size/mtime (the cache key),
  available modalities, reference geometry (size, spacing, origin, direction), spacing_zyx, the
  brain and lesion slice indices, the label set of the data.

``.npy`` files are memory-mapped, so a large dataset is not loaded into memory. An entry is written
into a hidden temporary folder and renamed into place: an interrupted run leaves no partial entry.
"""
from __future__ import annotations

import functools
import json
import os
import shutil
import uuid
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import SimpleITK as sitk

from BrainLesionSAMLib.conventions import LABEL_SETS, MODALITIES, to_brats2021
from BrainLesionSAMLib.errors import BrainLesionSAMError
from BrainLesionSAMLib.metrics import read_label_map
from BrainLesionSAMLib.preprocessing import PreparedCase, check_overlap, prepare_case, same_grid

from .datasets import CaseSource, DatasetError

CACHE_VERSION = 1
MAX_FOREGROUND_POINTS = 20_000
BRATS_VALUES = {0, 1, 2, 4}


def _source_key(source: CaseSource) -> dict[str, Any]:
    files = dict(source.images)
    if source.label is not None:
        files["seg"] = source.label
    key = {"version": CACHE_VERSION}
    for name, path in sorted(files.items()):
        stat = Path(path).stat()
        key[name] = [str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns]
    return key


def data_label_set(source: CaseSource, values: Iterable[int]) -> str:
    """'lesion' for lesion datasets (FCD 2023, or any label map with values 0/1 only outside a BraTS
    layout), else 'brats'."""
    if source.layout == "fcd2023":
        return "lesion"
    if not source.layout.startswith("brats") and set(values) <= {0, 1}:
        return "lesion"
    return "brats"


def _labels_on_reference(source: CaseSource, reference: sitk.Image) -> np.ndarray:
    image = read_label_map(source.label, f"label map of {source.case_id}")
    if not same_grid(image, reference):
        check_overlap(image, reference, f"label map {source.label}")
        image = sitk.Resample(image, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    labels = sitk.GetArrayFromImage(image).astype(np.int64)
    try:
        labels = to_brats2021(labels)
    except ValueError as error:
        raise DatasetError(f"case {source.case_id}: {error} ({source.label})") from None
    unexpected = sorted(set(np.unique(labels).tolist()) - BRATS_VALUES)
    if unexpected:
        raise DatasetError(f"case {source.case_id}: label map {source.label} has values {unexpected}; expected "
                           "0, 1, 2, 4 (BraTS; 3 = ET in BraTS 2023 numbering) or 0/1 (one lesion class)")
    return labels.astype(np.uint8)


def _to_uint8(images: np.ndarray) -> np.ndarray:
    stored = np.rint(images).clip(0, 255).astype(np.uint8)
    stored[(images > 0) & (stored == 0)] = 1
    return stored


def write_entry(source: CaseSource, cache_dir: str | os.PathLike) -> Path:
    """Preprocess one case into ``<cache_dir>/<case_id>/`` (atomically); returns the folder."""
    try:
        case = prepare_case(source.images)
    except BrainLesionSAMError as error:
        raise DatasetError(f"case {source.case_id}: {error}") from None
    labels = _labels_on_reference(source, case.reference) if source.label is not None else None
    label_set = data_label_set(source, np.unique(labels).tolist()) if labels is not None else None
    return store_entry(case, labels, cache_dir, source.case_id, source.patient_id, source.layout,
                       _source_key(source), label_set)


def store_entry(case: PreparedCase, labels: np.ndarray | None, cache_dir: str | os.PathLike, case_id: str,
                patient_id: str, layout: str, key: dict[str, Any], label_set: str | None) -> Path:
    """Write a prepared case (and its labels on the reference grid, BraTS 2021 values or 0/1) as the
    cache entry ``<cache_dir>/<case_id>/``, atomically; ``key`` identifies what it was made from."""
    cache_dir = Path(cache_dir)
    meta: dict[str, Any] = {
        "case_id": case_id, "patient_id": patient_id, "layout": layout, "key": key,
        "available": [bool(a) for a in case.available], "reference_modality": case.reference_modality,
        "size_xyz": list(case.reference.GetSize()), "spacing_xyz": list(case.reference.GetSpacing()),
        "origin": list(case.reference.GetOrigin()), "direction": list(case.reference.GetDirection()),
        "shape_zyx": list(case.shape_zyx), "spacing_zyx": list(case.spacing_zyx),
        "brain_slices": case.brain_slices().tolist(),
        "has_labels": labels is not None, "lesion_slices": [], "label_set": None, "label_values": [],
    }
    if labels is not None:
        meta["label_values"] = sorted(np.unique(labels).tolist())
        meta["label_set"] = label_set
        meta["lesion_slices"] = np.flatnonzero(labels.any(axis=(1, 2))).tolist()
    temporary = cache_dir / f".{case_id}.{uuid.uuid4().hex}.part"
    temporary.mkdir(parents=True)
    try:
        np.save(temporary / "images.npy", _to_uint8(case.images))
        if labels is not None:
            np.save(temporary / "labels.npy", labels)
            points = np.argwhere(labels > 0).astype(np.int32)
            if len(points) > MAX_FOREGROUND_POINTS:
                rng = np.random.default_rng(zlib.crc32(case_id.encode()))
                points = points[np.sort(rng.choice(len(points), MAX_FOREGROUND_POINTS, replace=False))]
            np.save(temporary / "foreground.npy", points)
        (temporary / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        target = cache_dir / case_id
        if target.exists():
            old = cache_dir / f".{case_id}.{uuid.uuid4().hex}.old"
            os.replace(target, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(temporary, target)
    finally:
        if temporary.exists():
            shutil.rmtree(temporary, ignore_errors=True)
    return target


def stored_key(cache_dir: str | os.PathLike, case_id: str) -> dict[str, Any] | None:
    """The key an existing entry was made from (None when there is no readable entry)."""
    try:
        return json.loads((Path(cache_dir) / case_id / "meta.json").read_text(encoding="utf-8")).get("key")
    except (OSError, json.JSONDecodeError):
        return None


def entry_is_current(source: CaseSource, cache_dir: str | os.PathLike) -> bool:
    return stored_key(cache_dir, source.case_id) == _source_key(source)


def prepare_cache(sources: list[CaseSource], cache_dir: str | os.PathLike, rank: int = 0, world_size: int = 1,
                  workers: int = 1, log: Callable[[str], None] = print) -> int:
    """Write the cache entries that are missing or stale; this process takes every ``world_size``-th
    case from ``rank`` on (all training processes share the work). Returns the number written."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    mine = [s for i, s in enumerate(sources) if i % world_size == rank]
    todo = [s for s in mine if not entry_is_current(s, cache_dir)]
    if not todo:
        return 0
    log(f"preparing {len(todo)} case(s) into {cache_dir}" + (f" (process {rank} of {world_size})" if world_size > 1 else ""))
    if workers > 1 and len(todo) > 1:
        import multiprocessing

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            for done, _ in enumerate(pool.map(functools.partial(write_entry, cache_dir=cache_dir), todo), 1):
                if done % 20 == 0 or done == len(todo):
                    log(f"prepared {done}/{len(todo)}")
    else:
        for done, source in enumerate(todo, 1):
            write_entry(source, cache_dir)
            if done % 20 == 0 or done == len(todo):
                log(f"prepared {done}/{len(todo)}")
    return len(todo)


@dataclass
class CachedCase:
    """Read access to one cache entry (arrays memory-mapped on first use)."""

    folder: Path
    meta: dict[str, Any]

    @classmethod
    def open(cls, cache_dir: str | os.PathLike, case_id: str) -> "CachedCase":
        folder = Path(cache_dir) / case_id
        try:
            meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            raise DatasetError(
                f"the cache has no entry for case {case_id} in {cache_dir}; on several nodes, put data.cache "
                "on a shared file system or prepare it on every node (brainlesionsam-train --prepare-only)") from None
        return cls(folder, meta)

    @property
    def case_id(self) -> str:
        return self.meta["case_id"]

    @functools.cached_property
    def images(self) -> np.ndarray:
        """uint8 [4, Z, Y, X] (memory-mapped)."""
        return np.load(self.folder / "images.npy", mmap_mode="r")

    @functools.cached_property
    def labels(self) -> np.ndarray:
        """uint8 [Z, Y, X] label values (memory-mapped)."""
        if not self.meta["has_labels"]:
            raise DatasetError(f"case {self.case_id} has no label map; it cannot be used for training or validation")
        return np.load(self.folder / "labels.npy", mmap_mode="r")

    @functools.cached_property
    def foreground(self) -> np.ndarray:
        return np.load(self.folder / "foreground.npy") if self.meta["has_labels"] else np.zeros((0, 3), np.int32)

    def close(self) -> None:
        """Drop the memory maps (each holds a file descriptor); they reopen on the next access."""
        for name in ("images", "labels", "foreground"):
            self.__dict__.pop(name, None)

    @property
    def available(self) -> np.ndarray:
        return np.asarray(self.meta["available"], dtype=bool)

    @property
    def spacing_zyx(self) -> tuple[float, float, float]:
        return tuple(self.meta["spacing_zyx"])

    def reference_image(self) -> sitk.Image:
        """An image with the case's reference geometry (no pixel data of interest)."""
        image = sitk.Image([int(v) for v in self.meta["size_xyz"]], sitk.sitkUInt8)
        image.SetSpacing(self.meta["spacing_xyz"])
        image.SetOrigin(self.meta["origin"])
        image.SetDirection(self.meta["direction"])
        return image

    def prepared_case(self, modalities: Iterable[str] = MODALITIES) -> PreparedCase:
        """The case as the inference engine takes it, restricted to ``modalities``."""
        keep = np.array([m in set(modalities) for m in MODALITIES]) & self.available
        images = np.asarray(self.images, dtype=np.float32) * keep[:, None, None, None]
        return PreparedCase(images, keep, self.reference_image(), self.meta["reference_modality"],
                            (images > 0).any(axis=0), {"cache": str(self.folder)})


def classes_for(labels: np.ndarray, data_label_set: str, method_label_set: str) -> np.ndarray:
    """Label values -> class indices of the method's label set (channel k = LABEL_SETS[set][k]).

    A 'lesion' method trained on BraTS data learns the whole tumour (every label > 0); a 'brats'
    method cannot learn from one-class lesion data.
    """
    if method_label_set == "lesion":
        return (np.asarray(labels) > 0).astype(np.int64)
    if data_label_set != "brats":
        raise DatasetError(f"a method with the '{method_label_set}' label set needs BraTS sub-region labels; "
                           f"this dataset has '{data_label_set}' labels (one lesion class)")
    lookup = np.zeros(256, dtype=np.int64)
    for index, value in enumerate(LABEL_SETS[method_label_set]):
        lookup[value] = index
    return lookup[np.asarray(labels)]
