"""Zero-shot LiteMedSAM on generated sample cases: whole-tumour Dice with a box from the ground truth.

    python benchmarks/zero_shot_litemedsam.py [--seeds 100 101 ...] [--resolution 1] [--margin 0]
                                              [--weights both|real|random] [--timing] [--threads N]
                                              [--csv out.csv]

For every seed: generate the case (``SampleParameters.random(seed, resolution)``), prepare all four
modalities, take the 3D bounding box of the whole tumour (label > 0) as the engine's ``Box``
(optionally widened by ``--margin`` voxels in x and y), segment with ``litemedsam`` on FLAIR - the
published weights, and the same network with random weights (seed 0) as the floor a box alone gives -
and print the whole-tumour Dice of each. The engine labels nothing outside the box; that is checked.

``--propagate`` also scores MedSAM's own 3D box workflow (``MedSAM_infer_npz_3D`` of its
LiteMedSAM branch) on the same embeddings: the 3D box prompts only the middle slice; every other
slice is prompted with the bounding box of the previous slice's mask (+3 pixels), walking up and
then down from the middle, and falls back to the 3D box after an empty slice. The engine instead
prompts every slice with the 3D box, which on the tumour's top and bottom slices is far larger than
the lesion there. This is a prototype for the engine (decode only: no extra encoder cost).

``--timing``: on the first case, the real-weights run uses an embedding cache, and a second box
(the first one widened by 3 voxels: a user's refinement) is segmented on the same case; the script
prints both times. The second box re-runs only the prompt encoder and mask decoder.

The requirement this checks: mean Dice of the real weights above 0.75 on >= 10 cases at 1 mm.
Cost on a CPU: LiteMedSAM's encoder runs at 64 x 64 tokens throughout (~55 GFLOP per slice), a few
seconds per slice; a 1 mm case has 40-120 slices in its box. On a shared machine ``--threads 1``
avoids oversubscription, and ``--weights real`` / ``--weights random`` split the run in two.
"""
from __future__ import annotations

import argparse
import csv
import statistics
import time

import numpy as np
import SimpleITK as sitk
import torch

from BrainLesionSAMLib.engine import Box, EmbeddingCache, InferenceEngine
from BrainLesionSAMLib.methods.boxprompt import LiteMedSAMMethod
from BrainLesionSAMLib.preprocessing import prepare_case
from BrainLesionSAMLib.sample import SampleParameters, generate_case

REQUIRED_MEAN_DICE = 0.75


def dice(prediction: np.ndarray, truth: np.ndarray) -> float:
    total = int(prediction.sum()) + int(truth.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(prediction, truth).sum()) / total


def bounding_box(mask: np.ndarray, margin: int = 0) -> Box:
    """The inclusive voxel box (x, y, z) around ``mask`` [z, y, x], widened by ``margin`` in x and y."""
    z, y, x = np.nonzero(mask)
    return Box(int(x.min()) - margin, int(y.min()) - margin, int(z.min()),
               int(x.max()) + margin, int(y.max()) + margin, int(z.max()))


def propagated(method, case, box: Box, embedding_of, shift: int = 3) -> np.ndarray:
    """MedSAM's slice-to-slice box propagation over ``box``'s slices -> [Z, Y, X] bool mask.

    embedding_of(z) gives slice z's image embedding [1, ...]; boxes live in network pixels.
    """
    box = box.clipped_to(case.shape_zyx)
    geometry = case.slice_geometry
    available = torch.as_tensor(case.available)[None]
    x0, y0, x1, y1 = geometry.box_to_network(box.x0, box.y0, box.x1, box.y1)
    user_box = torch.tensor([[x0, y0, x1, y1]])
    brain = set(case.brain_slices().tolist())
    result = np.zeros(case.shape_zyx, dtype=bool)
    middle = (box.z0 + box.z1) // 2
    middle_mask = None
    for slices in (range(middle, box.z1 + 1), range(middle - 1, box.z0 - 1, -1)):
        previous = middle_mask
        for z in slices:
            if z not in brain:
                previous = None
                continue
            prompt = user_box
            if previous is not None and previous.any():
                ys, xs = torch.nonzero(previous, as_tuple=True)
                prompt = torch.tensor([[max(float(xs.min()) - shift, x0), max(float(ys.min()) - shift, y0),
                                        min(float(xs.max()) + 1 + shift, x1), min(float(ys.max()) + 1 + shift, y1)]])
            with torch.inference_mode():
                probabilities = method.decode_proba(embedding_of(z), available, prompt)
            previous = probabilities[0, 1] > 0.5
            if z == middle:
                middle_mask = previous
            result[z] = geometry.from_network(probabilities)[0].argmax(0).numpy() > 0
    return result & box.mask(case.shape_zyx)


