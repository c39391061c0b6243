"""CMAA forward time per 256 x 256 slice (all four modalities: one T1-based and one T2-based image
pair through the shared frozen encoder) on this machine's CPU, for each backbone.

    python benchmarks/bench_cmaa.py [--threads 2] [--repeats 3]

Prints seconds per slice at batch 1 and batch 4, and the parameter counts. Random ViT-B weights
(no SAM weights offline) and the real LiteMedSAM weights: the time does not depend on the values.
"""
from __future__ import annotations

import argparse
import time

import torch

from BrainLesionSAMLib.backbones.base import BACKBONES
from BrainLesionSAMLib.methods.cmaa import CMAA


def seconds_per_slice(model: CMAA, batch: int, repeats: int) -> float:
    images = 255 * torch.rand(batch, 4, 256, 256)
    available = torch.ones(batch, 4, dtype=torch.bool)
    with torch.inference_mode():
        model.predict_proba(images, available)  # warm-up (allocations, TinyViT's bias cache)
        start = time.perf_counter()
        for _ in range(repeats):
            model.predict_proba(images, available)
    return (time.perf_counter() - start) / repeats / batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} CPU threads")
    for backbone in BACKBONES:
        model = CMAA(backbone=backbone).eval()
        counts = model.parameter_counts()
        times = {b: seconds_per_slice(model, b, args.repeats) for b in (1, 4)}
        print(f"cmaa backbone={backbone}: {counts['total']:,} parameters ({counts['trainable']:,} trainable); "
              + ", ".join(f"batch {b}: {t:.2f} s per slice" for b, t in times.items()))


if __name__ == "__main__":
    main()
