"""Fine-tune SOFA's attention and decoder on generated sample cases (CPU) and measure the Dice per
sub-region before (the untrained head) and after, through the library's engine and metrics.

    python benchmarks/finetune_sofa.py [--train-seeds 20000 ...] [--test-seeds 30000 ...]
        [--resolution 2] [--steps 300] [--lr 1e-4] [--batch-size 2] [--slices-per-case 16]
        [--background-ratio 0.25] [--test-margin 2] [--threads 1] [--cache-dir /tmp/sofa_finetune_cache]
        [--trained FILE [--train-only]] [--prepare-only]

On a shared CPU the phases can run as separate processes: ``--prepare-only`` encodes the training
slices and the test slabs (and scores the untrained head), ``--train-only --trained FILE`` trains and
writes FILE, and a last run with ``--trained FILE`` loads it and scores before and after from the
cached embeddings (decoder only).

What it does:

1. Cases: ``generate_case(SampleParameters.random(seed, resolution))`` for training seeds (>= 20000)
   and test seeds (disjoint, 30000 on by default), prepared with ``prepare_case`` as the engine does.
2. Training slices: up to ``--slices-per-case`` lesion slices per case (evenly spaced over the
   lesion's slices) plus ``--background-ratio`` times as many brain slices without lesion; network
   slices and class targets through the case's ``SliceGeometry`` (as ``Training/`` makes them).
3. **The image encoder is frozen for this fine-tune** (``freeze_image_encoder=True``): TinyViT costs
   a few seconds per 256 x 256 slice and modality on this CPU, so every training slice's four
   modality embeddings are computed once (``SOFA.encode``) and stored (float16, on disk under
   ``--cache-dir``, reused by later runs); what trains is the sub-region attention, the prompt
   encoder and the mask decoder, with ``SOFA.embedding_loss`` (the method's own one-vs-all loss of
   both passes; no image augmentation: the embeddings are fixed). No box is given in training, so
   pass 1 always trains with the automatic whole-slice box - the mode that is evaluated. Adam with
   cosine decay to 0 over ``--steps``, lr 1e-4 for LiteMedSAM's decoder and prompt encoder and
   3e-3 for the new parts (attention and sub-region prompts start at zero and must grow within a
   few hundred steps); the paper: Adam 3e-5 for everything, cosine, batch 2, 200 epochs.
   ``--no-region-prompts`` trains the paper's literal design (``region_prompts: False``).
4. Evaluation: every test case through ``InferenceEngine`` (no box) before and after training, on
   the slab of its lesion's axial slices +- ``--test-margin`` (2) slices (the whole volume is
   prepared first, so intensities are normalised as for the full case; ``--test-margin -1`` runs
   every brain slice). The slab keeps the CPU time affordable (4 TinyViT encodes per slice) and is
   what the paper evaluates too (it crops volumes to their labelled slices for training and
   inference); false positives farther from the lesion are not counted. Labels are scored with
   ``BrainLesionSAMLib.metrics.evaluate_labels`` (WT/TC/ET and NCR/ED). Test embeddings go
   through the engine's ``EmbeddingCache`` (a disk-backed subclass, so the "before" and "after"
   runs - and reruns - encode each slice once). The embeddings are stored in float16 for both training and test slices (rounding ~5e-4 relative), so before and after see the
   same inputs.

Prints the figures; nothing is asserted (the numbers depend on the seeds and the step count).

Figures (2026-11-22, defaults: six training cases 20000-20005, 120 slices of which 96 with lesion,
300 steps of batch 2, ~6 min on 1 thread; test cases 30000 and 30001, 47 and 39 slices), mean Dice:

    region_prompts        WT     TC     ET    NCR     ED
    before (untrained)  0.254  0.134  0.000  0.055  0.000
    after, True         0.716  0.747  0.553  0.662  0.450
    after, False        0.642  0.630  0.368  0.484  0.255   (--no-region-prompts: the paper's design)

The untrained head labels everything it finds NCR (equal weights and no sub-region prompt: three
identical sub-region masks; ties go to the first), hence ET = ED = 0 before training. With three
training cases (20000-20002) the same run gives WT 0.613 (region prompts) and 0.434 (without); with
three training cases and one learning rate of 1e-4 for everything (an earlier version without
region prompts) the attention weights stayed at 0.25 +- 0.003 and case 30000's WT fell to 0.065.
"""
from __future__ import annotations

