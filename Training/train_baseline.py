"""Train the ``unet2d`` baseline on generated sample cases (seeded, CPU, a few minutes).

This is how the packaged weights ``BrainLesionSAMLib/weights/unet2d_sample.safetensors`` are made
(``python scripts/train_sample_weights.py``). Cases come from the library's generator with seeds
disjoint from the demo's sample case and from the test seeds, so the demo measures generalisation.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from monai.losses import DiceCELoss

from BrainLesionSAMLib.checkpoints import save_checkpoint
from BrainLesionSAMLib.methods import build_method
from BrainLesionSAMLib.sample import SampleParameters, generate_case
from Training.slice_data import SliceSet, slices_from_images

# Training cases use seeds from this offset on; the demo's case and test cases use small seeds.
TRAINING_SEED_OFFSET = 10_000


def build_training_slices(n_cases: int, seed: int, resolution: int = 1, log=print) -> SliceSet:
    rng = np.random.default_rng(seed)
    parts = []
    for i in range(n_cases):
        case_seed = TRAINING_SEED_OFFSET + seed * 1000 + i
        images = generate_case(SampleParameters.random(case_seed, resolution=resolution))
        parts.append(slices_from_images(images, rng))
        log(f"case {i + 1}/{n_cases} (seed {case_seed}): {len(parts[-1])} slices")
    return SliceSet.concatenate(parts)


def augment(images: torch.Tensor, available: torch.Tensor, classes: torch.Tensor,
            generator: torch.Generator, drop_probability: float = 0.3):
    """Flips, per-modality intensity scale/shift and random modality dropout (keeps >= 1).

    images float [B, 4, H, W] in [0, 255]; returns augmented copies.
    """
    batch = len(images)
    flip = torch.rand(batch, generator=generator) < 0.5
    images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    classes = torch.where(flip[:, None, None], classes.flip(-1), classes)
    scale = 1 + 0.2 * (torch.rand(batch, 4, 1, 1, generator=generator) - 0.5)
    shift = 10 * (torch.rand(batch, 4, 1, 1, generator=generator) - 0.5)
    brain = images > 0
    images = torch.where(brain, (images * scale + shift).clamp(0, 255), images)
    available = available.clone()
    for b in range(batch):
        if torch.rand(1, generator=generator).item() < drop_probability:
            present = torch.nonzero(available[b]).flatten()
            n_keep = int(torch.randint(1, len(present) + 1, (1,), generator=generator))
            keep = torch.randperm(len(present), generator=generator)[:n_keep]
            available[b] = False
            available[b, present[keep]] = True
    images = images * available[:, :, None, None]
    return images, available, classes


def train(n_cases: int = 12, steps: int = 400, batch_size: int = 8, learning_rate: float = 2e-3,
          seed: int = 0, resolution: int = 1, log=print):
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    data = build_training_slices(n_cases, seed, resolution, log)
    model = build_method("unet2d")
    model.train()
    loss_function = DiceCELoss(to_onehot_y=True, softmax=True)
    optimiser = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=learning_rate, total_steps=steps)
    start = time.perf_counter()
    for step in range(steps):
        index = torch.randint(0, len(data), (batch_size,), generator=generator)
        images, available, classes = augment(data.images[index].float(), data.available[index],
                                             data.classes[index].long(), generator)
        logits = model(images, available)
        loss = loss_function(logits, classes[:, None])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        schedule.step()
        if step % 25 == 0 or step == steps - 1:
            log(f"step {step + 1}/{steps} loss {loss.item():.4f} ({time.perf_counter() - start:.0f} s)")
    return model.eval(), len(data)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cases", type=int, default=12)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resolution", type=int, default=1, choices=(1, 2))
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, n_slices = train(args.cases, args.steps, args.batch_size, args.lr, args.seed, args.resolution)
    description = (f"BrainLesionSAM generated sample cases: {args.cases} cases at {args.resolution} mm, "
                   f"seeds {TRAINING_SEED_OFFSET + args.seed * 1000}+, {n_slices} slices, "
                   f"{args.steps} steps of batch {args.batch_size}, AdamW one-cycle lr {args.lr}")
    save_checkpoint(model, args.out, training_data=description)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
