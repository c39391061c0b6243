"""Optimisers and learning-rate schedules from a config's ``optimizer`` and ``scheduler`` sections.

The schedule is a ``LambdaLR`` stepped once per optimiser step; its factor is a function of the step
(:class:`ScheduleFactor`), with epoch-based settings (MultiStepLR milestones, warm-up) converted to
steps. Its state is just the step count, so resuming restores it exactly.

- ``constant``: factor 1.
- ``multistep``: ``gamma ** (number of milestones_epochs passed)`` (BrainSegDMIF: x0.5 at 7 and 12).
- ``cosine``: from 1 to ``min_lr_ratio`` over the run (SOFA).
- ``poly``: ``(1 - t) ** power`` to ``min_lr_ratio`` (DB-SAM, nnU-Net/MoME: power 0.9).
- ``warmup_epochs``: a linear ramp before any of them.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

import torch


def build_optimizer(parameters: Iterable[torch.nn.Parameter], config: dict[str, Any]) -> torch.optim.Optimizer:
    parameters = [p for p in parameters if p.requires_grad]
    if not parameters:
        raise ValueError("the method has no trainable parameters (every parameter has requires_grad False)")
    name, lr, decay = config["name"], float(config["lr"]), float(config["weight_decay"])
    if name == "adam":
        return torch.optim.Adam(parameters, lr=lr, betas=tuple(config["betas"]), weight_decay=decay)
    if name == "adamw":
        return torch.optim.AdamW(parameters, lr=lr, betas=tuple(config["betas"]), weight_decay=decay)
    if name == "sgd":
        return torch.optim.SGD(parameters, lr=lr, momentum=float(config["momentum"]),
                               nesterov=bool(config["nesterov"]), weight_decay=decay)
    raise ValueError(f"unknown optimizer {name!r}")


class ScheduleFactor:
    """LR multiplier as a function of the optimiser step (a picklable object, not a lambda)."""

    def __init__(self, config: dict[str, Any], steps_per_epoch: int, total_steps: int):
        self.name = config["name"]
        self.gamma = float(config["gamma"])
        self.power = float(config["power"])
        self.floor = float(config["min_lr_ratio"])
        self.milestones = [int(round(float(m) * steps_per_epoch)) for m in config["milestones_epochs"]]
        self.warmup = int(round(float(config["warmup_epochs"]) * steps_per_epoch))
        self.total = max(1, int(total_steps))

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.name == "multistep":
            return self.gamma ** sum(step >= m for m in self.milestones)
        t = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        if self.name == "cosine":
            return self.floor + (1.0 - self.floor) * 0.5 * (1.0 + math.cos(math.pi * t))
        if self.name == "poly":
            return self.floor + (1.0 - self.floor) * (1.0 - t) ** self.power
        return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, config: dict[str, Any], steps_per_epoch: int,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, ScheduleFactor(config, steps_per_epoch, total_steps))