import argparse
import hashlib
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from BrainLesionSAMLib.conventions import LABEL_SETS, MODALITIES
from BrainLesionSAMLib.engine import EmbeddingCache, InferenceEngine
from BrainLesionSAMLib.methods.sofa import REGIONS, SOFA
from BrainLesionSAMLib.metrics import evaluate_labels
from BrainLesionSAMLib.preprocessing import PreparedCase, prepare_case
from BrainLesionSAMLib.sample import SampleParameters, generate_case

STRUCTURES = ("WT", "TC", "ET", "NCR", "ED")


def case_and_labels(seed: int, resolution: int):
    images = generate_case(SampleParameters.random(seed, resolution=resolution))
    seg = sitk.GetArrayFromImage(images.pop("seg"))
    return prepare_case(images), seg


def lesion_slab(case: PreparedCase, seg: np.ndarray, margin: int) -> tuple[PreparedCase, np.ndarray]:
    """The case restricted to the axial slices of its lesion +- ``margin`` slices (after the whole
    volume was prepared, so intensities are normalised exactly as for the full case)."""
    if margin < 0:
        return case, seg
    lesion = np.flatnonzero(seg.any(axis=(1, 2)))
    z0, z1 = max(int(lesion[0]) - margin, 0), min(int(lesion[-1]) + margin + 1, seg.shape[0])
    slab = PreparedCase(images=case.images[:, z0:z1].copy(), available=case.available,
                        reference=case.reference[:, :, z0:z1], reference_modality=case.reference_modality,
                        brain_mask=case.brain_mask[z0:z1].copy(), sources=case.sources)
    return slab, seg[z0:z1]


def classes_of(labels: np.ndarray) -> np.ndarray:
    lookup = np.zeros(256, dtype=np.uint8)
    for index, value in enumerate(LABEL_SETS["brats"]):
        lookup[value] = index
    return lookup[labels]


