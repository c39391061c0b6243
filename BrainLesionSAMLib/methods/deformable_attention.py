"""Multi-scale deformable attention (Zhu et al., Deformable DETR, ICLR 2021) in plain PyTorch.

Each query looks at ``num_points`` sampled locations per head and per value level instead of at
every value token: the locations are its reference point plus offsets predicted from the query,
the values there are read by bilinear interpolation, and a softmax over all levels' and points'
weights (also predicted from the query) mixes them. The sampling uses ``F.grid_sample``
(bilinear, zeros outside the map, ``align_corners=False``), so it runs on the CPU and the GPU,
under autocast and on the meta device, without Deformable DETR's compiled CUDA extension; it is the
same computation as that extension's pure-PyTorch reference ``ms_deform_attn_core_pytorch``.

Conventions (B batch, Q queries, h heads, L levels, P points, d = head width):

- locations are normalised (x, y) in [0, 1] over each value map, (0, 0) the top-left corner of
  its first pixel and (1, 1) the bottom-right corner of its last one, so a pixel centre is at
  ((j + 0.5) / W, (i + 0.5) / H); an offset of 1 moves by one pixel of the level it samples
  (offsets are divided by that level's (W, H)), as in Deformable DETR.
- values are channels-last maps [B, H_l, W_l, C]: the feature maps between the SAM encoder's blocks
  are channels-last, and the value projection is a Linear over the last axis anyway.

The module allows a value width other than the query width (``value_dim``): the value projection
maps it to the query width. DB-SAM's bilateral cross-attention needs that where the ViT and the
convolution branch differ in width (LiteMedSAM's TinyViT blocks are 64 to 320 wide).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def multi_scale_deformable_sampling(values: Sequence[torch.Tensor], sampling_locations: torch.Tensor,
                                    attention_weights: torch.Tensor) -> torch.Tensor:
    """The core of multi-scale deformable attention.

    values: L tensors [B, h, d, H_l, W_l] (the projected values, split into heads);
    sampling_locations: [B, Q, h, L, P, 2] normalised (x, y) (see the module docstring);
    attention_weights: [B, Q, h, L, P] (softmax-normalised over L * P by the caller).
    Returns [B, Q, h * d]: sum over levels and points of weight x bilinear sample, per head.
    """
    batch, queries, heads, levels, points, _ = sampling_locations.shape
    if len(values) != levels:
        raise ValueError(f"{len(values)} value levels for sampling locations over {levels} levels")
    # float32 throughout: under bf16 autocast a location on a 64-wide map would be off by up to a
    # quarter pixel; the output goes back to the values' dtype.
    grids = 2.0 * sampling_locations.float() - 1.0  # grid_sample's [-1, 1] frame (align_corners=False)
    sampled = []
    for level, value in enumerate(values):
        _, _, width, height_l, width_l = value.shape
        # [B, Q, h, P, 2] -> [B * h, Q, P, 2]: one grid per (sample, head)
        grid = grids[:, :, :, level].transpose(1, 2).reshape(batch * heads, queries, points, 2)
        sampled.append(F.grid_sample(value.reshape(batch * heads, width, height_l, width_l).float(), grid,
                                     mode="bilinear", padding_mode="zeros", align_corners=False))
    # [B * h, d, Q, L, P] weighted by [B * h, 1, Q, L, P]
    stacked = torch.stack(sampled, dim=-2)
    weights = attention_weights.float().transpose(1, 2).reshape(batch * heads, 1, queries, levels, points)
    out = (stacked * weights).sum(dim=(-1, -2))  # [B * h, d, Q]
    return out.reshape(batch, heads * out.shape[1], queries).transpose(1, 2).to(values[0].dtype)


def grid_reference_points(height: int, width: int, device: torch.device | str | None = None,
                          dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Pixel centres of an H x W map as normalised (x, y), row-major: [H * W, 2]."""
    ys = (torch.arange(height, device=device, dtype=dtype) + 0.5) / height
    xs = (torch.arange(width, device=device, dtype=dtype) + 0.5) / width
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=-1)


class MultiScaleDeformableAttention(nn.Module):
    """Deformable DETR's multi-scale deformable attention.

    query [B, Q, C] (C = ``embed_dim``), reference_points [B or 1, Q, 2] normalised (x, y),
    values: ``num_levels`` channels-last maps [B, H_l, W_l, value_dim] -> [B, Q, C].

    Learnt: ``sampling_offsets`` (C -> h * L * P * 2, in pixels of each level),
    ``attention_weights`` (C -> h * L * P, softmax over L * P per head), ``value_proj``
    (value_dim -> C) and ``output_proj`` (C -> C). Initialised as Deformable DETR does: offsets
    zero-weighted with a bias that puts each head's points on a ray in the head's own direction at
    1, 2, ..., P pixels, uniform attention weights, Xavier projections.
    """

    def __init__(self, embed_dim: int, num_heads: int, num_levels: int = 1, num_points: int = 4,
                 value_dim: int | None = None) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}")
        if num_levels < 1 or num_points < 1:
            raise ValueError(f"num_levels and num_points must be >= 1, not {num_levels}, {num_points}")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.num_levels, self.num_points = num_levels, num_points
        self.value_dim = embed_dim if value_dim is None else value_dim
        self.sampling_offsets = nn.Linear(embed_dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(embed_dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(self.value_dim, embed_dim)
        self.output_proj = nn.Linear(embed_dim, embed_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        directions = torch.stack([angles.cos(), angles.sin()], dim=-1)
        directions = directions / directions.abs().max(dim=-1, keepdim=True).values  # onto the unit square
        steps = torch.arange(1, self.num_points + 1, dtype=torch.float32)
        bias = directions[:, None, None, :] * steps[None, None, :, None]               # [h, 1, P, 2]
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(bias.expand(-1, self.num_levels, -1, -1).reshape(-1))
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for projection in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(projection.weight)
            nn.init.zeros_(projection.bias)

    def forward(self, query: torch.Tensor, reference_points: torch.Tensor,
                values: Sequence[torch.Tensor]) -> torch.Tensor:
        batch, queries, _ = query.shape
        if len(values) != self.num_levels:
            raise ValueError(f"expected {self.num_levels} value level(s), got {len(values)}")
        if reference_points.shape[-2:] != (queries, 2):
            raise ValueError(f"reference_points must be [B, {queries}, 2], got {tuple(reference_points.shape)}")
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        head_dim = self.embed_dim // heads
        projected = []
        normalizer = []
        for value in values:
            _, height, width, _ = value.shape
            v = self.value_proj(value)                                        # [B, H, W, C]
            projected.append(v.reshape(batch, height, width, heads, head_dim).permute(0, 3, 4, 1, 2))
            normalizer.append((width, height))
        offsets = self.sampling_offsets(query).view(batch, queries, heads, levels, points, 2)
        weights = self.attention_weights(query).view(batch, queries, heads, levels * points)
        weights = weights.softmax(dim=-1).view(batch, queries, heads, levels, points)
        scale = torch.tensor(normalizer, dtype=torch.float32, device=offsets.device)  # [L, 2] = (W, H)
        locations = (reference_points.float()[:, :, None, None, None, :]
                     + offsets.float() / scale[None, None, None, :, None, :])
        return self.output_proj(multi_scale_deformable_sampling(projected, locations, weights))
