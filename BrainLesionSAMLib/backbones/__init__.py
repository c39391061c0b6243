"""Pretrained backbones the methods build on, each in its own module (import the one you need):

- ``sam_vit``: SAM ViT-B (image encoder, prompt encoder, mask decoder) from segment-anything's own
  classes at any input size, and the loader of official SAM / MedSAM ViT-B ``.pth`` checkpoints.
- ``litemedsam``: LiteMedSAM (TinyViT encoder + SAM prompt encoder and mask decoder).

``build_backbone`` picks one by name. It lives here, above the backbones: they import ``base``
(:class:`~.base.SamBackbone`), and the factory imports each backbone only when it is asked for, so
importing one backbone never pulls in (or breaks on) another, and no module imports one that imports it.
"""
from __future__ import annotations

import os

from .base import BACKBONES, SamBackbone

__all__ = ["BACKBONES", "SamBackbone", "build_backbone"]


def build_backbone(name: str, image_size: int = 256, weights: str | os.PathLike | None = None,
                   method: str = "this method") -> SamBackbone:
    """The backbone ``name`` ('vit_b' or 'lite') at ``image_size`` with its initial weights.

    ``vit_b``: ``weights`` is a SAM / MedSAM ViT-B ``.pth`` (every tensor must load; unexpected
    keys only warn); None leaves it random (tests, or before loading one of our checkpoints).
    ``lite``: ``weights`` is a LiteMedSAM-layout ``.pth``; None loads the packaged
    ``lite_medsam.pth``. Only 256 input (TinyViT's 64 x 64 grid is built in).
    """
    if name == "vit_b":
        import warnings

        from ..errors import WeightsError
        from .sam_vit import SamViTB, load_sam_weights

        backbone = SamViTB(image_size)
        if weights:
            report = load_sam_weights(backbone, weights)
            if report.missing_keys:
                raise WeightsError(report.summary())
            if report.unexpected_keys:
                warnings.warn(report.summary(), stacklevel=2)
        return backbone
    if name == "lite":
        from .litemedsam import IMAGE_SIZE, build_lite_medsam

        if image_size != IMAGE_SIZE:
            raise ValueError(f"{method}: the 'lite' backbone (LiteMedSAM) takes {IMAGE_SIZE} x {IMAGE_SIZE} "
                             f"input only, not {image_size}; use image_size {IMAGE_SIZE} or backbone 'vit_b'")
        return build_lite_medsam(pretrained=True, checkpoint=weights)
    raise ValueError(f"{method}: unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
