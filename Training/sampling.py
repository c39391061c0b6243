"""Training samples from the cache: balanced 2D slices, or 3D patches, and the distributed sampler.

What the data set hands the trainer is exactly the training contract's batch
(``SegmentationMethod.training_loss``): ``images`` [4, ...] float in [0, 255] (zeros for missing
modalities), ``available`` [4] bool, ``target`` long class indices of the method's label set, and,
where the method's facts ask for them, ``boxes`` [4] (promptable methods: the ground truth's box in
network pixels, grown by a random 0-20 px per side as MedSAM and DB-SAM train) and ``modality``
(``single_modality``: the MODALITIES index of the one modality the sample shows, MoME's curriculum).
Nothing here looks at a method's name; everything follows from its facts and the config.

2D: every axial slice with brain is an item (a 2.5D method, ``facts.context_slices`` > 0, gets it with
its neighbouring slices, as the engine gives them). Each epoch takes every lesion slice of the training
cases once plus ``background_ratio`` times as many lesion-free brain slices drawn anew (so the
network also learns to say 'nothing here'); slices go through the engine's
:class:`~BrainLesionSAMLib.preprocessing.SliceGeometry` to 256 x 256. A patient's slices come only
from the cases of its split set.

3D: an item is a case; a sample is a patch of the method's ``input_size`` around a random lesion
voxel (probability ``foreground_probability``, nnU-Net's oversampling) or a random voxel, zero-padded
where it leaves the volume. A method with a working voxel size (``working_spacing_mm``) gets the patch
of that many working voxels' field of view, resized to ``input_size`` (labels nearest), as the engine
resizes whole cases.

Sampler: :class:`BalancedDistributedSampler` is a ``DistributedSampler`` whose epoch is the
balanced selection above, drawn from (seed, epoch) alone, shuffled, padded to a multiple of the
number of processes and dealt out rank by rank. Each item carries its own random seed (patch place,
box jitter, modality choice, augmentation), and the sampler can start an epoch part-way, so a
resumed run sees exactly the samples an uninterrupted run would have seen.
"""
from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

from BrainLesionSAMLib.conventions import MODALITIES
from BrainLesionSAMLib.methods import MethodFacts
from BrainLesionSAMLib.preprocessing import SliceGeometry, resize_volume, slices_with_context, working_shape

from .augmentation import augment, build_augmentation
from .cache import CachedCase, classes_for
from .datasets import DatasetError

OPEN_CASES = 64


def box_from_mask(mask: np.ndarray | torch.Tensor, rng: np.random.Generator, jitter: tuple[int, int]
                  ) -> list[float]:
    """(x0, y0, x1, y1) in pixels (exclusive end, SAM's convention) around the non-zero pixels of a
    2D ``mask`` [H, W], each side moved outwards by a random integer in [jitter[0], jitter[1]] and
    clipped to the image. An empty mask gives the whole image."""
    mask = np.asarray(mask)
    height, width = mask.shape
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return [0.0, 0.0, float(width), float(height)]
    grow = rng.integers(jitter[0], jitter[1] + 1, size=4)
    return [float(max(0, xs.min() - grow[0])), float(max(0, ys.min() - grow[1])),
            float(min(width, xs.max() + 1 + grow[2])), float(min(height, ys.max() + 1 + grow[3]))]


def crop_patch(volume: np.ndarray, centre: np.ndarray, size: tuple[int, ...]) -> np.ndarray:
    """volume [..., Z, Y, X] -> [..., *size] centred on ``centre`` (z, y, x), zero outside the volume."""
    spatial = volume.shape[-3:]
    start = np.asarray(centre) - np.asarray(size) // 2
    out = np.zeros(volume.shape[:-3] + tuple(size), dtype=volume.dtype)
    source, target = [], []
    for s, n, k in zip(start, spatial, size):
        lo, hi = max(s, 0), min(s + k, n)
        if hi <= lo:
            return out
        source.append(slice(lo, hi))
        target.append(slice(lo - s, hi - s))
    out[(...,) + tuple(target)] = volume[(...,) + tuple(source)]
    return out


