"""A pool of frozen-encoder embeddings of synthetic slices, encoded once and reused by every training
step (issue 20: SOFA and the brain-tuned LiteMedSAM train only what sits behind LiteMedSAM's
TinyViT encoder, so the encoder's output can be stored).

One shard per synthetic case, ``<pool>/case_<i>.safetensors``, holds for the chosen axial slices:

- ``embeddings`` float16 [N, 4, 256, 64, 64]: TinyViT's image embedding of every modality on its own
  (the slice min-max scaled and repeated to three channels: exactly what ``SOFA.encode`` and
  ``litemedsam``'s encoder compute; zeros where a modality is missing); float16 rounds by about
  5e-4 relative, far below what separates slices;
- ``targets`` uint8 [N, 256, 256]: BraTS class indices (0 background, 1 NCR, 2 ED, 3 ET) on the
  network slice (nearest neighbour through the engine's ``SliceGeometry``);
- ``available`` uint8 [N, 4].

Its metadata names what it was made from (synthesiser version, case seed, slice choice, the
encoder file's sha256); a shard whose metadata differs is re-encoded, one that matches is never
encoded again (``build_pool`` resumes after an interruption, shards are written atomically).

Which slices: up to ``lesion_slices`` slices through the lesion (evenly spaced over its extent, so
edges and centre both appear) and ``background_slices`` brain slices without lesion (random by the
case seed). Healthy cases give background slices only: the automatic mode sees every brain slice,
most of which hold no lesion, and must learn to leave them empty.

Cost decides the pool's size: one slice is four TinyViT encodes (``docs/sam_heads.md`` has the
measured seconds per slice and the diversity / encoding-time trade).
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import SimpleITK as sitk
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from BrainLesionSAMLib.io import atomic_output
from BrainLesionSAMLib.preprocessing import PreparedCase, prepare_case

from .cache import classes_for
from .synthesis import SYNTHESISER_VERSION, TRAINING, synthesise_case

POOL_FORMAT = 1
METADATA_KEY = "embedding_pool"


@dataclass(frozen=True)
class PoolSpec:
    """What a pool is made of: case ``i`` is ``synthesise_case((seed, stream, i))``."""

    seed: int = 20          # issue 20's pools; disjoint from the trainer's pools (0, p, i) and the benchmark's
    stream: int = 0         # 0: training cases, 1: validation cases
    lesion_slices: int = 8
    background_slices: int = 3

    def case_seed(self, index: int) -> tuple[int, int, int]:
        return (self.seed, self.stream, index)


def choose_slices(classes: np.ndarray, brain_slices: np.ndarray, spec: PoolSpec,
                  rng: np.random.Generator) -> np.ndarray:
    """Sorted axial indices: lesion slices evenly spaced over the lesion, plus background slices."""
    with_lesion = np.flatnonzero(classes.any(axis=(1, 2)))
    lesion = with_lesion
    if len(lesion) > spec.lesion_slices:
        lesion = lesion[np.round(np.linspace(0, len(lesion) - 1, spec.lesion_slices)).astype(int)]
    empty = np.setdiff1d(brain_slices, with_lesion)
    background = rng.choice(empty, size=min(len(empty), spec.background_slices), replace=False)
    return np.sort(np.concatenate([lesion, background]).astype(int))


def modality_embeddings(sofa, images: torch.Tensor, available: torch.Tensor, slices_per_call: int = 1) -> torch.Tensor:
    """Every available modality through the frozen TinyViT on its own: ``SOFA.encode`` (what SOFA
    decodes at inference; litemedsam's embedding of a modality is the same), ``slices_per_call``
    slices (four encodes each) at a time: images [N, 4, 256, 256] -> [N, 4, 256, 64, 64]."""
    with torch.inference_mode():
        return torch.cat([sofa.encode(images[i:i + slices_per_call], available[i:i + slices_per_call])
                          for i in range(0, len(images), slices_per_call)])


def encode_case(case: PreparedCase, labels: np.ndarray, encoder, spec: PoolSpec,
                rng: np.random.Generator) -> dict[str, torch.Tensor]:
    classes = classes_for(labels, "brats", "brats").astype(np.uint8)
    chosen = choose_slices(classes, case.brain_slices(), spec, rng)
    images = case.network_slices(chosen)
    available = torch.as_tensor(np.asarray(case.available, dtype=bool))[None].expand(len(chosen), -1).clone()
    return {
        "embeddings": modality_embeddings(encoder, images, available).to(torch.float16).contiguous(),
        "targets": case.slice_geometry.to_network(classes[chosen], nearest=True).to(torch.uint8).contiguous(),
        "available": available.to(torch.uint8),
        "slices": torch.as_tensor(chosen, dtype=torch.int32),
    }


def shard_path(folder: Path, index: int) -> Path:
    return Path(folder) / f"case_{index:05d}.safetensors"


def shard_key(spec: PoolSpec, index: int, encoder_sha256: str) -> dict:
    return {"format": POOL_FORMAT, "synthesiser": SYNTHESISER_VERSION, "seed": list(spec.case_seed(index)),
            "lesion_slices": spec.lesion_slices, "background_slices": spec.background_slices,
            "encoder_sha256": encoder_sha256}


def stored_key(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            return json.loads((handle.metadata() or {}).get(METADATA_KEY, "null"))
    except Exception:  # a damaged shard is simply encoded again
        return None


def build_pool(folder: str | os.PathLike, spec: PoolSpec, indices: Sequence[int], encoder, encoder_sha256: str,
               log: Callable[[str], None] = print) -> list[Path]:
    """Encode the cases ``indices`` that are missing or stale in ``folder``; returns all their shards."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in indices:
        path = shard_path(folder, index)
        key = shard_key(spec, index, encoder_sha256)
        paths.append(path)
        if stored_key(path) == key:
            continue
        start = time.perf_counter()
        synthetic = synthesise_case(spec.case_seed(index), TRAINING)
        labels = sitk.GetArrayFromImage(synthetic.labels).astype(np.uint8)
        case = prepare_case(synthetic.images)
        made = time.perf_counter()
        rng = np.random.default_rng(list(spec.case_seed(index)))
        tensors = encode_case(case, labels, encoder, spec, rng)
        with atomic_output(path) as temporary:
            save_file(tensors, str(temporary), metadata={METADATA_KEY: json.dumps(key)})
        done = time.perf_counter()
        lesion = int(tensors["targets"].flatten(1).any(1).sum())
        log(f"case {index}: {len(tensors['targets'])} slices ({lesion} with lesion), synthesised in "
            f"{made - start:.1f} s, encoded in {done - made:.1f} s "
            f"({(done - made) / max(len(tensors['targets']), 1):.2f} s per slice)")
    return paths


@dataclass
class Pool:
    """Shards loaded into memory: embeddings float16 [N, 4, 256, 64, 64] and the rest per slice."""

    embeddings: torch.Tensor
    targets: torch.Tensor
    available: torch.Tensor
    case: torch.Tensor          # the shard (case) index of every slice

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def lesion(self) -> torch.Tensor:
        return self.targets.flatten(1).any(1)


def load_pool(paths: Sequence[Path]) -> Pool:
    parts = {"embeddings": [], "targets": [], "available": [], "case": []}
    for number, path in enumerate(paths):
        with safe_open(str(path), framework="pt") as handle:
            for name in ("embeddings", "targets", "available"):
                parts[name].append(handle.get_tensor(name))
            parts["case"].append(torch.full((len(parts["targets"][-1]),), number, dtype=torch.int32))
    return Pool(embeddings=torch.cat(parts["embeddings"]), targets=torch.cat(parts["targets"]),
                available=torch.cat(parts["available"]).to(torch.bool), case=torch.cat(parts["case"]))
