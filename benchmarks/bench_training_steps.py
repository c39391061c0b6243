"""Cost of one training step of the paper methods in reduced CPU configurations (issue 21): the
figure that sizes a release training run (docs/release_methods.md).

    python benchmarks/bench_training_steps.py [--threads 1] [--batch 2] [--steps 3]

One step = ``training_loss(batch)``, backward and an AdamW step on a batch of random 256 x 256
slices (four modalities, a lesion square as target, a box for the promptable methods), on one
process; printed: the fastest step after the first (which pays for allocation), the ratio to the
first row and the trainable parameters. Run it on an idle machine, or read the ratios only.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from BrainLesionSAMLib.methods import build_method  # noqa: E402

CONFIGURATIONS = {
    "CMAA, LiteMedSAM, 128 px (release)": ("cmaa", {"backbone": "lite", "image_size": 128}),
    "CMAA, LiteMedSAM, 256 px": ("cmaa", {"backbone": "lite"}),
    "DB-SAM, LiteMedSAM, 128 px": ("dbsam", {"backbone": "lite", "image_size": 128}),
    "DB-SAM, LiteMedSAM, 256 px": ("dbsam", {"backbone": "lite"}),
    "BrainSegDMIF, LiteMedSAM, 128 px, one shared frozen encoder":
        ("brainsegdmif", {"backbone": "lite", "image_size": 128, "freeze_encoders": True, "shared_encoder": True}),
    "BrainSegDMIF, LiteMedSAM, 128 px, four fine-tuned encoders (paper)":
        ("brainsegdmif", {"backbone": "lite", "image_size": 128}),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="steps per configuration (the first is left out)")
    parser.add_argument("--only", nargs="*", help="only configurations whose name contains one of these")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    target = torch.zeros(args.batch, 256, 256, dtype=torch.long)
    target[:, 80:160, 90:170] = 1
    batch = {"images": torch.rand(args.batch, 4, 256, 256) * 255,
             "available": torch.ones(args.batch, 4, dtype=torch.bool),
             "boxes": torch.tensor([[80.0, 70.0, 180.0, 170.0]] * args.batch), "target": target}
    first = None
    for name, (method, config) in CONFIGURATIONS.items():
        if args.only and not any(part in name for part in args.only):
            continue
        model = build_method(method, config).train()
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimiser = torch.optim.AdamW(trainable, lr=1e-4)
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            model.training_loss(batch).backward()
            optimiser.step()
            optimiser.zero_grad()
            times.append(time.perf_counter() - start)
        seconds = min(times[1:] or times)
        first = first or seconds
        print(f"{name}: {seconds:.2f} s / step of batch {args.batch} ({args.threads} thread(s)), "
              f"{seconds / first:.1f}x the first row, {sum(p.numel() for p in trainable) / 1e6:.2f} M trainable",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
