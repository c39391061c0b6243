"""DB-SAM CPU time per 256 x 256 slice: ``encode`` (everything image-dependent: both branches, the
cross-attention, the fusion and SAM's neck; run once per slice and cached) and ``decode_proba`` (prompt
encoder + mask decoder for a new box: what a box refinement re-runs), for each backbone.

    python benchmarks/bench_dbsam.py [--threads 1] [--repeats 2] [--batch 1] [--configs vit_b-1024 vit_b-256 lite]

Prints, per configuration, the median wall-clock seconds per slice of ``--repeats`` runs (after one
warm-up) and the process CPU seconds per slice (the steadier figure on a shared machine), plus the frozen backbone's own encoder time on the
same input for comparison (what the adapters add). Random ViT-B weights (no SAM weights offline),
the real LiteMedSAM weights: the time does not depend on the values. The default config is the
paper's (MLP ratio 4, interactions after blocks 2, 5, 8, 11); the ``-every`` configurations put the
bilateral cross-attention after every block (``interaction_blocks: 'every_block'``), the paper's
literal reading, to measure what it costs. ``train`` is one training step's forward + backward
(``training_loss`` in train mode, dropout on, a box-shaped lesion); when a configuration and its
``-every`` variant both run, a last line gives every-block / four-stage ratios of the parameter
counts and of the encode and training-step CPU times (``--no-train``: encode and decode only).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from BrainLesionSAMLib.methods.dbsam import DBSAM

CONFIGS = {
    "vit_b-1024": {"backbone": "vit_b", "image_size": 1024},
    "vit_b-256": {"backbone": "vit_b", "image_size": 256},
    "lite": {"backbone": "lite"},
    # The paper's literal "fusion of the output features of each block": cross-attention after all 12.
    "vit_b-256-every": {"backbone": "vit_b", "image_size": 256, "interaction_blocks": "every_block"},
    "lite-every": {"backbone": "lite", "interaction_blocks": "every_block"},
}


def timed(function, repeats: int) -> tuple[float, float]:
    """(median wall seconds, median process CPU seconds) of ``repeats`` calls after one warm-up."""
    function()
    wall, cpu = [], []
    for _ in range(repeats):
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        function()
        wall.append(time.perf_counter() - start_wall)
        cpu.append(time.process_time() - start_cpu)
    return statistics.median(wall), statistics.median(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--no-train", action="store_true", help="skip the training-step timing")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} CPU thread(s), batch {args.batch}, "
          f"median of {args.repeats} after a warm-up")
    images = 255 * torch.rand(args.batch, 4, 256, 256)
    available = torch.ones(args.batch, 4, dtype=torch.bool)
    boxes = torch.tensor([[60.0, 70.0, 180.0, 200.0]]).repeat(args.batch, 1)
    target = torch.zeros(args.batch, 256, 256, dtype=torch.long)
    target[:, 90:180, 80:160] = 1
    batch = {"images": images, "available": available, "target": target, "boxes": boxes}
    measured: dict[str, dict[str, float]] = {}
    for name in args.configs:
        model = DBSAM(**CONFIGS[name]).eval()
        counts = model.parameter_counts()
        backbone = model.backbone
        size = backbone.image_size
        with torch.inference_mode():
            embeddings = model.encode(images, available)
            rgb = model.input_image(images, available)
            if size != 256:
                rgb = torch.nn.functional.interpolate(rgb, size=(size, size), mode="bilinear", align_corners=False)
            normalized = backbone.normalize(rgb)
            encode = timed(lambda: model.encode(images, available), args.repeats)
            plain = timed(lambda: backbone.encode(normalized), args.repeats)
            decode = timed(lambda: model.decode_proba(embeddings, available, boxes), args.repeats)
        per = args.batch
        print(f"dbsam {name}: {counts['total']:,} parameters ({counts['trainable']:,} trainable), "
              f"embedding {tuple(embeddings.shape[1:])}")
        print(f"  encode  {encode[0] / per:8.3f} s per slice (CPU {encode[1] / per:8.3f} s)   "
              f"[frozen {backbone.name} encoder alone: {plain[0] / per:.3f} s, CPU {plain[1] / per:.3f} s]")
        print(f"  decode  {decode[0] / per:8.3f} s per slice (CPU {decode[1] / per:8.3f} s)   (box refinement)")
        measured[name] = {"total": counts["total"], "trainable": counts["trainable"], "encode": encode[1]}
        if not args.no_train:
            model.train()

            def step() -> None:
                model.zero_grad(set_to_none=True)
                model.training_loss(batch).backward()

            train = timed(step, args.repeats)
            measured[name]["train"] = train[1]
            print(f"  train   {train[0] / per:8.3f} s per slice (CPU {train[1] / per:8.3f} s)   "
                  "(one step: forward + backward)")
        del model
    for name in args.configs:
        every, base = measured.get(f"{name}-every"), measured[name]
        if every is None:
            continue
        ratios = ", ".join(f"{key} {every[key] / base[key]:.2f}x" for key in ("total", "trainable", "encode", "train")
                           if key in base and key in every)
        print(f"dbsam {name}-every / {name} (every block / four stages): {ratios} "
              f"(+{every['total'] - base['total']:,} parameters)")


if __name__ == "__main__":
    main()
