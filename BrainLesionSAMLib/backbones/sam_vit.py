"""SAM ViT-B (image encoder, prompt encoder, mask decoder) built from segment-anything's own classes
at any input size, and the loader of official SAM / MedSAM ViT-B checkpoints.

The three parts are ``segment_anything.modeling``'s ``ImageEncoderViT``, ``PromptEncoder`` and
``MaskDecoder(TwoWayTransformer)`` with exactly the hyper-parameters ``segment_anything.build_sam``
uses for ``vit_b`` (embed dim 768, depth 12, 12 heads, global attention in blocks 2, 5, 8, 11,
window 14, MLP ratio 4, qkv bias, relative positions, LayerNorm eps 1e-6, neck to 256 channels;
prompt embed dim 256, mask_in_chans 16; decoder: 3 multimask outputs, two-way transformer depth 2,
8 heads, MLP 2048, IoU head depth 3 width 256). Only the input size is free: ``image_size`` (a
multiple of 16; 1024 is SAM's own, 256 what the 2D methods here use) gives an image embedding of
``image_size // 16`` squared and low-resolution masks of ``image_size // 4`` squared.

Parameter counts: image encoder 89,670,912 at 1024 (86,672,640 at 256: the absolute position
embedding and the global blocks' relative-position tables shrink), prompt encoder 6,220, mask
decoder 4,058,340; 93,735,472 in all at 1024.

Weights trained at 1024 load at other sizes through :func:`adapt_state_dict`, which resizes the
only size-dependent tensors (what SAM-Med2D and SAMed do, minus their loaders' habit of dropping
decoder tensors: every ``mask_decoder.*`` tensor is kept):

- ``image_encoder.pos_embed`` [1, 64, 64, 768] -> [1, S, S, 768]: bilinear, ``align_corners=False``,
  no antialiasing (NCHW through ``F.interpolate``). Without antialiasing a 4x reduction samples
  the 64-grid at the 16 output centres (each output is a 2x2 average there), like SAM-Med2D/SAMed;
  antialiasing would average 8x8 neighbourhoods instead and blur the learnt positions.
- ``rel_pos_h``/``rel_pos_w`` of the GLOBAL blocks (2, 5, 8, 11) 127 -> 2S - 1 (31 at 256) by
  linear interpolation, ``align_corners=False``: exactly what SAM's ``get_rel_pos`` would do at run
  time, so the attention is the same as SAM's own run-time interpolation would compute. The windowed
  blocks attend within 14 x 14 windows at any input size and keep their 27-long tables.

Checkpoints (:func:`load_sam_checkpoint`, :func:`load_sam_weights`) are read with
``torch.load(path, map_location='cpu', weights_only=True)``. Accepted: a state dict in the official
``Sam`` key layout (``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*``) as in
``sam_vit_b_01ec64.pth`` and MedSAM's ``medsam_vit_b.pth``; the same dict wrapped under a ``'model'``
or ``'state_dict'`` key (training-script checkpoints); keys all prefixed ``module.``
(``DataParallel``), which is stripped; ``pixel_mean``/``pixel_std`` entries (some forks save
``Sam``'s buffers), which are ignored because they are SAM's constants anyway. Checkpoints of
another architecture (SAM ViT-L/ViT-H, LiteMedSAM's TinyViT) are refused with a ``WeightsError``
naming both architectures; missing and unexpected keys are listed in a :class:`SamLoadReport`.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, TwoWayTransformer

from ..errors import WeightsError
from ..pth import read_pth
from .base import SamBackbone

# SAM's pixel normalisation (ImageNet statistics on the 0-255 scale), as in segment_anything.Sam.
PIXEL_MEAN: tuple[float, float, float] = (123.675, 116.28, 103.53)
PIXEL_STD: tuple[float, float, float] = (58.395, 57.12, 57.375)

PATCH_SIZE = 16
PROMPT_EMBED_DIM = 256
PRETRAINED_IMAGE_SIZE = 1024   # the size every official SAM / MedSAM checkpoint was trained at


@dataclass(frozen=True)
class ViTArchitecture:
    """The image-encoder shape of one SAM variant (as ``segment_anything.build_sam`` defines them)."""

    name: str
    embed_dim: int
    depth: int
    num_heads: int
    global_attn_indexes: tuple[int, ...]

    def describe(self) -> str:
        return f"SAM {self.name} (embed dim {self.embed_dim}, {self.depth} blocks)"


VIT_B = ViTArchitecture("ViT-B", 768, 12, 12, (2, 5, 8, 11))
VIT_L = ViTArchitecture("ViT-L", 1024, 24, 16, (5, 11, 17, 23))
VIT_H = ViTArchitecture("ViT-H", 1280, 32, 16, (7, 15, 23, 31))
KNOWN_ARCHITECTURES = (VIT_B, VIT_L, VIT_H)
WINDOW_SIZE = 14


def _check_image_size(image_size: int) -> int:
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0 \
            or image_size % PATCH_SIZE:
        raise ValueError(f"image_size must be a positive multiple of {PATCH_SIZE}, not {image_size!r}")
    return image_size


def build_image_encoder(image_size: int = PRETRAINED_IMAGE_SIZE) -> ImageEncoderViT:
    """SAM's ViT-B image encoder for ``image_size`` inputs: [B, 3, S, S] -> [B, 256, S/16, S/16]."""
    _check_image_size(image_size)
    return ImageEncoderViT(
        img_size=image_size,
        patch_size=PATCH_SIZE,
        in_chans=3,
        embed_dim=VIT_B.embed_dim,
        depth=VIT_B.depth,
        num_heads=VIT_B.num_heads,
        mlp_ratio=4,
        out_chans=PROMPT_EMBED_DIM,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        window_size=WINDOW_SIZE,
        global_attn_indexes=VIT_B.global_attn_indexes,
    )


