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
    from BrainLesionSAMLib.backbones.base import build_backbone

    backbone = build_backbone("lite", 256).train()
    before = _status_gib("VmRSS")
    embedding = backbone.encode(backbone.normalize(255 * torch.rand(1, 3, 256, 256)))
    held = _status_gib("VmRSS") - before
    print(f"lite: one TinyViT stream's training forward on one image keeps {held:.2f} GiB for the backward "
          f"pass (embedding {tuple(embedding.shape)}); four streams: ~{4 * held:.1f} GiB per slice")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--skip-memory", action="store_true", help="leave out the training-step memory")
    parser.add_argument("--lite-step-batch", type=int, default=0,
                        help="also a whole lite training step at this batch size (0: no)")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
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
