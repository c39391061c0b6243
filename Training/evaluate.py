"""``brainlesionsam-evaluate``: per-case metrics, paper-style tables and paired comparisons.

    brainlesionsam-evaluate score --pred predictions/ --gt BraTS2021/ --out eval/unet2d
    brainlesionsam-evaluate run --run runs/cmaa --split test --out eval/cmaa [--save-predictions]
    brainlesionsam-evaluate compare eval/cmaa/per_case.csv eval/unet2d/per_case.csv --out eval/cmaa_vs_unet2d

``score`` evaluates label maps already written (``brainlesionsam batch``) against ground truth with
``BrainLesionSAMLib.metrics.evaluate_folders``; ``run`` segments a trained run's split (test by
default) from its cache with the library's engine and its weights (``best``, else ``final``) and
scores every case with ``metrics.evaluate_labels``. Both write into ``--out``:

- ``per_case.csv``: one row per case (columns ``<structure>_<metric>``, as the library writes them),
  then a ``mean`` and an ``sd`` row (sample standard deviation);
- ``table.md`` / ``table.csv``: the paper-style table, one row per structure (WT, TC, ET, and NCR,
  ED for BraTS sub-regions; the lesion otherwise), Dice, IoU, precision, sensitivity and NSD in %,
  HD95 in mm, each as mean +- sd over the cases; when the per-case rows have them (``score``), the
  BraTS 2023 lesion-wise Dice (%) and HD95 (mm) of WT, TC, ET (or the lesion), mean +- sd, and the
  TP / FN / FP lesions summed over the cases;
- ``summary.json``: the same numbers, the number of cases, what was evaluated.

``compare`` pairs two ``per_case.csv`` files by case and gives, per column, both means, the mean
difference and the two-sided Wilcoxon signed-rank p-value (``scipy.stats.wilcoxon``) over the
cases both contain (``comparison.csv`` and ``comparison.md``). The metrics themselves are never
computed here: they all come from ``BrainLesionSAMLib.metrics``.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from BrainLesionSAMLib.errors import BrainLesionSAMError
from BrainLesionSAMLib.io import atomic_output
from BrainLesionSAMLib.lesion_metrics import LESION_STRUCTURES
from BrainLesionSAMLib.metrics import METRIC_NAMES, STRUCTURES

SUMMARY_ROWS = ("mean", "sd")
METRIC_TITLES = {"dice": "Dice (%)", "iou": "IoU (%)", "precision": "Precision (%)",
                 "sensitivity": "Sensitivity (%)", "hd95_mm": "HD95 (mm)", "nsd": "NSD (%)",
                 "lesion_dice": "Lesion-wise Dice (%)", "lesion_hd95_mm": "Lesion-wise HD95 (mm)"}
LESION_SCORES = ("lesion_dice", "lesion_hd95_mm")   # mean +- sd, like the metrics above
LESION_COUNTS = ("lesion_tp", "lesion_fn", "lesion_fp")  # summed over the cases


class EvaluationError(BrainLesionSAMError):
    """Results cannot be evaluated or compared (no common cases, unreadable CSV, ...)."""


# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------

def case_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [row for row in rows if row["case"] not in SUMMARY_ROWS]


def summary_rows(rows: list[dict[str, Any]], columns: Sequence[str]) -> list[dict[str, Any]]:
    """'mean' and 'sd' (n - 1; NaN for one case) rows over the case rows."""
    values = np.array([[float(row[c]) for c in columns] for row in rows], dtype=np.float64)
    mean = values.mean(axis=0)
    sd = values.std(axis=0, ddof=1) if len(rows) > 1 else np.full(len(columns), np.nan)
    return [{"case": "mean", **dict(zip(columns, mean.tolist()))}, {"case": "sd", **dict(zip(columns, sd.tolist()))}]


def label_set_of(columns: Sequence[str]) -> str:
    for label_set, structures in STRUCTURES.items():
        if all(f"{s}_dice" in columns for s in structures):
            return label_set
    raise EvaluationError(f"the columns {list(columns)[:6]}... are not BrainLesionSAM metric columns")


def has_lesion_wise(rows: list[dict[str, Any]], label_set: str) -> bool:
    """Whether the case rows carry the lesion-wise columns (``evaluate_folders`` writes them)."""
    return bool(rows) and all(f"{s}_lesion_dice" in rows[0] for s in LESION_STRUCTURES[label_set])


def paper_table(rows: list[dict[str, Any]], label_set: str) -> list[dict[str, Any]]:
    """One entry per structure: {'structure', 'n', '<metric>_mean', '<metric>_sd', ...}; overlap
    metrics and NSD in %, HD95 in mm; with lesion-wise columns, also 'lesion_dice_mean' (%),
    'lesion_hd95_mm_mean' (mm), their '_sd', and 'lesion_tp_total', 'lesion_fn_total', 'lesion_fp_total'
    for the structures scored lesion-wise."""
    cases = case_rows(rows)
    lesion_wise = has_lesion_wise(cases, label_set)
    table = []
    for structure in STRUCTURES[label_set]:
        entry: dict[str, Any] = {"structure": structure, "n": len(cases)}
        scored = lesion_wise and structure in LESION_STRUCTURES[label_set]
        for metric in METRIC_NAMES + (LESION_SCORES if scored else ()):
            values = np.array([float(row[f"{structure}_{metric}"]) for row in cases])
            scale = 1.0 if metric.endswith("hd95_mm") else 100.0
            entry[f"{metric}_mean"] = float(values.mean() * scale)
            entry[f"{metric}_sd"] = float(values.std(ddof=1) * scale) if len(values) > 1 else float("nan")
        for count in LESION_COUNTS if scored else ():
            entry[f"{count}_total"] = int(sum(float(row[f"{structure}_{count}"]) for row in cases))
        table.append(entry)
    return table


def _cell(mean: float, sd: float) -> str:
    return f"{mean:.2f}" if math.isnan(sd) else f"{mean:.2f} ± {sd:.2f}"


def table_markdown(table: list[dict[str, Any]], title: str = "") -> str:
    lesion_wise = any("lesion_dice_mean" in entry for entry in table)
    scores = METRIC_NAMES + (LESION_SCORES if lesion_wise else ())
    header = ["Region"] + [METRIC_TITLES[m] for m in scores] + (["Lesions TP / FN / FP"] if lesion_wise else [])
    lines = [f"**{title}** (n = {table[0]['n']} cases, mean ± sd)\n" if title else "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for entry in table:
        cells = [entry["structure"]] + [_cell(entry[f"{m}_mean"], entry[f"{m}_sd"]) if f"{m}_mean" in entry else "–"
                                        for m in scores]
        if lesion_wise:
            cells.append(" / ".join(str(entry[f"{c}_total"]) for c in LESION_COUNTS)
                         if "lesion_tp_total" in entry else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(line for line in lines if line) + "\n"


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------

def write_csv(path: Path, rows: list[dict[str, Any]], columns: Sequence[str]) -> Path:
    with atomic_output(path) as temporary:
        with open(temporary, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(columns))
            writer.writeheader()
            writer.writerows(rows)
    return path


def read_per_case(path: str | os.PathLike) -> tuple[list[dict[str, Any]], list[str]]:
    """Case rows (summary rows dropped) and metric columns of a per-case CSV."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            rows = list(reader)
            columns = [c for c in (reader.fieldnames or []) if c != "case"]
    except OSError as error:
        raise EvaluationError(f"cannot read {path}: {error}") from None
    if not rows or "case" not in rows[0]:
        raise EvaluationError(f"{path} is not a per-case metrics CSV (no 'case' column or no rows)")
    try:
        cases = [{"case": r["case"], **{c: float(r[c]) for c in columns}} for r in case_rows(rows)]
    except ValueError as error:
        raise EvaluationError(f"{path} has a non-numeric metric value: {error}") from None
    return cases, columns