class TrainingSamples(Dataset):
    """Samples of the given cached cases for a method with ``facts`` (see the module docstring).

    ``__getitem__`` takes ``(item, seed)`` as the sampler yields them and returns the batch entries
    of one sample: images, available, target and, when asked for, boxes / modality.
    """

    def __init__(self, cache_dir, case_ids: list[str], facts: MethodFacts, data: dict[str, Any],
                 augmentation: dict[str, Any], log=print):
        self.facts = facts
        self.spatial_dims = facts.spatial_dims
        self.data = data
        self.jitter = tuple(int(j) for j in data["box_jitter_px"])
        wanted = set(facts.modalities) & set(data.get("modalities") or MODALITIES)
        self.method_modalities = np.array([m in wanted for m in MODALITIES])
        if facts.promptable and self.spatial_dims == 3:
            raise DatasetError(f"method '{facts.name}' is a 3D promptable method; box prompts for 3D training "
                               "are not supported by this trainer")
        self.cases: list[CachedCase] = []
        skipped = []
        for case_id in case_ids:
            case = CachedCase.open(cache_dir, case_id)
            given = [m for m, a in zip(MODALITIES, case.available) if a and m in wanted]
            if not case.meta["has_labels"] or not given or not set(facts.required_modalities) <= set(given):
                skipped.append(case_id)
                continue
            classes_for(np.zeros(1, np.uint8), case.meta["label_set"], facts.label_set)  # label sets fit
            self.cases.append(case)
        if skipped:
            warnings.warn(f"{len(skipped)} case(s) have no label map or lack a modality method '{facts.name}' "
                          f"needs ({', '.join(facts.required_modalities) or 'any one of ' + ', '.join(facts.modalities)})"
                          f" and are not used: {', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}", stacklevel=2)
        if not self.cases:
            raise DatasetError(f"no usable training case for method '{facts.name}' (cases need a label map and "
                               f"the modalities the method requires)")
        if self.spatial_dims == 2:
            items, lesion = [], []
            for index, case in enumerate(self.cases):
                lesion_slices = set(case.meta["lesion_slices"])
                for z in case.meta["brain_slices"]:
                    items.append((index, z))
                    lesion.append(z in lesion_slices)
            self.items = np.asarray(items, dtype=np.int64).reshape(-1, 2)
            self.is_lesion = np.asarray(lesion, dtype=bool)
        else:
            self.items = np.arange(len(self.cases), dtype=np.int64)[:, None]
            self.is_lesion = np.ones(len(self.cases), dtype=bool)
        self.transform = build_augmentation(augmentation, self.spatial_dims)
        self._open: OrderedDict[int, None] = OrderedDict()

    def _case(self, index: int) -> CachedCase:
        """Case ``index`` with at most ``OPEN_CASES`` cases' memory maps open (each map holds a file
        descriptor; a BraTS training set would exceed the usual limit of 1024)."""
        self._open[index] = None
        self._open.move_to_end(index)
        while len(self._open) > OPEN_CASES:
            self.cases[self._open.popitem(last=False)[0]].close()
        return self.cases[index]

    def __len__(self) -> int:
        return len(self.items)

    def _modalities(self, case: CachedCase, rng: np.random.Generator) -> tuple[np.ndarray, int | None]:
        available = case.available & self.method_modalities
        present = np.flatnonzero(available)
        if self.data["single_modality"]:
            chosen = int(rng.choice(present))
            one = np.zeros(len(MODALITIES), dtype=bool)
            one[chosen] = True
            return one, chosen
        if len(present) > 1 and rng.random() < self.data["modality_dropout"]:
            required = [MODALITIES.index(m) for m in self.facts.required_modalities]
            optional = [i for i in present if i not in required]
            keep = rng.choice(optional, size=int(rng.integers(0 if required else 1, len(optional) + 1)), replace=False) \
                if optional else []
            available = np.zeros(len(MODALITIES), dtype=bool)
            available[required] = True
            available[np.asarray(keep, dtype=np.int64)] = True
        return available, None

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        index, seed = key
        rng = np.random.default_rng(int(seed))
        case_index = int(self.items[index, 0])
        case = self._case(case_index)
        if self.spatial_dims == 2:
            z = int(self.items[index, 1])
            _, height, width = case.meta["shape_zyx"]
            geometry = SliceGeometry(height, width)
            image = geometry.to_network(slices_with_context(case.images, [z], self.facts.context_slices))[0]
            classes = classes_for(case.labels[z], case.meta["label_set"], self.facts.label_set)
            target = geometry.to_network(classes[None], nearest=True)[0]
        else:
            size = tuple(int(s) for s in self.facts.input_size)
            # With a working voxel size, the patch covers size x working spacing mm of the case's own
            # grid and is resized to ``size``, as the engine resizes a whole case.
            spacing = self.facts.working_spacing_mm
            native = size if spacing is None else working_shape(size, (spacing,) * 3, case.spacing_zyx)
            foreground = case.foreground
            if len(foreground) and rng.random() < self.data["foreground_probability"]:
                centre = foreground[int(rng.integers(len(foreground)))]
            else:
                centre = np.array([int(rng.integers(n)) for n in case.meta["shape_zyx"]])
            image = torch.from_numpy(crop_patch(case.images, centre, native).astype(np.float32))
            labels = torch.from_numpy(crop_patch(case.labels, centre, native).astype(np.float32))
            image = resize_volume(image[None], size)[0]
            labels = resize_volume(labels[None, None], size, nearest=True)[0, 0].numpy().astype(np.uint8)
            target = torch.from_numpy(classes_for(labels, case.meta["label_set"], self.facts.label_set))
        available, modality = self._modalities(case, rng)
        present = torch.from_numpy(available.astype(np.float32)).repeat(2 * self.facts.context_slices + 1)
        image = image * present.view(-1, *([1] * self.spatial_dims))
        image, target = augment(self.transform, image, target, int(rng.integers(2 ** 32)))
        sample = {"images": image, "available": torch.from_numpy(available), "target": target}
        if self.facts.promptable:
            sample["boxes"] = torch.tensor(box_from_mask(target.numpy() > 0, rng, self.jitter), dtype=torch.float32)
        if modality is not None:
            sample["modality"] = torch.tensor(modality, dtype=torch.long)
        return sample


