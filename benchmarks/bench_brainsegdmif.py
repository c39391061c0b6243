"""BrainSegDMIF figures: parameters, GFLOPs per 256 x 256 four-modality slice, CPU time per slice
(both backbones), the peak memory of one ViT-B training step at batch 2, and what the DMIF
modules cost on the ``lite`` backbone's 256 x 256 grid.

    python benchmarks/bench_brainsegdmif.py [--threads 2] [--repeats 2] [--skip-memory]
                                            [--lite-step-batch 0]

- Parameters: the default configuration (``parameter_counts``) against the paper's 354M.
- GFLOPs: ``torch.utils.flop_counter.FlopCounterMode`` on one forward pass (2 FLOPs per
  multiply-add of matmuls and convolutions), :func:`flops_per_slice`, on the meta device (ViT-B
  built there; TinyViT, which cannot be built there, built on the CPU and moved): nothing allocated.
  The paper reports 311.
- Time: ``predict_proba`` on one slice with all four modalities, inference mode, after a warm-up:
  wall-clock seconds and this process's CPU seconds (``time.process_time``, all threads; on a
  shared machine the wall clock also counts waiting for the cores). Random ViT-B weights (none
  offline) and the real LiteMedSAM weights: the time does not depend on the values.
- Memory, each in a fresh child process (run first), as the kernel's high-water mark VmHWM of
  /proc/self/status (``getrusage(RUSAGE_SELF).ru_maxrss`` would not do: Linux carries it over
  from the parent across fork and exec, so a child of a large process reports the parent's peak):
  - ViT-B: build, then forward, FocalDice loss, backward and one Adam step (the paper's optimiser)
    on two slices: peak RSS (weights, gradients, Adam's moments, activations) and the step's time;
  - lite: the DMIF module of TinyViT's first block (65,536 tokens x 4 modalities x 64 channels),
    forward and backward at batch 2: peak over the process's RSS before; and one TinyViT stream's
    training forward on one image: the activations it keeps for the backward pass. A whole lite
    training step (``--lite-step-batch N``, off by default) needs about four times the latter per
    slice, more than a shared 24 GB machine has free at batch 2.

The fusion-feedback study (issue 24; ``--feedback-study``, figures in docs/decisions.md), on the
``lite`` backbone with the real LiteMedSAM weights (no SAM ViT-B weights exist offline):

- ``rms``: token RMS of the streams after every block (what the next block receives, feedback
  included; block 12: its output) for each ``fusion_feedback`` rule, one four-modality lesion slice
  of a generated 2 mm case, untrained DMIF modules (seed 0, identical for every rule);
- ``train``: a SHORT training at equal budget per rule: two streams (T1CE, FLAIR, as the smoke
  config), batch 1, Adam 1e-4 (the paper's), the same lesion slices of three generated 2 mm cases
  in the same order for every rule, no augmentation; FocalDice loss and whole-lesion Dice (pooled)
  on the four most-lesioned slices of a fourth case before and after.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time

import torch

from BrainLesionSAMLib.backbones.base import BACKBONES
from BrainLesionSAMLib.methods.brainsegdmif import BrainSegDMIF, flops_per_slice

PAPER_PARAMETERS, PAPER_GFLOPS = 354e6, 311.0


def seconds_per_slice(model: BrainSegDMIF, repeats: int) -> tuple[float, float]:
    """(wall-clock, process CPU) seconds per slice."""
    images = 255 * torch.rand(1, 4, 256, 256)
    available = torch.ones(1, 4, dtype=torch.bool)
    with torch.inference_mode():
        model.predict_proba(images, available)  # warm-up (allocations, TinyViT's bias cache)
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(repeats):
            model.predict_proba(images, available)
    return (time.perf_counter() - wall) / repeats, (time.process_time() - cpu) / repeats


def _status_gib(field: str) -> float:
    """A memory field of /proc/self/status (Linux, kB) in GiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 2**20
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_rss_gib() -> float:
    return _status_gib("VmHWM")


def training_step_memory(backbone: str, batch: int) -> None:
    """Child process: build, one training step, print the figures."""
    torch.manual_seed(0)
    model = BrainSegDMIF(backbone=backbone).train()
    built = _status_gib("VmRSS")
    optimiser = torch.optim.Adam(model.parameters(), lr=model.config["learning_rate"])
    images = 255 * torch.rand(batch, 4, 256, 256)
    available = torch.ones(batch, 4, dtype=torch.bool)
    target = torch.zeros(batch, 256, 256, dtype=torch.long)
    target[:, 96:160, 80:150] = 1
    start = time.perf_counter()
    loss = model.training_loss({"images": images, "available": available, "target": target})
    optimiser.zero_grad()
    loss.backward()
    optimiser.step()
    seconds = time.perf_counter() - start
    print(f"{backbone} training step, batch {batch} (forward + FocalDice + backward + Adam step): {seconds:.1f} s; "
          f"peak RSS {peak_rss_gib():.2f} GiB (after building: {built:.2f} GiB; "
          f"{model.parameter_counts()['trainable']:,} trainable parameters)")