def build_prompt_encoder(image_size: int = PRETRAINED_IMAGE_SIZE) -> PromptEncoder:
    """SAM's prompt encoder; box coordinates are pixels of the ``image_size`` input."""
    embedding_size = _check_image_size(image_size) // PATCH_SIZE
    return PromptEncoder(
        embed_dim=PROMPT_EMBED_DIM,
        image_embedding_size=(embedding_size, embedding_size),
        input_image_size=(image_size, image_size),
        mask_in_chans=16,
    )


def build_mask_decoder() -> MaskDecoder:
    """SAM's mask decoder (size-independent: it upsamples whatever embedding it gets 4x)."""
    return MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=PROMPT_EMBED_DIM, mlp_dim=2048, num_heads=8),
        transformer_dim=PROMPT_EMBED_DIM,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
    )


class SamViTB(SamBackbone):
    """SAM ViT-B's three parts at one input size, with SAM's pixel normalisation (backbone ``vit_b``).

    Attribute names (``image_encoder``, ``prompt_encoder``, ``mask_decoder``) are those of
    ``segment_anything.Sam``, so the official checkpoints' keys apply unchanged; the pixel mean/std
    are non-persistent buffers, as in ``Sam``, so they are not part of the state dict. Block by
    block (``tokens``, ``run_block``, ``embedding``) it is exactly ``ImageEncoderViT.forward``.
    """

    name = "vit_b"

    def __init__(self, image_size: int = PRETRAINED_IMAGE_SIZE) -> None:
        super().__init__()
        self.image_size = _check_image_size(image_size)
        self.embedding_size = image_size // PATCH_SIZE
        self.block_dims = (VIT_B.embed_dim,) * VIT_B.depth
        self.block_grids = (self.embedding_size,) * VIT_B.depth
        self.image_encoder = build_image_encoder(image_size)
        self.prompt_encoder = build_prompt_encoder(image_size)
        self.mask_decoder = build_mask_decoder()
        self.register_buffer("pixel_mean", torch.tensor(PIXEL_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(PIXEL_STD).view(1, 3, 1, 1), persistent=False)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] RGB in [0, 255] -> SAM-normalised [B, 3, S, S] (no padding: inputs are S x S)."""
        self.check_images(images)
        return (images - self.pixel_mean) / self.pixel_std

    def tokens(self, normalized: torch.Tensor) -> torch.Tensor:
        return self.image_encoder.patch_embed(normalized) + self.image_encoder.pos_embed

    def run_block(self, index: int, x: torch.Tensor) -> torch.Tensor:
        return self.image_encoder.blocks[index](x)

    def embedding(self, x: torch.Tensor) -> torch.Tensor:
        return self.image_encoder.neck(x.permute(0, 3, 1, 2))


# --------------------------------------------------------------------------- state-dict adaptation

def _global_rel_pos_keys(global_attn_indexes: tuple[int, ...] = VIT_B.global_attn_indexes) -> list[str]:
    return [f"image_encoder.blocks.{i}.attn.rel_pos_{axis}" for i in global_attn_indexes for axis in "hw"]


def resize_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """[1, G, G, C] -> [1, grid, grid, C]: bilinear, align_corners False, no antialiasing."""
    resized = F.interpolate(pos_embed.permute(0, 3, 1, 2).float(), size=(grid, grid), mode="bilinear",
                            align_corners=False, antialias=False)
    return resized.permute(0, 2, 3, 1).to(pos_embed.dtype).contiguous()


def resize_rel_pos(rel_pos: torch.Tensor, length: int) -> torch.Tensor:
    """[L, C] -> [length, C] by linear interpolation, exactly as SAM's ``get_rel_pos`` resizes."""
    resized = F.interpolate(rel_pos.float().t()[None], size=length, mode="linear", align_corners=False)
    return resized[0].t().to(rel_pos.dtype).contiguous()