def write_results(out: Path, rows: list[dict[str, Any]], label_set: str, description: dict[str, Any]) -> dict[str, Path]:
    """per_case.csv, table.md, table.csv and summary.json for case rows of one label set."""
    from BrainLesionSAMLib.metrics import result_columns

    out.mkdir(parents=True, exist_ok=True)
    cases = case_rows(rows)
    columns = result_columns(label_set, lesion_wise=has_lesion_wise(cases, label_set))
    if not cases:
        raise EvaluationError("no case was evaluated")
    table = paper_table(cases, label_set)
    paths = {
        "per_case": write_csv(out / "per_case.csv", cases + summary_rows(cases, columns), ["case", *columns]),
        "table_csv": write_csv(out / "table.csv", table, list(table[0])),
    }
    with atomic_output(out / "table.md") as temporary:
        temporary.write_text(table_markdown(table, description.get("title", "")), encoding="utf-8")
    paths["table_md"] = out / "table.md"
    with atomic_output(out / "summary.json") as temporary:
        temporary.write_text(json.dumps({**description, "cases": len(cases), "label_set": label_set, "table": table},
                                        indent=1, default=str) + "\n", encoding="utf-8")
    paths["summary"] = out / "summary.json"
    return paths


# ----------------------------------------------------------------------------------------------
# Comparison
# ----------------------------------------------------------------------------------------------

