"""Inference benchmark (issue 10): every method and backbone on one BraTS-size case.

    python benchmarks/bench_inference.py [--device auto|cpu|cuda] [--threads 2] [--methods NAME ...]
                                         [--slices 3 | --full] [--windows 1] [--batch-sizes 8]
                                         [--seed 7] [--json FILE]

Each variant - every registered method at its default config, plus the other ``backbone`` of the
methods that have one and DB-SAM at ``image_size`` 256 - runs in its own child process, so its peak
resident memory is its own. The case is ``generate_case(SampleParameters.random(seed, resolution=1))``
(240 x 240 x 155, four modalities), written once as NIfTI; each child prepares it from those files
(the preprocessing time includes reading them, as the command line does) and figures, per case:

- wall time split into preprocessing (``prepare_case``), network (the engine's ``network_s``) and
  postprocessing (``postprocessing_s``: argmax, masking, label image), slices per second, peak RSS
  (the kernel's VmHWM: ``getrusage`` would report the parent's peak, which Linux carries over fork
  and exec) and on CUDA peak GPU memory (``torch.cuda.max_memory_allocated``);
- the engine against a naive loop over the same weights and slices, the way published inference
  scripts run: every axial slice (for box-requiring methods every slice of the box), batch 1, fp32,
  ``torch.no_grad`` (not inference mode), no embedding cache, no autocast. 3D methods: MONAI's
  sliding window with one patch at a time, fp32, no_grad. Speed-up = naive network time per case /
  engine network time per case (preprocessing is the same for both and left out);
- for methods with cacheable embeddings, a box refinement: a second ``segment`` with a different box
  on the same engine and ``EmbeddingCache``, seconds per slice.

Timings shorter than ``--repeat-budget`` seconds are repeated (up to five runs, the fastest counts,
as ``timeit`` does): on a shared machine single short timings scatter by +-20 %. Each engine run
has a fresh engine and cache; one warm-up slice (patch on CUDA) runs before any timing.

Box-requiring methods get the ground truth's bounding box (the same box in the engine and the naive
loop); SOFA, promptable but automatic, runs without one and gets that box for its refinement.

Extrapolation. On the CPU a whole case takes hours for some methods, so by default only ``--slices``
brain slices around the lesion's centre run (a ``PreparedCase`` restricted to that slab) and the
network time is scaled to the slices the engine runs on the whole case (its brain slices, within the
box for box methods; the naive loop: every slice, or every slice of the box); postprocessing scales
with the number of voxels. 3D methods run on a crop of ``--windows`` sliding-window patches and are
scaled by the number of patches MONAI's sliding window uses on the whole volume (counted with
``sliding_window_inference`` and a predictor that computes nothing). Every extrapolated figure is
marked ``~``. ``--full`` runs whole cases (the default on CUDA).

GPU (CUDA): autocast as the engine does it (bfloat16 where supported, else float16), a batch-size
sweep (``--batch-sizes``, default 1 2 4 8 16 32; stops at the first out-of-memory and reports it),
``torch.cuda.synchronize`` around every timing, peak GPU memory per batch size. The table and the
targets use the engine's default batch size (8 on CUDA, ``engine.default_batch_size``), the 2 s target the fastest batch size. CPU: batch
sizes 1 and 8 (batching is slower per slice for some encoders on the CPU); the table and the targets
use the faster.

Weights: the values do not change the time. Methods with packaged or shipped third-party weights
(``unet2d``, ``litemedsam``) load them; the ``lite`` backbone loads the real LiteMedSAM weights into
its encoder and decoder (new modules random); ViT-B backbones, MedSAM and MoME are randomly
initialised (no weights offline). The table says which.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import SimpleITK as sitk
import torch

from BrainLesionSAMLib.backbones.base import BACKBONES
from BrainLesionSAMLib.checkpoints import load_method
from BrainLesionSAMLib.engine import Box, EmbeddingCache, InferenceEngine, default_batch_size, resolve_device
from BrainLesionSAMLib.errors import BrainLesionSAMError, WeightsError
from BrainLesionSAMLib.io import discover_case
from BrainLesionSAMLib.methods import SegmentationMethod, build_method, get_method_class, method_names
from BrainLesionSAMLib.preprocessing import PreparedCase, prepare_case
from BrainLesionSAMLib.sample import SampleParameters, generate_case, write_case

GPU_BATCH_SIZES = (1, 2, 4, 8, 16, 32)
# On the CPU batching can be slower per slice (TinyViT is, measured): the engine default and batch 1.
CPU_BATCH_SIZES = (1, 8)
# Variants beyond each method's default config and its other backbone(s).
EXTRA_VARIANTS: dict[str, tuple[dict[str, Any], ...]] = {"dbsam": ({"backbone": "vit_b", "image_size": 256},)}
REFINEMENT_SHRINK = 4  # voxels the refinement box is smaller than the first box on each side (x, y)

TARGETS = {
    "gpu_2d_case_s": 2.0,          # every 2D method, per case, one H100
    "cpu_case_s": 600.0,           # every method, per case, 2 CPU cores, default settings
    "gpu_speedup": 3.0,            # engine vs naive loop
    "cpu_speedup": 1.5,
    "gpu_peak_gb": 6.0,            # every method at default settings
    "cpu_refine_slice_s": 0.3,     # box refinement with cached embeddings, per slice
}
REFERENCE_POINTS = ("plain encoders on 2 cores, per slice: ViT-B at 256 0.58 s, ViT-B at 1024 13.6 s, "
                    "LiteMedSAM's TinyViT at 256 1.8 s; LiteMedSAM prompt encoder + decoder 0.06 s")


# ----------------------------------------------------------------------------------------- variants

@dataclasses.dataclass(frozen=True)
class Variant:
    method: str
    config: tuple[tuple[str, Any], ...] = ()   # overrides of the default config (hashable)

    @property
    def label(self) -> str:
        """e.g. 'dbsam' (default config) or 'dbsam:backbone=vit_b,image_size=256'."""
        return self.method + (":" + ",".join(f"{k}={v}" for k, v in self.config) if self.config else "")

    @property
    def is_default(self) -> bool:
        return not self.config


def all_variants() -> list[Variant]:
    variants = []
    for name in method_names():
        variants.append(Variant(name))
        default_backbone = get_method_class(name).default_config.get("backbone")
        if default_backbone is not None:
            variants += [Variant(name, (("backbone", b),)) for b in BACKBONES if b != default_backbone]
        variants += [Variant(name, tuple(extra.items())) for extra in EXTRA_VARIANTS.get(name, ())]
    return variants


def select_variants(wanted: list[str] | None) -> list[Variant]:
    """``--methods`` entries are method names (all their variants) or exact variant labels."""
    variants = all_variants()
    if not wanted:
        return variants
    chosen = [v for v in variants if v.method in wanted or v.label in wanted]
    unknown = [w for w in wanted if not any(w in (v.method, v.label) for v in variants)]
    if unknown:
        raise SystemExit(f"unknown method or variant {unknown}; variants: {[v.label for v in variants]}")
    return chosen


def build_variant(variant: Variant) -> tuple[SegmentationMethod, str]:
    """The method in eval mode and where its weights come from."""
    cls = get_method_class(variant.method)
    if variant.is_default:
        try:
            method = load_method(variant.method)
            source = (f"packaged {cls.packaged_weights}" if cls.packaged_weights
                      else "shipped third-party pretrained weights")
            return method, source
        except WeightsError:
            pass  # no weights offline: random initialisation times the same
    torch.manual_seed(0)
    method = build_method(variant.method, dict(variant.config)).eval()
    if method.config.get("backbone") == "lite" and method.config.get("backbone_weights") is None:
        return method, "LiteMedSAM weights in the backbone (packaged lite_medsam.pth), new modules random"
    return method, "random init (no weights offline)"


# --------------------------------------------------------------------------------------- the case

def lesion_box(seg: np.ndarray) -> Box:
    """Bounding box (voxel indices, inclusive) of the ground-truth lesion, seg [z, y, x]."""
    z, y, x = np.nonzero(seg)
    return Box(int(x.min()), int(y.min()), int(z.min()), int(x.max()), int(y.max()), int(z.max()))


def shrunk(box: Box, margin: int) -> Box:
    """A different box for the refinement: ``margin`` voxels smaller in x and y, same slices."""
    mx = min(margin, (box.x1 - box.x0) // 4)
    my = min(margin, (box.y1 - box.y0) // 4)
    return Box(box.x0 + mx, box.y0 + my, box.z0, box.x1 - mx, box.y1 - my, box.z1)


def crop(case: PreparedCase, z: slice, y: slice, x: slice) -> PreparedCase:
    """The prepared case restricted to a sub-block (same normalisation; the reference image cropped
    by SimpleITK keeps the physical position)."""
    return PreparedCase(images=case.images[:, z, y, x].copy(), available=case.available,
                        reference=case.reference[x, y, z], reference_modality=case.reference_modality,
                        brain_mask=case.brain_mask[z, y, x].copy(), sources=case.sources)


def shifted(box: Box | None, z0: int = 0, y0: int = 0, x0: int = 0) -> Box | None:
    """``box`` in the coordinates of a crop that starts at (z0, y0, x0)."""
    if box is None:
        return None
    return Box(box.x0 - x0, box.y0 - y0, box.z0 - z0, box.x1 - x0, box.y1 - y0, box.z1 - z0)


def engine_slices(case: PreparedCase, box: Box | None) -> np.ndarray:
    """The axial slices the engine runs a 2D method on: brain slices, within the box if any."""
    slices = case.brain_slices()
    if box is not None:
        box = box.clipped_to(case.shape_zyx)
        slices = slices[(slices >= box.z0) & (slices <= box.z1)]
    return slices


def naive_slices(case: PreparedCase, box: Box | None) -> np.ndarray:
    """The slices a published script loops over: all of them, or all of the box's."""
    if box is None:
        return np.arange(case.shape_zyx[0])
    box = box.clipped_to(case.shape_zyx)
    return np.arange(box.z0, box.z1 + 1)


