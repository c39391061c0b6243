"""Preprocessing + inverse time for one BraTS-size case (240 x 240 x 155, four modalities).

    python benchmarks/bench_preprocessing.py [--repeats 3]

Prints the median of ``--repeats`` runs for: reading + validation + resampling + normalisation
(``prepare_case`` from files), slicing all brain slices to the 256 x 256 network grid, and the
inverse (network-grid class probabilities back to the reference grid + argmax + label image).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from BrainLesionSAMLib.io import discover_case
from BrainLesionSAMLib.preprocessing import prepare_case
from BrainLesionSAMLib.sample import SampleParameters, generate_case, write_case


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"torch threads: {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as folder:
        case_dir = write_case(generate_case(SampleParameters.random(1, resolution=1)), Path(folder), "bench")
        inputs = {k: v for k, v in discover_case(case_dir).items() if k != "seg"}
        timings: dict[str, list[float]] = {"prepare_case (read, resample, normalise)": [],
                                           "slices to 256x256": [], "inverse to reference grid": []}
        for _ in range(args.repeats):
            start = time.perf_counter()
            case = prepare_case(inputs)
            timings["prepare_case (read, resample, normalise)"].append(time.perf_counter() - start)
            slices = case.brain_slices()
            start = time.perf_counter()
            network = case.network_slices(slices)
            timings["slices to 256x256"].append(time.perf_counter() - start)
            probabilities = torch.softmax(torch.randn(len(slices), 4, 256, 256), dim=1)
            start = time.perf_counter()
            back = case.slice_geometry.from_network(probabilities).argmax(1).numpy().astype(np.uint8)
            full = np.zeros(case.shape_zyx, np.uint8)
            full[slices] = back
            case.to_reference_image(full)
            timings["inverse to reference grid"].append(time.perf_counter() - start)
        print(f"case {case.shape_zyx[::-1]} (x, y, z), {len(slices)} brain slices, network input {tuple(network.shape)}")
        total = 0.0
        for name, values in timings.items():
            median = statistics.median(values)
            total += median
            print(f"{name:45s} {median:7.3f} s (median of {len(values)})")
        print(f"{'total preprocessing + inverse':45s} {total:7.3f} s")


if __name__ == "__main__":
    main()
