"""Generalisation benchmark: the unet2d weights on cases they were not made from (issue 19), and
any other method's weights on the same cases (issue 21).

    python benchmarks/generalisation.py [--cases 4] [--out docs/generalisation_results.json]
    python benchmarks/generalisation.py --no-unet2d --model cmaa=cmaa --model "cmaa FLAIR=cmaa:runs/cmaa_release_flair/final.safetensors:flair"

``--model LABEL=METHOD[:WEIGHTS[:MODALITIES]]`` adds a model: the method with WEIGHTS (a file or a
catalogue id; empty = what ``brainlesionsam segment --method METHOD`` uses without ``--weights``),
given only MODALITIES (comma-separated; default all four). A model of label set 'lesion' is scored
on the whole tumour only (its lesion against WT), TC and ET are left out. A method that requires a
box (DB-SAM) gets the drawn-ROI box: the bounding box of every lesion voxel (as the trainer's
validation); healthy cases are left out for it (there is nothing to draw a box around). ``--cascade
LABEL ...`` also scores those models behind the engine's cascade (the default automatic model picks
the slices first: what ``brainlesionsam segment --cascade`` costs in Dice); ``--matched-expert
LABEL ...`` also scores those MoME models with each input's own modality expert alone (the gate
unused); every row records the model's seconds for the case.

Test groups (seeds never used in training: training pools use (0, pool, i), validation
(0, 999999, i); the test uses (TEST_SEED, group, i)):

- ``synth_training``: the synthesiser inside its training ranges (recall, not generalisation);
- ``shift_<axis>``: the synthesiser with one acquisition axis outside the training ranges
  (``Training.synthesis.SHIFTED``: bias, low SNR, thick slices, rotation, gamma);
- ``sample_1mm`` / ``sample_2mm``: the demo generator's cases (seeds 50 000+, another contrast
  model: a fixed table, unseen by the synthesiser-trained weights), at 1 and 2 mm.

Every weights file is scored on the same cases with the library's engine (fully automatic, no
box, except for box-requiring methods), each raw prediction also cleaned by
``BrainLesionSAMLib.postprocessing`` at every threshold of THRESHOLDS_ML (the engine itself runs with the clean-up off here)
and, after the 0.1 ml one, at every component confidence of CONFIDENCES (mean lesion probability). Printed per group and model:
Dice WT / TC / ET (mean over cases with that region), lesion detection on the whole tumour's
26-connected components (sensitivity, false-positive lesions per case), labelled volume on healthy
cases (ml) and the worst predicted / true whole-tumour volume ratio; at the end the same pooled over
the synthetic groups per case size bin (whole-tumour volume) and per lesion type, at the engine's
0.1 ml clean-up. A weights file of ``WEIGHTS`` that does not exist is left out. Per-case rows, the
means and the breakdowns go to ``--out`` (JSON) for docs/generalisation.md.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from BrainLesionSAMLib.catalogue import resolve_method  # noqa: E402
from BrainLesionSAMLib.checkpoints import load_method  # noqa: E402
from BrainLesionSAMLib.conventions import MODALITIES  # noqa: E402
from BrainLesionSAMLib.methods import SegmentationMethod  # noqa: E402
from BrainLesionSAMLib.metrics import evaluate_labels  # noqa: E402
from BrainLesionSAMLib.pipeline import segment_images  # noqa: E402
from BrainLesionSAMLib.postprocessing import (remove_small_components, remove_unconfident_components,  # noqa: E402
                                             whole_lesion_components)
from Training.synthesis import SHIFTED, TRAINING, synthesise_case  # noqa: E402
from Training.trainer import ground_truth_box  # noqa: E402

TEST_SEED = 424242
WEIGHTS = {"phantom (v1)": REPO / "BrainLesionSAMLib/weights/unet2d_sample.safetensors",
           "synthesis (v2)": REPO / "BrainLesionSAMLib/weights/unet2d_synthesis.safetensors",
           # not shipped (docs/generalisation.md): `scripts/train_release_weights.py --config unet2d_synthesis_v3`
           "synthesis (v3)": REPO / "BrainLesionSAMLib/weights/unet2d_synthesis_v3.safetensors"}
REGIONS = {"WT": (1, 2, 4), "TC": (1, 4), "ET": (4,)}
THRESHOLDS_ML = (0.0, 0.1, 0.5)  # connected-component clean-up swept on the raw prediction
# ... and, after the engine's 0.1 ml, a component's mean lesion probability (remove_unconfident_components)
CONFIDENCES = (0.6, 0.7, 0.75, 0.8, 0.85, 0.9)
VARIANTS = tuple(f"cc>={t:g}ml" for t in THRESHOLDS_ML) + tuple(f"cc>=0.1ml p>={c:g}" for c in CONFIDENCES)


def variants(raw: np.ndarray, lesion_probability: np.ndarray, spacing_zyx) -> dict[str, np.ndarray]:
    """The raw prediction under every clean-up the benchmark scores, by row-name suffix (VARIANTS)."""
    out = {f"cc>={t:g}ml": remove_small_components(raw, spacing_zyx, t) for t in THRESHOLDS_ML}
    for confidence in CONFIDENCES:
        out[f"cc>=0.1ml p>={confidence:g}"] = remove_unconfident_components(out["cc>=0.1ml"], lesion_probability,
                                                                            confidence)
    assert tuple(out) == VARIANTS
    return out


def groups() -> dict[str, object]:
    return {"synth_training": TRAINING, **{f"shift_{name}": ranges for name, ranges in SHIFTED.items()},
            "sample_1mm": 1, "sample_2mm": 2}


def make_case(group: str, index: int, spec) -> tuple[dict[str, sitk.Image], sitk.Image, dict]:
    if isinstance(spec, int):
        from BrainLesionSAMLib.sample import SampleParameters, generate_case

        case = generate_case(SampleParameters.random(50_000 + index, resolution=spec))
        return {m: case[m] for m in ("t1", "t1ce", "t2", "flair")}, case["seg"], {"kind": "sample"}
    case = synthesise_case((TEST_SEED, list(groups()).index(group), index), spec)
    kinds = sorted({lesion["kind"] for lesion in case.info["lesions"]}) or ["healthy"]
    return case.images, case.labels, {"kind": "+".join(kinds), "spacing_zyx": case.info["spacing_zyx"]}


def load(path: Path) -> SegmentationMethod:
    """A unet2d weights file with the configuration its header records (2D or 2.5D)."""
    return load_method("unet2d", path)


def score(prediction: np.ndarray, truth: np.ndarray, spacing_zyx: tuple[float, ...], label_set: str = "brats") -> dict:
    voxel_ml = float(np.prod(spacing_zyx)) / 1000
    row = {"true_ml": float((truth > 0).sum()) * voxel_ml, "predicted_ml": float((prediction > 0).sum()) * voxel_ml}
    if label_set == "lesion":  # one lesion class: scored against the whole tumour
        if (truth > 0).any():
            whole = evaluate_labels((prediction > 0).astype(np.uint8), (truth > 0).astype(np.uint8), spacing_zyx,
                                    label_set="lesion")
            row["WT_dice"] = float(whole["lesion"]["dice"])
    else:
        metrics = evaluate_labels(prediction, truth, spacing_zyx, label_set="brats")
        for region, values in REGIONS.items():
            if np.isin(truth, values).any():
                row[f"{region}_dice"] = float(metrics[region]["dice"])
    # Detection on 26-connected whole-lesion components (cheap; not the BraTS 2023 dilation rule of
    # BrainLesionSAMLib.lesion_metrics, which is too slow for the hundreds of specks of a raw 2D model):
    # a true lesion is detected when a predicted voxel touches it, a predicted component is a false
    # positive when it touches no true lesion.
    true_components, true_count = whole_lesion_components(truth)
    predicted_components, predicted_count = whole_lesion_components(prediction)
    row["lesions"] = int(true_count)
    row["detected"] = int(len(np.unique(true_components[(prediction > 0) & (true_components > 0)])))
    row["false_positive_lesions"] = int(predicted_count - len(np.unique(predicted_components[(truth > 0) & (predicted_components > 0)])))
    return row


SIZE_BINS_ML = ((0.0, 0.0, "healthy"), (0.0, 5.0, "<5 ml"), (5.0, 50.0, "5-50 ml"),
                (50.0, 200.0, "50-200 ml"), (200.0, float("inf"), ">200 ml"))


def size_bin(true_ml: float) -> str:
    """The case's whole-tumour volume bin (a case, not a lesion: several lesions add up)."""
    if true_ml == 0:
        return "healthy"
    return next(name for low, high, name in SIZE_BINS_ML[1:] if low < true_ml <= high)


