"""Building blocks of BrainSegDMIF (Wang et al., MM '25; see ``methods/brainsegdmif.py`` for the
network they make up and for every decision taken where the paper is vague).

- :class:`DynamicModalInteractiveFusion` (DMIF, paper section 3.1, eq. 1-7), after every encoder block;
- :class:`PromptGenerator` (PG, section 3.2, eq. 8-9): learned mask tokens and SAM's two-way block;
- :class:`LayerByLayerUpsamplingDecoder` (LUD, section 3.3, eq. 10-13);
- :class:`FocalDiceLoss` (eq. 14) from MONAI's ``DiceLoss`` and ``FocalLoss``.

Shapes: B batch, M modalities (streams), H x W token grid, D token width (the encoder block's),
C = 256 the prompt/decoder width, N mask tokens (= output masks), S the network input side.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from segment_anything.modeling.common import LayerNorm2d
from segment_anything.modeling.mask_decoder import MLP
from segment_anything.modeling.transformer import Attention, TwoWayAttentionBlock

DECODER_DIM = 256     # SAM's prompt / mask-decoder width (the neck's output channels)
DECODER_HEADS = 8     # as SAM's mask decoder
DECODER_MLP_DIM = 2048
ATTENTION_DOWNSAMPLE = 2


def fusion_hidden_width(dim: int, reduction: int, min_hidden: int) -> int:
    """Hidden width of a DMIF module at token width ``dim``: ``max(dim // reduction, min_hidden)``."""
    return max(dim // reduction, min_hidden)


class DynamicModalInteractiveFusion(nn.Module):
    """DMIF after one encoder block: M modality token maps -> one fused map f_fus (eq. 1-7).

    With f the stacked tokens [B, H, W, M, D] (per token: M modality vectors of width D) and
    [f] their concatenation over modalities (width M * D):

    - inter-modal interaction (eq. 1-2): f' = LN(W1 [f] + b1), f'' = W2 GELU(f') + b2, W1: M*D -> h,
      W2: h -> M*D, reshaped to [.., M, D]: each modality's output depends on every modality;
    - dynamic weights (eq. 3-5): W = softmax over M of MLP(f'') (the MLP, D -> h -> D, is shared by
      the modalities and gives one weight per modality, token and channel, so that W has f'''s shape
      and eq. 5 is a true Hadamard product), f''' = f'' * W;
    - convergence (eq. 6-7): F = sum over M of f'''; F_c = F + gamma([f]) with the parallel
      enhancement branch gamma: M*D -> h -> D (Linear, GELU, Linear); f_fus = F_c + mean over M of f.

    Missing modalities (``present`` [B, M] False): their logits are set to -inf before the softmax
    (weight exactly 0, the others renormalised), the residual mean runs over the present ones, and
    in the concatenated inputs [f] a missing modality's slot holds the mean of the present ones (a
    zero slot would be an input the layers never see when trained on complete data).
    """

    def __init__(self, dim: int, num_modalities: int, hidden: int) -> None:
        super().__init__()
        if dim <= 0 or num_modalities <= 0 or hidden <= 0:
            raise ValueError(f"DMIF needs positive dim, num_modalities and hidden, got {dim}, {num_modalities}, {hidden}")
        self.dim, self.num_modalities, self.hidden = dim, num_modalities, hidden
        concatenated = dim * num_modalities
        self.interaction_in = nn.Linear(concatenated, hidden)     # W1, b1
        self.interaction_norm = nn.LayerNorm(hidden)              # F_Norm
        self.interaction_out = nn.Linear(hidden, concatenated)    # W2, b2
        self.weight_mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.enhance = nn.Sequential(nn.Linear(concatenated, hidden), nn.GELU(), nn.Linear(hidden, dim))  # gamma

    def forward(self, features: torch.Tensor, present: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features [B, H, W, M, D], present [B, M] bool -> (f_fus [B, H, W, D], weights [B, H, W, M, D]).

        ``weights`` sum to 1 over M and are 0 for missing modalities."""
        if features.dim() != 5 or features.shape[-2:] != (self.num_modalities, self.dim):
            raise ValueError(f"DMIF expects features [B, H, W, {self.num_modalities}, {self.dim}], "
                             f"got {tuple(features.shape)}")
        mask = present.to(torch.bool)[:, None, None, :, None]               # [B, 1, 1, M, 1]
        count = mask.sum(dim=3, keepdim=True).clamp_min(1).to(features.dtype)
        mean = (features * mask).sum(dim=3, keepdim=True) / count           # [B, H, W, 1, D]
        filled = torch.where(mask, features, mean)
        concatenated = filled.flatten(-2)                                    # [B, H, W, M * D]
        interacted = self.interaction_out(F.gelu(self.interaction_norm(self.interaction_in(concatenated))))
        interacted = interacted.unflatten(-1, (self.num_modalities, self.dim))  # f'' [B, H, W, M, D]
        logits = self.weight_mlp(interacted).masked_fill(~mask, float("-inf"))
        weights = torch.softmax(logits, dim=3)                               # eq. 3-4
        fused = (interacted * weights).sum(dim=3)                            # eq. 5-6
        fused = fused + self.enhance(concatenated)                           # F_c
        return fused + mean.squeeze(3), weights                              # eq. 7


class PromptGenerator(nn.Module):
    """Prompt Generate (eq. 8-9): learned mask tokens M_Q [N, C] become prompts M_T, and the image
    features F [B, C, E, E] become M''_Q, by SAM's ``TwoWayAttentionBlock`` (the four steps are the
    paper's: self-attention of M_Q; cross-attention M_Q -> F (eq. 8); the MLP ("FC") giving M_T;
    cross-attention F -> M_T (eq. 9)), with SAM's 8 heads, MLP 2048 and 2x attention downsampling.
    ``skip_first_layer_pe`` as in SAM's first decoder layer, so SAM's pretrained layer 0 fits."""

    def __init__(self, dim: int = DECODER_DIM, num_heads: int = DECODER_HEADS, mlp_dim: int = DECODER_MLP_DIM) -> None:
        super().__init__()
        self.block = TwoWayAttentionBlock(dim, num_heads, mlp_dim, nn.ReLU, ATTENTION_DOWNSAMPLE,
                                          skip_first_layer_pe=True)

    def forward(self, image: torch.Tensor, image_pe: torch.Tensor, mask_tokens: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """image [B, C, E, E], image_pe [1, C, E, E], mask_tokens [B, N, C] ->
        (prompts M_T [B, N, C], enhanced image features M''_Q [B, C, E, E])."""
        batch, channels, height, width = image.shape
        keys = image.flatten(2).transpose(1, 2)
        key_pe = image_pe.flatten(2).transpose(1, 2)
        prompts, keys = self.block(mask_tokens, keys, query_pe=mask_tokens, key_pe=key_pe)
        return prompts, keys.transpose(1, 2).reshape(batch, channels, height, width)


class LayerByLayerUpsamplingDecoder(nn.Module):
    """Layer-by-layer upsampling decoder (eq. 10-13): image features [B, C, E, E] and prompt tokens
    [B, N, C] -> mask logits [B, K, S, S] from the first K = ``num_masks`` tokens, S = ``scale`` * E.

    - O_Q = LN(M_T + Attn(M_T -> M''_Q)): the tokens attend to the image once more (SAM's final
      token-to-image attention, 2x downsampled, with positional encodings);
    - D_i (eq. 10): three branches, each ``ConvTranspose2d(C, c, kernel=s_i, stride=s_i)`` with
      s = (scale / 4, scale / 2, scale) (16 x 16 -> 64, 128, 256 for ViT-B at 256), then LayerNorm2d,
      GELU and a 3x3 convolution ("upsampling and convolution modules");
    - G (eq. 11): per branch, an MLP C -> C -> C -> c (SAM's hypernetwork MLP) maps each token of
      O_Q to channel weights; D_i^enhanced = G(O_Q) (.) D_i, summed over the c channels as SAM's
      ``hyper_in @ upscaled`` does, gives one mask per token at branch i's resolution;
    - eq. 12-13: the D1 and D2 masks resized bilinearly to D3's size, and the three summed.
    """

    def __init__(self, num_masks: int, scale: int, dim: int = DECODER_DIM, channels: int = 32,
                 num_heads: int = DECODER_HEADS) -> None:
        super().__init__()
        if scale < 4 or scale % 4:
            raise ValueError(f"LUD upsampling factor must be a multiple of 4, not {scale}")
        if channels <= 0 or num_masks <= 0:
            raise ValueError(f"LUD needs positive channels and num_masks, got {channels}, {num_masks}")
        self.num_masks = num_masks
        self.strides = (scale // 4, scale // 2, scale)
        self.token_to_image = Attention(dim, num_heads, downsample_rate=ATTENTION_DOWNSAMPLE)
        self.token_norm = nn.LayerNorm(dim)
        self.branches = nn.ModuleList(
            nn.Sequential(nn.ConvTranspose2d(dim, channels, kernel_size=s, stride=s), LayerNorm2d(channels),
                          nn.GELU(), nn.Conv2d(channels, channels, kernel_size=3, padding=1))
            for s in self.strides)
        self.modulators = nn.ModuleList(MLP(dim, dim, channels, 3) for _ in self.strides)   # G

    def forward(self, image: torch.Tensor, image_pe: torch.Tensor, prompts: torch.Tensor,
                prompt_pe: torch.Tensor) -> torch.Tensor:
        """image [B, C, E, E] (M''_Q), image_pe [1, C, E, E], prompts [B, N, C] (M_T) and their
        positional part [B, N, C] (the mask tokens M_Q) -> mask logits [B, K, S, S]."""
        if prompts.shape[1] < self.num_masks:
            raise ValueError(f"LUD needs at least {self.num_masks} tokens, got {prompts.shape[1]}")
        keys = image.flatten(2).transpose(1, 2)
        key_pe = image_pe.flatten(2).transpose(1, 2)
        attended = self.token_to_image(q=prompts + prompt_pe, k=keys + key_pe, v=keys)
        tokens = self.token_norm(prompts + attended)[:, :self.num_masks]                 # O_Q
        masks = []
        for branch, modulator in zip(self.branches, self.modulators):
            upsampled = branch(image)                                                    # D_i
            masks.append(torch.einsum("bnc,bchw->bnhw", modulator(tokens), upsampled))   # eq. 11
        size = masks[-1].shape[-2:]
        resized = [F.interpolate(m, size=size, mode="bilinear", align_corners=False) for m in masks[:-1]]
        return resized[0] + resized[1] + masks[-1]                                       # eq. 12-13


class FocalDiceLoss(nn.Module):
    """FocalDice = lambda_focal Focal + lambda_dice Dice (eq. 14: 0.5 Focal + Dice), MONAI's losses.

    - ``mode='sigmoid'`` (one lesion class): on the lesion logit x of logits [B, 2, ...] = [0, x]
      (so the loss sees exactly the softmax's lesion probability sigmoid(x)) against target > 0;
      MONAI ``DiceLoss(sigmoid=True)`` + ``FocalLoss`` (sigmoid focal, gamma 2).
    - ``mode='softmax'`` (BraTS classes): logits [B, K, ...] against class indices; MONAI
      ``DiceLoss(softmax=True, to_onehot_y=True, include_background=False)`` (background, most of
      every slice, left out of the Dice as nnU-Net does) + ``FocalLoss(use_softmax=True)`` over all K.

    ``batch``: Dice over the whole batch, since batches of slices hold lesion-free slices whose
    per-slice Dice is undefined. target: [B, ...] or [B, 1, ...] class indices (or a mask).
    """

    def __init__(self, mode: str = "sigmoid", lambda_focal: float = 0.5, lambda_dice: float = 1.0,
                 gamma: float = 2.0, batch: bool = True) -> None:
        super().__init__()
        from monai.losses import DiceLoss, FocalLoss

        if mode not in ("sigmoid", "softmax"):
            raise ValueError(f"FocalDiceLoss mode must be 'sigmoid' or 'softmax', not {mode!r}")
        if lambda_focal < 0 or lambda_dice < 0:
            raise ValueError("FocalDiceLoss weights must not be negative")
        self.mode, self.lambda_focal, self.lambda_dice = mode, lambda_focal, lambda_dice
        if mode == "sigmoid":
            self.dice = DiceLoss(sigmoid=True, batch=batch)
            self.focal = FocalLoss(gamma=gamma, use_softmax=False)
        else:
            self.dice = DiceLoss(softmax=True, to_onehot_y=True, include_background=False, batch=batch)
            self.focal = FocalLoss(gamma=gamma, use_softmax=True, to_onehot_y=True)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if target.dim() == logits.dim() - 1:
            target = target[:, None]
        logits = logits.float()
        if self.mode == "sigmoid":
            logits = logits[:, 1:2] - logits[:, 0:1]   # the logit of softmax's lesion probability
            target = (target > 0).to(torch.float32)
        else:
            target = target.long()
        return self.lambda_dice * self.dice(logits, target) + self.lambda_focal * self.focal(logits, target)
