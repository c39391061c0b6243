"""``sofa``: sub-region-aware modality attention and adaptive prompting on LiteMedSAM (Aljani,
Aghaee Meibodi, Najjaran, "Sub-Region-Aware Modality Fusion and Adaptive Prompting for Multi-Modal
Brain Tumor Segmentation"; SOFA).

What the paper says (section 3.3-3.4, Algorithm 1):

- LiteMedSAM (TinyViT encoder, SAM prompt encoder and two-way mask decoder) on 2D slices.
- Every modality m goes through the encoder on its own, giving feature maps f_m in R^{C x H x W}.
- Sub-region-aware modality attention for r in {necrotic core, edema, enhancing tumour} (eq. 1-3)::

      e_{m,r} = tanh(W_r f_m + b_r),  alpha_{m,r} = softmax_m(e_{m,r}),  f_r = sum_m alpha_{m,r} f_m

  with W_r, b_r "a linear layer for sub-region r".
- Adaptive prompting: pass 1 predicts Y_pred1; P_r = BoundingBox(Y_pred1 = r) (eq. 4) goes through
  the prompt encoder (eq. 5) and the mask decoder decodes f_r with it (eq. 6, pass 2); the
  sub-region predictions are combined into one label map at threshold 0.5.
- One-vs-all training: per sample one of the three binary sub-region masks is drawn at random and
  the loss is computed on it; loss lambda_seg CE + lambda_iou IoU ("Dice-based IoU"), both 1;
  augmentation: rotation +-15 deg, scaling 0.9-1.1, random intensity; Adam, lr 3e-5, cosine decay,
  batch 2, 200 epochs.

What is decided here where the paper is vague (all switchable in ``default_config``):

- **f_m is the image embedding** (TinyViT's neck output, [256, 64, 64]): eq. 6 decodes f_r with
  SAM's mask decoder, which takes exactly that. The four modalities go through the one shared
  encoder as one batch; a modality that is missing is not encoded at all.
- **Input per modality**: the modality's [0, 255] slice repeated to three channels and scaled by
  the backbone's own ``normalize`` (LiteMedSAM: per-image min-max to [0, 1], what it was trained
  on; SAM ViT-B: pixel mean/std).
- **W_r is a linear layer over the C channels at every position** (``attention_pooling: 'none'``,
  the literal reading of "a linear layer" applied to f_m in R^{C x H x W}): the weights are maps,
  alpha_{m,r} in R^{H x W}, softmax over m at every pixel, f_r the pixel-wise weighted sum. All three
  W_r are one ``nn.Linear(256, 3)`` (row r = W_r). ``'mean'`` averages f_m over the grid first, giving
  one weight per modality, sub-region and slice. W starts at zero (``attention_zero_init``), so an
  untrained head fuses by the plain mean of the modalities (alpha = 1/M) and training starts from
  the unchanged LiteMedSAM; tanh'(0) = 1, so the gradient reaches W at once.
- **Missing modalities are excluded from the softmax** (their e is -inf, alpha exactly 0) so the
  weights of the available ones sum to 1 and a missing modality's zero features never dilute f_r.
  The paper assumes all four (it names missing modalities as future work). Any non-empty subset works.
- **Pass 1** (Algorithm 1 line 4, "LiteMedSAM(X_norm)", does not say with which prompt or which
  features): the mask decoder decodes each f_r with the first-pass prompt
  (``first_pass_prompt``): the **whole-slice box** (0, 0, 256, 256) by default (LiteMedSAM only
  ever saw box prompts; the whole slice is the box "anywhere in this slice") or SAM's learnt
  no-prompt embedding (``'none'``). A **user box** (``boxes``, a Slicer ROI / ``--box`` in network
  pixels) replaces the automatic whole-slice box: it is the whole-tumour box. The same decoder and
  the same f_r serve both passes; pass 1 adds no parameters. (The whole-slice box does not depend on
  the image, so the pass-1 prompt is known from the embeddings alone and the embeddings are cacheable.)
- **Sub-region prompts** (``region_prompts``, our addition, on by default; ``False`` is the paper's
  literal design). One decoder decodes all three sub-regions from the same pass-1 prompt, and in
  the paper the only thing that tells it which sub-region it is asked for is f_r, i.e. how far the
  attention weights differ between the sub-regions. They start equal and move slowly (LiteMedSAM's
  embeddings are small, std ~0.09, so W_r must grow large before alpha moves); while they are
  nearly equal, f_r is nearly the same for every r and a decoder trained one-vs-all learns the
  average sub-region. Measured with ``benchmarks/finetune_sofa.py`` (frozen encoder, 300 steps):
  at lr 1e-4 for everything the weights stayed at 0.25 +- 0.003 and pass 1 gave one and the same
  mask for all three sub-regions; with lr 3e-3 for the new parts, on two test cases, Dice
  WT/TC/ET/NCR/ED 0.64/0.63/0.37/0.48/0.26 without and 0.72/0.75/0.55/0.66/0.45 with sub-region
  prompts. Each sub-region therefore has a learnt 256-d dense prompt embedding t_r, added to f_r
  exactly where SAM's mask decoder adds its dense (mask) prompt embedding (``src = image embedding
  + dense prompt``), zero at the start (an untrained SOFA is still LiteMedSAM on the mean fusion);
  768 parameters. It is a "sub-region-specific prompt" in the paper's words, the class prompt of
  SurgicalSAM, which the paper cites ([15]); the boxes of eq. 4-6 are still what refines.
- **Pass 2**: P_r = the bounding box of pass 1's sub-region r (logit > 0, i.e. probability > 0.5),
  (x0, y0, x1, y1) in network pixels with exclusive end (SAM's convention, the engine's boxes), not
  clipped to a user box (the engine labels nothing outside the user's box anyway). **A sub-region
  absent after pass 1 stays absent**: it is not decoded again and its pass-1 logits (all <= 0) are
  kept. ``refine: False`` switches pass 2 off (the output is then pass 1's).
- **Combining** the three independent sub-region probabilities p_r = sigmoid(logit_r) (one-vs-all,
  threshold 0.5) into one BraTS label map and class probabilities summing to 1: a pixel is
  background when every p_r <= 0.5; otherwise it gets the sub-region with the highest p_r (overlaps:
  the most probable sub-region wins). The class probabilities that the engine's argmax turns into
  exactly this map: background 1 - max_r p_r, the winning sub-region max_r p_r, the other two 0
  (``region_class_probabilities``). ``forward`` returns their log (softmax(forward) = predict_proba).
  Channels follow ``LABEL_SETS['brats']``: background, NCR (1), ED (2), ET (4).
- **Training** (``training_loss``): per sample one sub-region r drawn uniformly (one-vs-all, also
  when r is absent from the slice, so that "nothing here" is learnt). Pass 1 decodes f_r with the
  first-pass prompt: the batch's box (the ground-truth whole-tumour box the training package gives
  promptable methods) with probability ``train_user_box_probability`` (0.5), else the automatic
  prompt, so both the boxed and the box-less use are trained. Pass 2 is trained where r is present,
  with r's ground-truth bounding box grown by a random 0-``train_box_jitter_px`` (5) px per side
  (LiteMedSAM's own training jitter at 256; the paper does not say how pass 2 is trained; boxes
  from pass 1 would be noise early in training). Loss = L(pass 1) + L(pass 2) with
  L = lambda_ce BCE + lambda_iou (1 - soft IoU): torch's BCE (lesion pixels weighted by
  ``ce_positive_weight``, 1 by default; see ``region_loss``) plus MONAI's ``DiceLoss(sigmoid=True,
  jaccard=True)``, i.e. MONAI's Dice loss in its Jaccard form ("Dice-based IoU"), over the whole
  batch (``iou_batch``; a sampled sub-region is often empty in a slice). (The names lambda_seg /
  lambda_iou are LiteMedSAM's training script's, whose "IoU loss" is the MSE of the IoU-prediction
  head; the paper calls its IoU loss Dice-based, which is what is implemented; the IoU head is not
  used.)
- **Frozen parts**: none by default (the paper fine-tunes LiteMedSAM; "the attention mechanism in
  TinyViT, when properly fine-tuned"). ``freeze_image_encoder: True`` freezes TinyViT (it then stays
  in eval mode under ``.train()``: its BatchNorm statistics are kept), e.g. to train on precomputed
  embeddings (``embedding_loss``), as ``benchmarks/finetune_sofa.py`` does on the CPU.
- **Augmentation** (``build_augmentation``): MONAI's RandRotated (+-15 deg), RandZoomd (0.9-1.1)
  and per-modality RandScaleIntensityd (x(1 +- 0.1)) and RandShiftIntensityd (+- 0.1 x 255), each
  with probability 0.5 (the paper gives ranges, not probabilities or intensity amounts).
- **Per-case weights** (``case_weights``, shown in the lesion report): {sub-region: {modality:
  alpha}} for the available modalities, where a slice's alpha is the attention map averaged over
  the pixels of that slice's final sub-region mask (at the attention's 64 x 64 grid, mask fractions
  as weights), then averaged over the case's slices in which the sub-region was found. A
  sub-region found in no slice is left out.
- **Embedding cache**: ``encode`` returns the four modalities' embeddings [B, 4, 256, 64, 64]
  (16.8 MB per slice in float32; zeros for missing modalities), ``decode_proba`` runs attention,
  both passes and the combination; ``predict_proba`` is exactly ``decode_proba(encode(...))``, so
  the engine's cached and uncached paths agree bit for bit and a new box re-runs only the light part.
- **Weights**: the constructor initialises the backbone from ``backbone_weights`` (lite: None = the
  packaged ``lite_medsam.pth``); the attention has no published weights, so ``pretrained()``
  returns None (an untrained attention head cannot tell the sub-regions apart) and the command line
  asks for one of our trained checkpoints.

Cost (``benchmarks/bench_sofa.py --threads 2 --slices 6``, idle 2-core machine): 8.7 s per
256 x 256 slice, of which 8.3 s are the four TinyViT encodes and 0.4 s the attention and 6
mask-decoder runs (3 sub-regions x 2 passes); a 240 x 240 x 155 case (150 brain slices) ~22 min on
the CPU (extrapolated); a new box on a cached case re-runs only the ~0.45 s part per slice.

Parameter counts (default config, backbone 'lite'): total 9,792,839 = LiteMedSAM 9,791,300
(TinyViT encoder 5,726,740, prompt encoder 6,220, mask decoder 4,058,340) + attention 3 x (256 + 1)
= 771 + sub-region prompts 3 x 256 = 768; all trainable (with ``freeze_image_encoder``: 4,066,099).
``region_prompts: False``: 9,792,071. Backbone 'vit_b' (256 input): 90,738,739 (SAM ViT-B
90,737,200 + 1,539). (TinyViT's constructor reads tensor values, so ``brainlesionsam info`` counts
the 'lite' backbone with a real build instead of on the meta device.)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones import build_backbone
from ..conventions import MODALITIES
from .base import BackboneDeltaBase, MethodFacts, SegmentationMethod, register_method

# Sub-regions in the order of the 'brats' label set's classes 1, 2, 3 (labels 1, 2, 4).
REGIONS: tuple[str, ...] = ("necrotic core", "edema", "enhancing tumour")
ATTENTION_POOLING = ("none", "mean")
FIRST_PASS_PROMPTS = ("slice_box", "none")
NETWORK_SIZE = 256  # the engine's slices are 256 x 256; boxes are in this frame

# The paper's augmentation (section 3.4) with the amounts it leaves open (see the module docstring).
AUGMENTATION: dict[str, Any] = {
    "rotate_deg": 15.0,        # uniform in +-15 deg (paper)
    "scale": (0.9, 1.1),       # zoom range (paper)
    "intensity_scale": 0.1,    # per modality x (1 + U(-0.1, 0.1))
    "intensity_shift": 0.1,    # per modality + U(-0.1, 0.1) x 255
    "probability": 0.5,        # of each transform
}


def build_augmentation(rotate_deg: float = AUGMENTATION["rotate_deg"],
                       scale: tuple[float, float] = AUGMENTATION["scale"],
                       intensity_scale: float = AUGMENTATION["intensity_scale"],
                       intensity_shift: float = AUGMENTATION["intensity_shift"],
                       probability: float = AUGMENTATION["probability"],
                       keys: tuple[str, ...] = ("image", "label", "brain")):
    """SOFA's training augmentation as a MONAI ``Compose`` of dictionary transforms.

    A sample is {'image': [4, H, W] float in [0, 255], 'label': [1, H, W] class indices, 'brain':
    [1, H, W] 0/1} (the layout of ``Training.augmentation.augment``, which also clips the image to
    [0, 255] and zeroes it outside the moved brain). ``keys``: the image key first, then the keys
    moved with nearest-neighbour interpolation (labels, masks). Seed it with ``set_random_state``.
    """
    from monai.transforms import (Compose, RandRotated, RandScaleIntensityd, RandShiftIntensityd,
                                  RandZoomd)

    if not keys:
        raise ValueError("build_augmentation: keys must name at least the image")
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"build_augmentation: probability must be in [0, 1], not {probability!r}")
    low, high = (float(s) for s in scale)
    if not 0 < low <= high:
        raise ValueError(f"build_augmentation: scale must be (low, high) with 0 < low <= high, not {scale!r}")
    modes = ("bilinear",) + ("nearest",) * (len(keys) - 1)
    image = keys[0]
    return Compose([
        RandRotated(keys, range_x=math.radians(float(rotate_deg)), prob=probability, keep_size=True,
                    mode=modes, padding_mode="zeros"),
        RandZoomd(keys, prob=probability, min_zoom=low, max_zoom=high, mode=modes,
                  padding_mode="constant", keep_size=True),
        RandScaleIntensityd(image, factors=float(intensity_scale), prob=probability, channel_wise=True),
        RandShiftIntensityd(image, offsets=255.0 * float(intensity_shift), prob=probability, channel_wise=True),
    ])


class SubRegionModalityAttention(nn.Module):
    """Eq. 1-3: e_{m,r} = tanh(W_r f_m + b_r), alpha = softmax over the available modalities,
    f_r = sum_m alpha_{m,r} f_m, for R sub-regions at once (``nn.Linear(C, R)``, row r = W_r).

    features [B, M, C, H, W] (f_m), available [B, M] bool -> (fused [B, R, C, H, W],
    weights [B, R, M, h, w]) with (h, w) = (H, W) for pooling 'none' (a weight per pixel) and
    (1, 1) for 'mean' (f_m averaged over the grid before W_r: one weight per slice).
    """

    def __init__(self, embed_dim: int = 256, num_regions: int = len(REGIONS), pooling: str = "none",
                 zero_init: bool = True) -> None:
        super().__init__()
        if pooling not in ATTENTION_POOLING:
            raise ValueError(f"attention pooling must be one of {ATTENTION_POOLING}, not {pooling!r}")
        self.pooling = pooling
        self.score = nn.Linear(embed_dim, num_regions)
        if zero_init:
            nn.init.zeros_(self.score.weight)
            nn.init.zeros_(self.score.bias)

    def weights(self, features: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
        """alpha [B, R, M, h, w] (eq. 1-2); exactly 0 for missing modalities."""
        if features.dim() != 5:
            raise ValueError(f"features must be [B, M, C, H, W], got {tuple(features.shape)}")
        present = available.to(device=features.device, dtype=torch.bool)
        if present.shape != features.shape[:2]:
            raise ValueError(f"available must be [B, M] = {tuple(features.shape[:2])}, got {tuple(present.shape)}")
        if not bool(present.any(dim=1).all()):
            raise ValueError("every sample needs at least one available modality")
        pooled = features.mean(dim=(-2, -1), keepdim=True) if self.pooling == "mean" else features
        scores = torch.tanh(self.score(pooled.movedim(2, -1)))            # [B, M, h, w, R]
        scores = scores.permute(0, 4, 1, 2, 3)                             # [B, R, M, h, w]
        scores = scores.masked_fill(~present[:, None, :, None, None], float("-inf"))
        return torch.softmax(scores, dim=2)

    def forward(self, features: torch.Tensor, available: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha = self.weights(features, available)
        full = alpha.expand(-1, -1, -1, *features.shape[-2:]).to(features.dtype)
        fused = torch.einsum("brmhw,bmchw->brchw", full, features)        # eq. 3
        return fused, alpha


def mask_bounding_boxes(masks: torch.Tensor) -> torch.Tensor:
    """Eq. 4: bounding boxes (x0, y0, x1, y1) of boolean masks [..., H, W] -> float [..., 4], in pixel
    edges with exclusive end (SAM's and the engine's convention). An empty mask gives (0, 0, 0, 0)."""
    masks = masks.to(torch.bool)
    height, width = masks.shape[-2:]
    rows, cols = masks.any(dim=-1), masks.any(dim=-2)                     # [..., H], [..., W]
    y0 = rows.float().argmax(dim=-1)
    y1 = height - rows.flip(-1).float().argmax(dim=-1)
    x0 = cols.float().argmax(dim=-1)
    x1 = width - cols.flip(-1).float().argmax(dim=-1)
    boxes = torch.stack([x0, y0, x1, y1], dim=-1).to(torch.float32)
    return boxes * rows.any(dim=-1, keepdim=True)


def region_class_probabilities(region_logits: torch.Tensor) -> torch.Tensor:
    """Independent sub-region logits [B, R, H, W] -> class probabilities [B, 1 + R, H, W] summing to 1
    whose argmax is the 0.5-threshold label map: background 1 - max_r p_r, the most probable
    sub-region max_r p_r, the others 0 (p_r = sigmoid(logit_r); ties at 0.5 go to background)."""
    p = torch.sigmoid(region_logits.float())
    top, winner = p.max(dim=1, keepdim=True)
    regions = torch.zeros_like(p).scatter_(1, winner, top)
    return torch.cat([1.0 - top, regions], dim=1)


@dataclass
class TwoPassResult:
    """What ``SOFA.two_pass`` computed for a batch (B images, R = 3 sub-regions, S = 256)."""

    weights: torch.Tensor         # alpha [B, R, M, h, w]
    first_boxes: torch.Tensor | None  # pass-1 prompt [B, 4] (None: no prompt)
    first_logits: torch.Tensor    # [B, R, S, S]
    present: torch.Tensor         # [B, R] bool: sub-region found by pass 1
    second_boxes: torch.Tensor | None  # P_r [B, R, 4] (zeros where absent); None with refine off
    logits: torch.Tensor          # final sub-region logits [B, R, S, S]


@register_method
class SOFA(BackboneDeltaBase, SegmentationMethod):
    facts = MethodFacts(
        name="sofa",
        title="SOFA: sub-region-aware modality attention + adaptive prompting (LiteMedSAM)",
        modalities=MODALITIES,
        required_modalities=(),
        spatial_dims=2,
        label_set="brats",
        promptable=True,
        cacheable_embeddings=True,
        input_size=(NETWORK_SIZE, NETWORK_SIZE),
        reference="Aljani, Aghaee Meibodi, Najjaran: Sub-Region-Aware Modality Fusion and Adaptive "
                  "Prompting for Multi-Modal Brain Tumor Segmentation",
    )
    initialisation_keys = ("backbone_weights",)
    default_config = {
        "backbone": "lite",              # 'lite' (LiteMedSAM, the paper's) or 'vit_b' (SAM ViT-B)
        "backbone_weights": None,        # lite: LiteMedSAM .pth, None = the packaged lite_medsam.pth;
                                         # vit_b: SAM / MedSAM .pth, None = random (tests only)
        "image_size": 256,               # encoder input (lite: 256 or a smaller multiple of 64); slices resized inside
        "attention_pooling": "none",     # 'none': a weight per pixel (eq. 1 literally); 'mean': per slice
        "attention_zero_init": True,     # W_r = 0 at the start: mean fusion, unchanged LiteMedSAM
        "region_prompts": True,          # a learnt dense prompt per sub-region (ours; False: the paper's literal design)
        "first_pass_prompt": "slice_box",  # pass-1 prompt without a user box: 'slice_box' | 'none'
        "refine": True,                  # pass 2 (adaptive prompting); False: output = pass 1
        "freeze_image_encoder": False,   # paper: everything fine-tuned
        "lambda_ce": 1.0,                # lambda_seg (CE)
        "lambda_iou": 1.0,               # lambda_iou (Dice-based IoU)
        "iou_batch": True,               # IoU over the whole batch (sampled sub-regions are often empty)
        "ce_positive_weight": 1.0,       # BCE weight of mask pixels (>= 1; 'balanced': see region_loss)
        "train_box_jitter_px": 5,        # pass-2 training box: ground truth grown by 0-5 px per side
        "train_user_box_probability": 0.5,  # pass-1 training prompt: the batch's box this often
        "optimizer": "adam",             # paper: Adam, lr 3e-5, cosine decay, batch 2, 200 epochs
        "learning_rate": 3e-5,
        "scheduler": "cosine",
        "batch_size": 2,
        "epochs": 200,
    }

    def __init__(self, **config: Any):
        super().__init__(**config)
        c = self.config
        if c["attention_pooling"] not in ATTENTION_POOLING:
            raise ValueError(f"sofa: attention_pooling must be one of {ATTENTION_POOLING}, "
                             f"not {c['attention_pooling']!r}")
        if c["first_pass_prompt"] not in FIRST_PASS_PROMPTS:
            raise ValueError(f"sofa: first_pass_prompt must be one of {FIRST_PASS_PROMPTS}, "
                             f"not {c['first_pass_prompt']!r}")
        for key in ("refine", "region_prompts", "freeze_image_encoder", "attention_zero_init", "iou_batch"):
            if not isinstance(c[key], bool):
                raise ValueError(f"sofa: {key} must be true or false, not {c[key]!r}")
        for key in ("lambda_ce", "lambda_iou"):
            if not (isinstance(c[key], (int, float)) and c[key] >= 0):
                raise ValueError(f"sofa: {key} must be a number >= 0, not {c[key]!r}")
        weight = c["ce_positive_weight"]
        if weight != "balanced" and not (isinstance(weight, (int, float)) and not isinstance(weight, bool)
                                         and weight >= 1):
            raise ValueError(f"sofa: ce_positive_weight must be a number >= 1 or 'balanced', not {weight!r}")
        if not (isinstance(c["train_box_jitter_px"], int) and c["train_box_jitter_px"] >= 0):
            raise ValueError(f"sofa: train_box_jitter_px must be an integer >= 0, not {c['train_box_jitter_px']!r}")
        if not (isinstance(c["train_user_box_probability"], (int, float))
                and 0 <= c["train_user_box_probability"] <= 1):
            raise ValueError("sofa: train_user_box_probability must be in [0, 1], "
                             f"not {c['train_user_box_probability']!r}")
        self.backbone = build_backbone(c["backbone"], c["image_size"], c["backbone_weights"], method="sofa")
        self.attention = SubRegionModalityAttention(self.backbone.mask_decoder.transformer_dim, len(REGIONS),
                                                    c["attention_pooling"], c["attention_zero_init"])
        # One learnt dense prompt embedding per sub-region (see the module docstring), zero at the start.
        self.region_prompts = (nn.Parameter(torch.zeros(len(REGIONS), self.attention.score.in_features))
                               if c["region_prompts"] else None)
        if c["freeze_image_encoder"]:
            self.backbone.image_encoder.requires_grad_(False)
        self._loss_function = None
        self.start_case()

    def train(self, mode: bool = True) -> "SOFA":
        """As nn.Module.train, but a frozen image encoder stays in eval mode (BatchNorm statistics)."""
        super().train(mode)
        if self.config["freeze_image_encoder"]:
            self.backbone.image_encoder.eval()
        return self

    @classmethod
    def pretrained(cls, weights=None, **config: Any) -> None:
        """None: SOFA's attention has no published weights (LiteMedSAM's initialise the backbone in
        the constructor, ``backbone_weights``); segmenting needs one of our trained checkpoints."""
        return None

    # --- inputs ------------------------------------------------------------------------------------
    def _check_inputs(self, images: torch.Tensor, available: torch.Tensor) -> None:
        size = (NETWORK_SIZE, NETWORK_SIZE)
        if images.dim() != 4 or images.shape[1] != len(MODALITIES) or tuple(images.shape[-2:]) != size:
            raise ValueError(f"sofa takes images [B, {len(MODALITIES)}, {size[0]}, {size[1]}], got {tuple(images.shape)}")
        if tuple(available.shape) != (images.shape[0], len(MODALITIES)):
            raise ValueError(f"available must be [B, {len(MODALITIES)}], got {tuple(available.shape)}")
        if not bool(available.to(torch.bool).any(dim=1).all()):
            raise ValueError("sofa: every slice needs at least one available modality")

    def _check_boxes(self, boxes: torch.Tensor | None, batch: int) -> torch.Tensor | None:
        if boxes is None:
            return None
        if tuple(boxes.shape) != (batch, 4):
            raise ValueError(f"sofa: boxes must be [B, 4] with B = {batch}, got {tuple(boxes.shape)}")
        if not bool(torch.isfinite(boxes).all()):
            raise ValueError("sofa: boxes must be finite (x0, y0, x1, y1) in network pixels")
        return boxes.float()

    # --- encoder -----------------------------------------------------------------------------------
    def modality_embeddings(self, images: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
        """f_m: images [B, 4, 256, 256] in [0, 255], available [B, 4] -> [B, 4, 256, E, E], each
        available modality through the shared encoder (all of them as one batch), zeros for the others."""
        self._check_inputs(images, available)
        present = available.to(device=images.device, dtype=torch.bool)
        batch_index, modality_index = present.nonzero(as_tuple=True)
        grey = images[batch_index, modality_index][:, None].float()       # [N, 1, 256, 256]
        size = self.backbone.image_size
        if size != NETWORK_SIZE:
            grey = F.interpolate(grey, size=(size, size), mode="bilinear", align_corners=False)
        encoded = self.backbone.encode(self.backbone.normalize(grey.expand(-1, 3, -1, -1)))
        out = encoded.new_zeros((images.shape[0], len(MODALITIES)) + tuple(encoded.shape[1:]))
        out[batch_index, modality_index] = encoded
        return out

    def encode(self, images: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
        """Cacheable embeddings: the modality embeddings [B, 4, 256, E, E] (see the module docstring)."""
        return self.modality_embeddings(images, available)

    # --- decoder -----------------------------------------------------------------------------------
    def _decode(self, embeddings: torch.Tensor, boxes: torch.Tensor | None) -> torch.Tensor:
        """embeddings [N, 256, E, E], boxes [N, 4] in network pixels (or None: no prompt) ->
        mask logits [N, 256, 256]."""
        scale = self.backbone.image_size / NETWORK_SIZE
        logits = self.backbone.decode(embeddings, None if boxes is None else boxes.float() * scale)
        if tuple(logits.shape[-2:]) != (NETWORK_SIZE, NETWORK_SIZE):
            logits = F.interpolate(logits.float(), size=(NETWORK_SIZE, NETWORK_SIZE), mode="bilinear",
                                   align_corners=False)
        return logits[:, 0]

    def _with_region_prompts(self, fused: torch.Tensor) -> torch.Tensor:
        """f_r + t_r: each sub-region's learnt dense prompt embedding added to its fused features [B, R, C, E, E]
        (where SAM's decoder adds its dense prompt); unchanged without ``region_prompts``."""
        if self.region_prompts is None:
            return fused
        return fused + self.region_prompts[None, :, :, None, None].to(fused.dtype)

    def _automatic_boxes(self, batch: int, device: torch.device) -> torch.Tensor | None:
        if self.config["first_pass_prompt"] == "none":
            return None
        whole = torch.tensor([0.0, 0.0, NETWORK_SIZE, NETWORK_SIZE], device=device)
        return whole.expand(batch, 4)

    def two_pass(self, embeddings: torch.Tensor, available: torch.Tensor,
                 boxes: torch.Tensor | None = None) -> TwoPassResult:
        """Algorithm 1 on modality embeddings [B, 4, 256, E, E]: attention, pass 1 with the user's
        boxes [B, 4] (or the automatic first-pass prompt), pass 2 with the sub-regions' boxes."""
        batch, regions = embeddings.shape[0], len(REGIONS)
        boxes = self._check_boxes(boxes, batch)
        fused, alpha = self.attention(embeddings, available)              # [B, R, C, E, E]
        flat = self._with_region_prompts(fused).flatten(0, 1)
        first_boxes = boxes if boxes is not None else self._automatic_boxes(batch, embeddings.device)
        prompt = None if first_boxes is None else first_boxes.to(embeddings.device).repeat_interleave(regions, 0)
        first = self._decode(flat, prompt).unflatten(0, (batch, regions))
        present = (first > 0).flatten(2).any(dim=2)
        if not self.config["refine"]:
            return TwoPassResult(alpha, first_boxes, first, present, None, first)
        second_boxes = mask_bounding_boxes(first > 0)                     # eq. 4
        logits = first
        if bool(present.any()):
            chosen = present.flatten()
            second = self._decode(flat[chosen], second_boxes.flatten(0, 1)[chosen])  # eq. 5-6
            logits = first.flatten(0, 1).clone()
            logits[chosen] = second.to(logits.dtype)
            logits = logits.unflatten(0, (batch, regions))
        return TwoPassResult(alpha, first_boxes, first, present, second_boxes, logits)

    def decode_proba(self, embeddings: torch.Tensor, available: torch.Tensor,
                     boxes: torch.Tensor | None = None) -> torch.Tensor:
        """Class probabilities [B, 4, 256, 256] (background, NCR, ED, ET) from ``encode``'s embeddings;
        outside training the attention weights are accumulated for ``case_weights``."""
        result = self.two_pass(embeddings, available, boxes)
        if not self.training:
            self._record(result, available)
        return region_class_probabilities(result.logits)

    def predict_proba(self, images: torch.Tensor, available: torch.Tensor,
                      boxes: torch.Tensor | None = None) -> torch.Tensor:
        self._check_boxes(boxes, images.shape[0])  # before the expensive encoder
        return self.decode_proba(self.encode(images, available), available, boxes)

    def forward(self, images: torch.Tensor, available: torch.Tensor,
                boxes: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, 4, 256, 256]: the log of ``predict_proba``'s class probabilities (so their
        softmax is exactly those), without recording case weights."""
        self._check_boxes(boxes, images.shape[0])
        result = self.two_pass(self.encode(images, available), available, boxes)
        probabilities = region_class_probabilities(result.logits)
        return torch.log(probabilities.clamp_min(torch.finfo(probabilities.dtype).tiny))

    # --- per-case weights --------------------------------------------------------------------------
    def start_case(self) -> None:
        self._weight_sums = torch.zeros(len(REGIONS), len(MODALITIES), dtype=torch.float64)
        self._weight_slices = torch.zeros(len(REGIONS), dtype=torch.float64)
        self._seen_modalities = torch.zeros(len(MODALITIES), dtype=torch.bool)

    def _record(self, result: TwoPassResult, available: torch.Tensor) -> None:
        """Add each slice's attention averaged over its final sub-region masks (see case_weights)."""
        alpha = result.weights.detach().float()                            # [B, R, M, h, w]
        masks = (result.logits.detach() > 0).float()                       # [B, R, S, S]
        fractions = F.adaptive_avg_pool2d(masks, alpha.shape[-2:])         # [B, R, h, w]
        mass = fractions.sum(dim=(-2, -1))                                 # [B, R]
        per_slice = (alpha * fractions[:, :, None]).sum(dim=(-2, -1)) / mass[..., None].clamp_min(1e-12)
        found = (mass > 0).double().cpu()
        self._weight_sums += (per_slice.double().cpu() * found[..., None]).sum(dim=0)
        self._weight_slices += found.sum(dim=0)
        self._seen_modalities |= available.to(torch.bool).any(dim=0).cpu()

    def case_weights(self) -> dict[str, dict[str, float]]:
        """{sub-region: {modality: mean attention weight}} since ``start_case``, over the slices in
        which the sub-region was found (available modalities only; they sum to 1); {} if none was."""
        weights = {}
        for r, region in enumerate(REGIONS):
            if self._weight_slices[r] > 0:
                mean = self._weight_sums[r] / self._weight_slices[r]
                weights[region] = {m: float(mean[i]) for i, m in enumerate(MODALITIES)
                                   if self._seen_modalities[i]}
        return weights

    # --- training ----------------------------------------------------------------------------------
    def region_loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Eq. 7: lambda_ce BCE + lambda_iou (1 - soft IoU) of sub-region logits [N, H, W] (or
        [N, 1, H, W]) against a binary mask of the same size.

        ``ce_positive_weight`` w counts each mask pixel's BCE w times (the mean stays over pixels).
        Why: a small lesion is a few hundred of a slice's 65,536 pixels; a model that cannot yet tell
        exactly where it is then minimises plain BCE with probabilities below 0.5 everywhere, and
        the 0.5 threshold finds nothing (docs/sam_heads.md: the automatic mode collapsed that way).
        Under weight w a pixel is labelled where its lesion probability exceeds 1 / (1 + w).
        'balanced': per sample the mean of the BCE's mean over the mask's pixels and its mean over
        the others (an empty mask: the latter only), i.e. w = background / lesion pixels."""
        if self._loss_function is None:
            from monai.losses import DiceLoss  # monai is slow to import; only training needs it

            self._loss_function = DiceLoss(sigmoid=True, jaccard=True, batch=self.config["iou_batch"])
        if logits.dim() == 3:
            logits = logits[:, None]
        if target.dim() == 3:
            target = target[:, None]
        logits, target = logits.float(), target.to(torch.float32)
        weight = self.config["ce_positive_weight"]
        if weight == "balanced":
            bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(1)
            inside = target.flatten(1)
            count = inside.sum(dim=1)
            inside_mean = (bce * inside).sum(dim=1) / count.clamp_min(1)
            outside_mean = (bce * (1 - inside)).sum(dim=1) / (inside.shape[1] - count).clamp_min(1)
            ce = torch.where(count > 0, 0.5 * (inside_mean + outside_mean), outside_mean).mean()
        else:
            ce = F.binary_cross_entropy_with_logits(logits, target,
                                                    pos_weight=torch.tensor(float(weight), device=logits.device))
        return (float(self.config["lambda_ce"]) * ce
                + float(self.config["lambda_iou"]) * self._loss_function(logits, target))

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The one-vs-all loss on ``forward``'s class logits [B, 4, H, W]: ``region_loss`` of each
        sub-region's log-odds against its mask (target class indices [B, H, W]), summed. Training
        uses ``training_loss`` (sampled sub-region, both passes)."""
        if target.dim() == logits.dim():
            target = target[:, 0]
        probabilities = torch.softmax(logits.float(), dim=1).clamp(1e-6, 1 - 1e-6)
        return sum(self.region_loss(torch.logit(probabilities[:, r + 1]), target == r + 1)
                   for r in range(len(REGIONS)))

    def _jittered_boxes(self, masks: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        boxes = mask_bounding_boxes(masks)
        jitter = self.config["train_box_jitter_px"]
        if jitter:
            grow = torch.randint(0, jitter + 1, boxes.shape, generator=generator).to(boxes)
            boxes = boxes + grow * torch.tensor([-1.0, -1.0, 1.0, 1.0], device=boxes.device)
        return boxes.clamp(0, NETWORK_SIZE)

    def embedding_loss(self, embeddings: torch.Tensor, available: torch.Tensor, target: torch.Tensor,
                       boxes: torch.Tensor | None = None, regions: torch.Tensor | None = None,
                       generator: torch.Generator | None = None) -> torch.Tensor:
        """One-vs-all loss of both passes from modality embeddings [B, 4, 256, E, E] and class indices
        [B, 256, 256] (0 background, 1 NCR, 2 ED, 3 ET). ``regions`` [B] (0-2) fixes the sampled
        sub-regions, ``generator`` the random draws (sub-region, prompt choice, box jitter; CPU)."""
        batch = embeddings.shape[0]
        if target.dim() == 4:
            target = target[:, 0]
        if tuple(target.shape) != (batch, NETWORK_SIZE, NETWORK_SIZE):
            raise ValueError(f"sofa: target must be [B, {NETWORK_SIZE}, {NETWORK_SIZE}] class indices, "
                             f"got {tuple(target.shape)}")
        boxes = self._check_boxes(boxes, batch)
        if regions is None:
            regions = torch.randint(0, len(REGIONS), (batch,), generator=generator)
        regions = regions.to(target.device)
        region_target = target == (regions[:, None, None] + 1)
        fused, _ = self.attention(embeddings, available)
        fused = self._with_region_prompts(fused)
        chosen = fused[torch.arange(batch, device=fused.device), regions.to(fused.device)]  # [B, C, E, E]

        automatic = self._automatic_boxes(batch, fused.device)
        use_user = torch.zeros(batch, dtype=torch.bool)
        if boxes is not None:
            boxes = boxes.to(fused.device)
            use_user = torch.rand(batch, generator=generator) < self.config["train_user_box_probability"]
        use_user = use_user.to(fused.device)
        if boxes is not None and bool(use_user.all()):
            first = self._decode(chosen, boxes)
        elif automatic is not None:
            first = self._decode(chosen, automatic if boxes is None else
                                 torch.where(use_user[:, None], boxes, automatic))
        elif not bool(use_user.any()):
            first = self._decode(chosen, None)
        else:  # boxed and no-prompt samples cannot share one decoder call
            first = chosen.new_zeros(batch, NETWORK_SIZE, NETWORK_SIZE)
            first[use_user] = self._decode(chosen[use_user], boxes[use_user])
            first[~use_user] = self._decode(chosen[~use_user], None)
        loss = self.region_loss(first, region_target)
        present = region_target.flatten(1).any(dim=1)
        if self.config["refine"] and bool(present.any()):
            second_boxes = self._jittered_boxes(region_target[present].cpu(), generator).to(fused.device)
            second = self._decode(chosen[present], second_boxes)
            loss = loss + self.region_loss(second, region_target[present])
        return loss

    def training_loss(self, batch: dict[str, torch.Tensor], progress: float = 0.0) -> torch.Tensor:
        """One batch's loss (``embedding_loss`` of the encoder's embeddings; see the module docstring).
        ``batch['target']``: class indices of the BraTS label set (0 bg, 1 NCR, 2 ED, 3 ET)."""
        embeddings = self.modality_embeddings(batch["images"], batch["available"])
        return self.embedding_loss(embeddings, batch["available"], batch["target"], batch.get("boxes"))