def breakdowns(results: dict, model_key: str) -> dict[str, dict[str, dict]]:
    """Pooled over the synthetic groups: the summary per case size bin and per lesion type."""
    rows = [row for group, models in results["groups"].items() if not group.startswith("sample")
            for row in models.get(model_key, {}).get("rows", [])]
    tables: dict[str, dict[str, dict]] = {"size": {}, "type": {}}
    for name in [b[2] for b in SIZE_BINS_ML]:
        chosen = [r for r in rows if size_bin(r["true_ml"]) == name]
        if chosen:
            tables["size"][name] = summarise(chosen)
    for kind in sorted({k for r in rows for k in r["kind"].split("+")}):
        tables["type"][kind] = summarise([r for r in rows if kind in r["kind"].split("+")])
    return tables


def summarise(rows: list[dict]) -> dict:
    out = {"cases": len(rows)}
    if not rows:  # a box-requiring model on healthy cases only
        return out
    for key in ("WT_dice", "TC_dice", "ET_dice"):
        values = [r[key] for r in rows if key in r]
        out[key] = round(float(np.mean(values)), 3) if values else None
    lesions = sum(r.get("lesions", 0) for r in rows)
    out["sensitivity"] = round(sum(r.get("detected", 0) for r in rows) / lesions, 3) if lesions else None
    out["fp_lesions_per_case"] = round(sum(r.get("false_positive_lesions", 0) for r in rows) / len(rows), 2)
    healthy = [r["predicted_ml"] for r in rows if r["true_ml"] == 0]
    out["healthy_ml"] = round(float(np.mean(healthy)), 2) if healthy else None
    ratios = [r["predicted_ml"] / r["true_ml"] for r in rows if r["true_ml"] > 0]
    out["worst_volume_ratio"] = round(float(max(ratios)), 2) if ratios else None
    times = [r["seconds"] for r in rows if "seconds" in r]
    out["seconds_per_case"] = round(float(np.mean(times)), 1) if times else None
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=4, help="cases per group")
    parser.add_argument("--groups", nargs="*", help="only these groups")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "generalisation_results.json")
    parser.add_argument("--mirror-tta", nargs="*", default=[], metavar="MODEL",
                        help="also score these models (names of WEIGHTS) with mirror test-time augmentation")
    parser.add_argument("--cascade", nargs="*", default=[], metavar="MODEL",
                        help="also score these models (labels of --model) behind the cascade: the default "
                             "automatic model picks the slices first (issue 22's Dice cost of --cascade)")
    parser.add_argument("--matched-expert", nargs="*", default=[], metavar="MODEL",
                        help="also score these MoME models (labels of --model) with each input's own modality "
                             "expert alone, the gate unused (issue 21: the modality experts against the mixture)")
    parser.add_argument("--model", action="append", default=[], metavar="LABEL=METHOD[:WEIGHTS[:MODALITIES]]",
                        help="also score this method (see the module docstring); repeatable")
    parser.add_argument("--no-unet2d", action="store_true", help="leave out the unet2d weights of WEIGHTS")
    args = parser.parse_args(argv)
    loaded = {} if args.no_unet2d else {name: load(path) for name, path in WEIGHTS.items() if path.exists()}
    given = {name: MODALITIES for name in loaded}  # the modalities each model is given
    for spec in args.model:
        label, _, rest = spec.partition("=")
        method_name, _, rest = rest.partition(":")
        weights, _, modalities = rest.partition(":")
        if not label or not method_name:
            parser.error(f"--model {spec!r}: give LABEL=METHOD[:WEIGHTS[:MODALITIES]]")
        loaded[label] = resolve_method(method_name, weights or None).eval()
        given[label] = tuple(modalities.split(",")) if modalities else MODALITIES
    for option, chosen in (("--mirror-tta", args.mirror_tta), ("--cascade", args.cascade),
                           ("--matched-expert", args.matched_expert)):
        if set(chosen) - set(loaded):
            parser.error(f"{option}: unknown model(s) {sorted(set(chosen) - set(loaded))}; "
                         f"available: {', '.join(loaded)}")
    # name -> (method, run options); a variant is the same network run through the engine's mirror TTA
    # or behind the cascade
    models = {name: (method, {}) for name, method in loaded.items()}
    models.update({f"{name} +TTA": (loaded[name], {"mirror_tta": True}) for name in args.mirror_tta})
    models.update({f"{name} +cascade": (loaded[name], {"cascade": True}) for name in args.cascade})
    for name in args.matched_expert:
        if "prediction" not in loaded[name].config:
            parser.error(f"--matched-expert: {name} is not a MoME model")
        ablation = type(loaded[name])(**{**loaded[name].config, "prediction": "matched_expert"})
        ablation.load_state_dict(loaded[name].state_dict())
        models[f"{name} expert"] = (ablation.eval(), {})
        given[f"{name} expert"] = given[name]
    results: dict = {"cases_per_group": args.cases, "groups": {}}
    for group, spec in groups().items():
        if args.groups and group not in args.groups:
            continue
        rows = {f"{name} {suffix}": [] for name in models for suffix in VARIANTS}
        for index in range(args.cases):
            start = time.perf_counter()
            images, labels, info = make_case(group, index, spec)
            truth = sitk.GetArrayFromImage(labels)
            spacing = labels.GetSpacing()[::-1]
            for name, (method, options) in models.items():
                box = ground_truth_box(truth) if method.facts.requires_box else None
                if method.facts.requires_box and box is None:
                    continue  # a healthy case: no box to draw, the box workflow does not apply
                shown = {m: images[m] for m in given[name.removesuffix(" +TTA").removesuffix(" +cascade")]}
                started = time.perf_counter()
                result = segment_images(shown, method, device="cpu", min_component_ml=0, min_component_confidence=0, box=box,
                                        return_probabilities=True, **options).result
                seconds = round(time.perf_counter() - started, 1)
                raw = sitk.GetArrayFromImage(result.labels)
                lesion_probability = 1.0 - sitk.GetArrayViewFromImage(result.probabilities)[..., 0]
                for suffix, prediction in variants(raw, lesion_probability, spacing).items():
                    rows[f"{name} {suffix}"].append({"case": index, **info, "seconds": seconds,
                                                     **score(prediction, truth, spacing, method.facts.label_set)})
            print(f"{group} case {index} ({info['kind']}) {time.perf_counter() - start:.0f} s: " + "  ".join(
                f"{name} WT {rows[name][-1].get('WT_dice', float('nan')):.2f}" for name in rows
                if rows[name] and rows[name][-1]["case"] == index and ("cc>=0ml" in name or "cc>=0.1ml" in name)),
                flush=True)
        results["groups"][group] = {name: {"summary": summarise(r), "rows": r} for name, r in rows.items()}
        args.out.write_text(json.dumps(results, indent=1), encoding="utf-8")  # a partial run keeps its groups
        for name in rows:
            print(f"  {group:18s} {name:28s} {json.dumps(results['groups'][group][name]['summary'])}", flush=True)
    results["breakdowns"] = {name: breakdowns(results, f"{name} cc>=0.1ml") for name in models}
    for name, tables in results["breakdowns"].items():
        for table, entries in tables.items():
            for key, summary in entries.items():
                print(f"  by {table:4s} {key:16s} {name:16s} {json.dumps(summary)}")
    args.out.write_text(json.dumps(results, indent=1), encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