def segment(engine: InferenceEngine, case, box: Box) -> tuple[np.ndarray, float]:
    start = time.perf_counter()
    labels = sitk.GetArrayFromImage(engine.segment(case, box=box).labels) > 0
    elapsed = time.perf_counter() - start
    outside = labels & ~box.clipped_to(case.shape_zyx).mask(case.shape_zyx)
    if outside.any():
        raise AssertionError(f"{int(outside.sum())} voxels labelled outside the box")
    return labels, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(range(100, 110)))
    parser.add_argument("--resolution", type=int, default=1, choices=(1, 2))
    parser.add_argument("--modality", default="flair")
    parser.add_argument("--margin", type=int, default=0, help="widen the ground-truth box by this many voxels in x, y")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--weights", choices=("both", "real", "random"), default="both",
                        help="the published weights, random weights (seed 0), or both")
    parser.add_argument("--propagate", action="store_true", help="also score MedSAM's slice-to-slice box propagation")
    parser.add_argument("--timing", action="store_true", help="first vs second box on the first case (real weights)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--csv", help="write the per-case rows here")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; seeds {args.seeds}; "
          f"{args.resolution} mm; modality {args.modality}; box margin {args.margin} voxels; "
          f"weights {args.weights}", flush=True)
    models = {}
    if args.weights in ("both", "real"):
        models["real"] = LiteMedSAMMethod.pretrained(modality=args.modality)
    if args.weights in ("both", "random"):
        torch.manual_seed(0)
        models["random"] = LiteMedSAMMethod(modality=args.modality).eval()

    rows = []
    timing_lines = []
    for index, seed in enumerate(args.seeds):
        images = generate_case(SampleParameters.random(seed, resolution=args.resolution))
        truth = sitk.GetArrayFromImage(images.pop("seg")) > 0
        case = prepare_case(images)
        box = bounding_box(truth, args.margin)
        slices = int(np.isin(case.brain_slices(), np.arange(box.z0, box.z1 + 1)).sum())
        row = {"seed": seed, "box_slices": slices, "tumour_ml": truth.sum() * args.resolution ** 3 / 1000}
        for name, model in models.items():
            timing = args.timing and index == 0 and name == "real"
            cache = EmbeddingCache() if (timing or args.propagate) else None
            engine = InferenceEngine(model, "cpu", batch_size=args.batch_size, embedding_cache=cache)
            labels, seconds = segment(engine, case, box)
            row.update({f"dice_{name}": dice(labels, truth), f"seconds_{name}": seconds})
            if args.propagate:
                def embedding_of(z, model=model, cache=cache):
                    # the engine's cache key (method, case, slice); encode if it is not there
                    cached = cache.get((id(model), case.fingerprint, int(z)))
                    if cached is None:
                        with torch.inference_mode():
                            cached = model.encode(case.network_slices([z]), torch.as_tensor(case.available)[None])[0]
                    return cached[None]
                row[f"dice_{name}_propagated"] = dice(propagated(model, case, box, embedding_of), truth)
            if timing:
                refined = Box(box.x0 - 3, box.y0 - 3, box.z0, box.x1 + 3, box.y1 + 3, box.z1)
                refined_labels, refined_seconds = segment(engine, case, refined)
                timing_lines = [
                    f"case {case.shape_zyx[::-1]} (x, y, z), {slices} slices in the box",
                    f"first box  (encode + decode): {seconds:7.2f} s  ({seconds / slices:.2f} s per slice)",
                    f"second box (cached, decode) : {refined_seconds:7.2f} s  "
                    f"({refined_seconds / slices:.3f} s per slice); Dice {dice(refined_labels, truth):.4f}, "
                    f"{len(cache)} embeddings cached",
                ]
                for text in timing_lines:
                    print(text, flush=True)
        rows.append(row)
        print(f"seed {seed}: {slices:3d} slices, tumour {row['tumour_ml']:6.1f} ml, Dice "
              + ", ".join(f"{name} {row[f'dice_{name}']:.4f} ({row[f'seconds_{name}']:.0f} s)"
                          + (f" propagated {row[f'dice_{name}_propagated']:.4f}" if args.propagate else "")
                          for name in models), flush=True)

    columns = [f"{name}{suffix}" for name in models for suffix in ("", "_propagated") if suffix == "" or args.propagate]
    means = {column: statistics.mean(r[f"dice_{column}"] for r in rows) for column in columns}
    print(f"mean Dice over {len(rows)} cases: " + ", ".join(f"{name} {value:.4f}" for name, value in means.items()))
    if "real" in means:
        print(f"requirement mean real Dice > {REQUIRED_MEAN_DICE}: "
              + ("met" if means["real"] > REQUIRED_MEAN_DICE else "NOT met"))
    for text in timing_lines:
        print(text)
    if args.csv:
        with open(args.csv, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
