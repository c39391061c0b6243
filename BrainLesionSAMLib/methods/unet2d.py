"""``unet2d``: the baseline that keeps the chain honest before the papers' methods.

A MONAI 2D U-Net on axial 256 x 256 slices. Input: the four modalities scaled to [0, 1] plus four
constant channels saying which modalities are present (a missing one is zero-filled), so one
network serves any non-empty subset; training drops modalities at random to teach it that.
Output: the BraTS sub-regions (background, NCR, ED, ET) as softmax classes.
"""
from __future__ import annotations

import torch
from monai.networks.nets import UNet

from ..conventions import MODALITIES
from .base import MethodFacts, SegmentationMethod, register_method


@register_method
class UNet2DBaseline(SegmentationMethod):
    facts = MethodFacts(
        name="unet2d",
        title="2D U-Net baseline (any modalities)",
        modalities=MODALITIES,
        required_modalities=(),
        spatial_dims=2,
        label_set="brats",
        promptable=False,
        cacheable_embeddings=False,
        input_size=(256, 256),
        reference="Ronneberger et al. 2015 (U-Net), MONAI implementation",
        cpu_bf16=True,  # 1.33x, Dice within 0.0002 of fp32 (docs/benchmarks.md, "CPU precision")
    )
    default_config = {
        "channels": (16, 32, 64, 128, 256),
        "strides": (2, 2, 2, 2),
        "num_res_units": 1,
        "dropout": 0.0,
    }
    packaged_weights = "unet2d_sample.safetensors"

    def __init__(self, **config):
        super().__init__(**config)
        self.net = UNet(
            spatial_dims=2,
            in_channels=2 * len(MODALITIES),
            out_channels=len(self.facts.labels),
            channels=tuple(self.config["channels"]),
            strides=tuple(self.config["strides"]),
            num_res_units=self.config["num_res_units"],
            dropout=self.config["dropout"],
        )

    def forward(self, images: torch.Tensor, available: torch.Tensor,
                boxes: torch.Tensor | None = None) -> torch.Tensor:
        """images [B, 4, H, W] in [0, 255], available [B, 4] bool -> logits [B, 4, H, W].
        ``boxes`` is not used (the engine restricts the output to a box for every method)."""
        present = available.to(images.dtype)[:, :, None, None]
        scaled = images / 255.0 * present
        channel_mask = present.expand_as(scaled)
        return self.net(torch.cat([scaled, channel_mask], dim=1))