def lite_dmif_memory() -> None:
    """Child process: DMIF at TinyViT's first block, forward + backward at batch 2."""
    from BrainLesionSAMLib.methods.brainsegdmif_modules import DynamicModalInteractiveFusion, fusion_hidden_width

    config = BrainSegDMIF.default_config
    fusion = DynamicModalInteractiveFusion(64, 4, fusion_hidden_width(64, config["fusion_reduction"],
                                                                      config["fusion_min_hidden"]))
    features = torch.randn(2, 256, 256, 4, 64, requires_grad=True)
    present = torch.ones(2, 4, dtype=torch.bool)
    before = _status_gib("VmRSS")
    fused, _ = fusion(features, present)
    held = _status_gib("VmRSS") - before
    fused.square().mean().backward()
    print(f"lite: DMIF at the first TinyViT block (2 x 256 x 256 tokens x 4 modalities x 64 channels, "
          f"{features.numel() * 4 / 2**20:.0f} MiB of input): forward keeps {held:.2f} GiB for the backward "
          f"pass, peak {peak_rss_gib() - before:.2f} GiB over the RSS before (batch 2)")


def tinyvit_stream_memory() -> None:
    """Child process: what one TinyViT stream keeps for the backward pass (one 256 x 256 image)."""
    from BrainLesionSAMLib.backbones import build_backbone

    backbone = build_backbone("lite", 256).train()
    before = _status_gib("VmRSS")
    embedding = backbone.encode(backbone.normalize(255 * torch.rand(1, 3, 256, 256)))
    held = _status_gib("VmRSS") - before
    print(f"lite: one TinyViT stream's training forward on one image keeps {held:.2f} GiB for the backward "
          f"pass (embedding {tuple(embedding.shape)}); four streams: ~{4 * held:.1f} GiB per slice")


FEEDBACK_STUDY_RULES = ("add", "average", "gated", "none")


def _rms(streams: dict[int, torch.Tensor]) -> float:
    return float(torch.stack([x.float().square().mean() for x in streams.values()]).mean().sqrt())


