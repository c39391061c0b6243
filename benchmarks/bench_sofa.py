"""SOFA's size and CPU cost per case.

    python benchmarks/bench_sofa.py [--resolution 1] [--seed 7] [--slices 4] [--full] [--threads 1]

Prints the parameter counts (both backbones; LiteMedSAM alone is 9.8M) and the time SOFA takes
through the engine (``InferenceEngine``, batch 2, no box) on a generated BraTS-grid case
(240 x 240 x 155 at 1 mm): preprocessing, and per slice the four TinyViT encodes and the attention
+ two passes (6 mask-decoder runs), plus a cached re-run (what a new box costs).

On a contended CPU a whole 1 mm case takes long (4 TinyViT encodes per brain slice, a few seconds
each), so by default only ``--slices`` slices around the lesion's centre run and the per-case time
is **extrapolated**: preprocessing + (brain slices of the case) x (measured seconds per slice).
``--full`` runs every brain slice of the case instead (no extrapolation).
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import SimpleITK as sitk
import torch

from BrainLesionSAMLib.cli import parameter_counts
from BrainLesionSAMLib.engine import EmbeddingCache, InferenceEngine
from BrainLesionSAMLib.methods.sofa import SOFA
from BrainLesionSAMLib.preprocessing import PreparedCase, prepare_case
from BrainLesionSAMLib.sample import SampleParameters, generate_case


def slab(case: PreparedCase, z0: int, z1: int) -> PreparedCase:
    """The prepared case restricted to axial slices z0..z1-1 (same normalisation as the full case)."""
    return PreparedCase(images=case.images[:, z0:z1].copy(), available=case.available,
                        reference=case.reference[:, :, z0:z1], reference_modality=case.reference_modality,
                        brain_mask=case.brain_mask[z0:z1].copy(), sources=case.sources)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--resolution", type=int, default=1, choices=(1, 2))
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--slices", type=int, default=4, help="slices timed (extrapolated to the case)")
    parser.add_argument("--full", action="store_true", help="run the whole case (no extrapolation)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    for backbone in ("lite", "vit_b"):
        counts = parameter_counts("sofa", {"backbone": backbone})
        print(f"parameters ({backbone}): total {counts['total']:,}, trainable {counts['trainable']:,}")
    model = SOFA().eval()
    parts = {"image encoder": model.backbone.image_encoder, "prompt encoder": model.backbone.prompt_encoder,
             "mask decoder": model.backbone.mask_decoder, "sub-region attention": model.attention}
    print("  " + ", ".join(f"{name} {sum(p.numel() for p in part.parameters()):,}" for name, part in parts.items())
          + f", sub-region prompts {model.region_prompts.numel():,}")

    images = generate_case(SampleParameters.random(args.seed, resolution=args.resolution))
    seg = sitk.GetArrayFromImage(images.pop("seg"))
    start = time.perf_counter()
    case = prepare_case(images)
    preprocessing = time.perf_counter() - start
    brain_slices = len(case.brain_slices())
    print(f"case: seed {args.seed}, {args.resolution} mm, grid (z, y, x) {case.shape_zyx}, "
          f"{brain_slices} brain slices; preprocessing {preprocessing:.1f} s; {args.threads} thread(s)")

    if args.full:
        run = case
    else:
        centre = int(np.round(np.flatnonzero(seg.any(axis=(1, 2))).mean()))
        z0 = max(centre - args.slices // 2, 0)
        run = slab(case, z0, z0 + args.slices)
    slices = len(run.brain_slices())
    cache = EmbeddingCache()
    engine = InferenceEngine(model, device="cpu", batch_size=2, embedding_cache=cache)

    encode_time = [0.0]
    original = model.encode

    def timed_encode(images, available):
        start = time.perf_counter()
        out = original(images, available)
        encode_time[0] += time.perf_counter() - start
        return out

    model.encode = timed_encode
    start, cpu = time.perf_counter(), time.process_time()
    engine.segment(run)
    first, first_cpu = time.perf_counter() - start, time.process_time() - cpu
    start = time.perf_counter()
    engine.segment(run)
    cached = time.perf_counter() - start
    per_slice = first / slices
    print(f"{slices} slices: {first:.1f} s ({per_slice:.2f} s per slice = {1 / per_slice:.3f} slices/s): "
          f"encoder {encode_time[0] / slices:.2f} s, attention + 2 passes + rest "
          f"{(first - encode_time[0]) / slices:.2f} s per slice; cached re-run {cached / slices:.2f} s per slice")
    print(f"  CPU time of this process: {first_cpu / slices:.2f} s per slice (wall / CPU = {first / first_cpu:.2f}; "
          f"above 1 / {args.threads} the machine was shared)")
    if args.full:
        print(f"time per case (measured): {preprocessing + first:.0f} s")
    else:
        single = (f"; from this process's CPU time per slice (one thread: what an unshared core takes) "
                  f"{preprocessing + brain_slices * first_cpu / slices:.0f} s") if args.threads == 1 else ""
        print(f"time per case (extrapolated from {slices} slices): {preprocessing:.1f} s + {brain_slices} x "
              f"{per_slice:.2f} s = {preprocessing + brain_slices * per_slice:.0f} s wall{single}; a new box on a "
              f"cached case ~{brain_slices * cached / slices:.0f} s for all slices (a box spans fewer)")


if __name__ == "__main__":
    main()