class DiskBackedCache(EmbeddingCache):
    """The engine's embedding cache, also kept on disk (float16) so that reruns skip the encoder.

    The engine's keys are (method, case content, slice); the disk file is named by the last two
    (the encoder is frozen and the same for every run of this script)."""

    def __init__(self, directory: Path, tag: str):
        super().__init__(max_bytes=3 * 2**30 // 2)  # reloads from disk beyond this
        self.directory = directory
        self.tag = tag

    def _path(self, key: tuple) -> Path:
        name = hashlib.blake2b(repr((self.tag,) + tuple(key[1:])).encode(), digest_size=12).hexdigest()
        return self.directory / f"test_{name}.pt"

    def get(self, key: tuple) -> torch.Tensor | None:
        hit = super().get(key)
        if hit is None and self._path(key).is_file():
            hit = torch.load(self._path(key), weights_only=True).float()
            super().put(key, hit)
        return hit

    def put(self, key: tuple, embedding: torch.Tensor) -> None:
        half = embedding.detach().to("cpu", torch.float16)
        torch.save(half.clone(), self._path(key))
        super().put(key, half.float())


def training_slices(seed: int, resolution: int, per_case: int, background_ratio: float,
                    model: SOFA, cache_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """Embeddings (float16) [N, 4, 256, 64, 64], targets [N, 256, 256] uint8 and available [N, 4]."""
    path = cache_dir / f"train_{tag}_{seed}_r{resolution}_{per_case}_{background_ratio}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    case, seg = case_and_labels(seed, resolution)
    classes = classes_of(seg)
    lesion = np.flatnonzero(classes.any(axis=(1, 2)))
    if len(lesion) > per_case:
        lesion = lesion[np.round(np.linspace(0, len(lesion) - 1, per_case)).astype(int)]
    empty = np.setdiff1d(case.brain_slices(), np.flatnonzero(classes.any(axis=(1, 2))))
    rng = np.random.default_rng(seed)
    count = min(len(empty), int(round(background_ratio * len(lesion))))
    chosen = np.sort(np.concatenate([lesion, rng.choice(empty, size=count, replace=False)]))
    images = case.network_slices(chosen)
    targets = case.slice_geometry.to_network(classes[chosen], nearest=True).to(torch.uint8)
    available = torch.as_tensor(case.available)[None].expand(len(chosen), -1).clone()
    start = time.perf_counter()
    embeddings = []
    with torch.inference_mode():
        for i in range(0, len(chosen), 2):
            embeddings.append(model.encode(images[i:i + 2], available[i:i + 2]).to(torch.float16))
    print(f"  case {seed}: {len(chosen)} slices ({len(lesion)} with lesion) encoded in "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    data = {"embeddings": torch.cat(embeddings), "targets": targets, "available": available}
    torch.save(data, path)
    return data


def evaluate(model: SOFA, cases, cache: DiskBackedCache, batch_size: int) -> tuple[list[dict], list[dict]]:
    scores, weights = [], []
    for seed, (case, seg) in cases.items():
        start = time.perf_counter()
        result = InferenceEngine(model, device="cpu", batch_size=batch_size, embedding_cache=cache).segment(case)
        labels = sitk.GetArrayFromImage(result.labels)
        metrics = evaluate_labels(labels, seg, case.spacing_zyx, "brats")
        scores.append({s: metrics[s]["dice"] for s in STRUCTURES})
        weights.append(result.case_weights)
        print(f"  case {seed}: " + " ".join(f"{s} {metrics[s]['dice']:.3f}" for s in STRUCTURES)
              + f" ({time.perf_counter() - start:.0f} s)", flush=True)
    return scores, weights


def mean_scores(scores: list[dict]) -> dict[str, float]:
    return {s: statistics.fmean(row[s] for row in scores) for s in STRUCTURES}


def train(model: SOFA, data: dict[str, torch.Tensor], args) -> tuple[list[float], float]:
    """Adam with cosine decay to 0 over ``args.steps`` on the precomputed embeddings."""
    embeddings, targets, available = data["embeddings"], data["targets"], data["available"]
    new = [p for name, p in model.named_parameters() if name.startswith(("attention.", "region_prompts"))]
    pretrained = [p for name, p in model.named_parameters()
                  if p.requires_grad and not name.startswith(("attention.", "region_prompts"))]
    optimiser = torch.optim.Adam([{"params": pretrained, "lr": args.lr}, {"params": new, "lr": args.head_lr}])
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimiser, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, args.steps) / args.steps)))
    generator = torch.Generator().manual_seed(args.seed)
    model.train()
    losses = []
    start = time.perf_counter()
    for step in range(args.steps):
        index = torch.randint(0, len(targets), (args.batch_size,), generator=generator)
        loss = model.embedding_loss(embeddings[index].float(), available[index], targets[index],
                                    generator=generator)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        losses.append(loss.item())
        if (step + 1) % 25 == 0:
            print(f"  step {step + 1}: loss (last 25) {statistics.fmean(losses[-25:]):.4f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    model.eval()
    return losses, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-seeds", type=int, nargs="+", default=list(range(20000, 20006)))
    parser.add_argument("--test-seeds", type=int, nargs="+", default=[30000, 30001])
    parser.add_argument("--resolution", type=int, default=2, choices=(1, 2))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-4, help="learning rate of LiteMedSAM's decoder and prompt encoder")
    parser.add_argument("--head-lr", type=float, default=3e-3,
                        help="learning rate of the new parts (attention, sub-region prompts)")
    parser.add_argument("--no-region-prompts", action="store_true",
                        help="SOFA with region_prompts False (the paper's literal design)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--slices-per-case", type=int, default=16)
    parser.add_argument("--background-ratio", type=float, default=0.25)
    parser.add_argument("--test-margin", type=int, default=2,
                        help="evaluate the test cases on their lesion's slices +- this many (-1: whole volume)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/sofa_finetune_cache"))
    parser.add_argument("--trained", type=Path, default=None,
                        help="file of the trained weights: written after training; when it exists (and "
                             "--train-only is not given) loaded instead of training")
    parser.add_argument("--train-only", action="store_true", help="train (and write --trained), no evaluation")
    parser.add_argument("--prepare-only", action="store_true",
                        help="encode the training and test slices (scoring the untrained head), then stop")
    args = parser.parse_args()
    if set(args.train_seeds) & set(args.test_seeds):
        parser.error("training and test seeds must be disjoint")
    if min(args.train_seeds) < 20000:
        parser.error("training seeds start at 20000 (smaller seeds are the demo's and the tests')")
    torch.set_num_threads(args.threads)
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    tag = "lite"  # the packaged lite_medsam.pth encoder, frozen

    config = {"freeze_image_encoder": True, "region_prompts": not args.no_region_prompts}
    saved = None
    if args.trained is not None and args.trained.is_file() and not args.train_only:
        saved = torch.load(args.trained, weights_only=False)
        config = saved["config"]
    torch.manual_seed(args.seed)
    model = SOFA(**config).eval()
    print(f"config: {config}", flush=True)
    counts = model.parameter_counts()
    print(f"SOFA (lite): {counts['total']:,} parameters, {counts['trainable']:,} trained here "
          "(image encoder frozen)", flush=True)
    initial = {k: v.clone() for k, v in model.state_dict().items()}

    if saved is not None:
        model.load_state_dict(saved["state"])
        losses, train_time, slices = saved["losses"], saved["train_time"], saved["slices"]
        print(f"trained weights from {args.trained} ({saved['args']})", flush=True)
    else:
        print(f"training slices: seeds {args.train_seeds} at {args.resolution} mm", flush=True)
        parts = [training_slices(s, args.resolution, args.slices_per_case, args.background_ratio, model,
                                 args.cache_dir, tag) for s in args.train_seeds]
        data = {key: torch.cat([p[key] for p in parts]) for key in ("embeddings", "targets", "available")}
        data["targets"] = data["targets"].long()
        slices = len(data["targets"])
        print(f"  {slices} slices, {int(data['targets'].flatten(1).any(1).sum())} with lesion", flush=True)
        if args.prepare_only:
            losses, train_time = [], 0.0
        else:
            losses, train_time = train(model, data, args)
            if args.trained is not None:
                torch.save({"state": model.state_dict(), "config": config, "losses": losses, "train_time": train_time,
                            "slices": slices, "args": " ".join(sys.argv[1:])}, args.trained)
        del data, parts
    if losses:
        print(f"training: {args.steps} steps of batch {args.batch_size} on {slices} slices of "
              f"{len(args.train_seeds)} cases, Adam lr {args.lr:g} (new parts {args.head_lr:g}) cosine, {train_time:.0f} s; loss first 25 "
              f"steps {statistics.fmean(losses[:25]):.4f}, last 25 {statistics.fmean(losses[-25:]):.4f}", flush=True)
    if args.train_only:
        return
    trained = {k: v.clone() for k, v in model.state_dict().items()}

    print(f"test cases: seeds {args.test_seeds}", flush=True)
    cache = DiskBackedCache(args.cache_dir, tag)
    before, after, after_weights = [], [], []
    for seed in args.test_seeds:
        case, seg = lesion_slab(*case_and_labels(seed, args.resolution), args.test_margin)
        print(f" case {seed}: {len(case.brain_slices())} slices evaluated", flush=True)
        model.load_state_dict(initial)
        print("  before training (zero-initialised attention = mean fusion, LiteMedSAM's decoder):", flush=True)
        scores, _ = evaluate(model, {seed: (case, seg)}, cache, args.batch_size)
        before += scores
        if args.prepare_only:
            continue
        model.load_state_dict(trained)
        print("  after training:", flush=True)
        scores, weights = evaluate(model, {seed: (case, seg)}, cache, args.batch_size)
        after += scores
        after_weights += weights
    if args.prepare_only:
        return

    print()
    print(f"SOFA fine-tune, test seeds {args.test_seeds} at {args.resolution} mm (lesion slab +- {args.test_margin}):")
    print("            " + " ".join(f"{s:>6}" for s in STRUCTURES))
    print("before      " + " ".join(f"{v:6.3f}" for v in mean_scores(before).values()))
    print("after       " + " ".join(f"{v:6.3f}" for v in mean_scores(after).values()))
    print("mean Dice over the test cases (WT/TC/ET regions; NCR/ED labels; ET is both)")
    print("attention weights after training (per test case, sub-region: modality weights):")
    for seed, weights in zip(args.test_seeds, after_weights):
        for region in REGIONS:
            if region in weights:
                print(f"  {seed} {region:>16}: " + " ".join(f"{m} {weights[region][m]:.3f}"
                                                           for m in MODALITIES if m in weights[region]))


if __name__ == "__main__":
    main()