def wilcoxon_p(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired samples; 1.0 when every pair is equal."""
    from scipy.stats import wilcoxon

    differences = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    if np.all(differences == 0):
        return 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(wilcoxon(a, b, alternative="two-sided").pvalue)


def compare(path_a: str | os.PathLike, path_b: str | os.PathLike) -> list[dict[str, Any]]:
    """Per metric column: n, mean of A, mean of B, mean difference A - B and the Wilcoxon p-value,
    over the cases both files contain."""
    rows_a, columns_a = read_per_case(path_a)
    rows_b, columns_b = read_per_case(path_b)
    by_case_a = {r["case"]: r for r in rows_a}
    by_case_b = {r["case"]: r for r in rows_b}
    common = sorted(set(by_case_a) & set(by_case_b))
    if not common:
        raise EvaluationError(f"{path_a} and {path_b} have no case in common; compare runs on the same cases")
    only = sorted(set(by_case_a) ^ set(by_case_b))
    if only:
        warnings.warn(f"{len(only)} case(s) are in only one of the two files and are left out: "
                      f"{', '.join(only[:5])}", stacklevel=2)
    columns = [c for c in columns_a if c in columns_b]
    if not columns:
        raise EvaluationError(f"{path_a} and {path_b} share no metric column")
    results = []
    for column in columns:
        a = [by_case_a[c][column] for c in common]
        b = [by_case_b[c][column] for c in common]
        results.append({"column": column, "n": len(common), "mean_a": float(np.mean(a)), "mean_b": float(np.mean(b)),
                        "mean_difference": float(np.mean(a) - np.mean(b)), "wilcoxon_p": wilcoxon_p(a, b)})
    return results


def comparison_markdown(results: list[dict[str, Any]], name_a: str, name_b: str) -> str:
    lines = [f"| column | n | {name_a} | {name_b} | difference | Wilcoxon p |", "|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['column']} | {r['n']} | {r['mean_a']:.4f} | {r['mean_b']:.4f} | "
                     f"{r['mean_difference']:+.4f} | {r['wilcoxon_p']:.4g} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------

def evaluate_run(run_dir: str | os.PathLike, out: str | os.PathLike, split: str = "test", which: str = "best",
                 device: str = "auto", batch_size: int = 8, max_cases: int | None = None,
                 save_predictions: bool = False) -> dict[str, Path]:
    """Segment a run's ``split`` cases from its cache with its ``which`` weights and write the results."""
    from BrainLesionSAMLib.checkpoints import load_method

    from .datasets import read_splits, select_fold
    from .trainer import validate

    run_dir, out = Path(run_dir), Path(out)
    try:
        config = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        raise EvaluationError(f"{run_dir} is not a training run folder (no readable config.json)") from None
    weights = run_dir / f"{which}.safetensors"
    if which == "best" and not weights.is_file():
        weights = run_dir / "final.safetensors"
    if not weights.is_file():
        raise EvaluationError(f"{weights} does not exist; has the run finished? (or export its last checkpoint "
                              "with brainlesionsam-train --export RUN --which last and use score)")
    data = config["data"]
    splits = select_fold(read_splits(data["splits"]), data["fold"] if data["folds"] >= 2 else None)
    if split not in splits:
        raise EvaluationError(f"--split must be one of {', '.join(splits)}")
    case_ids = splits[split][: max_cases or None]
    if not case_ids:
        raise EvaluationError(f"the {split} set of {data['splits']} is empty")
    method = load_method(config["method"], weights)
    prediction_dir = out / "predictions" if save_predictions else None
    rows = validate(method, data["cache"], case_ids, device, batch_size=batch_size, prediction_dir=prediction_dir,
                    lesion_wise=True,
                    modalities=data.get("modalities"))
    description = {"title": f"{config['name']} ({method.facts.name}), {split} set",
                   "run": str(run_dir), "weights": str(weights), "split": split, "split_file": data["splits"]}
    return write_results(out, rows, method.facts.label_set, description)


def evaluate_predictions(pred: str | os.PathLike, gt: str | os.PathLike, out: str | os.PathLike,
                         label_set: str = "brats", nsd_tolerance_mm: float = 1.0) -> dict[str, Path]:
    from BrainLesionSAMLib.metrics import evaluate_folders

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = evaluate_folders(pred, gt, out / "per_case.csv", label_set=label_set, nsd_tolerance_mm=nsd_tolerance_mm)
    description = {"title": f"{Path(pred).name} vs {Path(gt).name}", "predictions": str(pred), "ground_truth": str(gt),
                   "nsd_tolerance_mm": nsd_tolerance_mm}
    return write_results(out, rows, label_set, description)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="brainlesionsam-evaluate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    score = commands.add_parser("score", help="evaluate written label maps against ground truth")
    score.add_argument("--pred", type=Path, required=True, help="folder of <case>.nii.gz predictions")
    score.add_argument("--gt", type=Path, required=True, help="dataset folder (<case>/<case>_seg.nii.gz) or flat label maps")
    score.add_argument("--label-set", default="brats", choices=sorted(STRUCTURES))
    score.add_argument("--nsd-tolerance", type=float, default=1.0, help="NSD tolerance in mm (default 1)")
    score.add_argument("--out", type=Path, required=True, help="output folder")
    run = commands.add_parser("run", help="segment and evaluate a trained run's split")
    run.add_argument("--run", type=Path, required=True, help="run folder (output.dir of the training)")
    run.add_argument("--split", default="test", choices=("train", "validation", "test"))
    run.add_argument("--which", default="best", choices=("best", "final"))
    run.add_argument("--device", default="auto")
    run.add_argument("--batch-size", type=int, default=8)
    run.add_argument("--max-cases", type=int, default=None)
    run.add_argument("--save-predictions", action="store_true", help="also write <out>/predictions/<case>.nii.gz")
    run.add_argument("--out", type=Path, required=True, help="output folder")
    comparison = commands.add_parser("compare", help="Wilcoxon signed-rank test between two per-case CSVs")
    comparison.add_argument("a", type=Path)
    comparison.add_argument("b", type=Path)
    comparison.add_argument("--names", nargs=2, default=None, metavar=("A", "B"))
    comparison.add_argument("--out", type=Path, required=True, help="output folder")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "score":
            paths = evaluate_predictions(args.pred, args.gt, args.out, args.label_set, args.nsd_tolerance)
        elif args.command == "run":
            paths = evaluate_run(args.run, args.out, args.split, args.which, args.device, args.batch_size,
                                 args.max_cases, args.save_predictions)
        else:
            names = args.names or [args.a.parent.name or "A", args.b.parent.name or "B"]
            results = compare(args.a, args.b)
            args.out.mkdir(parents=True, exist_ok=True)
            paths = {"comparison": write_csv(args.out / "comparison.csv", results, list(results[0]))}
            with atomic_output(args.out / "comparison.md") as temporary:
                temporary.write_text(comparison_markdown(results, *names), encoding="utf-8")
            paths["comparison_md"] = args.out / "comparison.md"
            primary = [r for r in results if r["column"].endswith("_dice")]
            print(comparison_markdown(primary, *names), end="")
        if "table_md" in paths:
            print(paths["table_md"].read_text(encoding="utf-8"), end="")
        for path in paths.values():
            print(f"wrote {path}")
        return 0
    except BrainLesionSAMError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def entry_point() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry_point()
