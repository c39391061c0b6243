"""Training augmentation from MONAI's dictionary transforms (rotation, scaling, flips, intensity).

A sample is {'image': [4, *spatial] float in [0, 255], 'label': [1, *spatial] class indices,
'brain': [1, *spatial] 0/1}. Spatial transforms move all three (images bilinear, label and brain
nearest, zeros outside the field of view); intensity transforms change each modality on its own.
Afterwards the image is clipped to [0, 255] and zeroed outside the (moved) brain, so the
intensity shift never paints the background - the methods see zero background, as at inference.

Every sample is augmented with its own seed (:func:`augment`), so a sample's augmentation does not
depend on which process or data-loader worker draws it, nor on what was drawn before: this is what
makes an interrupted and resumed run bit-identical to an uninterrupted one.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from monai.transforms import (Compose, RandFlipd, RandRotated, RandScaleIntensityd, RandShiftIntensityd,
                              RandZoomd)

SPATIAL_KEYS = ("image", "label", "brain")
_MODES = ("bilinear", "nearest", "nearest")


def build_augmentation(config: dict[str, Any], spatial_dims: int) -> Compose | None:
    """The MONAI pipeline for ``config`` (the config's ``augmentation`` section); None when disabled."""
    if not config["enabled"]:
        return None
    transforms = []
    angle = math.radians(float(config["rotate_deg"]))
    if angle > 0 and config["rotate_probability"] > 0:
        extra = {"range_y": angle, "range_z": angle} if spatial_dims == 3 else {}
        transforms.append(RandRotated(SPATIAL_KEYS, range_x=angle, prob=config["rotate_probability"],
                                      keep_size=True, mode=_MODES, padding_mode="zeros", **extra))
    low, high = config["scale"]
    if (low, high) != (1.0, 1.0) and config["scale_probability"] > 0:
        transforms.append(RandZoomd(SPATIAL_KEYS, prob=config["scale_probability"], min_zoom=low, max_zoom=high,
                                    mode=_MODES, padding_mode="constant", keep_size=True))
    for axis in config["flip_axes"]:
        if not 0 <= int(axis) < spatial_dims:
            raise ValueError(f"augmentation.flip_axes: axis {axis} does not exist in {spatial_dims}D")
        transforms.append(RandFlipd(SPATIAL_KEYS, prob=0.5, spatial_axis=int(axis)))
    if config["intensity_probability"] > 0:
        if config["intensity_scale"] > 0:
            transforms.append(RandScaleIntensityd("image", factors=float(config["intensity_scale"]),
                                                  prob=config["intensity_probability"], channel_wise=True))
        if config["intensity_shift"] > 0:
            offset = 255.0 * float(config["intensity_shift"])
            transforms.append(RandShiftIntensityd("image", offsets=offset, prob=config["intensity_probability"],
                                                  channel_wise=True))
    return Compose(transforms) if transforms else None


def _plain(value) -> torch.Tensor:
    return value.as_tensor() if hasattr(value, "as_tensor") else torch.as_tensor(value)


def augment(transform: Compose | None, image: torch.Tensor, label: torch.Tensor, seed: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment one sample with its own seed.

    image [4, *spatial] float in [0, 255], label [*spatial] long -> the same shapes and types.
    """
    if transform is None:
        return image, label
    brain = (image > 0).any(dim=0, keepdim=True).float()
    transform.set_random_state(seed=int(seed) % (2 ** 32))
    out = transform({"image": image, "label": label[None].float(), "brain": brain})
    image = _plain(out["image"]).float().clamp(0.0, 255.0) * (_plain(out["brain"]) > 0.5)
    label = _plain(out["label"])[0].round().long()
    return image.contiguous(), label.contiguous()