def adapt_state_dict(state_dict: Mapping[str, torch.Tensor], image_size: int) -> dict[str, torch.Tensor]:
    """A copy of a SAM ViT-B state dict with its size-dependent tensors resized for ``image_size``.

    ``image_encoder.pos_embed`` goes to [1, S, S, 768] (S = image_size / 16) and the global blocks'
    relative-position tables to 2S - 1 rows, from whatever size the checkpoint has (so a 256-adapted
    dict also goes back to 1024). Every other tensor, all decoder tensors included, is passed on
    untouched. Tensors already of the right size are not touched either.
    """
    grid = _check_image_size(image_size) // PATCH_SIZE
    adapted = dict(state_dict)
    key = "image_encoder.pos_embed"
    pos_embed = adapted.get(key)
    if isinstance(pos_embed, torch.Tensor) and pos_embed.dim() == 4 and pos_embed.shape[1:3] != (grid, grid):
        adapted[key] = resize_pos_embed(pos_embed, grid)
    for key in _global_rel_pos_keys():
        table = adapted.get(key)
        if isinstance(table, torch.Tensor) and table.dim() == 2 and table.shape[0] != 2 * grid - 1:
            adapted[key] = resize_rel_pos(table, 2 * grid - 1)
    return adapted


# --------------------------------------------------------------------------- checkpoint reading

# Entries some forks save next to the weights; SAM's constants, not learnt, so ignored.
IGNORED_KEYS = ("pixel_mean", "pixel_std")