def slab_around(case: PreparedCase, centre: int, count: int) -> tuple[PreparedCase, int]:
    """``count`` axial slices centred on ``centre``; returns the slab and its first index."""
    z0 = int(np.clip(centre - count // 2, 0, max(case.shape_zyx[0] - count, 0)))
    return crop(case, slice(z0, z0 + count), slice(None), slice(None)), z0


def patch_crop(case: PreparedCase, roi: tuple[int, ...], windows: int, overlap: float
               ) -> tuple[PreparedCase, tuple[int, int, int]]:
    """A block of ``windows`` sliding-window patches along x (one patch in z and y), centred on the
    brain; returns it and its first (z, y, x) index."""
    step_x = max(int(roi[2] * (1 - overlap)), 1)
    size = [roi[0], roi[1], roi[2] + (windows - 1) * step_x]
    size = [min(s, n) for s, n in zip(size, case.shape_zyx)]
    nonzero = np.nonzero(case.brain_mask)
    start = []
    for axis, (length, extent) in enumerate(zip(size, case.shape_zyx)):
        centre = (int(nonzero[axis].min()) + int(nonzero[axis].max())) // 2
        start.append(int(np.clip(centre - length // 2, 0, extent - length)))
    blocks = [slice(s, s + n) for s, n in zip(start, size)]
    return crop(case, *blocks), tuple(start)


def count_windows(shape_zyx: tuple[int, ...], roi: tuple[int, ...], overlap: float) -> int:
    """How many patches MONAI's sliding window (as the engine calls it) runs over a volume."""
    from monai.inferers import sliding_window_inference

    seen = []

    def nothing(patches: torch.Tensor) -> torch.Tensor:
        seen.append(len(patches))
        return torch.zeros((len(patches), 1) + tuple(patches.shape[2:]))

    with torch.inference_mode():
        sliding_window_inference(torch.zeros((1, 1) + tuple(shape_zyx)), roi_size=roi, sw_batch_size=1,
                                 predictor=nothing, overlap=overlap, mode="gaussian", progress=False)
    return sum(seen)


# ------------------------------------------------------------------------------------------ timing

@dataclasses.dataclass
class Timing:
    wall_s: float = 0.0
    cpu_s: float = 0.0


@contextmanager
def stopwatch(device: torch.device) -> Iterator[Timing]:
    """Wall and process-CPU seconds; on CUDA synchronised on both ends (kernels run asynchronously)."""
    timing = Timing()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    wall, cpu = time.perf_counter(), time.process_time()
    yield timing
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    timing.wall_s, timing.cpu_s = time.perf_counter() - wall, time.process_time() - cpu


def peak_rss_gb() -> float:
    """This process's peak resident memory (VmHWM, Linux), GB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / 1e9
    raise RuntimeError("no VmHWM in /proc/self/status")


def reset_gpu_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def gpu_peak_gb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None


def fastest_of(measure: Callable[[], dict[str, Any]], budget_s: float, max_repeats: int = 5) -> dict[str, Any]:
    """Run ``measure`` once, and again while the time spent stays within ``budget_s`` (at most
    ``max_repeats`` runs); the fastest run, the one other processes on a shared machine disturbed
    least (as ``timeit`` does). Slow measurements run once."""
    runs = [measure()]
    spent = runs[0]["wall_s"]
    while len(runs) < max_repeats and spent + runs[-1]["wall_s"] <= budget_s:
        runs.append(measure())
        spent += runs[-1]["wall_s"]
    return {**min(runs, key=lambda r: r["wall_s"]), "repeats": len(runs)}


def time_engine(engine: InferenceEngine, run: PreparedCase, box: Box | None) -> dict[str, Any]:
    reset_gpu_peak(engine.device)
    with stopwatch(engine.device) as timing:
        result = engine.segment(run, box=box)
    return {"batch_size": engine.batch_size, "wall_s": timing.wall_s, "cpu_s": timing.cpu_s,
            "network_s": result.timings["network_s"], "postprocessing_s": result.timings["postprocessing_s"],
            "peak_gpu_gb": gpu_peak_gb(engine.device)}


def naive_slice_loop(method: SegmentationMethod, case: PreparedCase, box: Box | None,
                     device: torch.device) -> dict[str, Any]:
    """A published script's loop: one slice at a time, fp32, no_grad, no cache; network time only
    (slicing to 256 x 256, the network, back onto the slice grid), as the engine's network_s."""
    geometry = case.slice_geometry
    slices = naive_slices(case, box)
    available = torch.as_tensor(case.available[None], device=device)
    prompt = None
    if box is not None and method.facts.promptable:
        box = box.clipped_to(case.shape_zyx)
        prompt = torch.tensor([geometry.box_to_network(box.x0, box.y0, box.x1, box.y1)],
                              dtype=torch.float32, device=device)
    probabilities = np.zeros((len(method.facts.labels),) + case.shape_zyx, dtype=np.float32)
    reset_gpu_peak(device)
    with stopwatch(device) as timing, torch.no_grad():
        for z in slices:
            image = case.network_slices([int(z)]).to(device)
            slice_probabilities = method.predict_proba(image, available, prompt).float()
            probabilities[:, z] = geometry.from_network(slice_probabilities)[0].cpu().numpy()
    return {"units": len(slices), "wall_s": timing.wall_s, "cpu_s": timing.cpu_s,
            "peak_gpu_gb": gpu_peak_gb(device)}


def naive_sliding_window(method: SegmentationMethod, case: PreparedCase, overlap: float,
                         device: torch.device) -> dict[str, Any]:
    """3D: MONAI's sliding window one patch at a time, fp32, no_grad (nnU-Net-style scripts)."""
    from monai.inferers import sliding_window_inference

    volume = torch.as_tensor(case.images[None], device=device)
    available = torch.as_tensor(case.available[None], device=device)

    def predictor(patches: torch.Tensor) -> torch.Tensor:
        return method.predict_proba(patches, available.expand(len(patches), -1)).float()

    reset_gpu_peak(device)
    with stopwatch(device) as timing, torch.no_grad():
        output = sliding_window_inference(volume, roi_size=method.facts.input_size, sw_batch_size=1,
                                          predictor=predictor, overlap=overlap, mode="gaussian", progress=False)
        output.cpu()
    return {"units": count_windows(case.shape_zyx, method.facts.input_size, overlap),
            "wall_s": timing.wall_s, "cpu_s": timing.cpu_s, "peak_gpu_gb": gpu_peak_gb(device)}


def batch_sweep(method: SegmentationMethod, run: PreparedCase, box: Box | None, device: torch.device,
                batch_sizes: list[int], units: int, cacheable: bool, budget_s: float
                ) -> tuple[list[dict], InferenceEngine]:
    """Engine runs at each batch size (each run with a fresh engine and cache: every run encodes;
    repeated within ``budget_s``, see :func:`fastest_of`). Batch sizes beyond
    the first that covers all ``units`` would run identically and reuse its figures; the first
    out-of-memory ends the sweep. Returns the runs and the default batch size's engine (its cache
    holds the run's embeddings, for the refinement)."""
    runs: list[dict] = []
    engines: dict[int, InferenceEngine] = {}
    covering = None
    for batch_size in batch_sizes:
        if covering is not None:
            runs.append({**covering, "batch_size": batch_size, "same_as_batch": covering["batch_size"]})
            engines[batch_size] = engines[covering["batch_size"]]
        else:
            def measure(batch_size: int = batch_size) -> dict[str, Any]:
                engines[batch_size] = InferenceEngine(method, device=device, batch_size=batch_size,
                                                      embedding_cache=EmbeddingCache() if cacheable else None)
                return time_engine(engines[batch_size], run, box)

            try:
                runs.append(fastest_of(measure, budget_s))
            except BrainLesionSAMError as error:
                if "out of memory" not in str(error):
                    raise
                runs.append({"batch_size": batch_size, "oom": True})
                break
            if batch_size >= units:
                covering = runs[-1]
        print(f"  batch {batch_size}: {runs[-1]}", file=sys.stderr, flush=True)
    default_engine = engines.get(default_batch_size(device))
    return runs, default_engine


# --------------------------------------------------------------------------------------- one variant

def measure_variant(variant: Variant, case_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    device = resolve_device(args.device)
    load_start = os.getloadavg()[0]
    method, weights = build_variant(variant)
    facts = method.facts
    inputs = discover_case(case_dir)
    seg = sitk.GetArrayFromImage(sitk.ReadImage(str(inputs.pop("seg"))))
    with stopwatch(torch.device("cpu")) as preprocessing:
        case = prepare_case({m: path for m, path in inputs.items() if m in facts.modalities})
    box = lesion_box(seg) if facts.requires_box else None
    refine_box = shrunk(lesion_box(seg), REFINEMENT_SHRINK) if facts.cacheable_embeddings else None
    full = args.full or (args.slices is None and device.type == "cuda")
    slices = args.slices or 3

    # the region timed, and how many units (slices / patches) the engine and the naive loop run on it
    # and on the whole case
    if facts.spatial_dims == 2:
        if full:
            run, offset = case, (0, 0, 0)
        else:
            lesion_z = np.flatnonzero(seg.any(axis=(1, 2)))
            run, z0 = slab_around(case, int(round(lesion_z.mean())), slices)
            offset = (z0, 0, 0)
        run_box, run_refine_box = shifted(box, *offset), shifted(refine_box, *offset)
        units = {"engine_run": len(engine_slices(run, run_box)), "engine_case": len(engine_slices(case, box)),
                 "naive_case": len(naive_slices(case, box))}
        unit = "slices"
    else:
        if full:
            run, offset = case, (0, 0, 0)
        else:
            run, offset = patch_crop(case, facts.input_size, args.windows, args.overlap)
        run_box = run_refine_box = None
        units = {"engine_run": count_windows(run.shape_zyx, facts.input_size, args.overlap),
                 "engine_case": count_windows(case.shape_zyx, facts.input_size, args.overlap)}
        units["naive_case"] = units["engine_case"]
        unit = "patches"
    print(f"[{variant.label}] {weights}; timed region {run.shape_zyx} (z, y, x) at {offset}, "
          f"{units['engine_run']} {unit} of {units['engine_case']}", file=sys.stderr, flush=True)

    # warm-up (allocations, TinyViT's bias cache, cuDNN's choices): one slice; a 3D patch only on CUDA,
    # where it is cheap (on the CPU one patch is minutes and the first-call cost small beside it)
    warm_engine = InferenceEngine(method, device=device, batch_size=1)
    if facts.spatial_dims == 2:
        first = int(engine_slices(run, run_box)[0])
        warm_engine.segment(crop(run, slice(first, first + 1), slice(None), slice(None)),
                            box=shifted(run_box, first))
    elif device.type == "cuda":
        warm_engine.segment(patch_crop(case, facts.input_size, 1, args.overlap)[0])

    batch_sizes = args.batch_sizes or list(GPU_BATCH_SIZES if device.type == "cuda" else CPU_BATCH_SIZES)
    if default_batch_size(device) not in batch_sizes:
        batch_sizes = sorted(set(batch_sizes) | {default_batch_size(device)})
    runs, default_engine = batch_sweep(method, run, run_box, device, batch_sizes, units["engine_run"],
                                       facts.cacheable_embeddings, args.repeat_budget)

    refinement = None
    if facts.cacheable_embeddings and default_engine is not None:
        refined_slices = len(engine_slices(run, run_refine_box))

        def refine() -> dict[str, Any]:  # the embeddings stay cached: every repeat decodes only
            with stopwatch(device) as timing:
                default_engine.segment(run, box=run_refine_box)
            return {"slices": refined_slices, "wall_s": timing.wall_s, "cpu_s": timing.cpu_s}

        refinement = fastest_of(refine, args.repeat_budget)
        refinement["per_slice_s"] = refinement["wall_s"] / refined_slices
        print(f"  refinement: {refinement}", file=sys.stderr, flush=True)

    if facts.spatial_dims == 2:
        naive = fastest_of(lambda: naive_slice_loop(method, run, run_box, device), args.repeat_budget)
    else:
        naive = fastest_of(lambda: naive_sliding_window(method, run, args.overlap, device), args.repeat_budget)
    print(f"  naive: {naive}", file=sys.stderr, flush=True)

    counts = method.parameter_counts()
    return {
        "variant": variant.label, "method": variant.method, "config": dict(variant.config),
        "default": variant.is_default, "weights": weights, "spatial_dims": facts.spatial_dims,
        "requires_box": facts.requires_box, "cacheable": facts.cacheable_embeddings,
        "parameters": counts["total"], "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "autocast": autocast_name(device), "threads": torch.get_num_threads(),
        "extrapolated": not full, "unit": unit, "units": units,
        "voxels": {"run": int(np.prod(run.shape_zyx)), "case": int(np.prod(case.shape_zyx))},
        "case_shape_zyx": list(case.shape_zyx), "run_shape_zyx": list(run.shape_zyx),
        "preprocessing_s": preprocessing.wall_s, "preprocessing_cpu_s": preprocessing.cpu_s,
        "runs": runs, "naive": naive, "refinement": refinement,
        "peak_rss_gb": peak_rss_gb(), "load_start": load_start, "load_end": os.getloadavg()[0],
    }


def autocast_name(device: torch.device) -> str | None:
    """The dtype the engine's autocast uses on CUDA (None: no autocast, fp32)."""
    if device.type != "cuda":
        return None
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


# ------------------------------------------------------------------------------- per-case figures

def per_case(result: dict[str, Any], run: dict[str, Any]) -> dict[str, float]:
    """Scale one engine run to the whole case (identity when the whole case ran)."""
    units, voxels = result["units"], result["voxels"]
    network = run["network_s"] * units["engine_case"] / units["engine_run"]
    post = run["postprocessing_s"] * voxels["case"] / voxels["run"]
    total = result["preprocessing_s"] + network + post
    if result["unit"] == "slices":
        slices_per_s = units["engine_run"] / run["network_s"]
    else:  # axial slices of the case per second of network time
        slices_per_s = result["case_shape_zyx"][0] / network
    return {"network_s": network, "postprocessing_s": post, "total_s": total, "slices_per_s": slices_per_s}


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    """Per-case figures at the table's batch size, the default and the fastest; speed-up; target marks.

    The table's batch size: on CUDA the engine's default (8: the default settings the memory target
    is about); on the CPU the fastest measured."""
    if "error" in result:
        return result
    measured = [r for r in result["runs"] if not r.get("oom")]
    if not measured:
        return {**result, "error": "out of GPU memory at every batch size"}
    fastest = min(measured, key=lambda r: r["network_s"])
    # the default batch size may have run out of GPU memory: then the largest that fitted stands in
    engine_default = default_batch_size(torch.device(result["device"]))
    default = next((r for r in measured if r["batch_size"] == engine_default), None)
    summary = {"default_batch": per_case(result, default or measured[-1]), "default_oom": default is None,
               "fastest_batch": fastest["batch_size"], "fastest": per_case(result, fastest),
               "peak_gpu_gb": (default or measured[-1]).get("peak_gpu_gb"),
               "oom_batch": next((r["batch_size"] for r in result["runs"] if r.get("oom")), None)}
    on_cuda = result["device"].startswith("cuda")
    summary["table_batch"] = (default or measured[-1])["batch_size"] if on_cuda else fastest["batch_size"]
    summary["table"] = summary["default_batch"] if on_cuda else summary["fastest"]
    naive = result["naive"]
    summary["naive_network_s"] = naive["wall_s"] / naive["units"] * result["units"]["naive_case"]
    summary["speedup"] = summary["naive_network_s"] / summary["table"]["network_s"]
    refinement = result.get("refinement")
    summary["refine_per_slice_s"] = refinement["per_slice_s"] if refinement else None
    summary["marks"] = target_marks(result, summary)
    return {**result, "summary": summary}


def mark(value: float | None, limit: float, at_most: bool = True) -> str:
    if value is None:
        return "-"
    return "PASS" if (value <= limit if at_most else value >= limit) else "FAIL"


def target_marks(result: dict[str, Any], summary: dict[str, Any]) -> dict[str, str]:
    """PASS / FAIL for the targets that apply to this device ('-' where one does not apply)."""
    if result["device"].startswith("cuda"):
        two_d = summary["fastest"]["total_s"] if result["spatial_dims"] == 2 else None
        return {"case < 2 s (H100)": mark(two_d, TARGETS["gpu_2d_case_s"]),
                "speed-up >= 3x": mark(summary["speedup"], TARGETS["gpu_speedup"], at_most=False),
                "peak GPU <= 6 GB": ("FAIL (OOM at batch 8)" if summary["default_oom"]
                                     else mark(summary["peak_gpu_gb"], TARGETS["gpu_peak_gb"]))}
    return {"case < 10 min": mark(summary["table"]["total_s"], TARGETS["cpu_case_s"]),
            "speed-up >= 1.5x": mark(summary["speedup"], TARGETS["cpu_speedup"], at_most=False),
            "refine < 0.3 s/slice": mark(summary["refine_per_slice_s"], TARGETS["cpu_refine_slice_s"])}


# ----------------------------------------------------------------------------------------- output

def figure(value: float | None, extrapolated: bool, digits: int = 1) -> str:
    if value is None:
        return "-"
    return ("~" if extrapolated else "") + f"{value:.{digits}f}"


def print_table(results: list[dict[str, Any]]) -> None:
    header = (f"{'variant':36s} {'params':>7s} {'weights':8s} {'batch':>5s} {'prep s':>7s} {'network s':>10s} {'post s':>7s} "
              f"{'total s':>9s} {'slices/s':>8s} {'RSS GB':>6s} {'GPU GB':>6s} {'naive s':>9s} {'speed-up':>8s} "
              f"{'refine s/sl':>11s} {'load':>9s}")
    print(header)
    print("-" * len(header))
    for result in results:
        if "error" in result:
            print(f"{result['variant']:36s} FAILED: {result['error']}")
            continue
        s, x = result["summary"], result["extrapolated"]
        case = s["table"]
        weights = ("real" if not result["weights"].startswith(("random", "LiteMedSAM weights"))
                   else "lite+rnd" if result["weights"].startswith("LiteMedSAM") else "random")
        gpu = "-" if s["peak_gpu_gb"] is None else f"{s['peak_gpu_gb']:.2f}"
        print(f"{result['variant']:36s} {result['parameters'] / 1e6:6.1f}M {weights:8s} {s['table_batch']:5d} "
              f"{result['preprocessing_s']:7.1f} {figure(case['network_s'], x):>10s} "
              f"{figure(case['postprocessing_s'], x, 2):>7s} {figure(case['total_s'], x):>9s} "
              f"{figure(case['slices_per_s'], x and result['unit'] != 'slices', 2):>8s} "
              f"{result['peak_rss_gb']:6.2f} {gpu:>6s} {figure(s['naive_network_s'], x):>9s} "
              f"{figure(s['speedup'], x, 2):>8s} {figure(s['refine_per_slice_s'], False, 3):>11s} "
              f"{result['load_start']:4.1f}-{result['load_end']:<4.1f}")


def print_sweep(results: list[dict[str, Any]]) -> None:
    print("\nbatch-size sweep (network s per case / slices per s / peak GPU GB):")
    for result in results:
        if "error" in result:
            continue
        cells = []
        for run in result["runs"]:
            if run.get("oom"):
                cells.append(f"b{run['batch_size']}: out of memory")
                continue
            case = per_case(result, run)
            gpu = "" if run.get("peak_gpu_gb") is None else f" / {run['peak_gpu_gb']:.2f}"
            same = f" (= b{run['same_as_batch']})" if "same_as_batch" in run else ""
            cells.append(f"b{run['batch_size']}: {figure(case['network_s'], result['extrapolated'])} s / "
                         f"{case['slices_per_s']:.2f}{gpu}{same}")
        print(f"  {result['variant']:36s} " + "; ".join(cells))


def print_targets(results: list[dict[str, Any]], threads: int) -> None:
    ok = [r for r in results if "error" not in r]
    if not ok:
        return
    names = list(ok[0]["summary"]["marks"])
    print("\ntargets (the default-config variants decide; the other variants are for information):")
    print(f"{'variant':36s} {'default':7s} " + " ".join(f"{n:>20s}" for n in names))
    for result in ok:
        marks = result["summary"]["marks"]
        print(f"{result['variant']:36s} {'yes' if result['default'] else 'no':7s} "
              + " ".join(f"{marks[n]:>20s}" for n in names))
    if not ok[0]["device"].startswith("cuda") and threads != 2:
        print(f"note: the CPU targets are for 2 cores; this run used {threads} threads")
    if ok[0]["device"].startswith("cuda") and "H100" not in (ok[0]["gpu"] or ""):
        print(f"note: the 2 s target is for one H100; this GPU is {ok[0]['gpu']}")


def print_header(args: argparse.Namespace, device: torch.device) -> None:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    gpu = f", GPU {torch.cuda.get_device_name(device)} (autocast {autocast_name(device)})" if device.type == "cuda" else ""
    print(f"BrainLesionSAM inference benchmark, {datetime.datetime.now().isoformat(timespec='minutes')}, "
          f"{platform.node()}: {cores} CPU cores visible, torch {torch.__version__}, {args.threads} threads, "
          f"device {device}{gpu}")
    print(f"case: generate_case(SampleParameters.random({args.seed}, resolution=1)), 240 x 240 x 155, four "
          f"modalities, read from NIfTI; load average at start {os.getloadavg()[0]:.1f}")
    print("targets: 2D methods < 2 s per case on one H100; every method < 10 min per case on 2 CPU cores "
          "(default settings); engine >= 3x the naive loop on GPU, >= 1.5x on CPU; peak GPU memory <= 6 GB "
          "(default settings); box refinement with cached embeddings < 0.3 s per slice on CPU")
    print(f"reference points: {REFERENCE_POINTS}")
    print("columns: per case at the batch size shown (CUDA: the engine's default 8; CPU: the faster of 1 "
          "and 8, see the sweep); '~' = extrapolated from the timed "
          "slices/patches (see --slices/--windows; --full measures whole cases); naive s = network time "
          "of the one-slice-at-a-time loop per case; speed-up = naive / engine network time; RSS = peak "
          "of the variant's process (timed region only when extrapolated); weights: real = packaged or "
          "shipped, lite+rnd = LiteMedSAM weights in the backbone with new modules random, random = "
          "random init (no weights offline; time does not depend on the values)\n")


# ------------------------------------------------------------------------------------------- main

def run_child(variant: Variant, case_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Measure ``variant`` in a fresh interpreter (its own peak RSS and GPU memory)."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        output = Path(handle.name)
    command = [sys.executable, __file__, "--child", variant.label, "--case-dir", str(case_dir),
               "--child-output", str(output), "--device", args.device, "--threads", str(args.threads),
               "--windows", str(args.windows), "--overlap", str(args.overlap),
               "--repeat-budget", str(args.repeat_budget)]
    if args.full:
        command.append("--full")
    if args.slices is not None:
        command += ["--slices", str(args.slices)]
    if args.batch_sizes:
        command += ["--batch-sizes", *map(str, args.batch_sizes)]
    threads = str(args.threads)
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
    try:
        completed = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True)
        sys.stderr.write(completed.stdout)
        if completed.returncode != 0:
            return {"variant": variant.label, "error": f"child exited with {completed.returncode} (see stderr)"}
        return json.loads(output.read_text())
    finally:
        output.unlink(missing_ok=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="variants: " + ", ".join(v.label for v in all_variants()))
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    parser.add_argument("--threads", type=int, default=2, help="torch / OpenMP CPU threads per variant")
    parser.add_argument("--methods", nargs="+", help="method names or variant labels (default: all)")
    parser.add_argument("--slices", type=int, default=None,
                        help="2D: brain slices timed and extrapolated to the case (default 3 on the CPU, "
                             "the whole case on CUDA)")
    parser.add_argument("--windows", type=int, default=1, help="3D: sliding-window patches timed (default 1)")
    parser.add_argument("--full", action="store_true", help="run whole cases (no extrapolation)")
    parser.add_argument("--batch-sizes", type=int, nargs="+",
                        help=f"engine batch sizes (default {' '.join(map(str, CPU_BATCH_SIZES))} on the CPU, "
                             f"{' '.join(map(str, GPU_BATCH_SIZES))} on CUDA; the engine's default for the device is always run)")
    parser.add_argument("--overlap", type=float, default=0.5, help="3D sliding-window overlap (engine default)")
    parser.add_argument("--seed", type=int, default=7, help="sample case seed")
    parser.add_argument("--repeat-budget", type=float, default=10.0,
                        help="seconds within which a timing is repeated (up to 5 runs, the fastest counts)")
    parser.add_argument("--json", type=Path, help="write the raw figures here")
    parser.add_argument("--report", type=Path, help="print the tables of a --json file; measure nothing")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--case-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-output", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if (args.slices is not None and args.slices < 1) or args.windows < 1 or args.threads < 1:
        parser.error("--slices, --windows and --threads must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    if args.child:
        variant = next(v for v in all_variants() if v.label == args.child)
        result = measure_variant(variant, args.case_dir, args)
        args.child_output.write_text(json.dumps(result))
        return
    if args.report:
        saved = json.loads(args.report.read_text())
        # summaries recomputed from the raw figures, so the report follows this script's rules
        print_results([summarise(result) for result in saved["variants"]], saved["args"]["threads"])
        return
    variants = select_variants(args.methods)
    device = resolve_device(args.device)
    print_header(args, device)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_inference_") as folder:
        case_dir = write_case(generate_case(SampleParameters.random(args.seed, resolution=1)), Path(folder), "bench")
        for variant in variants:
            results.append(summarise(run_child(variant, case_dir, args)))
            if args.json:  # after every variant: a long run interrupted keeps what it measured
                write_json(args, results)
    print_results(results, args.threads)
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")
    if args.json:
        print(f"raw figures: {args.json}")


def print_results(results: list[dict[str, Any]], threads: int) -> None:
    print_table(results)
    print_sweep(results)
    print_targets(results, threads)


def write_json(args: argparse.Namespace, results: list[dict[str, Any]]) -> None:
    arguments = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    args.json.write_text(json.dumps({"args": arguments, "targets": TARGETS, "reference_points": REFERENCE_POINTS,
                                     "variants": results}, indent=1))

if __name__ == "__main__":
    main()