def stream_rms_per_block(model: BrainSegDMIF, images: torch.Tensor, available: torch.Tensor) -> list[float]:
    """Token RMS of the streams after each block: the input of blocks 2..N (feedback included) and
    block N's output, from one forward pass (eval, no grad)."""
    seen: list[float] = []
    run_block, last = model._run_block, model.backbone.num_blocks - 1

    def recording(index: int, streams: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        if index > 0:
            seen.append(_rms(streams))
        out = run_block(index, streams)
        if index == last:
            seen.append(_rms(out))
        return out

    model._run_block = recording   # instance attribute, removed again below
    try:
        with torch.no_grad():
            model(images, available)
    finally:
        del model._run_block
    return seen


def _lesion_slices(seed: int, count: int | None = None):
    """A generated 2 mm case: (network slices [n, 4, 256, 256], available [n, 4], whole-lesion
    targets [n, 256, 256]) of its lesion slices (the ``count`` most lesioned, or all)."""
    import numpy as np
    import SimpleITK as sitk

    from BrainLesionSAMLib.preprocessing import prepare_case
    from BrainLesionSAMLib.sample import SampleParameters, generate_case

    images = generate_case(SampleParameters.random(seed, resolution=2))
    seg = sitk.GetArrayFromImage(images.pop("seg"))
    case = prepare_case(images)
    area = (seg > 0).sum(axis=(1, 2))
    z = [int(i) for i in (np.argsort(area)[::-1][:count] if count else np.nonzero(area)[0])]
    target = case.slice_geometry.to_network(seg[z][:, None].astype(np.float32), nearest=True)[:, 0] > 0
    available = torch.as_tensor(case.available)[None].expand(len(z), -1)
    return case.network_slices(z), available, target.long()


def feedback_rms(rules=FEEDBACK_STUDY_RULES) -> None:
    images, available, _ = _lesion_slices(3, count=1)
    for rule in rules:
        torch.manual_seed(0)
        model = BrainSegDMIF(backbone="lite", fusion_feedback=rule).eval()
        values = stream_rms_per_block(model, images, available)
        print(f"feedback {rule:8s} stream RMS after blocks 1-12: " + " ".join(f"{v:.3g}" for v in values))


def _evaluate(model: BrainSegDMIF, batch) -> tuple[float, float]:
    """(FocalDice loss, pooled whole-lesion Dice) on a batch of slices, eval mode."""
    images, available, target = batch
    model.eval()
    with torch.no_grad():
        logits = torch.cat([model(images[i:i + 1], available[i:i + 1]) for i in range(len(images))])
        loss = float(model.loss(logits, target))
    predicted = logits.argmax(dim=1) > 0
    truth = target > 0
    dice = float(2 * (predicted & truth).sum() / (predicted.sum() + truth.sum()).clamp_min(1))
    return loss, dice


def feedback_training(steps: int, rules=("add", "average", "gated")) -> None:
    import numpy as np

    parts = [_lesion_slices(seed) for seed in (100, 101, 102)]
    train = tuple(torch.cat([p[k] for p in parts]) for k in range(3))
    order = np.random.default_rng(0).permutation(len(train[0]))[:steps]
    validation = _lesion_slices(103, count=4)
    print(f"short training: {steps} steps of batch 1 from {len(train[0])} lesion slices of 3 cases; "
          f"validation: 4 slices of a fourth case ({int(validation[2].sum())} lesion pixels)")
    for rule in rules:
        torch.manual_seed(0)
        model = BrainSegDMIF(backbone="lite", modalities=["t1ce", "flair"], fusion_feedback=rule)
        optimiser = torch.optim.Adam(model.parameters(), lr=model.config["learning_rate"])
        before = _evaluate(model, validation)
        model.train()
        losses, started = [], time.process_time()
        torch.manual_seed(1)
        for index in order.tolist():
            batch = {"images": train[0][index:index + 1], "available": train[1][index:index + 1],
                     "target": train[2][index:index + 1]}
            loss = model.training_loss(batch)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            losses.append(float(loss.detach()))
        seconds = (time.process_time() - started) / steps
        after = _evaluate(model, validation)
        quarter = max(1, steps // 4)
        print(f"feedback {rule:8s}: validation loss {before[0]:.4f} -> {after[0]:.4f}, Dice {before[1]:.4f} -> "
              f"{after[1]:.4f}; training loss first {quarter} steps {np.mean(losses[:quarter]):.4f}, last {quarter} "
              f"{np.mean(losses[-quarter:]):.4f}; {seconds:.1f} CPU s per step; losses "
              + " ".join(f"{v:.3f}" for v in losses))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-memory", action="store_true", help="leave out the training-step memory")
    parser.add_argument("--lite-step-batch", type=int, default=0,
                        help="also a whole lite training step at this batch size (0: no)")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    parser.add_argument("--feedback-study", choices=("rms", "train"),
                        help="only the fusion-feedback study (see the module docstring)")
    parser.add_argument("--steps", type=int, default=16, help="--feedback-study train: steps per rule")
    parser.add_argument("--rules", nargs="+", choices=FEEDBACK_STUDY_RULES,
                        help="--feedback-study: only these feedback rules (default: all of the study)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.feedback_study == "rms":
        feedback_rms(*([args.rules] if args.rules else []))
        return
    if args.feedback_study == "train":
        feedback_training(args.steps, *([args.rules] if args.rules else []))
        return
    if args.memory_child:
        if args.memory_child == "dmif-lite":
            lite_dmif_memory()
        elif args.memory_child == "tinyvit":
            tinyvit_stream_memory()
        else:
            backbone, batch = args.memory_child.split(":")
            training_step_memory(backbone, int(batch))
        return
    print(f"torch {torch.__version__}, {args.threads} CPU threads")
    if not args.skip_memory:
        children = ["vit_b:2", "dmif-lite", "tinyvit"]
        if args.lite_step_batch > 0:
            children.append(f"lite:{args.lite_step_batch}")
        for child in children:
            subprocess.run([sys.executable, __file__, "--memory-child", child, "--threads", str(args.threads)],
                           check=True)
    for backbone in BACKBONES:
        torch.manual_seed(0)
        if backbone == "vit_b":
            with torch.device("meta"):
                on_meta = BrainSegDMIF(backbone=backbone)
        else:   # TinyViT reads tensor values while it is built; its eval() rebuilds the bias cache there
            on_meta = BrainSegDMIF(backbone=backbone).to("meta")
        gflops = flops_per_slice(on_meta.eval()) / 1e9
        del on_meta
        model = BrainSegDMIF(backbone=backbone).eval()
        counts = model.parameter_counts()
        wall, cpu = seconds_per_slice(model, args.repeats)
        print(f"brainsegdmif backbone={backbone}: {counts['total']:,} parameters "
              f"({counts['total'] / PAPER_PARAMETERS - 1:+.1%} vs the paper's 354M), "
              f"{gflops:.1f} GFLOPs per slice ({gflops / PAPER_GFLOPS - 1:+.1%} vs 311); "
              f"per slice (batch 1, inference): {wall:.2f} s wall, {cpu:.2f} s CPU")
        del model


if __name__ == "__main__":
    main()
