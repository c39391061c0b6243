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

__all__ = ["BACKBONES", "SamBackbone", "backbone_base", "build_backbone"]


def build_backbone(name: str, image_size: int = 256, weights: str | os.PathLike | None = None,
                   method: str = "this method") -> SamBackbone:
    """The backbone ``name`` ('vit_b' or 'lite') at ``image_size`` with its initial weights.

    ``vit_b``: ``weights`` is a SAM / MedSAM ViT-B ``.pth`` (every tensor must load; unexpected
    keys only warn); None leaves it random (tests, or before loading one of our checkpoints).
    ``lite``: ``weights`` is a LiteMedSAM-layout ``.pth``; None loads the packaged
    ``lite_medsam.pth``. 256 input (LiteMedSAM's) or a smaller multiple of 64 (same weights).
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
        from .litemedsam import build_lite_medsam, check_image_size

        check_image_size(image_size, method)
        return build_lite_medsam(pretrained=True, checkpoint=weights, image_size=image_size)
    raise ValueError(f"{method}: unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")


def backbone_base(name: str, weights: str | os.PathLike | None, method: str = "this method") -> tuple[str, str]:
    """(name, sha256) of the file that ``build_backbone(name, ..., weights)`` initialises from: the base
    of a delta checkpoint (``checkpoints.save_delta_checkpoint``). A random ``vit_b`` has none."""
    from ..errors import WeightsError

    if name == "lite":
        from .litemedsam import lite_medsam_base

        return lite_medsam_base(weights)
    if weights is None:
        raise WeightsError(f"{method} with backbone '{name}' and no backbone_weights starts from random weights; "
                           "there is no base to save a delta against")
    from ..pth import file_sha256

    return os.path.basename(weights), file_sha256(weights)