@dataclass
class SamLoadReport:
    """What loading a SAM checkpoint did. ``complete`` means every weight of the model came from it."""

    source: str
    image_size: int
    missing_keys: list[str] = field(default_factory=list)     # in the model, not in the checkpoint
    unexpected_keys: list[str] = field(default_factory=list)  # in the checkpoint, not in the model
    resized_keys: list[str] = field(default_factory=list)     # adapted to image_size
    ignored_keys: list[str] = field(default_factory=list)     # IGNORED_KEYS found in the file
    notes: list[str] = field(default_factory=list)            # unwrapping, prefix stripping

    @property
    def complete(self) -> bool:
        return not self.missing_keys and not self.unexpected_keys

    @staticmethod
    def _listing(keys: list[str], limit: int = 8) -> str:
        parts: dict[str, int] = {}
        for key in keys:
            part = key.split(".", 1)[0]
            parts[part] = parts.get(part, 0) + 1
        by_part = ", ".join(f"{part}: {n}" for part, n in parts.items())
        shown = "\n".join(f"    {key}" for key in keys[:limit])
        more = f"\n    ... and {len(keys) - limit} more" if len(keys) > limit else ""
        return f"{len(keys)} ({by_part})\n{shown}{more}"

    def summary(self) -> str:
        lines = [f"SAM ViT-B weights from {self.source} at input {self.image_size}: "
                 + ("all weights loaded" if self.complete else "INCOMPLETE")]
        lines += [f"  note: {note}" for note in self.notes]
        if self.resized_keys:
            lines.append(f"  resized to {self.image_size // PATCH_SIZE}x{self.image_size // PATCH_SIZE} "
                         f"embedding: {', '.join(self.resized_keys)}")
        if self.ignored_keys:
            lines.append(f"  ignored (SAM constants): {', '.join(self.ignored_keys)}")
        if self.missing_keys:
            lines.append("  missing (left at their initial values): " + self._listing(self.missing_keys))
        if self.unexpected_keys:
            lines.append("  unexpected (not used): " + self._listing(self.unexpected_keys))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def read_sam_state_dict(path_or_state_dict: str | os.PathLike | Mapping[str, Any],
                        expected_sha256: str | None = None) -> tuple[dict[str, Any], str, list[str]]:
    """(state dict, source description, notes) from a ``.pth`` path or an in-memory dict.

    A path is read with ``torch.load(weights_only=True)`` (after checking ``expected_sha256`` when
    given); a dict wrapped under 'model' or 'state_dict' is unwrapped and a 'module.' prefix on
    every key stripped (both recorded in the notes). Unreadable files raise WeightsError.
    """
    notes: list[str] = []
    if isinstance(path_or_state_dict, Mapping):
        state, source = path_or_state_dict, "a state dict in memory"
    else:
        source = str(path_or_state_dict)
        state = read_pth(path_or_state_dict, "SAM checkpoint", expected_sha256,
                         hint=" (the official ViT-B file is sam_vit_b_01ec64.pth, MedSAM's medsam_vit_b.pth)")
        if not isinstance(state, Mapping):
            raise WeightsError(f"{source} holds a {type(state).__name__}, not a state dict; give an "
                               "official SAM / MedSAM ViT-B .pth file")
    if not any(str(k).startswith(("image_encoder.", "mask_decoder.", "prompt_encoder.",
                                  "module.")) for k in state):
        for wrapper in ("model", "state_dict"):
            if isinstance(state.get(wrapper), Mapping):
                state = state[wrapper]
                notes.append(f"weights taken from the checkpoint's '{wrapper}' entry")
                break
    state = dict(state)
    if state and all(str(k).startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
        notes.append("'module.' prefix (DataParallel) stripped from every key")
    return state, source, notes


def _encoder_shape(state: Mapping[str, Any]) -> tuple[int | None, int, tuple[int, ...] | None]:
    """(embed dim, number of blocks, patch-embedding weight shape) seen in a state dict."""
    proj = state.get("image_encoder.patch_embed.proj.weight")
    embed_dim = None
    if isinstance(proj, torch.Tensor) and proj.dim() == 4:
        embed_dim = int(proj.shape[0])
    else:
        pos_embed = state.get("image_encoder.pos_embed")
        if isinstance(pos_embed, torch.Tensor) and pos_embed.dim() == 4:
            embed_dim = int(pos_embed.shape[-1])
        else:
            norm = state.get("image_encoder.blocks.0.norm1.weight")
            if isinstance(norm, torch.Tensor) and norm.dim() == 1:
                embed_dim = int(norm.shape[0])
    pattern = re.compile(r"^image_encoder\.blocks\.(\d+)\.")
    indexes = [int(m.group(1)) for m in map(pattern.match, map(str, state)) if m]
    depth = max(indexes) + 1 if indexes else 0
    return embed_dim, depth, tuple(proj.shape) if isinstance(proj, torch.Tensor) else None


def check_architecture(state: Mapping[str, Any], source: str = "this checkpoint") -> None:
    """Raise WeightsError unless ``state`` looks like SAM ViT-B (a truncated ViT-B is let through:
    its missing keys are reported by the loader)."""
    expected = f"expected SAM {VIT_B.name} ({VIT_B.embed_dim}, {VIT_B.depth})"
    keys = [str(k) for k in state]
    if any(k.startswith(("image_encoder.layers.", "image_encoder.patch_embed.seq.")) for k in keys):
        raise WeightsError(f"{source} is LiteMedSAM / MobileSAM (TinyViT image encoder); {expected}. "
                           "Use it with the LiteMedSAM-based methods, or give a SAM ViT-B checkpoint")
    if not any(k.startswith(("image_encoder.", "prompt_encoder.", "mask_decoder.")) for k in keys):
        shown = ", ".join(keys[:5]) + (" ..." if len(keys) > 5 else "")
        raise WeightsError(f"{source} is not a SAM checkpoint: none of its {len(keys)} keys is in SAM's "
                           f"layout (image_encoder.*, prompt_encoder.*, mask_decoder.*); first keys: "
                           f"{shown or '(none)'}; {expected}")
    embed_dim, depth, proj_shape = _encoder_shape(state)
    if embed_dim is not None and embed_dim != VIT_B.embed_dim or depth > VIT_B.depth:
        known = next((a for a in KNOWN_ARCHITECTURES if a.embed_dim == embed_dim), None)
        name = f"SAM {known.name}" if known is not None else "an unknown ViT"
        raise WeightsError(f"{source} is {name} (embed dim {embed_dim}, {depth} blocks); {expected}. "
                           "Give the ViT-B checkpoint (sam_vit_b_01ec64.pth or medsam_vit_b.pth)")
    if proj_shape is not None and proj_shape != (VIT_B.embed_dim, 3, PATCH_SIZE, PATCH_SIZE):
        raise WeightsError(f"{source} has a patch embedding of shape {list(proj_shape)}, not "
                           f"[{VIT_B.embed_dim}, 3, {PATCH_SIZE}, {PATCH_SIZE}] (3-channel, 16-pixel "
                           f"patches); {expected}")


def load_sam_weights(model: SamViTB, path_or_state_dict: str | os.PathLike | Mapping[str, Any],
                     require_complete: bool = False, expected_sha256: str | None = None) -> SamLoadReport:
    """Load SAM / MedSAM ViT-B weights into ``model`` (any image size); returns the report.

    Shapes that still differ after :func:`adapt_state_dict` (a damaged or foreign file) raise
    WeightsError naming them. ``require_complete``: also raise when keys are missing or unexpected
    (the error message is the report's summary).
    """
    state, source, notes = read_sam_state_dict(path_or_state_dict, expected_sha256)
    check_architecture(state, source)
    adapted = adapt_state_dict(state, model.image_size)
    report = SamLoadReport(source=source, image_size=model.image_size, notes=notes)
    report.resized_keys = [k for k in adapted if adapted[k] is not state[k]]
    report.ignored_keys = [k for k in adapted if k in IGNORED_KEYS]
    expected = model.state_dict()
    usable: dict[str, torch.Tensor] = {}
    mismatched = []
    for key, value in adapted.items():
        if key in IGNORED_KEYS:
            continue
        if key not in expected or not isinstance(value, torch.Tensor):
            report.unexpected_keys.append(key)
        elif value.shape != expected[key].shape:
            mismatched.append(f"{key}: file {list(value.shape)}, model {list(expected[key].shape)}")
        else:
            usable[key] = value
    if mismatched:
        raise WeightsError(f"{source} does not fit SAM ViT-B at input {model.image_size}: "
                           f"{len(mismatched)} tensor(s) of another shape: " + "; ".join(mismatched[:5])
                           + (" ..." if len(mismatched) > 5 else ""))
    result = model.load_state_dict(usable, strict=False)
    report.missing_keys = list(result.missing_keys)
    if require_complete and not report.complete:
        raise WeightsError(report.summary())
    return report


def load_sam_checkpoint(path_or_state_dict: str | os.PathLike | Mapping[str, Any],
                        image_size: int = PRETRAINED_IMAGE_SIZE, require_complete: bool = False,
                        expected_sha256: str | None = None) -> tuple[SamViTB, SamLoadReport]:
    """Build :class:`SamViTB` at ``image_size`` and load a SAM / MedSAM ViT-B checkpoint into it.

    Returns (model in eval mode, report). See the module docstring for what files are accepted.
    """
    model = SamViTB(image_size)
    report = load_sam_weights(model, path_or_state_dict, require_complete, expected_sha256)
    return model.eval(), report
