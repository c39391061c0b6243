"""Training the heads behind LiteMedSAM's frozen encoder on an embedding pool (issue 20).

Two trainings share one pool (``Training/embedding_pool.py``):

- **SOFA** (``sofa``): the sub-region modality attention, the sub-region prompts, the prompt encoder
  and the mask decoder, with the method's own loss (``SOFA.embedding_loss``: the paper's one-vs-all
  sub-region sampling, pass 1 with the automatic or the user's box, pass 2 with the sub-region's
  jittered box). A fraction ``user_box_probability`` of the slices gets a whole-tumour box (the
  Refine-with-ROI use), the rest train the automatic mode. The sub-region of a sample is drawn among
  those present in its slice with probability ``present_region_probability``, else uniformly (the
  paper's one-vs-all draw): with the uniform draw alone most sampled targets are empty (every slice
  without that compartment, every background slice). ``ce_weight`` is SOFA's lambda_ce. (All three
  runs so far collapsed to predicting nothing in automatic mode: docs/sam_heads.md.) Modality
  dropout: with probability ``modality_dropout`` a random non-empty subset of the four modalities
  is kept (SOFA's attention excludes missing modalities from its softmax).
- **Brain-tuned LiteMedSAM** (``litemedsam``): the prompt encoder and mask decoder, for the whole
  lesion inside a box on one modality drawn at random. The box is drawn the way a person draws an
  ROI around a tumour: the rectangle of the lesion over the whole case (the engine applies one
  rectangle to every slice of the box's slab, so slices near the lesion's top and bottom hold much
  less than the box, or nothing) or of the slice's own lesion, each side then moved by a random
  -``box_inset_px`` to +``box_margin`` (a fraction of the box side plus pixels). The target is the
  lesion inside the box (the engine labels nothing outside it). Loss: MONAI's DiceCELoss (sigmoid),
  LiteMedSAM's own training loss without its IoU-head term (the IoU head is not used here).

Both: Adam, cosine decay to 0 over the run, every random draw from one ``torch.Generator`` whose
state is checkpointed with the model, the optimiser and the schedule, so an interrupted run resumes
exactly (``state.pt``, written atomically every ``checkpoint_every`` steps). Validation Dice on the
pool's validation cases goes into ``curve.json`` (step, wall time, Dice).
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from BrainLesionSAMLib.io import atomic_output

from .embedding_pool import Pool

NETWORK_SIZE = 256
WHOLE_SLICE = (0.0, 0.0, float(NETWORK_SIZE), float(NETWORK_SIZE))


@dataclass
class HeadConfig:
    method: str                       # 'sofa' or 'litemedsam'
    steps: int = 2000
    batch_size: int = 4
    lr: float = 1e-4                  # LiteMedSAM's decoder and prompt encoder
    head_lr: float = 3e-3             # SOFA's new parts (attention, sub-region prompts; they start at zero)
    modality_dropout: float = 0.3     # SOFA: probability of keeping a random subset only
    user_box_probability: float = 0.5  # SOFA: pass 1 with a drawn whole-tumour box this often
    present_region_probability: float = 0.0  # SOFA: sub-region drawn among the slice's present ones this often
    ce_weight: float = 1.0            # SOFA: lambda_ce of its loss (lambda_iou stays 1)
    ce_positive_weight: float | str = 1.0  # SOFA: BCE weight of lesion pixels, or 'balanced' (its ce_positive_weight)
    case_box_probability: float = 0.5  # LiteMedSAM: the case's lesion rectangle, else the slice's
    box_margin: float = 0.15          # LiteMedSAM: up to this fraction of the box side outwards ...
    box_margin_px: int = 6            # ... plus up to this many pixels
    box_inset_px: int = 3             # ... or up to this many pixels inwards
    validate_every: int = 250
    checkpoint_every: int = 100
    seed: int = 0


def mask_box(mask: torch.Tensor) -> torch.Tensor | None:
    """(x0, y0, x1, y1), exclusive end, of a [H, W] mask (SOFA's eq. 4 boxes); None when empty."""
    from BrainLesionSAMLib.methods.sofa import mask_bounding_boxes

    return mask_bounding_boxes(mask) if bool(mask.any()) else None


def case_boxes(pool: Pool) -> dict[int, torch.Tensor]:
    """Per case, the rectangle of its whole lesion over all its pool slices (the ROI a user draws)."""
    boxes = {}
    for case in torch.unique(pool.case).tolist():
        union = (pool.targets[pool.case == case] > 0).any(0)
        box = mask_box(union)
        if box is not None:
            boxes[case] = box
    return boxes


def drawn_box(box: torch.Tensor, config: HeadConfig, generator: torch.Generator) -> torch.Tensor:
    """``box`` as a person draws it: each side moved independently outwards (up to ``box_margin`` of
    the side plus ``box_margin_px``) or inwards (up to ``box_inset_px``)."""
    side = torch.stack([box[2] - box[0], box[3] - box[1]]).repeat(2)
    low = -float(config.box_inset_px)
    high = side * config.box_margin + config.box_margin_px
    move = low + torch.rand(4, generator=generator) * (high - low)
    drawn = box + move * torch.tensor([-1.0, -1.0, 1.0, 1.0])
    drawn = drawn.clamp(0, NETWORK_SIZE)
    drawn[2:] = torch.maximum(drawn[2:], drawn[:2] + 1)  # never an empty box
    return drawn


def sampled_regions(targets: torch.Tensor, probability: float, generator: torch.Generator) -> torch.Tensor:
    """SOFA's sub-region per sample (0 NCR, 1 ED, 2 ET) for class-index targets [B, H, W]: uniform
    (one-vs-all), but with ``probability`` one of the sub-regions present in the slice, if any."""
    regions = torch.randint(0, 3, (len(targets),), generator=generator)
    for row, target in enumerate(targets):
        present = [r for r in range(3) if bool((target == r + 1).any())]
        if present and float(torch.rand(1, generator=generator)) < probability:
            regions[row] = present[int(torch.randint(0, len(present), (1,), generator=generator))]
    return regions


def dropped_modalities(available: torch.Tensor, probability: float, generator: torch.Generator) -> torch.Tensor:
    """available [B, 4] bool -> the same, with a random non-empty subset kept where a draw < probability."""
    out = available.clone()
    for row in range(len(out)):
        if float(torch.rand(1, generator=generator)) >= probability:
            continue
        present = out[row].nonzero().flatten()
        keep = torch.rand(len(present), generator=generator) < 0.5
        if not bool(keep.any()):
            keep[torch.randint(0, len(present), (1,), generator=generator)] = True
        out[row] = False
        out[row, present[keep]] = True
    return out


class HeadTraining:
    """Builds the method with its frozen encoder, draws batches from the pool and computes losses."""

    def __init__(self, config: HeadConfig, pool: Pool):
        self.config = config
        self.pool = pool
        self.case_boxes = case_boxes(pool)
        if config.method == "sofa":
            from BrainLesionSAMLib.methods.sofa import SOFA

            self.model = SOFA(freeze_image_encoder=True, train_user_box_probability=config.user_box_probability,
                              lambda_ce=config.ce_weight, ce_positive_weight=config.ce_positive_weight)
            self.candidates = torch.arange(len(pool))
            new = ("attention.", "region_prompts")
            groups = [{"params": [p for n, p in self.model.named_parameters() if p.requires_grad and not n.startswith(new)],
                       "lr": config.lr},
                      {"params": [p for n, p in self.model.named_parameters() if p.requires_grad and n.startswith(new)],
                       "lr": config.head_lr}]
        elif config.method == "litemedsam":
            from BrainLesionSAMLib.methods.boxprompt import LiteMedSAMMethod

            self.model = LiteMedSAMMethod.pretrained()
            for parameter in self.model.net.image_encoder.parameters():
                parameter.requires_grad_(False)
            # slices a box can be drawn on: every slice of a case with a lesion (healthy cases get no box)
            self.candidates = torch.tensor([i for i in range(len(pool)) if int(pool.case[i]) in self.case_boxes])
            groups = [{"params": [p for p in self.model.parameters() if p.requires_grad], "lr": config.lr}]
            from monai.losses import DiceCELoss

            self.loss_function = DiceCELoss(sigmoid=True, squared_pred=True, reduction="mean")
        else:
            raise ValueError(f"unknown head training method {config.method!r}; use 'sofa' or 'litemedsam'")
        self.optimiser = torch.optim.Adam(groups)
        steps = max(1, config.steps)
        self.schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimiser, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, steps) / steps)))
        self.generator = torch.Generator().manual_seed(config.seed)
        self.step = 0
        self.seconds = 0.0
        self.curve: list[dict] = []

    def trained_names(self) -> list[str]:
        return [name for name, p in self.model.named_parameters() if p.requires_grad]

    # --- one step ----------------------------------------------------------------------------------
    def batch_indices(self) -> torch.Tensor:
        pick = torch.randint(0, len(self.candidates), (self.config.batch_size,), generator=self.generator)
        return self.candidates[pick]

    def sofa_loss(self, index: torch.Tensor) -> torch.Tensor:
        pool, config, generator = self.pool, self.config, self.generator
        targets = pool.targets[index].long()
        available = dropped_modalities(pool.available[index], config.modality_dropout, generator)
        boxes = []
        for target in targets:
            box = mask_box(target > 0)
            boxes.append(torch.tensor(WHOLE_SLICE) if box is None else drawn_box(box, config, generator))
        regions = sampled_regions(targets, config.present_region_probability, generator)
        return self.model.embedding_loss(pool.embeddings[index].float(), available, targets,
                                         boxes=torch.stack(boxes), regions=regions, generator=generator)

    def litemedsam_sample(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(embedding [256, 64, 64] of a random available modality, box [4], target [256, 256] in box)."""
        pool, config, generator = self.pool, self.config, self.generator
        present = pool.available[i].nonzero().flatten()
        modality = int(present[torch.randint(0, len(present), (1,), generator=generator)])
        lesion = pool.targets[i] > 0
        own = mask_box(lesion)
        use_case = own is None or float(torch.rand(1, generator=generator)) < config.case_box_probability
        box = drawn_box(self.case_boxes[int(pool.case[i])] if use_case else own, config, generator)
        x0, y0, x1, y1 = (int(round(float(v))) for v in box)
        inside = torch.zeros_like(lesion)
        inside[y0:y1, x0:x1] = True
        return pool.embeddings[i, modality].float(), box, (lesion & inside).float()

    def litemedsam_loss(self, index: torch.Tensor) -> torch.Tensor:
        samples = [self.litemedsam_sample(i) for i in index.tolist()]
        embeddings = torch.stack([s[0] for s in samples])
        boxes = torch.stack([s[1] for s in samples])
        targets = torch.stack([s[2] for s in samples])[:, None]
        logits = self.model.net.decode(embeddings, boxes)
        return self.loss_function(logits.float(), targets)

    def train_step(self) -> float:
        self.model.train()
        index = self.batch_indices()
        loss = self.sofa_loss(index) if self.config.method == "sofa" else self.litemedsam_loss(index)
        self.optimiser.zero_grad()
        loss.backward()
        self.optimiser.step()
        self.schedule.step()
        self.step += 1
        return float(loss.detach())

    # --- validation --------------------------------------------------------------------------------
    @torch.inference_mode()
    def validate(self, pool: Pool) -> dict[str, float]:
        """Mean per-case Dice over the validation pool's slices: SOFA automatic (no box) WT/TC/ET and
        with the case's lesion box (WT); LiteMedSAM with the case's box grown by 5 px on FLAIR (WT).
        Cases without a region are left out of that region's mean."""
        self.model.eval()
        boxes = case_boxes(pool)
        sums: dict[str, list[float]] = {}
        for case in torch.unique(pool.case).tolist():
            rows = (pool.case == case).nonzero().flatten()
            truth = pool.targets[rows].long()
            if self.config.method == "sofa":
                predictions = {"": [], "box_": []}
                for start in range(0, len(rows), 4):
                    chunk = rows[start:start + 4]
                    embeddings, available = pool.embeddings[chunk].float(), pool.available[chunk]
                    predictions[""].append(self.model.decode_proba(embeddings, available).argmax(1))
                    if case in boxes:
                        box = (boxes[case] + torch.tensor([-5.0, -5.0, 5.0, 5.0])).clamp(0, NETWORK_SIZE)
                        predictions["box_"].append(
                            self.model.decode_proba(embeddings, available, box.expand(len(chunk), 4)).argmax(1))
                for prefix, parts in predictions.items():
                    if not parts:
                        continue
                    predicted = torch.cat(parts)
                    regions = {"WT": (1, 2, 3), "TC": (1, 3), "ET": (3,)} if not prefix else {"WT": (1, 2, 3)}
                    for name, classes in regions.items():
                        _add_dice(sums, prefix + name, torch.isin(predicted, torch.tensor(classes)),
                                  torch.isin(truth, torch.tensor(classes)))
            elif case in boxes:
                box = (boxes[case] + torch.tensor([-5.0, -5.0, 5.0, 5.0])).clamp(0, NETWORK_SIZE)
                flair = 3
                logits = torch.cat([self.model.net.decode(pool.embeddings[chunk, flair].float(),
                                                          box.expand(len(chunk), 4))
                                    for chunk in rows.split(8)])
                x0, y0, x1, y1 = (int(round(float(v))) for v in box)
                inside = torch.zeros(NETWORK_SIZE, NETWORK_SIZE, dtype=torch.bool)
                inside[y0:y1, x0:x1] = True
                _add_dice(sums, "box_WT", (logits[:, 0] > 0) & inside, (truth > 0) & inside)
        self.model.train()
        return {name: sum(values) / len(values) for name, values in sums.items()}

    # --- state -------------------------------------------------------------------------------------
    def state(self) -> dict:
        return {"config": asdict(self.config), "step": self.step, "seconds": self.seconds, "curve": self.curve,
                "model": {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad},
                "optimiser": self.optimiser.state_dict(), "schedule": self.schedule.state_dict(),
                "generator": self.generator.get_state()}

    def load_state(self, state: dict) -> None:
        # a checkpoint from before a field was added has that field's default
        if asdict(HeadConfig(**state["config"])) != asdict(self.config):
            raise ValueError(f"the checkpoint was made with another configuration ({state['config']}); "
                             "use a new run folder or the same settings")
        missing = self.model.load_state_dict(state["model"], strict=False)
        if missing.unexpected_keys:
            raise ValueError(f"checkpoint tensors {missing.unexpected_keys} do not belong to {self.config.method}")
        self.optimiser.load_state_dict(state["optimiser"])
        self.schedule.load_state_dict(state["schedule"])
        self.generator.set_state(state["generator"])
        self.step, self.seconds, self.curve = state["step"], state["seconds"], state["curve"]


def _add_dice(sums: dict[str, list[float]], name: str, predicted: torch.Tensor, truth: torch.Tensor) -> None:
    if not bool(truth.any()):
        return
    overlap = float((predicted & truth).sum())
    sums.setdefault(name, []).append(2 * overlap / float(predicted.sum() + truth.sum()))


def run(config: HeadConfig, pool: Pool, validation: Pool, folder: str | os.PathLike,
        log: Callable[[str], None] = print) -> HeadTraining:
    """Train (or resume) in ``folder``: ``state.pt`` and ``curve.json``; returns the finished training."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    training = HeadTraining(config, pool)
    state_path = folder / "state.pt"
    if state_path.is_file():
        training.load_state(torch.load(state_path, weights_only=False))
        log(f"resumed {config.method} at step {training.step} ({training.seconds / 60:.1f} min trained)")
    else:
        log(f"{config.method}: {len(training.trained_names())} trained tensors, "
            f"{sum(p.numel() for p in training.model.parameters() if p.requires_grad):,} parameters; "
            f"{len(training.candidates)} training slices")

    def save() -> None:
        with atomic_output(state_path) as temporary:
            torch.save(training.state(), temporary)
        (folder / "curve.json").write_text(json.dumps(training.curve, indent=1), encoding="utf-8")

    def record() -> None:
        scores = training.validate(validation)
        training.curve.append({"step": training.step, "seconds": round(training.seconds, 1),
                               **{k: round(v, 4) for k, v in scores.items()}})
        log(f"step {training.step} ({training.seconds / 60:.1f} min): validation "
            + " ".join(f"{k} {v:.3f}" for k, v in scores.items()))

    if not training.curve:
        record()
    losses = []
    while training.step < config.steps:
        start = time.perf_counter()
        losses.append(training.train_step())
        training.seconds += time.perf_counter() - start
        if training.step % 25 == 0:
            log(f"step {training.step}: loss {sum(losses[-25:]) / len(losses[-25:]):.4f} "
                f"({training.seconds / training.step:.2f} s per step)")
        if training.step % config.validate_every == 0 or training.step == config.steps:
            record()
        if training.step % config.checkpoint_every == 0 or training.step == config.steps:
            save()
    return training