class BalancedDistributedSampler(DistributedSampler):
    """A DistributedSampler over :class:`TrainingSamples` that draws each epoch's balanced selection
    (see the module docstring) and yields ``(item, seed)`` pairs; ``set_start`` skips the first
    samples of this process's share of the epoch (for resuming part-way)."""

    def __init__(self, dataset: TrainingSamples, num_replicas: int, rank: int, seed: int = 0,
                 background_ratio: float = 1.0, samples_per_epoch: int | None = None):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.background_ratio = background_ratio
        self.samples_per_epoch = samples_per_epoch
        self.start = 0
        if dataset.spatial_dims == 3 and samples_per_epoch is None:
            raise DatasetError("3D training draws patches: set train.steps_per_epoch (nnU-Net uses 250)")

    def epoch_items(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(items, seeds) of the whole epoch, in order, before they are dealt out to the processes."""
        rng = np.random.default_rng([self.seed, epoch])
        dataset: TrainingSamples = self.dataset
        all_items = np.arange(len(dataset))
        if dataset.spatial_dims == 2:
            lesion = all_items[dataset.is_lesion]
            background = all_items[~dataset.is_lesion]
            if len(lesion) == 0:
                pool = background
            else:
                count = min(len(background), int(round(self.background_ratio * len(lesion))))
                pool = np.concatenate([lesion, rng.choice(background, size=count, replace=False)])
        else:
            pool = all_items
        wanted = self.samples_per_epoch or len(pool)
        rounds = [rng.permutation(pool) for _ in range(-(-wanted // len(pool)))]
        items = np.concatenate(rounds)[:wanted]
        seeds = rng.integers(0, 2 ** 63 - 1, size=len(items), dtype=np.int64)
        return items, seeds

    def epoch_length(self) -> int:
        """Samples per process and epoch (the epoch is padded to a multiple of the processes)."""
        total = self.samples_per_epoch or len(self.epoch_items(0)[0])
        return -(-total // self.num_replicas)

    def set_start(self, start: int) -> None:
        self.start = int(start)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        items, seeds = self.epoch_items(self.epoch)
        per_process = -(-len(items) // self.num_replicas)
        padding = per_process * self.num_replicas - len(items)
        if padding:
            items = np.concatenate([items, items[:padding]])
            seeds = np.concatenate([seeds, seeds[:padding]])
        mine = slice(self.rank, len(items), self.num_replicas)
        for item, seed in list(zip(items[mine].tolist(), seeds[mine].tolist()))[self.start:]:
            yield item, seed

    def __len__(self) -> int:
        return max(0, self.epoch_length() - self.start)
