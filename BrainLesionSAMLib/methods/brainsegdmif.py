"""``brainsegdmif``: BrainSegDMIF (Wang, Wu et al., "BrainSegDMIF: A Dynamic Fusion-enhanced SAM for
Brain Lesion Segmentation", MM '25): fully automatic 2D multi-modal lesion segmentation with SAM.

Network (paper section 3; building blocks in ``brainsegdmif_modules.py``)::

    T1, T1CE, T2, FLAIR slice -> one SAM image-encoder stream each (12 blocks)
    after every block i:  f_fus = DMIF_i(stream tokens)        (eq. 1-7)
                          stream_m <- stream_m + f_fus         (fed back into every stream)
    last f_fus -> neck -> PG: learned mask tokens M_Q, SAM's two-way block -> M_T, M''_Q  (eq. 8-9)
                       -> LUD: O_Q = Attn(M_T, M''_Q); three ConvTranspose2d branches D1..D3
                               modulated by G(O_Q), resized to D3 and summed            (eq. 10-13)
    -> mask logits at the input size (256 x 256)

Decisions where the paper is vague (all in ``default_config``):

- **Four encoders, separate weights, trained.** One SAM ViT-B image encoder per modality
  (``shared_encoder`` False): the paper's 354M parameters only add up with four ViT-B encoders
  (4 x 86.7M at 256 input; one shared encoder would give ~107M), and "modality-specific encoders"
  (section 3) says the same. They are fine-tuned, not frozen (``freeze_encoders`` False): "we
  fine-tuned only the base model of SAM (SAM-B)" on four 80 GB A100s "due to memory constraints".
  Separate streams run one after another block by block; with ``shared_encoder`` True one encoder
  runs all streams as one batch. Every stream is initialised from the same ``backbone_weights``.
- **One neck.** Only the last f_fus reaches the decoder, so the first stream's neck embeds it and
  the other streams' necks (never used) are removed; the other streams' prompt encoder and mask
  decoder likewise.
- **Input.** Each modality's [0, 255] slice, repeated to three channels, normalised as the
  backbone expects (SAM's pixel mean/std, LiteMedSAM's min-max). ``image_size`` other than 256
  resizes the slices inside and the logits back (as CMAA).
- **DMIF** (see :class:`DynamicModalInteractiveFusion`): hidden width h = max(D / 8, 16)
  (``fusion_reduction``, ``fusion_min_hidden``): the paper gives no width; with D = 768 this keeps
  the total within 3 % of the paper's count (h = D / 4 would be +6 %). Weights per modality, token
  and channel (so eq. 5 is a true Hadamard product); gamma = Linear-GELU-Linear on the
  concatenation. Fusion after all 12 blocks, at each block's own width (ViT-B 768; TinyViT 64 to 320
  on grids 256 to 64). The first DMIF of ``lite`` works on 65,536 tokens x 4 modalities x 64
  channels (64 MiB per slice); its training forward keeps 0.26 GiB per slice for the backward pass,
  against 2.2 GiB that each TinyViT stream keeps per image (8.7 GiB per four-modality slice; ViT-B's
  whole training step at batch 2, Adam included, peaks at 8.0 GiB), so the fusion needs no
  chunking: at 256 input the TinyViT streams, not DMIF, make ``lite`` memory-hungry in training
  (``benchmarks/bench_brainsegdmif.py``).
- **Feedback** (``fusion_feedback``): how f_fus goes back into every stream. 'add' puts it onto
  every stream's tokens (x_m + f_fus), the paper's literal reading ("transmitted ... to each
  modality's encoder where they are integrated"). f_fus already contains the streams' mean, so the
  residual stream roughly doubles at every block and a pretrained encoder's later blocks contribute
  little at the start of training. 'average' ((x_m + f_fus) / 2) keeps the scale; 'none' feeds
  nothing back (fusion only for the decoder). The default 'gated' adds gamma_i * f_fus with a
  per-channel gamma_i after blocks 1-11 that starts at 0 (LayerScale / ReZero), so the network
  starts as the unchanged pretrained backbone and learns how much fusion to feed back. Measured
  (issue 24, ``benchmarks/bench_brainsegdmif.py --feedback-study rms|train``, real LiteMedSAM
  backbone): token RMS after blocks 1-12 'add' 0.68 -> 1,040 (block 10) -> 156, 'average' 0.34 ->
  0.32, 'gated' = 'none' = the backbone's own 0.31 -> 0.33; 48 Adam steps (batch 1, T1CE + FLAIR,
  lesion slices of 3 synthetic cases, validation 4 slices of a fourth): validation Dice 'add' 0.41,
  'average' 0.84, 'gated' 0.85 (docs/decisions.md).
- **Missing modalities** (any non-empty subset of the configured ``modalities``, from
  ``available``): a missing modality's stream is masked out of the softmax over modalities (weight
  exactly 0, the present ones renormalised) and out of the residual mean; in DMIF's concatenated
  inputs its slot holds the present modalities' mean. A stream no sample of the batch has is not
  computed at all; with mixed availability it runs on the zero image and is masked per sample, so
  each sample's output is the same either way. The paper trains a separate model per subset
  (Table 2); ``modalities`` builds such a model (e.g. FCD2023's T1, T2, FLAIR: three streams).
- **PG** (eq. 8-9): SAM's ``TwoWayAttentionBlock`` (self-attention, token-to-image attention,
  MLP = "FC", image-to-token attention) on N learned mask tokens (``mask_tokens``, the paper does not
  give N: 4, as SAM's decoder has); the first K of them give the K output masks. N must be at least
  2: with a single token, the self-attention and the image-to-token attention are a softmax over
  one key, constant, and their query/key projections would never get a gradient.
- **LUD** (eq. 10-13): see :class:`LayerByLayerUpsamplingDecoder`: O_Q by SAM's final
  token-to-image attention; branches with strides (4, 8, 16) for ViT-B (16 x 16 -> 64, 128, 256),
  (1, 2, 4) for ``lite`` (64 x 64 -> 64, 128, 256), c = 32 channels (SAM's last upscaling width,
  ``decoder_channels``), each ConvTranspose2d -> LayerNorm2d -> GELU -> 3x3 conv; G = SAM's
  3-layer hypernetwork MLP per branch; D_i^enhanced = G(O_Q) (.) D_i summed over channels (SAM's
  hyper_in @ upscaled), giving mask logits directly at 256 x 256.
- **Initialisation from SAM.** PG's block starts as SAM's mask-decoder layer 0, LUD's attention as
  SAM's final token-to-image attention, M_Q as SAM's four mask tokens (same classes, same shapes),
  so pretrained decoder knowledge is used; branches and G start at PyTorch's defaults.
- **Ablation switches (Table 3).** ``dmif`` False: no fusion modules; the streams run independently
  and the decoder gets their mean (over present modalities). ``prompt_generator`` False: SAM's
  prompt encoder without prompts (sparse: none; dense: its learnt no-mask embedding, added to the
  image embedding); the mask tokens then reach the decoder unprocessed. ``upsampling_decoder``
  False: SAM's mask decoder (prompts: PG's M_T, or none), its 4E x 4E masks resized bilinearly.
  Modules a configuration does not use are not built (PG on: no prompt encoder; LUD on: no SAM mask
  decoder). With LUD off, SAM's IoU head and the unused hypernetworks get no gradient (as in CMAA).
- **Output** (``head``): 'lesion' (FCD, or the whole tumour; label set 'lesion'): one mask logit x,
  returned as class logits [0, x] (softmax = [1 - sigmoid(x), sigmoid(x)]); 'brats': four masks, one
  per class (background, NCR, ED, ET; label set 'brats'), softmax over them. The class-level facts
  describe the default ('lesion', all four modalities); an instance configured otherwise carries
  its own facts (``dataclasses.replace``) for the engine and the GUI.
- **Loss** (eq. 14): 0.5 Focal + Dice with MONAI's ``FocalLoss`` and ``DiceLoss`` (see
  :class:`FocalDiceLoss`); Dice over the batch. Training (paper): Adam 1e-4, MultiStepLR x0.5 at
  epochs 7 and 12, 200 epochs; batch size not given (``Training/configs/brainsegdmif.json``).
- **Per-case modality weights**: ``start_case()`` / ``case_weights()`` give the DMIF softmax
  weights averaged over the 12 fusion blocks, all tokens and channels and the case's slices,
  {'modality weights': {'t1': .., 't1ce': .., 't2': .., 'flair': ..}} (summing to 1; 0 for a
  missing modality): which sequence the fusion relied on.

Parameter counts (``brainlesionsam info --json``; vit_b at 256, head 'lesion' or 'brats'): total
362,573,024 = four encoder streams 4 x 86,672,640 less three unused necks 3 x 787,456
(344,328,192) + twelve DMIF modules 12 x 1,111,008 (13,332,096) + four mask tokens 1,024 + PG
1,579,520 + LUD 3,332,192; all trainable. Paper: 354M, +2.4 %. Ablations: DMIF off 349,240,928;
PG off 360,998,956 (SAM's prompt encoder instead, one mask token); LUD off 363,299,172 (SAM's mask
decoder instead). ``freeze_encoders``: 18,244,832 trainable. ``lite``: 24,176,592 (four TinyViT
streams 4 x 5,726,740 less three necks 3 x 672,768 = 20,888,656; DMIF at TinyViT widths with
h = 16 to 40: 955,680; PG 1,579,520; LUD with strides 1, 2, 4: 751,712; mask tokens 1,024).

GFLOPs per 256 x 256 four-modality slice, by ``torch.utils.flop_counter.FlopCounterMode`` (2 FLOPs
per multiply-add of matmuls and convolutions; element-wise operations, norms and softmax are not
counted), :func:`flops_per_slice` / ``benchmarks/bench_brainsegdmif.py``: vit_b 287.5 = four
streams 4 x 69.0 + DMIF 9.5 + PG and LUD 1.9, against the paper's 311 (-7.6 %). The paper says
neither its fusion widths nor what its counter counts; reaching 311 through DMIF alone would need
h ~ 333 instead of 96 and ~33M more parameters (~395M, +12 %), so we match the parameter count
and report the FLOPs difference.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones import SamBackbone, build_backbone
from ..conventions import MODALITIES, MODALITY_DISPLAY_NAMES
from ..errors import MissingModalityError
from .base import BackboneDeltaBase, MethodFacts, SegmentationMethod, register_method
from .brainsegdmif_modules import (DECODER_DIM, DynamicModalInteractiveFusion, FocalDiceLoss,
                                   LayerByLayerUpsamplingDecoder, PromptGenerator, fusion_hidden_width)

HEADS = {"lesion": 1, "brats": 4}   # head -> number of output masks (= classes of its label set)
FEEDBACK_RULES = ("gated", "add", "average", "none")
SWITCHES = ("dmif", "prompt_generator", "upsampling_decoder")


def _is_meta(tensor: torch.Tensor) -> bool:
    return tensor.device.type == "meta"


@register_method
class BrainSegDMIF(BackboneDeltaBase, SegmentationMethod):
    facts = MethodFacts(
        name="brainsegdmif",
        title="BrainSegDMIF: dynamic modal interactive fusion SAM (one encoder per modality)",
        modalities=MODALITIES,
        required_modalities=(),
        spatial_dims=2,
        label_set="lesion",
        promptable=False,
        cacheable_embeddings=False,
        input_size=(256, 256),
        reference="Wang, Wu et al., BrainSegDMIF: A Dynamic Fusion-enhanced SAM for Brain Lesion "
                  "Segmentation, ACM MM 2025",
    )
    initialisation_keys = ("backbone_weights",)
    # The CPU release (catalogue brainsegdmif-lite128-v1): a delta on LiteMedSAM,
    # Training/configs/brainsegdmif_release.json.
    packaged_weights = "brainsegdmif_lite128.safetensors"
    default_config = {
        "backbone": "vit_b",            # 'vit_b' (paper) or 'lite' (LiteMedSAM's TinyViT at 256, or a smaller multiple of 64)
        "backbone_weights": None,       # vit_b: SAM / MedSAM .pth for every stream, None = random;
                                        # lite: LiteMedSAM .pth, None = the packaged lite_medsam.pth
        "image_size": 256,              # encoder input; the paper's 256 x 256 slices
        "modalities": MODALITIES,       # one encoder stream each (Table 2: any non-empty subset)
        "shared_encoder": False,        # True: one encoder for all streams (not the paper's 354M)
        "freeze_encoders": False,       # paper: SAM-B fine-tuned
        "head": "lesion",               # 'lesion' (one class: FCD, whole tumour) | 'brats' (NCR, ED, ET)
        "dmif": True,                   # Table 3 switches
        "prompt_generator": True,
        "upsampling_decoder": True,
        "fusion_reduction": 8,          # DMIF hidden width = max(D // 8, 16)
        "fusion_min_hidden": 16,
        "fusion_feedback": "gated",     # f_fus into every stream: 'gated' | 'add' (paper, literal) | 'average' | 'none'
        "mask_tokens": 4,               # N learned mask tokens of PG (SAM's four); the first K give the masks
        "decoder_channels": 32,         # LUD branch channels c
        "lambda_focal": 0.5,            # eq. 14: 0.5 Focal + Dice
        "lambda_dice": 1.0,
        "focal_gamma": 2.0,
        "dice_batch": True,
        "optimizer": "adam",            # paper: Adam 1e-4, MultiStepLR x0.5 at epochs 7 and 12, 200 epochs
        "learning_rate": 1e-4,
        "lr_milestones": (7, 12),
        "lr_gamma": 0.5,
        "epochs": 200,
    }

    def __init__(self, **config: Any):
        super().__init__(**config)
        cfg = self.config
        self._check_config(cfg)
        self.modality_names: tuple[str, ...] = tuple(cfg["modalities"])
        self.modality_indices = [MODALITIES.index(m) for m in self.modality_names]
        self.num_masks = HEADS[cfg["head"]]
        if (cfg["head"], self.modality_names) != (self.facts.label_set, self.facts.modalities):
            self.facts = dataclasses.replace(type(self).facts, label_set=cfg["head"],
                                             modalities=self.modality_names)

        num_encoders = 1 if cfg["shared_encoder"] else len(self.modality_names)
        encoders = [build_backbone(cfg["backbone"], cfg["image_size"], cfg["backbone_weights"],
                                   method="brainsegdmif") for _ in range(num_encoders)]
        first = encoders[0]
        for other in encoders[1:]:   # only the first stream's neck, prompt encoder, decoder are used
            del other.image_encoder.neck, other.prompt_encoder, other.mask_decoder
        self.encoders = nn.ModuleList(encoders)

        self.fusion = None
        if cfg["dmif"]:
            self.fusion = nn.ModuleList(
                DynamicModalInteractiveFusion(
                    dim, len(self.modality_names),
                    fusion_hidden_width(dim, cfg["fusion_reduction"], cfg["fusion_min_hidden"]))
                for dim in first.block_dims)
        # 'gated': x_m + gamma_i * f_fus with a per-channel gamma_i = 0 at the start (LayerScale /
        # ViT-Adapter's injector), so every stream starts as the unchanged pretrained encoder.
        self.feedback_gates = None
        if cfg["dmif"] and cfg["fusion_feedback"] == "gated":
            self.feedback_gates = nn.ParameterList(nn.Parameter(torch.zeros(dim)) for dim in first.block_dims[:-1])

        from segment_anything.modeling.prompt_encoder import PositionEmbeddingRandom

        sam_decoder = first.mask_decoder
        self.image_pe = PositionEmbeddingRandom(DECODER_DIM // 2)   # SAM's dense positional encoding
        # M_Q: without PG the tokens only query the image (one per mask); PG needs more than one, or
        # its attention over tokens would be a softmax over a single key (constant, no gradient).
        num_tokens = cfg["mask_tokens"] if cfg["prompt_generator"] else self.num_masks
        self.mask_tokens = nn.Embedding(num_tokens, DECODER_DIM)
        with torch.no_grad():
            self.image_pe.positional_encoding_gaussian_matrix.copy_(
                first.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix)
            copied = min(num_tokens, sam_decoder.mask_tokens.num_embeddings)
            self.mask_tokens.weight[:copied].copy_(sam_decoder.mask_tokens.weight[:copied])
        self.prompt_generator = None
        if cfg["prompt_generator"]:
            self.prompt_generator = PromptGenerator()
            self.prompt_generator.block.load_state_dict(sam_decoder.transformer.layers[0].state_dict())
            del first.prompt_encoder
        self.decoder = None
        if cfg["upsampling_decoder"]:
            scale = first.image_size // first.embedding_size
            self.decoder = LayerByLayerUpsamplingDecoder(self.num_masks, scale, channels=cfg["decoder_channels"])
            self.decoder.token_to_image.load_state_dict(sam_decoder.transformer.final_attn_token_to_image.state_dict())
            self.decoder.token_norm.load_state_dict(sam_decoder.transformer.norm_final_attn.state_dict())
            del first.mask_decoder
        if cfg["freeze_encoders"]:
            for encoder in self.encoders:
                encoder.image_encoder.requires_grad_(False)
        self._loss_function: FocalDiceLoss | None = None
        self.start_case()

    @staticmethod
    def _check_config(cfg: dict[str, Any]) -> None:
        modalities = cfg["modalities"]
        if isinstance(modalities, str) or not modalities or not set(modalities) <= set(MODALITIES) \
                or len(set(modalities)) != len(modalities):
            raise ValueError(f"brainsegdmif: modalities must be a non-empty list of distinct names from "
                             f"{MODALITIES}, not {modalities!r}")
        cfg["modalities"] = tuple(m for m in MODALITIES if m in modalities)   # canonical order
        if cfg["head"] not in HEADS:
            raise ValueError(f"brainsegdmif: head must be one of {tuple(HEADS)}, not {cfg['head']!r}")
        if cfg["fusion_feedback"] not in FEEDBACK_RULES:
            raise ValueError(f"brainsegdmif: fusion_feedback must be one of {FEEDBACK_RULES}, "
                             f"not {cfg['fusion_feedback']!r}")
        for key in SWITCHES + ("shared_encoder", "freeze_encoders", "dice_batch"):
            if not isinstance(cfg[key], bool):
                raise ValueError(f"brainsegdmif: {key} must be true or false, not {cfg[key]!r}")
        for key in ("fusion_reduction", "fusion_min_hidden", "decoder_channels", "mask_tokens"):
            if isinstance(cfg[key], bool) or not isinstance(cfg[key], int) or cfg[key] <= 0:
                raise ValueError(f"brainsegdmif: {key} must be a positive integer, not {cfg[key]!r}")
        if cfg["prompt_generator"] and cfg["mask_tokens"] < max(2, HEADS[cfg["head"]]):
            raise ValueError(f"brainsegdmif: mask_tokens must be at least 2 and at least the {HEADS[cfg['head']]} "
                             f"mask(s) of head {cfg['head']!r}, not {cfg['mask_tokens']!r}")

    # --- parts ---------------------------------------------------------------------------------------
    @property
    def backbone(self) -> SamBackbone:
        """The first stream's backbone (its neck embeds the fused features)."""
        return self.encoders[0]

    def _encoder(self, stream: int) -> SamBackbone:
        return self.encoders[0 if self.config["shared_encoder"] else stream]

    def train(self, mode: bool = True) -> "BrainSegDMIF":
        """As nn.Module.train; frozen encoders (``freeze_encoders``) stay in eval mode."""
        super().train(mode)
        if self.config["freeze_encoders"]:
            for encoder in self.encoders:
                encoder.image_encoder.eval()
        return self

    # --- encoder with fusion ---------------------------------------------------------------------------
    def _present(self, available: torch.Tensor, batch: int) -> tuple[torch.Tensor, list[int]]:
        """(present [B, M] bool for the configured modalities, streams to compute)."""
        if available.shape != (batch, len(MODALITIES)):
            raise ValueError(f"brainsegdmif: available must be [B, {len(MODALITIES)}] with B = {batch}, "
                             f"got {tuple(available.shape)}")
        present = available.to(torch.bool)[:, self.modality_indices]
        if _is_meta(present):   # FLOP counting / shape checks on the meta device: every stream runs
            return present, list(range(len(self.modality_names)))
        if not bool(present.any(dim=1).all()):
            accepted = ", ".join(MODALITY_DISPLAY_NAMES[m] for m in self.modality_names)
            raise MissingModalityError(f"method 'brainsegdmif' needs at least one of {accepted} for every slice")
        return present, [j for j in range(len(self.modality_names)) if bool(present[:, j].any())]

    def _run_block(self, index: int, streams: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        if self.config["shared_encoder"]:   # all streams as one batch through the one encoder
            order = list(streams)
            out = self.encoders[0].run_block(index, torch.cat([streams[j] for j in order]))
            return dict(zip(order, out.chunk(len(order))))
        return {j: self._encoder(j).run_block(index, x) for j, x in streams.items()}

    def encode_fused(self, images: torch.Tensor, available: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """images [B, 4, S, S] at the encoder's input size, in [0, 255] -> (image embedding of the last
        fused features [B, 256, E, E], per-sample modality weights [B, M] averaged over blocks,
        tokens and channels, or None without DMIF)."""
        batch = images.shape[0]
        present, active = self._present(available, batch)
        streams = {}
        for j in active:
            encoder = self._encoder(j)
            modality = images[:, self.modality_indices[j]][:, None]
            streams[j] = encoder.tokens(encoder.normalize(modality.expand(-1, 3, -1, -1)))
        feedback = self.config["fusion_feedback"]
        weight_sum = None
        last = self.backbone.num_blocks - 1
        fused = None
        for index in range(self.backbone.num_blocks):
            streams = self._run_block(index, streams)
            if self.fusion is None:
                continue
            some = next(iter(streams.values()))
            stacked = torch.stack([streams[j] if j in streams else torch.zeros_like(some)
                                   for j in range(len(self.modality_names))], dim=3)
            fused, weights = self.fusion[index](stacked, present)
            per_sample = weights.detach().float().mean(dim=(1, 2, 4))
            weight_sum = per_sample if weight_sum is None else weight_sum + per_sample
            if index < last and feedback != "none":
                if feedback == "gated":
                    gated = fused * self.feedback_gates[index].to(fused.dtype)
                    streams = {j: x + gated for j, x in streams.items()}
                elif feedback == "add":
                    streams = {j: x + fused for j, x in streams.items()}
                else:
                    streams = {j: 0.5 * (x + fused) for j, x in streams.items()}
        if fused is None:   # no DMIF: mean of the present streams
            mask = present.to(images.dtype)
            fused = sum(streams[j] * mask[:, j, None, None, None] for j in streams)
            fused = fused / mask.sum(dim=1).clamp_min(1)[:, None, None, None]
        weights = None if weight_sum is None else weight_sum / self.backbone.num_blocks
        return self.backbone.embedding(fused), weights

    # --- decoder -----------------------------------------------------------------------------------------
    def decode_masks(self, embedding: torch.Tensor) -> torch.Tensor:
        """Image embedding [B, 256, E, E] -> mask logits [B, N, S, S] (S the encoder input size)."""
        batch = embedding.shape[0]
        size = self.backbone.image_size
        image_pe = self.image_pe((embedding.shape[-2], embedding.shape[-1]))[None].to(embedding.dtype)
        mask_tokens = self.mask_tokens.weight[None].expand(batch, -1, -1)
        if self.prompt_generator is not None:
            prompts, image = self.prompt_generator(embedding, image_pe, mask_tokens)
            sparse = prompts
            dense = torch.zeros_like(embedding[:1])
        else:   # SAM's no-prompt embedding: no sparse prompt, the learnt no-mask dense embedding
            prompt_encoder = self.backbone.prompt_encoder
            sparse, dense = prompt_encoder(points=None, boxes=None, masks=None)
            sparse = sparse.expand(batch, -1, -1)
            dense = dense.to(embedding.dtype)
            prompts, image = mask_tokens, embedding + dense
        if self.decoder is not None:
            return self.decoder(image, image_pe, prompts, mask_tokens)
        # SAM's mask decoder, image by image (it repeats one image's embedding per prompt set).
        decoder = self.backbone.mask_decoder
        source = image if self.prompt_generator is not None else embedding
        masks = []
        for i in range(batch):
            low_res, _ = decoder.predict_masks(image_embeddings=source[i:i + 1], image_pe=image_pe,
                                               sparse_prompt_embeddings=sparse[i:i + 1],
                                               dense_prompt_embeddings=dense)
            masks.append(low_res[:, :self.num_masks])
        masks = torch.cat(masks)
        return F.interpolate(masks, size=(size, size), mode="bilinear", align_corners=False)

    # --- the method contract -----------------------------------------------------------------------------
    def forward(self, images: torch.Tensor, available: torch.Tensor,
                boxes: torch.Tensor | None = None) -> torch.Tensor:
        """images [B, 4, H, W] in [0, 255], available [B, 4] bool -> logits [B, K, H, W]: head
        'lesion' [0, x] (K = 2), head 'brats' the four class logits. ``boxes`` is not used (not
        promptable; the engine restricts the output to a box for every method)."""
        if images.dim() != 4 or images.shape[1] != len(MODALITIES):
            raise ValueError(f"brainsegdmif takes images [B, {len(MODALITIES)}, H, W], got {tuple(images.shape)}")
        size = tuple(images.shape[-2:])
        image_size = self.backbone.image_size
        if size != (image_size, image_size):
            images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
        embedding, weights = self.encode_fused(images, available)
        if weights is not None and not self.training and not _is_meta(weights):
            for j, total in enumerate(weights.sum(dim=0).tolist()):
                self._case_weight_sum[j] += total
            self._case_slices += weights.shape[0]
        masks = self.decode_masks(embedding)
        if tuple(masks.shape[-2:]) != size:
            masks = F.interpolate(masks, size=size, mode="bilinear", align_corners=False)
        if self.num_masks == 1:
            return torch.cat([torch.zeros_like(masks), masks], dim=1)
        return masks

    def start_case(self) -> None:
        self._case_weight_sum = [0.0] * len(self.modality_names)
        self._case_slices = 0

    def case_weights(self) -> dict[str, dict[str, float]]:
        """{'modality weights': {modality: mean DMIF softmax weight}} over the case's slices (eval
        mode, since ``start_case``); {} without DMIF or before any slice."""
        if self.fusion is None or self._case_slices == 0:
            return {}
        return {"modality weights": {m: total / self._case_slices
                                     for m, total in zip(self.modality_names, self._case_weight_sum)}}

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """FocalDice (eq. 14) for ``forward``'s logits and class indices (see FocalDiceLoss)."""
        if self._loss_function is None:
            cfg = self.config
            self._loss_function = FocalDiceLoss("sigmoid" if self.num_masks == 1 else "softmax",
                                                cfg["lambda_focal"], cfg["lambda_dice"], cfg["focal_gamma"],
                                                cfg["dice_batch"])
        return self._loss_function(logits, target)


def flops_per_slice(method: BrainSegDMIF, image_size: int = 256) -> int:
    """FLOPs of one forward pass on one four-modality slice, by ``torch.utils.flop_counter``
    (2 per multiply-add of matmuls / convolutions; element-wise operations are not counted).
    Works on a method built on the meta device (no weights allocated)."""
    from torch.utils.flop_counter import FlopCounterMode

    parameter = next(method.parameters())
    images = torch.zeros(1, len(MODALITIES), image_size, image_size, device=parameter.device)
    available = torch.ones(1, len(MODALITIES), dtype=torch.bool, device=parameter.device)
    counter = FlopCounterMode(display=False)
    with counter:   # not under no_grad: FlopCounterMode's module tracker fails on SAM's prompt encoder there
        method(images, available)
    return counter.get_total_flops()
