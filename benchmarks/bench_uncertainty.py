"""The cost of mirror test-time augmentation (the uncertainty map): engine time with it off and on,
in one run, on the embedded sample case (seed SAMPLE_CASE_SEED, 1 mm, 240 x 240 x 155) with unet2d's
packaged weights.

    OMP_NUM_THREADS=1 python benchmarks/bench_uncertainty.py [--threads 1] [--repeats 2] [--device cpu]

Off and on alternate (off, on, off, on, ...) so that a machine shared with other jobs slows both
alike; prints each run, the medians, their ratio, and how much the labels and Dice change.
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import SimpleITK as sitk
import torch

from BrainLesionSAMLib.checkpoints import load_method
from BrainLesionSAMLib.engine import InferenceEngine
from BrainLesionSAMLib.metrics import evaluate_labels
from BrainLesionSAMLib.preprocessing import prepare_case
from BrainLesionSAMLib.sample import SAMPLE_CASE_SEED, SampleParameters, generate_case


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    images = generate_case(SampleParameters.random(SAMPLE_CASE_SEED, resolution=1))
    truth = sitk.GetArrayFromImage(images.pop("seg"))
    case = prepare_case(images)
    engine = InferenceEngine(load_method("unet2d"), device=args.device)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {engine.device}, case {case.shape_zyx} (z, y, x), "
          f"{len(case.brain_slices())} slices with brain")
    engine.segment(case)  # warm-up
    seconds = {False: [], True: []}
    results = {}
    for _ in range(args.repeats):
        for tta in (False, True):
            start = time.perf_counter()
            results[tta] = engine.segment(case, mirror_tta=tta)
            seconds[tta].append(time.perf_counter() - start)
            print(f"mirror_tta={tta}: {seconds[tta][-1]:.2f} s (network {results[tta].timings['network_s']:.2f} s)")
    off, on = statistics.median(seconds[False]), statistics.median(seconds[True])
    print(f"median off {off:.2f} s, on {on:.2f} s: ratio {on / off:.2f}")
    labels = {tta: sitk.GetArrayFromImage(result.labels) for tta, result in results.items()}
    uncertainty = sitk.GetArrayFromImage(results[True].uncertainty)
    lesion = (labels[False] > 0) | (labels[True] > 0)
    print(f"labels changed by TTA: {int((labels[False] != labels[True]).sum())} voxels; uncertainty max "
          f"{uncertainty.max():.3f}, mean over the lesion {uncertainty[lesion].mean():.3f}, "
          f"voxels above 0.5: {int((uncertainty > 0.5).sum())}")
    spacing = tuple(reversed(images["t1ce"].GetSpacing()))
    for tta in (False, True):
        scores = evaluate_labels(labels[tta], truth, spacing)
        print(f"Dice mirror_tta={tta}: " + "  ".join(f"{r}={scores[r]['dice']:.4f}" for r in ("WT", "TC", "ET")))
    assert np.isfinite(uncertainty).all()


if __name__ == "__main__":
    main()
