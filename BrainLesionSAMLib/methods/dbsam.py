"""``dbsam``: DB-SAM, dual-branch adapted SAM with box prompts (Qin et al., "DB-SAM: Delving into High
Quality Universal Medical Image Segmentation", MICCAI 2024; code github.com/AlfredQin/DB-SAM).

The network (paper section 2, Fig. 1), for one box-prompted 2D image:

- **ViT branch** (:class:`ChannelAttentionBlock`): SAM ViT-B on the image resized to 1024 x 1024,
  frozen, with a learnable channel-attention block after every transformer block (eq. 1)::

      F_out = F + Conv1x1(SE(DWConv3x3(LN(F))))

- **Convolution branch** (:class:`ConvolutionBranch`) on the 256 x 256 image: two 3 x 3 and three
  1 x 1 convolutions, BatchNorm + ReLU after the first four; it gives the shallow features F_s.
- **Bilateral cross-attention** (:class:`BilateralCrossAttention`): the ViT features F_d as queries
  over F_s and F_s as queries over F_d, each with multi-scale deformable attention
  (:mod:`.deformable_attention`, plain PyTorch with ``grid_sample``) followed by LayerNorm and a
  two-layer GELU MLP, both with residuals. The updated F_d goes on into the next ViT block.
- **ViT-Conv fusion** (:class:`ViTConvFusion`, eq. 2): per-branch channel attention (FC squeeze,
  GELU, FC restore) gives A_d and A_s; M = sigmoid(A_d + A_s); F = F_d * M + F_s * (1 - M),
  computed as F_d + gamma * (1 - M) * (F_s - F_d) with a per-channel gate gamma (gamma = 1: eq. 2).
- The fused features go through SAM's neck (frozen, part of the image encoder) to the image
  embedding; with the box's prompt embedding (frozen prompt encoder) the trainable SAM mask decoder
  predicts one mask.

Decisions where the paper is loose (all in ``default_config``; the METHODS sheet records what the
authors' code does):

- Where the branches meet (``interaction_blocks``): after ViT blocks 2, 5, 8 and 11, i.e. after each
  of the four stages of three blocks of the authors' code. The paper says "after each block" of a
  figure that shows stages; ``'every_block'`` is that literal reading (interactions after all 12
  blocks), measured in ``benchmarks/bench_dbsam.py`` and ``docs/decisions.md`` (issue 24): it
  triples the cross-attention, for no gain the paper states.
  Channel attention comes after every block (paper and issue). The fusion follows the last block;
  both directions of one interaction read the features from before it (simultaneous update, as the
  authors' code does).
- Convolution branch widths (``conv_channels``): 3 -> 64 (3 x 3, stride 2) -> 128 (3 x 3, stride 2)
  -> 256 (1 x 1) -> 256 (1 x 1) -> C (1 x 1, no BN / ReLU), C = the width of the ViT's last block
  (768; ``conv_dim``), which eq. 2 needs. Stride 4 puts F_s on a 64 x 64 grid: exactly the ViT's
  grid at 1024 input, so both branches meet on the same grid as the paper's sizes imply (1024 / 16 =
  256 / 4). Its input is the 256 image scaled to [0, 1] (BatchNorm follows the first convolution, so
  no mean/std is needed).
- Deformable attention: 4 points (authors), one value level per direction (the branch opposite;
  the module itself is multi-scale), head width 64 for ViT-B (12 heads at 768, the authors') and 32
  for TinyViT (its own head width: 4, 5, 10 heads at 128, 160, 320), pre-LayerNorm on query and
  value, MLP ratio 4 (authors' ``expand_ratio``). On the ViT side, the attention's output
  projection and the MLP's last layer start at zero (``zero_init``), as does eq. 1's 1 x 1
  convolution, so training starts from the unchanged pretrained encoder (as ViT-Adapter's injector
  and CMAA here). The fusion's gate gamma starts at 0 too (issue 24), so at initialisation F = F_d:
  DB-SAM's output is the pretrained SAM's own for the box (``test_dbsam_starts_as_backbone``), not
  the frozen neck fed half random convolution-branch features (M ~ 0.5 at the start). The
  convolution side and the fusion's channel attention start as PyTorch initialises them; they get
  gradients once the first step has opened the gate. ``zero_init`` False: every added path as
  PyTorch initialises it, gamma starting at 1 (eq. 2 as written).
- Fusion: the channel attention is applied to every token (a per-pixel channel MLP, so M is
  element-wise as the paper says: "element-wise selective mask"), squeeze ratio 1/4
  (``fusion_reduction``; the authors' SE ratio 0.25). F_s is average-pooled to the ViT grid when
  they differ (ViT-B at 256: 64 -> 16).
- Dropout and drop-path 0.4 (paper): dropout on the deformable attention's output and in the MLPs
  (after each layer, torchvision's ``MLP``), drop-path (torchvision's ``StochasticDepth``, per
  sample) on every residual branch of the adapters. SE block: torchvision's ``SqueezeExcitation``
  (ReLU, sigmoid; Hu et al., the paper's reference), squeeze to a quarter of the width
  (``se_ratio``, authors). Eq. 1 has no activation between the depth-wise convolution and the SE
  block (the authors' code puts a GELU there: ``dw_activation: 'gelu'``).
- Frozen: the whole SAM image encoder, neck included (paper: "the ViT encoder and the prompt encoder
  are kept frozen"; the authors' code trains the neck: ``train_neck``), and the prompt encoder. Both
  stay in eval mode under ``.train()``.
- Input: the paper segments one image (the brain-tumour task is MR-FLAIR). ``modalities`` is one
  modality (repeated to three channels, as MedSAM's data) or a pair (channels a, b, (a + b) / 2);
  the configured modalities are required (instance facts, as ``boxprompt.py`` does). The slices
  are used on the engine's [0, 255] scale, normalised as the backbone expects (SAM's pixel
  mean/std; LiteMedSAM's per-image min-max). At ``image_size`` 1024 the 256 slice is resized
  bilinearly for the ViT and the box scaled by 4.
- Output: label set 'lesion'. The mask logit x (decoder output, bilinearly resized to 256 when
  smaller) is returned as class logits [0, x] (softmax = [1 - sigmoid(x), sigmoid(x)]).
- A box is required (``requires_box``): DB-SAM is trained only with boxes and has no box-less mode.
- Training boxes: ``training_loss`` uses ``batch['boxes']`` when given; otherwise it derives them from
  the target (:func:`boxes_from_masks`): the mask's bounding box (x1, y1 exclusive, the engine's
  convention) with each side moved outwards by a random 0-20 px (``box_jitter_px``; as MedSAM's
  ``bbox_shift``, clipped to the image). A slice without lesion gets a random box (sides 16-128 px)
  and learns to stay empty inside it, which the slices at the ends of a user's 3D box need.
- Loss: Dice + CE (paper) on the lesion logit, MONAI ``DiceCELoss`` (sigmoid, squared Dice
  denominators as the authors' code, Dice over the whole batch as CMAA here, since batches may hold
  lesion-free slices).
- Optimiser (paper): AdamW, lr 1e-4, polynomial decay, 12 epochs; weight decay 0.01, one warm-up
  epoch, power 0.9 and batch 1 per GPU from the authors' code.

Backbones (``backbone``): ``vit_b`` (paper) at ``image_size`` 1024 (default; 256 with the position
embeddings resized is the fast option: ~16x less ViT time, a 16 x 16 embedding); weights from a SAM
or MedSAM ``.pth`` (``backbone_weights``), random without one. ``lite``: LiteMedSAM's TinyViT at 256
with its real weights; channel attention after each of its 12 blocks at that block's width (64,
128, 128, 160 x 6, 320 x 3; the first on a 256 x 256 grid), interactions after blocks 2, 5, 8, 11
(widths 128, 160, 160, 320 on grids 128, 64, 64, 64), conv branch width 320 on its 64 x 64 grid,
which is also the embedding's: no pooling before the fusion.

Parameter counts (``brainlesionsam info --json``; SAM ViT-B itself: 93,735,472 at 1024):

- ``vit_b``, 1024 (default): total 153,599,600 (1.64 x SAM ViT-B), trainable 63,922,468 (41.6 %):
  channel attention 12 x 895,680 = 10,748,160; bilateral cross-attention 4 x 2 x 6,018,960 =
  48,151,680 (each direction: deformable attention 1,291,920, MLP 4,722,432, LayerNorms 4,608, at
  width 768; the MLPs with the authors' ratio 4 are most of the adapter); conv branch 372,544;
  fusion 591,744; mask decoder 4,058,340. Frozen: image encoder 89,670,912, prompt encoder 6,220.
- ``vit_b``, 256: total 150,601,328 (1.61 x SAM ViT-B), trainable 63,922,468 (only the frozen
  position tables shrink).
- ``lite``: total 16,882,836 (0.18 x SAM ViT-B; 1.72 x LiteMedSAM's 9,791,300), trainable 11,149,876:
  channel attention 778,416; cross-attention 5,952,512; conv branch 257,408; fusion 103,200; mask
  decoder 4,058,340. Frozen: TinyViT 5,726,740, prompt encoder 6,220.

The paper gives no parameter count to compare with.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import MLP, SqueezeExcitation, StochasticDepth

from ..backbones import build_backbone
from ..conventions import MODALITIES, MODALITY_DISPLAY_NAMES
from ..errors import MissingModalityError
from .base import BackboneDeltaBase, MethodFacts, register_method
from .boxprompt import BoxPromptedLesionMethod
from .deformable_attention import MultiScaleDeformableAttention, grid_reference_points

NETWORK_SIZE = 256        # the engine's slices, and the frame its boxes are in
CONV_STRIDE = 4           # two stride-2 3 x 3 convolutions: 256 -> 64
DEFAULT_IMAGE_SIZE = {"vit_b": 1024, "lite": 256}
DEFAULT_HEAD_DIM = {"vit_b": 64, "lite": 32}
DW_ACTIVATIONS = ("none", "gelu")
EVERY_BLOCK = "every_block"   # interaction_blocks: the paper's literal "after each block"


class ChannelAttentionBlock(nn.Module):
    """Eq. 1 on channels-last features [B, H, W, C]: F + Conv1x1(SE(DWConv3x3(LN(F))))."""

    def __init__(self, dim: int, se_ratio: float = 0.25, drop_path: float = 0.0, zero_init: bool = True,
                 dw_activation: str = "none") -> None:
        super().__init__()
        if dw_activation not in DW_ACTIVATIONS:
            raise ValueError(f"dw_activation must be one of {DW_ACTIVATIONS}, not {dw_activation!r}")
        self.norm = nn.LayerNorm(dim)
        self.depthwise = nn.Conv2d(dim, dim, kernel_size=3, padding=1, groups=dim)
        self.activation = nn.GELU() if dw_activation == "gelu" else nn.Identity()
        self.squeeze_excitation = SqueezeExcitation(dim, max(1, round(dim * se_ratio)))
        self.pointwise = nn.Conv2d(dim, dim, kernel_size=1)
        self.drop_path = StochasticDepth(drop_path, "row")
        if zero_init:
            nn.init.zeros_(self.pointwise.weight)
            nn.init.zeros_(self.pointwise.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x).permute(0, 3, 1, 2)
        y = self.pointwise(self.squeeze_excitation(self.activation(self.depthwise(y))))
        return x + self.drop_path(y.permute(0, 2, 3, 1))


class ConvolutionBranch(nn.Module):
    """Two 3 x 3 (stride 2) and three 1 x 1 convolutions, BN + ReLU after the first four:
    [B, 3, 256, 256] -> channels-last shallow features [B, 64, 64, out_dim]."""

    def __init__(self, out_dim: int, channels: Sequence[int] = (64, 128, 256, 256), in_channels: int = 3) -> None:
        super().__init__()
        if len(channels) != 4 or any(int(c) < 1 for c in channels):
            raise ValueError(f"conv_channels must be four positive widths, not {channels!r}")
        widths = [in_channels, *map(int, channels)]
        layers: list[nn.Module] = []
        for i, (cin, cout) in enumerate(zip(widths[:-1], widths[1:])):
            kernel = 3 if i < 2 else 1
            layers += [nn.Conv2d(cin, cout, kernel, stride=2 if i < 2 else 1, padding=kernel // 2, bias=False),
                       nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
        layers.append(nn.Conv2d(widths[-1], out_dim, kernel_size=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images).permute(0, 2, 3, 1)


class DeformableCrossAttention(nn.Module):
    """One direction of the bilateral block: queries [B, Hq, Wq, C] attend (deformable, one level)
    to the other branch's map [B, Hv, Wv, C_v]; residual, then LN + two-layer GELU MLP, residual.
    Output [B, Hq, Wq, C]."""

    def __init__(self, dim: int, value_dim: int, head_dim: int, num_points: int = 4, mlp_ratio: float = 4.0,
                 dropout: float = 0.0, drop_path: float = 0.0, zero_init: bool = False) -> None:
        super().__init__()
        if dim % head_dim:
            raise ValueError(f"width {dim} is not a multiple of the head width {head_dim}")
        self.query_norm = nn.LayerNorm(dim)
        self.value_norm = nn.LayerNorm(value_dim)
        self.attention = MultiScaleDeformableAttention(dim, dim // head_dim, num_levels=1, num_points=num_points,
                                                       value_dim=value_dim)
        self.attention_dropout = nn.Dropout(dropout)
        self.mlp_norm = nn.LayerNorm(dim)
        self.mlp = MLP(dim, [int(round(dim * mlp_ratio)), dim], activation_layer=nn.GELU, dropout=dropout)
        self.drop_path = StochasticDepth(drop_path, "row")
        if zero_init:
            last = self.mlp[-2]  # torchvision's MLP ends with Linear, Dropout
            for layer in (self.attention.output_proj, last):
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)

    def forward(self, query: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        batch, height, width, channels = query.shape
        q = query.reshape(batch, height * width, channels)
        reference = grid_reference_points(height, width, device=q.device)[None]  # float32 (see the module)
        attended = self.attention(self.query_norm(q), reference, [self.value_norm(value)])
        x = q + self.drop_path(self.attention_dropout(attended))
        x = x + self.drop_path(self.mlp(self.mlp_norm(x)))
        return x.reshape(batch, height, width, channels)


class BilateralCrossAttention(nn.Module):
    """ViT features as queries over the conv features and conv features as queries over the ViT
    features, both from the features before this block: (F_d, F_s) -> (F_d', F_s')."""

    def __init__(self, vit_dim: int, conv_dim: int, vit_head_dim: int, conv_head_dim: int, num_points: int = 4,
                 mlp_ratio: float = 4.0, dropout: float = 0.0, drop_path: float = 0.0, zero_init: bool = True) -> None:
        super().__init__()
        self.vit_query = DeformableCrossAttention(vit_dim, conv_dim, vit_head_dim, num_points, mlp_ratio,
                                                  dropout, drop_path, zero_init=zero_init)
        self.conv_query = DeformableCrossAttention(conv_dim, vit_dim, conv_head_dim, num_points, mlp_ratio,
                                                   dropout, drop_path, zero_init=False)

    def forward(self, deep: torch.Tensor, shallow: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.vit_query(deep, shallow), self.conv_query(shallow, deep)


class ViTConvFusion(nn.Module):
    """Eq. 2 on channels-last maps of one size [B, H, W, C]: A = FC(GELU(FC(F))) per token and
    branch, M = sigmoid(A_d + A_s), F = F_d * M + F_s * (1 - M), written as
    F = F_d + gamma * (1 - M) * (F_s - F_d) with a per-channel gate gamma.

    gamma = 1 is eq. 2 exactly. ``zero_init`` starts gamma at 0, so F = F_d: the frozen neck first
    sees the pretrained ViT's own features, not (with M ~ 0.5 at the start) half random
    convolution-branch features; the gate then opens as training finds the conv branch useful.
    """

    def __init__(self, dim: int, reduction: int = 4, zero_init: bool = True) -> None:
        super().__init__()
        hidden = max(1, dim // reduction)
        self.vit_attention = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.conv_attention = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.gate = nn.Parameter(torch.zeros(dim) if zero_init else torch.ones(dim))

    def forward(self, deep: torch.Tensor, shallow: torch.Tensor) -> torch.Tensor:
        mask = torch.sigmoid(self.vit_attention(deep) + self.conv_attention(shallow))
        return deep + self.gate.to(deep.dtype) * (1.0 - mask) * (shallow - deep)


def boxes_from_masks(masks: torch.Tensor, jitter: Sequence[int] = (0, 20), empty_side: Sequence[int] = (16, 128),
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Training boxes [B, 4] (x0, y0, x1, y1; x1, y1 exclusive) from masks [B, H, W] (any > 0 is lesion).

    Each side of the mask's bounding box moves outwards by an independent random integer in
    ``jitter`` (inclusive; MedSAM's ``bbox_shift``), clipped to the image. A mask without lesion gets
    a random box with sides in ``empty_side`` (inclusive) at a random place inside the image.
    """
    if masks.dim() == 4 and masks.shape[1] == 1:
        masks = masks[:, 0]
    if masks.dim() != 3:
        raise ValueError(f"masks must be [B, H, W] or [B, 1, H, W], got {tuple(masks.shape)}")
    low, high = int(jitter[0]), int(jitter[1])
    if not 0 <= low <= high:
        raise ValueError(f"box jitter must be 0 <= low <= high pixels, not {tuple(jitter)}")
    batch, height, width = masks.shape
    device = masks.device
    lesion = masks > 0
    rows, cols = lesion.any(dim=2), lesion.any(dim=1)            # [B, H], [B, W]

    def extent(hit: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.arange(size, device=device)
        first = torch.where(hit, index, size).min(dim=1).values
        last = torch.where(hit, index, -1).max(dim=1).values + 1
        return first, last

    x0, x1 = extent(cols, width)
    y0, y1 = extent(rows, height)
    shift = torch.randint(low, high + 1, (batch, 4), generator=generator).to(device)
    boxes = torch.stack([(x0 - shift[:, 0]).clamp_min(0), (y0 - shift[:, 1]).clamp_min(0),
                         (x1 + shift[:, 2]).clamp_max(width), (y1 + shift[:, 3]).clamp_max(height)], dim=1)
    empty = ~lesion.flatten(1).any(dim=1)
    if bool(empty.any()):
        side_low, side_high = int(empty_side[0]), int(empty_side[1])
        sides = torch.randint(side_low, side_high + 1, (batch, 2), generator=generator).to(device)
        sides = torch.minimum(sides, torch.tensor([width, height], device=device))
        corner = (torch.rand(batch, 2, generator=generator).to(device)
                  * (torch.tensor([width, height], device=device) - sides + 1)).floor().long()
        random_boxes = torch.cat([corner, corner + sides], dim=1)
        boxes = torch.where(empty[:, None], random_boxes, boxes)
    return boxes.to(torch.float32)


@register_method
class DBSAM(BackboneDeltaBase, BoxPromptedLesionMethod):
    facts = MethodFacts(
        name="dbsam",
        title="DB-SAM: dual-branch adapted SAM (box prompt; SAM ViT-B or LiteMedSAM)",
        modalities=MODALITIES,
        required_modalities=("flair",),
        spatial_dims=2,
        label_set="lesion",
        promptable=True,
        cacheable_embeddings=True,
        input_size=(NETWORK_SIZE, NETWORK_SIZE),
        reference="Qin et al., DB-SAM: Delving into High Quality Universal Medical Image Segmentation, "
                  "MICCAI 2024",
        requires_box=True,
    )
    initialisation_keys = ("backbone_weights",)
    # The CPU release (catalogue dbsam-lite128-v2): a delta on LiteMedSAM, Training/configs/dbsam_release.json.
    packaged_weights = "dbsam_lite128.safetensors"
    default_config = {
        "backbone": "vit_b",            # 'vit_b' (paper) or 'lite' (LiteMedSAM's TinyViT at 256, or a smaller multiple of 64)
        "backbone_weights": None,       # vit_b: SAM / MedSAM .pth, None = random (tests only);
                                        # lite: LiteMedSAM .pth, None = the packaged lite_medsam.pth
        "image_size": None,             # ViT input; None = 1024 for vit_b (paper), 256 for lite
        "modalities": ["flair"],        # one modality, or a pair (channels a, b, (a + b) / 2)
        "interaction_blocks": [2, 5, 8, 11],  # bilateral cross-attention after these blocks; 'every_block': all
        "conv_channels": [64, 128, 256, 256],  # conv branch: 3x3 s2, 3x3 s2, 1x1, 1x1 (+ 1x1 -> conv_dim)
        "conv_dim": None,               # conv branch output width; None = the last block's (768 / 320)
        "head_dim": None,               # deformable attention head width; None = 64 (vit_b) / 32 (lite)
        "num_points": 4,                # sampling points per head (authors)
        "mlp_ratio": 4.0,               # cross-attention MLP hidden width / width (authors)
        "se_ratio": 0.25,               # SE squeeze (authors)
        "dw_activation": "none",        # eq. 1: none; the authors' code: 'gelu'
        "fusion_reduction": 4,          # fusion channel attention squeeze C -> C / 4
        "dropout": 0.4,                 # paper
        "drop_path": 0.4,               # paper
        "zero_init": True,              # every added path starts as a pass-through (the pretrained SAM unchanged)
        "train_neck": False,            # paper: the ViT encoder (neck included) is frozen
        "box_jitter_px": [0, 20],       # training boxes from the ground truth, each side 0-20 px out
        "lambda_dice": 1.0,
        "lambda_ce": 1.0,
        "dice_squared_pred": True,      # authors' MONAI DiceCE
        "dice_batch": True,
        "optimizer": "adamw",           # paper: AdamW, lr 1e-4, polynomial decay, 12 epochs
        "learning_rate": 1e-4,
        "weight_decay": 0.01,           # authors' code
        "lr_schedule": "poly",
        "poly_power": 0.9,
        "warmup_epochs": 1,             # authors' code
        "epochs": 12,
        "batch_size": 1,                # authors' code, per GPU (4 GPUs in the paper)
    }

    def __init__(self, **config: Any):
        super().__init__(**config)
        cfg = self.config
        backbone_name = cfg["backbone"]
        image_size = cfg["image_size"] if cfg["image_size"] is not None else DEFAULT_IMAGE_SIZE.get(backbone_name, 256)
        self.modality_indices = self._modality_indices(cfg["modalities"])
        required = tuple(m for i, m in enumerate(MODALITIES) if i in self.modality_indices)
        if self.facts.required_modalities != required:
            # Instance facts shadow the class's: the engine then requires the configured modalities.
            self.facts = dataclasses.replace(type(self).facts, required_modalities=required)
        self.backbone = build_backbone(backbone_name, image_size, cfg["backbone_weights"], method="dbsam")
        dims, blocks = self.backbone.block_dims, self.backbone.num_blocks

        requested = cfg["interaction_blocks"]
        interactions = list(range(blocks)) if requested == EVERY_BLOCK else requested
        if isinstance(interactions, str) or not all(isinstance(i, int) and not isinstance(i, bool) for i in interactions) \
                or sorted(set(interactions)) != list(interactions) or any(not 0 <= i < blocks for i in interactions):
            raise ValueError(f"dbsam: interaction_blocks must be increasing block indices in 0..{blocks - 1} "
                             f"or '{EVERY_BLOCK}', "
                             f"not {cfg['interaction_blocks']!r}")
        self.interaction_blocks = list(interactions)
        head_dim = int(cfg["head_dim"] or DEFAULT_HEAD_DIM.get(backbone_name, 32))
        conv_dim = int(cfg["conv_dim"] or dims[-1])
        if conv_dim != dims[-1]:
            raise ValueError(f"dbsam: conv_dim must equal the last encoder block's width {dims[-1]} (eq. 2 mixes "
                             f"the two branches channel by channel), not {conv_dim}")
        for name in ("dropout", "drop_path"):
            if not 0.0 <= float(cfg[name]) < 1.0:
                raise ValueError(f"dbsam: {name} must be in [0, 1), not {cfg[name]!r}")
        if int(cfg["num_points"]) < 1 or float(cfg["mlp_ratio"]) <= 0:
            raise ValueError("dbsam: num_points must be >= 1 and mlp_ratio > 0")
        dropout, drop_path = float(cfg["dropout"]), float(cfg["drop_path"])

        self.channel_attention = nn.ModuleList(
            ChannelAttentionBlock(dim, float(cfg["se_ratio"]), drop_path, bool(cfg["zero_init"]), cfg["dw_activation"])
            for dim in dims)
        self.conv_branch = ConvolutionBranch(conv_dim, cfg["conv_channels"])
        try:
            self.interactions = nn.ModuleList(
                BilateralCrossAttention(dims[i], conv_dim, head_dim, head_dim, int(cfg["num_points"]),
                                        float(cfg["mlp_ratio"]), dropout, drop_path, bool(cfg["zero_init"]))
                for i in interactions)
        except ValueError as error:
            raise ValueError(f"dbsam: head_dim {head_dim} does not fit the {backbone_name} widths: {error}") from None
        self.fusion = ViTConvFusion(conv_dim, int(cfg["fusion_reduction"]), bool(cfg["zero_init"]))

        self.backbone.image_encoder.requires_grad_(False)
        self.backbone.prompt_encoder.requires_grad_(False)
        if cfg["train_neck"]:
            self.backbone.image_encoder.neck.requires_grad_(True)
        jitter = cfg["box_jitter_px"]
        if len(jitter) != 2 or not 0 <= int(jitter[0]) <= int(jitter[1]):
            raise ValueError(f"dbsam: box_jitter_px must be [low, high] with 0 <= low <= high, not {jitter!r}")

    @staticmethod
    def _modality_indices(modalities: Any) -> tuple[int, ...]:
        if isinstance(modalities, str):
            modalities = [modalities]
        modalities = list(modalities)
        if not 1 <= len(modalities) <= 2 or len(set(modalities)) != len(modalities) \
                or any(m not in MODALITIES for m in modalities):
            raise ValueError(f"dbsam: modalities must be one or two different keys of {MODALITIES}, "
                             f"not {modalities!r}")
        return tuple(MODALITIES.index(m) for m in modalities)

    def train(self, mode: bool = True) -> "DBSAM":
        """As nn.Module.train, but the frozen encoders stay in eval mode."""
        super().train(mode)
        self.backbone.image_encoder.eval()
        self.backbone.prompt_encoder.eval()
        return self

    # --- the network ----------------------------------------------------------------------------
    def input_image(self, images: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
        """images [B, 4, 256, 256] in [0, 255] -> the configured modality image [B, 3, 256, 256]."""
        if images.dim() != 4 or images.shape[1] != len(MODALITIES) \
                or tuple(images.shape[-2:]) != self.facts.input_size:
            raise ValueError(f"dbsam takes images [B, {len(MODALITIES)}, {NETWORK_SIZE}, {NETWORK_SIZE}], "
                             f"got {tuple(images.shape)}")
        present = available[:, list(self.modality_indices)].to(torch.bool)
        if not bool(present.all()):
            names = ", ".join(MODALITY_DISPLAY_NAMES[MODALITIES[i]] for i in self.modality_indices)
            raise MissingModalityError(
                f"method 'dbsam' is configured to segment on {names}, which was not given for every slice; "
                "give the volume(s) or configure other modalities (config 'modalities')")
        chosen = images[:, list(self.modality_indices)].float()
        if chosen.shape[1] == 1:
            return chosen.expand(-1, 3, -1, -1)
        return torch.cat([chosen, chosen.mean(dim=1, keepdim=True)], dim=1)

    def _after_block(self, shallow: torch.Tensor) -> Callable[[int, torch.Tensor], torch.Tensor]:
        """The hook that ``SamBackbone.encode`` calls after every block (channel attention,
        bilateral cross-attention, and the fusion after the last block)."""
        state = {"shallow": shallow}
        interaction_at = {block: k for k, block in enumerate(self.interaction_blocks)}
        last = self.backbone.num_blocks - 1

        def hook(index: int, x: torch.Tensor) -> torch.Tensor:
            x = self.channel_attention[index](x)
            if index in interaction_at:
                x, state["shallow"] = self.interactions[interaction_at[index]](x, state["shallow"])
            if index == last:
                shallow = state["shallow"]
                if shallow.shape[1:3] != x.shape[1:3]:
                    shallow = F.adaptive_avg_pool2d(shallow.permute(0, 3, 1, 2), x.shape[1:3]).permute(0, 2, 3, 1)
                x = self.fusion(x, shallow)
            return x

        return hook

    def encode(self, images: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
        """Everything image-dependent: images [B, 4, 256, 256] in [0, 255], available [B, 4] ->
        image embeddings [B, 256, E, E] of the fused features (E = 64 at 1024 and for lite, 16 for
        ViT-B at 256)."""
        rgb = self.input_image(images, available)
        size = self.backbone.image_size
        vit_input = rgb if size == NETWORK_SIZE else F.interpolate(rgb, size=(size, size), mode="bilinear",
                                                                   align_corners=False)
        shallow = self.conv_branch(rgb / 255.0)
        return self.backbone.encode(self.backbone.normalize(vit_input), after_block=self._after_block(shallow))

    def _decode_logits(self, embeddings: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Prompt encoder + mask decoder: embeddings, boxes [B, 4] in 256-pixel coordinates ->
        lesion logits [B, 1, 256, 256]."""
        scale = self.backbone.image_size / NETWORK_SIZE
        logits = self.backbone.decode(embeddings, boxes.to(torch.float32) * scale)
        if tuple(logits.shape[-2:]) != self.facts.input_size:
            logits = F.interpolate(logits.float(), size=self.facts.input_size, mode="bilinear", align_corners=False)
        return logits

    # --- training -------------------------------------------------------------------------------
    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Dice + CE on the lesion logit (``forward``'s [0, x]); any target > 0 is lesion."""
        from monai.losses import DiceCELoss

        if target.dim() == logits.dim() - 1:
            target = target[:, None]
        cfg = self.config
        dice_ce = DiceCELoss(sigmoid=True, squared_pred=bool(cfg["dice_squared_pred"]), batch=bool(cfg["dice_batch"]),
                             lambda_dice=float(cfg["lambda_dice"]), lambda_ce=float(cfg["lambda_ce"]))
        lesion_logit = logits[:, 1:2] - logits[:, 0:1]
        return dice_ce(lesion_logit.float(), (target > 0).to(torch.float32))

    def training_loss(self, batch: dict[str, torch.Tensor], progress: float = 0.0) -> torch.Tensor:
        """The loss of one batch. Boxes: ``batch['boxes']`` when the data pipeline gives them, else
        from the target with 0-20 px jitter (:func:`boxes_from_masks`, ``box_jitter_px``)."""
        boxes = batch.get("boxes")
        if boxes is None:
            boxes = boxes_from_masks(batch["target"], self.config["box_jitter_px"]).to(batch["images"].device)
        logits = self.forward(batch["images"], batch["available"], boxes)
        return self.loss(logits, batch["target"])
