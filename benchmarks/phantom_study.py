"""The phantom study (issue 10): every method and the ``unet2d`` baseline trained with the same budget on
generated cases and tested on a disjoint generated set, plus the papers' modality and module
ablations, tabulated in ``docs/phantom_study.md``.

    python benchmarks/phantom_study.py --device cuda                       # the real study (a GPU)
    python benchmarks/phantom_study.py --dry-run                          # print the commands
    python benchmarks/phantom_study.py --only-report [--cost-from DIR]    # rebuild the page

What produced the committed page (2 CPU cores, no GPU): the cost per step of every method, measured
in a 2 mm study folder, and the unet2d runs at 1 mm:

    python benchmarks/phantom_study.py --measure-cost --measure-steps 3 --measure-batch 1 \\
        --budget-steps 500 --batch-size 8 --train-cases 12 --test-cases 8 --resolution 2 \\
        --device cpu --threads 1 --out runs/phantom_study_2mm
    python benchmarks/phantom_study.py --methods unet2d --tables main unet2d_modalities \\
        --budget-steps 600 --batch-size 8 --train-cases 12 --test-cases 8 --resolution 1 \\
        --device cpu --threads 1 --stop-after 30
    python benchmarks/phantom_study.py --only-report --cost-from runs/phantom_study_2mm

Everything goes through the training package, unchanged: ``python -m Training.train --config <paper
config> section.key=value ...`` trains one run folder per (method, variant), then ``python -m
Training.evaluate run --run RUN --split test --which final`` scores its test cases with the library's
metrics (Dice, HD95, NSD per WT/TC/ET, NCR/ED), and the page is written from the ``summary.json``
files. What is trained is declared in ``benchmarks/phantom_study/study.json``: one main run per method
(its packaged paper config, LiteMedSAM's TinyViT as the backbone where the paper's ViT-B needs SAM
weights that do not ship), the ablation variants (``data.modalities``, ``method_config`` switches),
and one table per paper table, with the rows that no existing config can express and why.

Data (all under ``--out``, default ``runs/phantom_study``):

- ``cases/``: ``BrainLesionSAMLib.sample.generate_cases`` with base seed ``--train-seed`` (20000) for
  the training cases and ``--test-seed`` (30000) for the test cases; the per-case seeds derived from
  them (``sample.case_seed``) are checked to be >= ``sample.STUDY_SEEDS_FROM`` (20000; the demo and
  the tests use smaller seeds) and disjoint between the two sets.
- ``splits.json``: our own case-level split, train = the training seed's cases, test = the test
  seed's, validation empty. (The trainer's own ``data.sample_cases`` generates one seed's cases and
  splits them 70/10/20, so its test cases would come from the training seed; a disjoint generated
  test set needs its own seed, hence ``data.root`` + ``data.splits``.) Without validation cases the
  trainer selects nothing: every run is scored with its final weights after exactly the budget.
- ``cache/``: the trainer's preprocessed cache (shared by every run).
- ``runs/<variant>/`` (trainer), ``eval/<variant>/`` (evaluation), ``timing/<variant>.json`` (wall
  and CPU seconds of every subprocess, device, threads, load), ``logs/<variant>.*.log``,
  ``cost/<method>/cost.json`` (``--measure-cost``), ``study.json`` (the settings: a folder made with
  other cases, seeds or budget is refused, never overwritten; a run folder is resumed or refused
  by the trainer itself).

Budget: ``--budget-steps`` optimiser steps of ``--batch-size`` samples for every run (each config's
own optimiser and schedule, spread over those steps). Where a method cannot hold the whole batch in
GPU memory (``max_micro_batch`` in study.json) the batch is split into micro-batches with gradient
accumulation, so the samples per step stay the same. MoME's samples are 3D patches, the others'
2D slices.

``--measure-cost`` trains every selected method for ``--measure-steps`` steps of a micro-batch
(``--measure-batch``) and times one inference batch through the library's engine; the page turns
those figures into the time each run not done would need.

Figures: see ``docs/phantom_study.md`` (written by this script, with the machine, load and budget).
One more, from the 2 mm folder (2026-11-22): unet2d with its config, 500 steps of 8 on 12 cases at
2 mm, predicted background everywhere (Dice 0 on all 8 test cases), a property of the recipe at
2 mm, not of the trainer (docs/decisions.md, "The baseline weights"); at 1 mm the same config
reaches test WT/TC/ET Dice 98/98/97 % with 1600 steps. At 2 mm a lesion also covers a quarter of
the pixels of the 256 x 256 canvas: the SAM-based methods, built for ~240-pixel slices, would be
measured under a handicap there too, hence 1 mm for the study.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
STUDY_FILE = Path(__file__).resolve().parent / "phantom_study" / "study.json"
DEFAULT_PAGE = REPO / "docs" / "phantom_study.md"
# The real study: sized for one GPU (about a day for every run of study.json on an H100-class card).
DEFAULTS = {"budget_steps": 2000, "batch_size": 8, "train_cases": 32, "test_cases": 16, "resolution": 1,
            "train_seed": 20000, "test_seed": 30000}
# What makes two studies different: a folder made with other values is refused.
MANIFEST_KEYS = tuple(DEFAULTS)
METRIC_TITLES = {"dice": "Dice", "iou": "IoU", "precision": "Prec", "sensitivity": "Sens",
                 "hd95_mm": "HD95 (mm)", "nsd": "NSD"}


class StudyError(Exception):
    """The study cannot go on (another study's folder, a seed clash, a missing result); exits 1."""


# ----------------------------------------------------------------------------------------------
# The study's declaration and settings
# ----------------------------------------------------------------------------------------------

def load_study(path: Path = STUDY_FILE) -> dict[str, Any]:
    study = json.loads(path.read_text(encoding="utf-8"))
    for variant, spec in study["variants"].items():
        if spec["method"] not in study["methods"]:
            raise StudyError(f"{path}: variant {variant} names unknown method {spec['method']}")
    known = set(study["methods"]) | set(study["variants"])
    for table in study["tables"]:
        for row in table["rows"]:
            if "variant" in row and row["variant"] not in known:
                raise StudyError(f"{path}: table {table['id']} names unknown variant {row['variant']}")
    return study


def variant_method(study: dict[str, Any], variant: str) -> str:
    return variant if variant in study["methods"] else study["variants"][variant]["method"]


def selected_variants(study: dict[str, Any], methods: list[str], tables: list[str]) -> list[str]:
    """Main runs first (cheap methods first as study.json lists them), then each table's variants."""
    chosen: list[str] = []
    if "main" in tables:
        chosen += [m for m in study["methods"] if m in methods]
    for table in study["tables"]:
        if table["id"] not in tables:
            continue
        for row in table["rows"]:
            variant = row.get("variant")
            if variant and variant_method(study, variant) in methods and variant not in chosen:
                chosen.append(variant)
    return chosen


def micro_batches(batch_size: int, max_micro: int | None) -> tuple[int, int]:
    """(micro-batch, accumulation steps) with micro x accumulation = batch_size, micro <= max_micro."""
    if not max_micro or batch_size <= max_micro:
        return batch_size, 1
    micro = max(d for d in range(1, max_micro + 1) if batch_size % d == 0)
    return micro, batch_size // micro


def resolved_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# ----------------------------------------------------------------------------------------------
# The study folder: manifest, cases, split
# ----------------------------------------------------------------------------------------------

def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def write_json(path: Path, value: Any) -> None:
    from BrainLesionSAMLib.io import atomic_output

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as temporary:
        temporary.write_text(json.dumps(value, indent=1) + "\n", encoding="utf-8")


def check_manifest(out: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The folder's manifest when it fits ``settings``, None for a new folder; refuses anything else."""
    manifest_path = out / "study.json"
    if manifest_path.is_file():
        manifest = read_json(manifest_path)
        differing = {k: (manifest.get(k), settings[k]) for k in MANIFEST_KEYS if manifest.get(k) != settings[k]}
        if differing:
            details = ", ".join(f"{k}: folder {a!r}, asked {b!r}" for k, (a, b) in differing.items())
            raise StudyError(f"{out} holds a phantom study with other settings ({details}); use the same "
                             "settings to resume it, or another --out")
        return manifest
    if out.exists() and any(out.iterdir()):
        raise StudyError(f"{out} exists and is not a phantom-study folder (no study.json); choose another --out")
    return None


def case_ids(seed: int, n: int) -> list[str]:
    return [f"BLSAM_{seed:04d}_{i:03d}" for i in range(n)]


def check_case_seeds(settings: dict[str, Any]) -> dict[str, list[int]]:
    """The per-case seeds of both sets; refuses reserved or shared ones."""
    from BrainLesionSAMLib.sample import STUDY_SEEDS_FROM, case_seed

    seeds = {name: [case_seed(settings[f"{name}_seed"], i) for i in range(settings[f"{name}_cases"])]
             for name in ("train", "test")}
    for name in ("train", "test"):
        if settings[f"{name}_seed"] < STUDY_SEEDS_FROM:
            raise StudyError(f"--{name}-seed must be >= {STUDY_SEEDS_FROM} (smaller seeds belong to the demo "
                             "and the tests)")
        low = [s for s in seeds[name] if s < STUDY_SEEDS_FROM]
        if low:
            raise StudyError(f"the {name} cases' derived seeds include {low} < {STUDY_SEEDS_FROM}; choose another seed")
    shared = set(seeds["train"]) & set(seeds["test"])
    if settings["train_seed"] == settings["test_seed"] or shared:
        raise StudyError(f"training and test cases share seeds ({sorted(shared) or settings['train_seed']}); "
                         "choose different --train-seed and --test-seed")
    return seeds


def generate_missing_cases(root: Path, seed: int, n: int, resolution: int) -> None:
    from BrainLesionSAMLib.sample import generate_cases

    if all((root / c).is_dir() for c in case_ids(seed, n)):
        return
    print(f"generating {n} case(s) with seed {seed} at {resolution} mm into {root}", flush=True)
    root.mkdir(parents=True, exist_ok=True)
    # Cases are deterministic in (seed, index, resolution): regenerating a partial set rewrites the same data.
    generate_cases(root, n, seed=seed, resolution=resolution, overwrite=True)


def prepare_study(out: Path, settings: dict[str, Any]) -> None:
    """Cases and the split file (the trainer's first run fills the cache)."""
    from Training.datasets import write_splits

    seeds = check_case_seeds(settings)
    root = out / "cases"
    generate_missing_cases(root, settings["train_seed"], settings["train_cases"], settings["resolution"])
    generate_missing_cases(root, settings["test_seed"], settings["test_cases"], settings["resolution"])
    train = case_ids(settings["train_seed"], settings["train_cases"])
    test = case_ids(settings["test_seed"], settings["test_cases"])
    splits_path = out / "splits.json"
    if not splits_path.is_file():
        write_splits({"about": "phantom study: training cases from one seed, test cases from another, no validation",
                      "seed": None, "fractions": None, "folds": 0,
                      "patients": {c: c for c in train + test},
                      "case_seeds": dict(zip(train + test, seeds["train"] + seeds["test"])),
                      "train": train, "validation": [], "test": test}, splits_path)


# ----------------------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------------------

def override_args(overrides: dict[str, Any]) -> list[str]:
    return [f"{key}={json.dumps(value)}" for key, value in overrides.items()]


def method_overrides(study: dict[str, Any], method: str, resolution: int) -> dict[str, Any]:
    spec = study["methods"][method]
    return {**spec.get("overrides", {}), **spec.get("overrides_by_resolution", {}).get(str(resolution), {})}


def train_command(study: dict[str, Any], variant: str, settings: dict[str, Any], out: Path, run_dir: Path,
                  steps: int, micro: int, accumulation: int, log_every: int, checkpoint_every: int) -> list[str]:
    method = variant_method(study, variant)
    overrides = method_overrides(study, method, settings["resolution"])
    if variant != method:
        overrides.update(study["variants"][variant]["overrides"])
    overrides.update({
        "data.root": str(out / "cases"), "data.cache": str(out / "cache"), "data.splits": str(out / "splits.json"),
        "train.max_steps": steps, "train.batch_size": micro, "train.accumulation_steps": accumulation,
        "train.device": settings["device"], "train.num_workers": settings["workers"],
        "train.log_every_steps": log_every, "train.checkpoint_every_steps": checkpoint_every,
        "train.keep_checkpoints": 1, "train.save_final_state": False,
        "validation.every_epochs": 0, "output.dir": str(run_dir),
    })
    if settings["threads"]:
        overrides["train.threads"] = settings["threads"]
    return [sys.executable, "-m", "Training.train", "--config", study["methods"][method]["config"],
            *override_args(overrides)]


def evaluate_command(run_dir: Path, eval_dir: Path, device: str) -> list[str]:
    return [sys.executable, "-m", "Training.evaluate", "run", "--run", str(run_dir), "--split", "test",
            "--which", "final", "--device", device, "--out", str(eval_dir)]


def subprocess_environment(threads: int | None) -> dict[str, str]:
    env = dict(os.environ)
    if threads:
        # Training.evaluate has no --threads: the thread pools read these at start-up.
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            env[name] = str(threads)
    return env


def run_timed(command: list[str], log_path: Path, threads: int | None) -> dict[str, Any]:
    """Run ``command`` with its output in ``log_path``; wall and CPU seconds (the child's user + system)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"$ {shlex.join(command)}\n")
        log.flush()
        returncode = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                    env=subprocess_environment(threads)).returncode
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"returncode": returncode, "wall_s": round(time.perf_counter() - started, 1),
            "cpu_s": round((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), 1),
            "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2),
            "started": datetime.datetime.now().isoformat(timespec="seconds")}


def tail(path: Path, lines: int = 8) -> str:
    return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


# ----------------------------------------------------------------------------------------------
# Running the variants
# ----------------------------------------------------------------------------------------------

def training_finished(run_dir: Path, steps: int) -> bool:
    run_json = run_dir / "run.json"
    return run_json.is_file() and read_json(run_json).get("steps") == steps and (run_dir / "final.safetensors").is_file()


def evaluation_finished(run_dir: Path, eval_dir: Path) -> bool:
    summary, weights = eval_dir / "summary.json", run_dir / "final.safetensors"
    return summary.is_file() and weights.is_file() and summary.stat().st_mtime >= weights.stat().st_mtime


def record_timing(out: Path, variant: str, stage: str, timing: dict[str, Any], settings: dict[str, Any]) -> None:
    path = out / "timing" / f"{variant}.json"
    entries = read_json(path) if path.is_file() else []
    entries.append({"stage": stage, "device": settings["device"], "threads": settings["threads"], **timing})
    write_json(path, entries)


def run_variant(study: dict[str, Any], variant: str, settings: dict[str, Any], out: Path, dry_run: bool) -> bool:
    """Train (or resume) and evaluate one variant; False when a step failed."""
    method = variant_method(study, variant)
    steps = settings["budget_steps"]
    micro, accumulation = micro_batches(settings["batch_size"], study["methods"][method].get("max_micro_batch"))
    run_dir, eval_dir = out / "runs" / variant, out / "eval" / variant
    checkpoint_every = max(1, min(500, steps // 4))
    log_every = max(1, min(20, steps // 10))
    stages = [("train", train_command(study, variant, settings, out, run_dir, steps, micro, accumulation,
                                      log_every, checkpoint_every), lambda: training_finished(run_dir, steps)),
              ("evaluate", evaluate_command(run_dir, eval_dir, settings["device"]),
               lambda: evaluation_finished(run_dir, eval_dir))]
    for stage, command, finished in stages:
        if dry_run:
            print(shlex.join(command))
            continue
        if finished():
            print(f"{variant}: {stage} done already", flush=True)
            continue
        log_path = out / "logs" / f"{variant}.{stage}.log"
        what = f"{steps} steps of {micro} x {accumulation}" if stage == "train" else "test set"
        print(f"{variant}: {stage} ({what}) ... log {log_path}", flush=True)
        timing = run_timed(command, log_path, settings["threads"])
        record_timing(out, variant, stage, timing, settings)
        print(f"{variant}: {stage} exit {timing['returncode']}, {timing['wall_s']} s wall, {timing['cpu_s']} CPU-s, "
              f"load {timing['load_before']} -> {timing['load_after']}", flush=True)
        if timing["returncode"] != 0:
            print(tail(log_path), file=sys.stderr, flush=True)
            return False
    return True


# ----------------------------------------------------------------------------------------------
# Cost per step and per slice
# ----------------------------------------------------------------------------------------------

def seconds_per_step(metrics_csv: Path) -> list[float]:
    import csv

    with open(metrics_csv, newline="", encoding="utf-8") as handle:
        return [float(row["value"]) for row in csv.DictReader(handle) if row["name"] == "train/seconds_per_step"]


def test_case_work(cache: Path, test_ids: list[str], method, modalities: list[str] | None) -> list[int]:
    """Per test case, what the engine runs: brain slices (promptable: within the ground-truth box's
    slices) for 2D methods, 1 (the whole volume) for 3D ones."""
    from Training.cache import CachedCase
    from Training.trainer import ground_truth_box

    facts = method.facts
    work = []
    for case_id in test_ids:
        if facts.spatial_dims == 3:
            work.append(1)
            continue
        cached = CachedCase.open(cache, case_id)
        prepared = cached.prepared_case([m for m in facts.modalities if m in (modalities or facts.modalities)])
        slices = prepared.brain_slices()
        if facts.promptable:
            box = ground_truth_box(cached.labels)
            slices = slices[(slices >= box.z0) & (slices <= box.z1)]
        work.append(len(slices))
        cached.close()
    return work


def time_inference(run_dir: Path, cache: Path, test_ids: list[str], device: str, slices: int) -> dict[str, Any]:
    """Seconds per slice (2D) or per case (3D) of the library's engine on the first test case, after a
    one-slice warm-up; the run's final weights."""
    import torch

    from BrainLesionSAMLib.checkpoints import load_method
    from BrainLesionSAMLib.engine import Box, InferenceEngine
    from Training.cache import CachedCase
    from Training.trainer import ground_truth_box

    config = read_json(run_dir / "config.json")
    method = load_method(config["method"], run_dir / "final.safetensors")
    modalities = config["data"]["modalities"]
    facts = method.facts
    cached = CachedCase.open(cache, test_ids[0])
    prepared = cached.prepared_case([m for m in facts.modalities if m in (modalities or facts.modalities)])
    truth = ground_truth_box(cached.labels)
    engine = InferenceEngine(method, device=device, batch_size=slices)
    middle = (truth.z0 + truth.z1) // 2

    def segment(z0: int, z1: int) -> tuple[float, float]:
        start_cpu = time.process_time()
        result = engine.segment(prepared, box=Box(truth.x0, truth.y0, z0, truth.x1, truth.y1, z1))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return result.timings["network_s"], time.process_time() - start_cpu

    if facts.spatial_dims == 3:  # sliding window over the whole volume; the box only masks the output
        wall, cpu = segment(truth.z0, truth.z1)
        unit, count = "case", 1
    else:
        segment(middle, middle)
        last = min(middle + slices - 1, prepared.shape_zyx[0] - 1)
        wall, cpu = segment(middle, last)
        unit, count = "slice", last - middle + 1
    work = test_case_work(cache, test_ids, method, modalities)
    return {"inference_unit": unit, "inference_s": round(wall / count, 3), "inference_cpu_s": round(cpu / count, 3),
            "inference_units_per_test_case": round(statistics.mean(work), 1)}


def measure_cost(study: dict[str, Any], method: str, settings: dict[str, Any], out: Path, steps: int,
                 batch: int, dry_run: bool) -> dict[str, Any] | None:
    folder = out / "cost" / method
    cost_path = folder / "cost.json"
    if cost_path.is_file():
        print(f"{method}: cost measured already ({cost_path})", flush=True)
        return read_json(cost_path)
    micro, _ = micro_batches(batch, study["methods"][method].get("max_micro_batch"))
    command = train_command(study, method, settings, out, folder / "run", steps, micro, 1, 1, steps)
    if dry_run:
        print(shlex.join(command))
        return None
    print(f"{method}: measuring {steps} training steps of batch {micro}", flush=True)
    timing = run_timed(command, folder / "train.log", settings["threads"])
    if timing["returncode"] != 0:
        print(tail(folder / "train.log"), file=sys.stderr, flush=True)
        raise StudyError(f"{method}: the cost run failed (log {folder / 'train.log'})")
    per_step = seconds_per_step(folder / "run" / "metrics.csv")
    steady = per_step[1:] or per_step  # the first step pays for lazy initialisation
    import torch

    if settings["threads"]:
        torch.set_num_threads(settings["threads"])
    load_before = os.getloadavg()[0]
    inference = time_inference(folder / "run", out / "cache", case_ids(settings["test_seed"], settings["test_cases"]),
                               settings["device"], micro)
    cost = {"method": method, "device": settings["device"], "threads": settings["threads"], "micro_batch": micro,
            "steps": steps, "resolution": settings["resolution"], "seconds_per_step": per_step, "s_per_step": round(statistics.median(steady), 3),
            "s_per_sample": round(statistics.median(steady) / micro, 3), "train_run": timing,
            **inference, "inference_load": [round(load_before, 2), round(os.getloadavg()[0], 2)],
            "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "measured": datetime.datetime.now().isoformat(timespec="seconds")}
    write_json(cost_path, cost)
    print(f"{method}: {cost['s_per_step']} s/step at batch {micro} ({cost['s_per_sample']} s/sample), inference "
          f"{cost['inference_s']} s/{cost['inference_unit']}, {cost['inference_units_per_test_case']} "
          f"{cost['inference_unit']}(s) per test case; load {timing['load_before']}-{timing['load_after']}", flush=True)
    return cost


def estimated_seconds(cost: dict[str, Any], settings: dict[str, Any], units_per_case: float | None
                      ) -> tuple[float | None, float | None]:
    """(training, evaluation) seconds of one run at ``settings``' budget on the cost run's device and
    threads. 2D figures are per 256 x 256 slice at any resolution; ``units_per_case`` is the slices per
    test case of this study. A 3D method's patch (study.json) and volume change with the resolution,
    so its figures hold only at the resolution they were measured at (None elsewhere)."""
    train = cost["s_per_sample"] * settings["budget_steps"] * settings["batch_size"]
    if cost["inference_unit"] == "case":
        if cost.get("resolution") != settings["resolution"]:
            return None, None
        return train, cost["inference_s"] * settings["test_cases"]
    return train, cost["inference_s"] * (units_per_case or cost["inference_units_per_test_case"]) * settings["test_cases"]


def work_per_test_case(cache: Path, test_ids: list[str]) -> dict[str, float]:
    """Mean slices per test case that the engine runs: every brain slice ('brain') and, for promptable
    methods, the brain slices inside the ground-truth box ('box')."""
    from Training.cache import CachedCase
    from Training.trainer import ground_truth_box

    brain, box = [], []
    for case_id in test_ids:
        cached = CachedCase.open(cache, case_id)
        slices = cached.prepared_case().brain_slices()
        truth = ground_truth_box(cached.labels)
        brain.append(len(slices))
        box.append(int(((slices >= truth.z0) & (slices <= truth.z1)).sum()))
        cached.close()
    return {"brain": statistics.mean(brain), "box": statistics.mean(box)}


def unit_kind(method: str) -> str:
    """'case' for 3D methods, 'box' for promptable 2D ones (the box workflow), else 'brain'."""
    from BrainLesionSAMLib.methods import get_method_class

    facts = get_method_class(method).facts
    return "case" if facts.spatial_dims == 3 else ("box" if facts.promptable else "brain")


# ----------------------------------------------------------------------------------------------
# The page
# ----------------------------------------------------------------------------------------------

def hours(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.0f} min" if seconds >= 60 else f"{seconds:.0f} s"
    return f"{seconds / 3600:.1f} h" if seconds < 100 * 3600 else f"{seconds / 86400:.0f} days"


def hours_or_unknown(seconds: float | None) -> str:
    return "?" if seconds is None else hours(seconds)


def cell(mean: float, sd: float, scale: float = 1.0) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "n/a"
    mean *= scale
    return f"{mean:.1f}" if sd is None or math.isnan(sd) else f"{mean:.1f} ± {sd * scale:.1f}"


class Results:
    """What the study folder holds: evaluation summaries, timings, cost measurements, failures."""

    def __init__(self, study: dict[str, Any], out: Path):
        self.study, self.out = study, out
        self.manifest = read_json(out / "study.json")
        self.settings = {k: self.manifest[k] for k in MANIFEST_KEYS}
        self.cost_from = Path(self.manifest["cost_from"]) if self.manifest.get("cost_from") else None
        self._work: dict[str, float] | None = None

    def work(self, method: str) -> float | None:
        """Slices per test case of this study for ``method`` (None for 3D methods); computed once
        from the cache and kept in ``work_per_test_case.json``."""
        kind = unit_kind(method)
        if kind == "case":
            return None
        if self._work is None:
            path = self.out / "work_per_test_case.json"
            if not path.is_file():
                test_ids = case_ids(self.settings["test_seed"], self.settings["test_cases"])
                write_json(path, work_per_test_case(self.out / "cache", test_ids))
            self._work = read_json(path)
        return self._work[kind]

    def summary(self, variant: str) -> dict[str, Any] | None:
        path = self.out / "eval" / variant / "summary.json"
        return read_json(path) if path.is_file() else None

    def timing(self, variant: str) -> list[dict[str, Any]]:
        path = self.out / "timing" / f"{variant}.json"
        return read_json(path) if path.is_file() else []

    def cost(self, method: str) -> dict[str, Any] | None:
        """This folder's cost measurement of ``method``, else the one in the manifest's ``cost_from``."""
        for folder in (self.out, self.cost_from):
            if folder is not None and (folder / "cost" / method / "cost.json").is_file():
                return read_json(folder / "cost" / method / "cost.json")
        return None

    def metric(self, variant: str, structure: str, metric: str) -> str:
        summary = self.summary(variant)
        if summary is None:
            return ""
        if summary["label_set"] == "lesion":
            if structure != "WT":
                return "—"
            structure = "lesion"
        entry = next((e for e in summary["table"] if e["structure"] == structure), None)
        if entry is None:
            return "—"
        return cell(entry[f"{metric}_mean"], entry[f"{metric}_sd"])

    def state(self, variant: str) -> str:
        """'' when evaluated, else why not: failed, incomplete, or not run with the estimated time."""
        if self.summary(variant) is not None:
            return ""
        timings = self.timing(variant)
        if timings and timings[-1]["returncode"] != 0:
            return f"failed ({timings[-1]['stage']}; logs/{variant}.{timings[-1]['stage']}.log)"
        run_json = self.out / "runs" / variant / "run.json"
        if timings:
            return "incomplete (stopped before the end)" if not run_json.is_file() else "trained, not evaluated"
        return "not run" + self.estimate(variant_method(self.study, variant))

    def estimate(self, method: str) -> str:
        cost = self.cost(method)
        if cost is None:
            return ""
        train, evaluate = estimated_seconds(cost, self.settings, self.work(method))
        where = f"{cost['device']}, {cost['threads'] or 'default'} thread(s)"
        if train is None:
            return f"; not estimated (3D: its cost was measured at {cost.get('resolution', '?')} mm)"
        return f"; est. {hours(train)} training + {hours_or_unknown(evaluate)} evaluation ({where})"

    def run_time(self, variant: str) -> dict[str, float]:
        total: dict[str, float] = {}
        for entry in self.timing(variant):
            if entry["returncode"] == 0:
                for key in ("wall_s", "cpu_s"):
                    total[f"{entry['stage']}_{key}"] = total.get(f"{entry['stage']}_{key}", 0.0) + entry[key]
        return total


def setup_lines(results: Results) -> list[str]:
    from BrainLesionSAMLib.sample import STUDY_SEEDS_FROM

    s, manifest = results.settings, results.manifest
    samples = s["budget_steps"] * s["batch_size"]
    lines = [
        f"- **Cases**: generated phantoms (`BrainLesionSAMLib.sample`), {s['resolution']} mm grid; "
        f"{s['train_cases']} training cases (base seed {s['train_seed']}), {s['test_cases']} test cases "
        f"(base seed {s['test_seed']}); per-case seeds all >= {STUDY_SEEDS_FROM} and disjoint. No validation "
        "set: every run is scored with its final weights.",
        f"- **Budget (used here)**: {s['budget_steps']} optimiser steps x {s['batch_size']} samples = {samples} "
        "samples per run (2D slices; MoME: 3D patches), each paper config's optimiser and schedule spread over "
        "those steps; micro-batches with gradient accumulation where study.json caps the batch.",
        f"- **The real study** (defaults, for a GPU): `python benchmarks/phantom_study.py --device cuda`: "
        f"{DEFAULTS['budget_steps']} steps x {DEFAULTS['batch_size']} samples, {DEFAULTS['train_cases']} training "
        f"and {DEFAULTS['test_cases']} test cases at {DEFAULTS['resolution']} mm, every table.",
        f"- **Machine**: {manifest.get('machine', '?')}.",
        "- **Commands that made this folder**:",
    ]
    lines += [f"  `{command}`" for command in manifest.get("invocations", [])]
    if results.cost_from is not None and (results.cost_from / "study.json").is_file():
        other = read_json(results.cost_from / "study.json")
        lines.append(f"- **Cost figures** where this folder has none: from `{results.cost_from.name}` "
                     f"({other['resolution']} mm cases), made by:")
        lines += [f"  `{command}`" for command in other.get("invocations", [])]
    return lines


def cost_table(results: Results) -> list[str]:
    study, s = results.study, results.settings
    default_samples = DEFAULTS["budget_steps"] * DEFAULTS["batch_size"]
    rows = ["| method | measured on | micro-batch | s / step | s / sample | inference | units per test case | "
            f"one run at this budget ({s['budget_steps']} x {s['batch_size']}) | one run at the default budget "
            f"({DEFAULTS['budget_steps']} x {DEFAULTS['batch_size']}, training only) | load |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for method in study["methods"]:
        cost = results.cost(method)
        if cost is None:
            rows.append(f"| {method} | not measured | | | | | | | | |")
            continue
        units = results.work(method)
        train, evaluate = estimated_seconds(cost, s, units)
        run = cost["train_run"]
        rows.append(
            f"| {method} | {cost['device']}, {cost['threads'] or 'default'} thread(s), {cost['steps']} steps, "
            f"{cost.get('resolution', '?')} mm cases | {cost['micro_batch']} | {cost['s_per_step']:.2f} | "
            f"{cost['s_per_sample']:.2f} | {cost['inference_s']:.2f} s / {cost['inference_unit']} | "
            f"{units if units is not None else 1:g} | {hours_or_unknown(train)} + {hours_or_unknown(evaluate)} | "
            f"{hours(cost['s_per_sample'] * default_samples)} | {run['load_before']}-{run['load_after']} |")
    return rows


def main_table(results: Results) -> list[str]:
    study = results.study
    structures = ("WT", "TC", "ET")
    header = (["method", "n"] + [f"{r} Dice" for r in structures] + [f"{r} HD95 (mm)" for r in structures]
              + [f"{r} NSD" for r in structures])
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, spec in study["methods"].items():
        state = results.state(method)
        if state:
            rows.append(f"| {spec['title']} | — | {state} |" + " |" * (len(header) - 3))
            continue
        n = results.summary(method)["cases"]
        cells = [results.metric(method, r, m) for m in ("dice", "hd95_mm", "nsd") for r in structures]
        rows.append(f"| {spec['title']} | {n} | " + " | ".join(cells) + " |")
    return rows


def time_table(results: Results) -> list[str]:
    rows = ["| variant | device, threads | training wall | training CPU | evaluation wall | evaluation CPU | load |",
            "|---|---|---|---|---|---|---|"]
    for variant in list(results.study["methods"]) + list(results.study["variants"]):
        timings = [t for t in results.timing(variant) if t["returncode"] == 0]
        if not timings:
            continue
        total = results.run_time(variant)
        loads = [t["load_before"] for t in timings] + [t["load_after"] for t in timings]
        rows.append(f"| {variant} | {timings[-1]['device']}, {timings[-1]['threads'] or 'default'} | "
                    f"{hours(total.get('train_wall_s', 0))} | {total.get('train_cpu_s', 0):.0f} s | "
                    f"{hours(total.get('evaluate_wall_s', 0))} | {total.get('evaluate_cpu_s', 0):.0f} s | "
                    f"{min(loads):.1f}-{max(loads):.1f} |")
    return rows


def ablation_table(results: Results, table: dict[str, Any]) -> list[str]:
    columns = [f"{structure} {METRIC_TITLES[metric]}" for structure, metric in table["columns"]]
    paper = [f"paper {c}" for c in table["paper_columns"]]
    header = ["row", "n"] + columns + paper
    lines = [f"### {table['title']}", "", f"Paper: {table['paper']}. {table['about']}", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table["rows"]:
        quoted = ["—" if v is None else f"{v:g}" for v in row.get("paper", [None] * len(paper))]
        variant = row.get("variant")
        if variant is None:
            state = row["not_run"]
        else:
            state = results.state(variant)
        if state:
            label = row["label"] if variant is None else f"{row['label']} (`{variant}`)"
            lines.append(f"| {label} | — | {state} |" + " |" * (len(columns) - 1) + "".join(f" {q} |" for q in quoted))
            continue
        n = results.summary(variant)["cases"]
        cells = [results.metric(variant, structure, metric) for structure, metric in table["columns"]]
        lines.append(f"| {row['label']} (`{variant}`) | {n} | " + " | ".join(cells)
                     + "".join(f" | {q}" for q in quoted) + " |")
    return lines + [""]


# The release configurations' fusion-vs-single-modality comparison (issue 21) is not a phantom-study run:
# benchmarks/generalisation.py --model ... scores the shipped weights and their single-FLAIR controls on
# the generalisation cases and writes this file; the page shows it so that the paper-table comparison
# lives in one place.
RELEASE_COMPARISON = REPO / "docs" / "release_fusion_results.json"


def release_comparison_lines(path: Path = RELEASE_COMPARISON) -> list[str]:
    """The section of the page for ``path`` (nothing when it does not exist): per model WT Dice at the
    0.1 ml clean-up, per generalisation group and over all groups (mean of the cases)."""
    if not path.is_file():
        return []
    results = json.loads(path.read_text(encoding="utf-8"))
    groups = list(results["groups"])
    models = [name.removesuffix(" cc>=0.1ml") for name in results["groups"][groups[0]] if name.endswith(" cc>=0.1ml")]
    lines = ["## Release configurations: fusion against single FLAIR (issue 21)", "",
             "Not phantom-study runs: each method's CPU release configuration (docs/release_methods.md) and its "
             "single-FLAIR control, trained with the same budget on the domain-randomised synthesiser, scored on "
             f"the generalisation cases (`benchmarks/generalisation.py`, {results['cases_per_group']} case(s) per "
             "group, fully automatic, 0.1 ml clean-up; a one-lesion-class model is scored against WT; rows of other "
             "models on the same cases, where the file has them, for reference). Dice in %; n = cases with a "
             "lesion. Source: `" + str(path.relative_to(REPO)) + "`.", "",
             "| model | n | WT Dice (all groups) | " + " | ".join(groups) + " |",
             "|---|---|---|" + "---|" * len(groups)]
    for model in models:
        per_group = [[row["WT_dice"] for row in results["groups"][g][f"{model} cc>=0.1ml"]["rows"] if "WT_dice" in row]
                     for g in groups]
        every = [value for values in per_group for value in values]
        cells = [f"{100 * statistics.mean(v):.1f}" if v else "—" for v in per_group]
        overall = f"{100 * statistics.mean(every):.1f} ± {100 * statistics.pstdev(every):.1f}" if every else "—"
        lines.append(f"| {model} | {len(every)} | {overall} | " + " | ".join(cells) + " |")
    return lines + [""]


def write_page(study: dict[str, Any], out: Path, page: Path) -> None:
    from BrainLesionSAMLib.io import atomic_output

    if not (out / "study.json").is_file():
        raise StudyError(f"{out} holds no phantom study (no study.json); run the study first or point --out at one")
    results = Results(study, out)
    s = results.settings
    lines = [
        "# Phantom study (issue 10)",
        "",
        "Written by `python benchmarks/phantom_study.py` from the results in its output folder "
        f"(`{out.relative_to(REPO) if out.is_relative_to(REPO) else out}`); rebuild with `--only-report`. "
        "What is trained and which paper table each run answers: `benchmarks/phantom_study/study.json`.",
        "",
        "**These are synthetic cases.** Every figure below comes from generated phantoms "
        "(`brainlesionsam sample`), not from patients. Real BraTS figures need your copy of BraTS and the "
        "training package: `brainlesionsam-train --config <method> data.root=/path/to/BraTS2021`, then "
        "`brainlesionsam-evaluate run --run runs/<method> --split test --out eval/<method>`.",
        "",
        "## Setup",
        "",
        *setup_lines(results),
        "",
        "Figures: Dice, NSD (1 mm tolerance) in %, HD95 in mm, mean ± sd over the test cases "
        "(`BrainLesionSAMLib.metrics`; an empty prediction of a non-empty region scores Dice 0 and HD95 = the "
        "field-of-view diagonal, so one miss dominates an HD95 mean). Methods with one lesion class (LiteMedSAM, "
        "CMAA, DB-SAM, MoME) are scored on WT only. Promptable methods (LiteMedSAM, DB-SAM, SOFA) get the "
        "ground truth's whole-tumour box in training and testing (the training package's box workflow: only the "
        "box's slices are segmented, nothing outside it is labelled); the others get no prompt.",
        "",
        "## Cost per training step and per slice",
        "",
        "Measured with `--measure-cost` (each method's main configuration, a few steps of a micro-batch; the "
        "first step is left out of s / step; inference through the library's engine on the first test case). "
        "Estimates for a run = s / sample x samples + inference x units x test cases, on the same device "
        "and threads; on one CPU thread the CPU time equals the wall time.",
        "",
        *cost_table(results),
        "",
        f"## Main table ({s['budget_steps']} steps x {s['batch_size']} samples per run)",
        "",
        *main_table(results),
        "",
        "Run times of what was run:",
        "",
        *time_table(results),
        "",
        f"## Ablations ({s['budget_steps']} steps x {s['batch_size']} samples per run)",
        "",
        "One table per paper table. 'paper' columns quote the paper's own figures (BraTS or private data, its "
        "units: fractions in SOFA, % elsewhere) for the shape of the comparison only; they are not comparable "
        "with phantom figures. Rows without a variant cannot be expressed with the existing configs; the "
        "reason is given. Times of rows not run are estimated from the method's main configuration (a "
        "variant with fewer modalities or modules costs less).",
        "",
    ]
    for table in study["tables"]:
        lines += ablation_table(results, table)
    lines += release_comparison_lines()
    lines += [
        "## What this is not",
        "",
        "Not a benchmark on patients. The phantoms are MNI152-based tumours with simple, seeded contrasts; "
        "what a method learns here and how the methods rank say little about BraTS, where lesions, scanners "
        "and intensities vary far more. The budget is the same for every method and far below the papers' "
        "(hundreds of epochs on BraTS), the SAM-based methods use LiteMedSAM's TinyViT instead of the papers' "
        "SAM ViT-B (no SAM weights ship), and the ablations are one run each (no folds, no repeats), so "
        "small differences are noise. Real BraTS figures need your copy of BraTS and the training package "
        "(`brainlesionsam-train --config <method> data.root=...`, `brainlesionsam-evaluate run ...`), "
        "ideally on GPUs.",
        "",
    ]
    page.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(page) as temporary:
        temporary.write_text("\n".join(lines), encoding="utf-8")
    print(f"wrote {page}")


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None, study: dict[str, Any]) -> argparse.Namespace:
    tables = ["main"] + [t["id"] for t in study["tables"]]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(study["methods"]), choices=list(study["methods"]))
    parser.add_argument("--tables", nargs="+", default=tables, choices=tables,
                        help="which tables' runs to do (default all; the page always shows every table)")
    parser.add_argument("--variants", nargs="+", choices=list(study["methods"]) + list(study["variants"]),
                        help="only these runs of the selected methods and tables (e.g. to share the runs between "
                             "processes on one --out: give each process its own)")
    parser.add_argument("--budget-steps", type=int, default=DEFAULTS["budget_steps"])
    parser.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"], help="samples per optimiser step")
    parser.add_argument("--train-cases", type=int, default=DEFAULTS["train_cases"])
    parser.add_argument("--test-cases", type=int, default=DEFAULTS["test_cases"])
    parser.add_argument("--resolution", type=int, default=DEFAULTS["resolution"], choices=(1, 2), help="mm")
    parser.add_argument("--train-seed", type=int, default=DEFAULTS["train_seed"])
    parser.add_argument("--test-seed", type=int, default=DEFAULTS["test_seed"])
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads per process (default torch's)")
    parser.add_argument("--workers", type=int, default=None, help="data-loader workers (default 0 on the CPU, else 4)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "phantom_study")
    parser.add_argument("--page", type=Path, default=DEFAULT_PAGE)
    parser.add_argument("--measure-cost", action="store_true", help="time a few training steps and one inference "
                        "batch of every selected method (instead of the runs)")
    parser.add_argument("--cost-from", type=Path, default=None, metavar="DIR",
                        help="another study folder whose cost/ measurements the page uses where this one has none")
    parser.add_argument("--measure-steps", type=int, default=3)
    parser.add_argument("--measure-batch", type=int, default=2)
    parser.add_argument("--stop-after", type=float, default=None, metavar="MIN",
                        help="start no new training or evaluation after this many minutes")
    parser.add_argument("--only-report", action="store_true", help="rebuild the page from existing results")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    study = load_study()
    args = parse_args(argv, study)
    out = args.out.absolute()
    try:
        if args.only_report:
            if args.cost_from is not None and (out / "study.json").is_file():
                write_json(out / "study.json", {**read_json(out / "study.json"), "cost_from": str(args.cost_from.absolute())})
            write_page(study, out, args.page)
            return 0
        device = resolved_device(args.device)
        settings = {"budget_steps": args.budget_steps, "batch_size": args.batch_size, "train_cases": args.train_cases,
                    "test_cases": args.test_cases, "resolution": args.resolution, "train_seed": args.train_seed,
                    "test_seed": args.test_seed, "device": device, "threads": args.threads,
                    "workers": args.workers if args.workers is not None else (0 if device == "cpu" else 4)}
        manifest = check_manifest(out, settings)
        if not args.dry_run:
            manifest = manifest or {k: settings[k] for k in MANIFEST_KEYS}
            manifest["machine"] = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                                   f"device {device}" + (f", {args.threads} thread(s)" if args.threads else ""))
            invocation = shlex.join(["python", "benchmarks/phantom_study.py", *(argv if argv is not None else sys.argv[1:])])
            manifest["invocations"] = [*manifest.get("invocations", []), invocation]
            if args.cost_from is not None:
                manifest["cost_from"] = str(args.cost_from.absolute())
            prepare_study(out, settings)
            write_json(out / "study.json", manifest)
        started = time.monotonic()

        def time_left() -> bool:
            return args.stop_after is None or (time.monotonic() - started) / 60 < args.stop_after

        if args.measure_cost:
            for method in args.methods:
                if not time_left():
                    print(f"--stop-after reached; {method} not measured", flush=True)
                    break
                try:
                    measure_cost(study, method, settings, out, args.measure_steps, args.measure_batch, args.dry_run)
                except StudyError as error:  # one method's failure must not cost the others' figures
                    print(f"error: {error}", file=sys.stderr, flush=True)
        else:
            for variant in selected_variants(study, args.methods, args.tables):
                if args.variants and variant not in args.variants:
                    continue
                if not time_left():
                    print(f"--stop-after reached; {variant} and later variants not started", flush=True)
                    break
                run_variant(study, variant, settings, out, args.dry_run)
        if not args.dry_run:
            write_page(study, out, args.page)
        return 0
    except StudyError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
