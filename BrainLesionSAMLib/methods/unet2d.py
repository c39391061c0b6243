"""``unet2d``: the baseline that keeps the chain honest before the papers' methods.

A MONAI 2D U-Net on axial 256 x 256 slices. Input: the four modalities scaled to [0, 1] plus four
constant channels saying which modalities are present (a missing one is zero-filled), so one
network serves any non-empty subset; training drops modalities at random to teach it that.
Output: the BraTS sub-regions (background, NCR, ED, ET) as softmax classes.

``context_slices`` k > 0 makes it 2.5D: the four modalities of slices z - k .. z + k come in as
4 * (2k + 1) image channels (then the four presence channels), so a slice's decision can use what
lies above and below it. Such a network can start from 2D weights (:meth:`adapt_initial_state`).
"""
from __future__ import annotations

import dataclasses

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
        "context_slices": 0,  # neighbouring slices on either side (2.5D); 0: the slice alone
        # How a 2.5D network's first layer starts from 2D weights (adapt_initial_state): 'centre' (the 2D
        # kernels on the centre slice, zeros on the neighbours) or 'spread' (each slice 1 / (2k + 1) of them).
        "context_init": "centre",
    }
    packaged_weights = "unet2d_sample.safetensors"
    initialisation_keys = ("context_init",)

    def __init__(self, **config):
        super().__init__(**config)
        context = self.config["context_slices"]
        if isinstance(context, bool) or not isinstance(context, int) or not 0 <= context <= 4:
            raise ValueError(f"unet2d: context_slices must be an integer from 0 to 4, not {context!r}")
        if self.config["context_init"] not in ("centre", "spread", None):
            raise ValueError(f"unet2d: context_init must be 'centre' or 'spread', not {self.config['context_init']!r}")
        if context:
            self.facts = dataclasses.replace(type(self).facts, context_slices=context,
                                             title=f"2.5D U-Net baseline ({2 * context + 1} slices, any modalities)")
        self.net = UNet(
            spatial_dims=2,
            in_channels=(2 * context + 2) * len(MODALITIES),
            out_channels=len(self.facts.labels),
            channels=tuple(self.config["channels"]),
            strides=tuple(self.config["strides"]),
            num_res_units=self.config["num_res_units"],
            dropout=self.config["dropout"],
        )

    def forward(self, images: torch.Tensor, available: torch.Tensor,
                boxes: torch.Tensor | None = None) -> torch.Tensor:
        """images [B, 4 * (2k + 1), H, W] in [0, 255] (k = context_slices), available [B, 4] bool
        -> logits [B, 4, H, W]. ``boxes`` is not used (the engine restricts the output to a box for
        every method)."""
        present = available.to(images.dtype)[:, :, None, None]
        slices = 2 * self.config["context_slices"] + 1
        scaled = images / 255.0 * present.repeat(1, slices, 1, 1)
        channel_mask = present.expand(-1, -1, *images.shape[-2:])
        return self.net(torch.cat([scaled, channel_mask], dim=1))

    def adapt_initial_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A 2D unet2d's weights made to fit this 2.5D one: every first-layer kernel that reads the
        eight 2D input channels keeps its presence kernels, and its image kernels go (``context_init``)
        onto the centre slice's channels with zeros on the neighbours' ('centre': the 2.5D network starts
        out computing exactly what the 2D one did) or, divided by 2k + 1, onto every slice's ('spread':
        the same function where the neighbours look like the slice, and a gradient that uses them from
        the first step; with 'centre' and weight decay the neighbours' kernels stayed small,
        docs/generalisation.md)."""
        modalities = len(MODALITIES)
        context = self.config["context_slices"]
        if not context:
            return state
        own = self.state_dict()
        adapted = dict(state)
        for name, tensor in state.items():
            wanted = own.get(name)
            if (wanted is None or tensor.ndim != 4 or tensor.shape[1] != 2 * modalities
                    or wanted.shape[1] != (2 * context + 2) * modalities):
                continue
            kernel = torch.zeros_like(wanted)
            if self.config["context_init"] == "spread":
                kernel[:, :-modalities] = (tensor[:, :modalities] / (2 * context + 1)).repeat(1, 2 * context + 1, 1, 1)
            else:
                centre = context * modalities
                kernel[:, centre:centre + modalities] = tensor[:, :modalities]
            kernel[:, -modalities:] = tensor[:, modalities:]
            adapted[name] = kernel
        return adapted
