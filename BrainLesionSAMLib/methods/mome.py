"""``mome``: Mixture of Modality Experts (Zhang et al., "A Foundation Model for Brain Lesion
Segmentation with Mixture of Modality Experts", MICCAI 2024; authors' code ZhangxinruBIT/MoME).

A universal 3D lesion model: the input is ONE image of any modality, the network is not told which,
and the output is one lesion class. Three parts (one class each below):

- :class:`DeepSupervisedUNet`: nnU-Net's 3D plain-conv U-Net (MONAI ``DynUNet``: two conv -
  instance norm - leaky ReLU per stage, transposed-conv upsampling, a 1x1 segmentation head at
  every decoder stage for deep supervision). It returns the first-stage features (the highest-
  resolution encoder skip) and the logits of every deep-supervision scale at their own resolution.
- :class:`HierarchicalGate`: another such U-Net on the image concatenated with every expert's
  first-stage features (1 + 32 x 5 = 161 channels by default) with experts x classes outputs:
  a weight per expert, class and voxel at every deep-supervision scale.
- :class:`MixtureOfModalityExperts`: the experts (one per modality, default T1, T1CE, T2, FLAIR,
  DWI), all fed the same image, and the gate; at each scale s the fused logits are
  ``fused_s = sum_i expert_i_s * gate_s[:, i]``.

What the paper and the authors' code do (``nnunetv2`` fork, ``nnUNetTrainer.train_step``):

- Five nnU-Net ``3d_fullres`` PlainConvUNets as experts, each first trained as an ordinary nnU-Net
  on its own modality and loaded from that checkpoint; the gate is a PlainConvUNet of the same
  plans with ``1 + 32 * 5`` inputs and ``2 * 5`` outputs, used without any activation (raw
  products ``output_i * gate[:, 2i:2i+2]``); every expert sees the same input.
- Loss per batch ``(1 - r)^2 L_expert + (1 - (1 - r)^2) L_fused`` with ``r = epoch / num_epochs``;
  ``L_expert`` sums, over the batch, each sample's loss on the expert of its modality (read from the
  case's file name; an unknown name falls to the DWI expert), ``L_fused`` is the loss of the gated
  output. Both are nnU-Net's Dice (background excluded, smooth 1e-5, per-sample Dice as the
  3d_fullres plans say) + CE with deep supervision: weights 1/2^s over the decoder scales, the
  coarsest weighted 0, normalised to sum 1.
- One SGD over all parameters, lr 1e-3, momentum 0.99, Nesterov, weight decay 3e-5, poly LR
  (exponent 0.9) over 800 epochs x 250 iterations, gradient-norm clipping 12 on the gate's
  parameters only, mixed precision. Inference with nnU-Net's predictor: the full-resolution fused
  logits, sliding window (step 0.5, Gaussian weighting) and mirroring.
- The plans file is not published. The authors crop MNI-registered 1 mm brains to 160 x 196 x 160
  (``Codes_prepro/crop.py``); the default config is what nnU-Net usually plans for 1 mm brains of
  that size - six stages of 32, 64, 128, 256, 320, 320 filters, 3^3 kernels, strides 1, 2, 2, 2, 2,
  2, a 128^3 patch - an assumption, not the authors' file.

Where this implementation differs, and why:

- MONAI ``DynUNet`` instead of nnU-Net's PlainConvUNet (same topology, heads and initialisation
  scheme); DynUNet's 3^3 convolutions have no bias (nnU-Net's do; a bias before instance norm is
  cancelled by it), transposed convolutions keep theirs (``trans_bias``) as nnU-Net. The authors'
  checkpoints therefore do not load as they are (different names and the bias tensors).
- Input: the engine hands every modality already normalised per case (0.5-99.5 percentile clip,
  min-max to [0, 255], zero outside the brain) and patches, not cases, reach the method, so the
  image is scaled to [0, 1] instead of nnU-Net's per-image z-score.
- Modalities: our four MR sequences plus DWI. The default keeps five experts with the fifth for DWI
  (``experts`` config), so the layout and the gate's 161 inputs are the paper's and a DWI input can
  be added later; the library has no DWI volume today, so that expert never has a matching case
  and learns through ``L_fused`` only. ``experts=('t1', 't1ce', 't2', 'flair')`` gives four. An
  input whose modality has no expert is an error, not silently the last expert.
- ``L_expert`` is the mean over samples (the authors sum it, which doubles its weight at their
  batch size 2); the curriculum weights are then exactly the formula's.
- Gate activation (``gate_activation``): 'none' as the authors' code (default); 'softmax' over the
  experts (weights per class and voxel summing to 1) or 'sigmoid' are available.
- Deep-supervision targets are down-sampled by MONAI's ``DeepSupervisionLoss`` (nearest-exact).
- ``prediction='matched_expert'`` predicts with each input's own modality expert alone, the gate
  unused: the ablation of the modality experts against the gated mixture (issue 21,
  docs/phantom_study.md); the default 'fused' is the paper's output.
- Several modalities at once (BraTS): MoME is run on each available modality separately, as its own
  single-image input, and the class probabilities are combined (``combine``): 'mean' (default; the
  lesion probability is the mean of the per-modality lesion probabilities) or 'max' (a voxel is
  lesion when any modality's run says so). In training, a batch without ``modality`` is expanded
  the same way: each available modality of a sample becomes one single-modality sample with its
  matching expert (the paper counts every modality of a case as one image).
- Inference goes through the library's engine (MONAI sliding window, Gaussian weighting, overlap
  0.5, mixed precision on CUDA); mirroring is the engine's optional test-time augmentation.
  ``working_spacing_mm`` (default None: the input's grid, as the paper's 1 mm MNI data) runs the
  network on the case resized to that isotropic voxel size, and trains on patches resized the same
  way: the CPU release (``Training/configs/mome_release.json``) works at 2 mm, where a 64^3 patch
  sees 128 mm of brain and a case is an eighth of the voxels.
  ``inference_batch`` bounds how many single-modality patches go through the six networks at once
  (nnU-Net: one), since one 128^3 patch needs about 4 GB of activations on the CPU.
- Expert pre-training (``training_stage='experts'``): the loss is ``L_expert`` only, each sample
  training only its own modality's expert and the gate not running; the experts share no
  parameters, so this equals separate single-modality nnU-Nets trained side by side.
  ``pretraining_learning_rate`` 1e-2 and ``pretraining_epochs`` 1000 are nnU-Net v2's defaults (the
  repository does not contain the pre-training runs); ``Training/configs/mome_experts.json`` trains
  with them (a test checks it against these defaults, as for the main stage's keys).
- The paper's two stages are two runs: stage 1 ``brainlesionsam-train --config mome_experts``,
  stage 2 ``brainlesionsam-train --config mome --init-from runs/mome_experts``, which starts the
  whole network (experts and the untouched gate) from stage 1's ``final.safetensors``, exactly, as
  a new run with the curriculum from r = 0. Both stages have the same architecture (only
  ``training_stage`` and the optimiser differ), which ``--init-from`` requires.
- Optimiser, schedule and clipping: the config keys here (``learning_rate``, ``momentum``,
  ``nesterov``, ``weight_decay``, ``poly_exponent``, ``gate_grad_clip``) are the paper's values;
  ``Training/`` builds SGD, the poly schedule and the gate-only clipping from
  ``Training/configs/mome.json`` (``train.grad_clip_parameters: ["network.gate."]``), and a test
  there checks that config against these defaults.

Per-case weights (:meth:`MoME.case_weights`): {'gate': {expert: share}}, the share of each expert in
the full-resolution gate, ``|g_i| / sum_j |g_j|`` (the weight itself under softmax), averaged over
classes and over the brain voxels (input > 0) of every patch the engine ran (overlapping patches
count each time); with several input modalities also one group per input ('gate, T1CE input').

Parameter counts (default config): one expert = one task-specific nnU-Net of this config
31,191,754; gate 31,336,434; MoME in all 5 x 31,191,754 + 31,336,434 = 187,295,204 (6.0 nnU-Nets;
the paper's alternative, nine task-specific nnU-Nets, is 280,725,786). With nnU-Net's biases on the
3^3 convolutions (3,840 per network) the authors' layout would count 31,195,594 per expert and
31,340,274 for the gate (computed, not run).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from monai.losses import DeepSupervisionLoss, DiceCELoss
from monai.networks.nets import DynUNet
from torch import nn

from ..conventions import MODALITIES, MODALITY_DISPLAY_NAMES
from ..errors import MissingModalityError
from .base import MethodFacts, SegmentationMethod, register_method

GATE_ACTIVATIONS = ("none", "softmax", "sigmoid")
COMBINE_RULES = ("mean", "max")
TRAINING_STAGES = ("mome", "experts")
PREDICTIONS = ("fused", "matched_expert")


def nnunet_dynunet(in_channels: int, out_channels: int, filters: Sequence[int], kernel_sizes: Sequence[int],
                   strides: Sequence[int], deep_supervision_heads: int) -> DynUNet:
    """MONAI's DynUNet configured as nnU-Net's plain-conv 3D U-Net: instance norm (affine, eps 1e-5),
    leaky ReLU 0.01, two convolutions per stage, transposed convolutions with bias, one 1x1 head per
    deep-supervision scale."""
    return DynUNet(
        spatial_dims=3, in_channels=in_channels, out_channels=out_channels,
        kernel_size=list(kernel_sizes), strides=list(strides), upsample_kernel_size=list(strides[1:]),
        filters=list(filters), norm_name=("INSTANCE", {"affine": True, "eps": 1e-5}),
        act_name=("leakyrelu", {"inplace": True, "negative_slope": 0.01}),
        deep_supervision=True, deep_supr_num=deep_supervision_heads, res_block=False, trans_bias=True)


class DeepSupervisedUNet(nn.Module):
    """nnU-Net's 3D plain-conv U-Net from MONAI DynUNet's blocks, also returning its first-stage features.

    ``forward(x)`` with x [N, C_in, D, H, W] returns ``(features, logits)``: features [N, filters[0],
    D, H, W] (the first encoder stage, strides[0] = 1) and logits, a list with one tensor
    [N, C_out, D / 2^s, H / 2^s, W / 2^s] per deep-supervision scale s = 0 .. heads, full resolution
    first, each at its own resolution (DynUNet's own forward interpolates them all to full size).

    The blocks are DynUNet's own (same construction and initialisation, same parameter names, so a
    DynUNet loads this module's state dict with ``strict=False``); the forward loop is written out
    because DynUNet's recursive ``skip_layers`` hides the first-stage features and registers every
    block twice, which safetensors refuses to save (shared tensors).
    """

    def __init__(self, in_channels: int, out_channels: int, filters: Sequence[int],
                 kernel_sizes: Sequence[int], strides: Sequence[int], deep_supervision_heads: int) -> None:
        super().__init__()
        net = nnunet_dynunet(in_channels, out_channels, filters, kernel_sizes, strides, deep_supervision_heads)
        self.input_block = net.input_block
        self.downsamples = net.downsamples
        self.bottleneck = net.bottleneck
        self.upsamples = net.upsamples  # deepest first
        self.output_block = net.output_block
        self.deep_supervision_heads = net.deep_supervision_heads  # head j: scale j + 1

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        skips = [self.input_block(x)]
        for block in self.downsamples:
            skips.append(block(skips[-1]))
        x = self.bottleneck(skips[-1])
        decoded = []
        for block, skip in zip(self.upsamples, reversed(skips)):
            x = block(x, skip)
            decoded.append(x)
        logits = [self.output_block(decoded[-1])]
        logits += [head(decoded[-2 - j]) for j, head in enumerate(self.deep_supervision_heads)]
        return skips[0], logits


class HierarchicalGate(nn.Module):
    """The gating network: a :class:`DeepSupervisedUNet` on the image and the experts' first-stage
    features, with ``num_experts * num_classes`` outputs.

    ``forward(gate_input, scales)`` with gate_input [N, 1 + E * F0, D, H, W] (the image and every
    expert's first-stage features, concatenated) returns, for the first ``scales`` deep-supervision
    scales (all when None), gates [N, E, K, ...] (channel i * K + k of the network is expert i, class
    k, as in the authors' code) after ``activation``.
    """

    def __init__(self, num_experts: int, num_classes: int, filters: Sequence[int],
                 kernel_sizes: Sequence[int], strides: Sequence[int], deep_supervision_heads: int,
                 activation: str = "none") -> None:
        super().__init__()
        if activation not in GATE_ACTIVATIONS:
            raise ValueError(f"mome: gate_activation must be one of {GATE_ACTIVATIONS}, not {activation!r}")
        self.num_experts, self.num_classes, self.activation = num_experts, num_classes, activation
        self.unet = DeepSupervisedUNet(1 + num_experts * filters[0], num_experts * num_classes, filters,
                                       kernel_sizes, strides, deep_supervision_heads)

    def forward(self, gate_input: torch.Tensor, scales: int | None = None) -> list[torch.Tensor]:
        _, outputs = self.unet(gate_input)
        gates = []
        for output in outputs[:scales]:
            gate = output.unflatten(1, (self.num_experts, self.num_classes))
            if self.activation == "softmax":
                gate = torch.softmax(gate, dim=1)
            elif self.activation == "sigmoid":
                gate = torch.sigmoid(gate)
            gates.append(gate)
        return gates


@dataclass
class MoMEOutput:
    """What :class:`MixtureOfModalityExperts` returns (lists over scales are full resolution first).

    expert_logits: per expert, per scale [N, K, ...]; gates: per scale [N, E, K, ...];
    fused: per scale [N, K, ...] = sum_i expert_logits[i][s] * gates[s][:, i].
    """

    expert_logits: list[list[torch.Tensor]]
    gates: list[torch.Tensor]
    fused: list[torch.Tensor]


class MixtureOfModalityExperts(nn.Module):
    """Experts (one :class:`DeepSupervisedUNet` per modality, all fed the same image) and the
    :class:`HierarchicalGate`; ``forward(x [N, 1, D, H, W], scales)`` -> :class:`MoMEOutput`."""

    def __init__(self, num_experts: int, num_classes: int, filters: Sequence[int],
                 kernel_sizes: Sequence[int], strides: Sequence[int], deep_supervision_heads: int,
                 gate_activation: str = "none") -> None:
        super().__init__()
        self.experts = nn.ModuleList(
            DeepSupervisedUNet(1, num_classes, filters, kernel_sizes, strides, deep_supervision_heads)
            for _ in range(num_experts))
        self.gate = HierarchicalGate(num_experts, num_classes, filters, kernel_sizes, strides,
                                     deep_supervision_heads, gate_activation)

    def forward(self, x: torch.Tensor, scales: int | None = None) -> MoMEOutput:
        gate_input, expert_logits = [x], []
        for expert in self.experts:
            features, logits = expert(x)
            gate_input.append(features)
            expert_logits.append(logits[:scales])
        # Only the concatenation keeps the features (at inference: 1.3 GB less for a 128^3 patch).
        del features
        gate_input = torch.cat(gate_input, dim=1)
        gates = self.gate(gate_input, scales)
        fused = [sum(logits[s] * gate[:, i] for i, logits in enumerate(expert_logits))
                 for s, gate in enumerate(gates)]
        return MoMEOutput(expert_logits, gates, fused)


def nnunet_deep_supervision_weights(levels: int) -> tuple[float, ...]:
    """nnU-Net's weights of the deep-supervision losses: 1/2^s, the coarsest 0, normalised to sum 1
    (one level: (1.0,))."""
    if levels == 1:
        return (1.0,)
    weights = [0.5 ** s for s in range(levels)]
    weights[-1] = 0.0
    return tuple(w / sum(weights) for w in weights)


def curriculum_weights(progress: float) -> tuple[float, float]:
    """(weight of L_expert, weight of L_fused) = ((1 - r)^2, 1 - (1 - r)^2) at r = ``progress``."""
    progress = float(progress)
    if not 0.0 <= progress <= 1.0:
        raise ValueError(f"mome: training progress must be in [0, 1] (epoch / epochs), not {progress}")
    expert = (1.0 - progress) ** 2
    return expert, 1.0 - expert


def _positive_ints(config: dict[str, Any], key: str) -> tuple[int, ...]:
    value = config[key]
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ValueError(f"mome: {key} must be a sequence of positive integers, not {value!r}")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
        raise ValueError(f"mome: {key} must be a sequence of positive integers, not {value!r}")
    return tuple(value)


def _positive_number(config: dict[str, Any], key: str, allow_zero: bool = False) -> float:
    value = config[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"mome: {key} must be a {'non-negative' if allow_zero else 'positive'} number, "
                         f"not {value!r}")
    return float(value)


@register_method
class MoME(SegmentationMethod):
    """The registered method: :class:`MixtureOfModalityExperts` behind the library's contract
    (several input modalities run one by one and combined, the curriculum loss, the gate's per-case
    weights); see the module docstring. An instance whose ``patch_size`` differs from the default
    carries its own ``facts`` with that ``input_size``, the engine's sliding-window size."""

    facts = MethodFacts(
        name="mome",
        title="MoME: mixture of modality experts (3D nnU-Net experts + hierarchical gate)",
        modalities=MODALITIES,
        required_modalities=(),
        spatial_dims=3,
        label_set="lesion",
        promptable=False,
        cacheable_embeddings=False,
        input_size=(128, 128, 128),
        reference="Zhang et al., A Foundation Model for Brain Lesion Segmentation with Mixture of "
                  "Modality Experts, MICCAI 2024",
    )
    # The CPU release (catalogue mome-2mm-v1): four small experts at 2 mm, Training/configs/mome_release.json.
    packaged_weights = "mome_2mm.safetensors"
    default_config = {
        "experts": ("t1", "t1ce", "t2", "flair", "dwi"),  # one expert per name, paper's five
        "patch_size": (128, 128, 128),          # sliding-window / training patch (z, y, x)
        "filters": (32, 64, 128, 256, 320, 320),  # nnU-Net 3d_fullres, per stage
        "kernel_sizes": (3, 3, 3, 3, 3, 3),     # isotropic kernel per stage
        "strides": (1, 2, 2, 2, 2, 2),          # isotropic stride per stage; the first must be 1
        "deep_supervision_heads": 4,            # scales below full resolution (nnU-Net: stages - 2)
        "deep_supervision_weights": None,       # None: nnU-Net's 1/2^s, coarsest 0, normalised
        "gate_activation": "none",              # authors' code: none; or 'softmax' / 'sigmoid'
        "combine": "mean",                      # several input modalities: 'mean' | 'max'
        "prediction": "fused",                  # 'fused' (the paper) | 'matched_expert': each input's
                                                # own modality expert alone (the ablation)
        "inference_batch": 1,                   # single-modality patches per network pass
        "working_spacing_mm": None,             # None: the input's grid (paper: MNI 1 mm); e.g. 2.0: the
                                                # engine and the trainer resize cases to 2 mm voxels
        "training_stage": "mome",               # 'experts': pre-train each expert on its modality
        "dice_batch": False,                    # nnU-Net 3d_fullres: per-sample Dice
        "optimizer": "sgd",
        "learning_rate": 1e-3,
        "momentum": 0.99,
        "nesterov": True,
        "weight_decay": 3e-5,
        "lr_schedule": "poly",
        "poly_exponent": 0.9,
        "epochs": 800,
        "iterations_per_epoch": 250,
        "batch_size": 2,
        "gate_grad_clip": 12.0,                 # max gradient norm of the gate's parameters
        "pretraining_learning_rate": 1e-2,      # training_stage 'experts' (nnU-Net v2 default;
        "pretraining_epochs": 1000,             # Training/configs/mome_experts.json trains with both)
    }

    def __init__(self, **config: Any):
        super().__init__(**config)
        config = self.config
        experts = config["experts"]
        if isinstance(experts, str) or not isinstance(experts, Sequence) or not experts \
                or not all(isinstance(e, str) and e and e == e.lower() for e in experts) \
                or len(set(experts)) != len(experts):
            raise ValueError(f"mome: experts must be a non-empty sequence of distinct lower-case modality "
                             f"names (e.g. {MODALITIES + ('dwi',)}), not {experts!r}")
        filters = _positive_ints(config, "filters")
        kernel_sizes = _positive_ints(config, "kernel_sizes")
        strides = _positive_ints(config, "strides")
        patch_size = _positive_ints(config, "patch_size")
        if not len(filters) == len(kernel_sizes) == len(strides) >= 3:
            raise ValueError("mome: filters, kernel_sizes and strides need one entry per stage and at least "
                             f"3 stages; got {len(filters)}, {len(kernel_sizes)}, {len(strides)}")
        if strides[0] != 1:
            raise ValueError(f"mome: strides[0] must be 1 (full-resolution first stage), not {strides[0]}")
        if any(k % 2 == 0 for k in kernel_sizes):
            raise ValueError(f"mome: kernel_sizes must be odd, not {kernel_sizes}")
        divisor = math.prod(strides)
        if len(patch_size) != 3 or any(p % divisor for p in patch_size):
            raise ValueError(f"mome: patch_size must be three sizes divisible by the product of the strides "
                             f"({divisor}), not {patch_size}")
        heads = config["deep_supervision_heads"]
        if not isinstance(heads, int) or isinstance(heads, bool) or not 1 <= heads <= len(strides) - 2:
            raise ValueError(f"mome: deep_supervision_heads must be 1 to {len(strides) - 2} (stages - 2) "
                             f"for {len(strides)} stages, not {heads!r}")
        weights = config["deep_supervision_weights"]
        if weights is None:
            weights = nnunet_deep_supervision_weights(heads + 1)
        elif (not isinstance(weights, Sequence) or len(weights) != heads + 1
              or not all(isinstance(w, (int, float)) and w >= 0 for w in weights) or sum(weights) <= 0):
            raise ValueError(f"mome: deep_supervision_weights must be None or {heads + 1} non-negative "
                             f"numbers (one per scale, full resolution first) with a positive sum, not {weights!r}")
        for key, allowed in (("gate_activation", GATE_ACTIVATIONS), ("combine", COMBINE_RULES),
                             ("prediction", PREDICTIONS),
                             ("training_stage", TRAINING_STAGES), ("optimizer", ("sgd",)),
                             ("lr_schedule", ("poly",))):
            if config[key] not in allowed:
                raise ValueError(f"mome: {key} must be one of {allowed}, not {config[key]!r}")
        for key in ("inference_batch", "epochs", "iterations_per_epoch", "batch_size", "pretraining_epochs"):
            if not isinstance(config[key], int) or isinstance(config[key], bool) or config[key] < 1:
                raise ValueError(f"mome: {key} must be a positive integer, not {config[key]!r}")
        for key in ("learning_rate", "pretraining_learning_rate", "poly_exponent", "gate_grad_clip"):
            _positive_number(config, key)
        for key in ("momentum", "weight_decay"):
            _positive_number(config, key, allow_zero=True)
        if config["nesterov"] and config["momentum"] == 0:
            raise ValueError("mome: Nesterov SGD needs a momentum > 0 (paper: 0.99)")

        self.expert_names: tuple[str, ...] = tuple(experts)
        self.deep_supervision_weights: tuple[float, ...] = tuple(float(w) for w in weights)
        spacing = config["working_spacing_mm"]
        if spacing is not None and (isinstance(spacing, bool) or not isinstance(spacing, (int, float))
                                    or not 0.5 <= spacing <= 4.0):
            raise ValueError(f"mome: working_spacing_mm must be None or a voxel size of 0.5-4 mm, not {spacing!r}")
        if patch_size != type(self).facts.input_size or spacing is not None:
            self.facts = dataclasses.replace(type(self).facts, input_size=patch_size,
                                             working_spacing_mm=None if spacing is None else float(spacing))
        self.network = MixtureOfModalityExperts(len(experts), len(self.facts.labels), filters, kernel_sizes,
                                                strides, heads, config["gate_activation"])
        dice_ce = DiceCELoss(include_background=False, to_onehot_y=True, softmax=True,
                             batch=bool(config["dice_batch"]), smooth_nr=1e-5, smooth_dr=1e-5)
        self.loss_function = DeepSupervisionLoss(dice_ce, weights=list(self.deep_supervision_weights))
        self.start_case()

    # -- helpers ------------------------------------------------------------------------------------

    def expert_index(self, modality: str) -> int:
        """Index of the expert specialised in ``modality`` (a key such as 'flair')."""
        try:
            return self.expert_names.index(modality)
        except ValueError:
            raise ValueError(f"mome: no expert for modality {modality!r}; experts: {self.expert_names}") from None

    @staticmethod
    def scale_input(images: torch.Tensor) -> torch.Tensor:
        """[0, 255] engine intensities -> the network's [0, 1] input (see the module docstring)."""
        return images / 255.0

    def curriculum_weights(self, progress: float) -> tuple[float, float]:
        """(weight of L_expert, weight of L_fused) at training ``progress``: the curriculum in stage
        'mome', (1, 0) in stage 'experts'."""
        weights = curriculum_weights(progress)
        return (1.0, 0.0) if self.config["training_stage"] == "experts" else weights

    # -- loss and training --------------------------------------------------------------------------

    def loss(self, logits: torch.Tensor | Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        """nnU-Net's Dice (background excluded, smooth 1e-5) + CE, through MONAI's DeepSupervisionLoss
        when ``logits`` is a list over scales (full resolution first; targets down-sampled to each).

        target: class indices [B, D, H, W] or [B, 1, D, H, W]; any value > 0 is lesion (so a BraTS
        label map gives the whole tumour)."""
        full = logits[0] if isinstance(logits, (list, tuple)) else logits
        if target.dim() == full.dim() - 1:
            target = target[:, None]
        target = (target > 0).to(torch.float32)
        if isinstance(logits, (list, tuple)):
            return self.loss_function([scale.float() for scale in logits], target)
        return self.loss_function.loss(logits.float(), target)

    def single_modality_batch(self, batch: dict[str, torch.Tensor]
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(images [N, 1, ...] in [0, 255], targets [N, ...], expert indices [N]) from a training batch.

        With ``batch['modality']`` (MODALITIES index per sample) sample b is its channel
        ``modality[b]``; without it every available modality of a sample becomes one sample."""
        images, available = batch["images"], batch["available"].to(torch.bool)
        target = batch["target"]
        if "modality" in batch and batch["modality"] is not None:
            modality = torch.as_tensor(batch["modality"], device=images.device).long().reshape(-1)
            if len(modality) != len(images) or ((modality < 0) | (modality >= len(MODALITIES))).any():
                raise ValueError(f"mome: batch['modality'] must hold one MODALITIES index (0-{len(MODALITIES) - 1}) "
                                 f"per sample, got {modality.tolist()}")
            rows = torch.arange(len(images), device=images.device)
            if not available[rows, modality].all():
                raise ValueError("mome: batch['modality'] names a modality that batch['available'] marks missing")
            pairs = torch.stack([rows, modality], dim=1)
        else:
            if not available.any(dim=1).all():
                raise ValueError("mome: a training sample has no available modality")
            pairs = available.nonzero()
        experts = torch.tensor([self.expert_index(MODALITIES[m]) for m in pairs[:, 1].tolist()],
                               device=images.device)
        return images[pairs[:, 0], pairs[:, 1]][:, None], target[pairs[:, 0]], experts

    def training_loss(self, batch: dict[str, torch.Tensor], progress: float = 0.0) -> torch.Tensor:
        """(1 - r)^2 L_expert + (1 - (1 - r)^2) L_fused at r = ``progress`` (stage 'experts': L_expert).

        L_expert: each sample's deep-supervised loss on the expert of its modality (mean over samples);
        L_fused: the same loss on the gated output. A term whose weight is 0 is not computed (at r = 0
        only the matching experts run, so the gate gets no gradient)."""
        images, target, experts = self.single_modality_batch(batch)
        x = self.scale_input(images)
        expert_weight, fused_weight = self.curriculum_weights(progress)
        total = torch.zeros((), device=x.device)
        if fused_weight == 0.0:
            # Only the matching experts; samples regrouped per expert (the loss is a mean over samples).
            order, per_expert = [], []
            for e in torch.unique(experts).tolist():
                rows = (experts == e).nonzero()[:, 0]
                order.append(rows)
                per_expert.append(self.network.experts[e](x[rows])[1])
            matched = [torch.cat([logits[s] for logits in per_expert]) for s in range(len(per_expert[0]))]
            return expert_weight * self.loss(matched, target[torch.cat(order)])
        output = self.network(x)
        if expert_weight > 0.0:
            rows = torch.arange(len(x), device=x.device)
            matched = [torch.stack([logits[s] for logits in output.expert_logits], dim=1)[rows, experts]
                       for s in range(len(output.fused))]
            total = total + expert_weight * self.loss(matched, target)
        return total + fused_weight * self.loss(output.fused, target)

    # -- inference ----------------------------------------------------------------------------------

    def _probabilities_per_modality(self, images: torch.Tensor, available: torch.Tensor, record: bool
                                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Softmax of the full-resolution fused logits of every (sample, available modality) pair -
        or, with ``prediction='matched_expert'``, of the logits of that modality's own expert -:
        ([P, K, ...], pairs [P, 2] = (sample, MODALITIES index)); ``record``: accumulate the gate's
        per-case weights."""
        present = available.to(torch.bool)
        if not present.any(dim=1).all():
            raise MissingModalityError("method 'mome' needs at least one of T1, T1CE, T2, FLAIR per input")
        pairs = present.nonzero()
        x = self.scale_input(images[pairs[:, 0], pairs[:, 1]][:, None])
        step = self.config["inference_batch"]
        chunks = []
        for start in range(0, len(x), step):
            chunk = x[start:start + step]
            output = self.network(chunk, scales=1)
            if record:
                self._record_gate(output.gates[0], chunk, pairs[start:start + len(chunk), 1])
            logits = output.fused[0]
            if self.config["prediction"] == "matched_expert":
                experts = [self.expert_index(MODALITIES[int(m)]) for m in pairs[start:start + len(chunk), 1]]
                logits = torch.stack([output.expert_logits[e][0][row] for row, e in enumerate(experts)])
            chunks.append(torch.softmax(logits.float(), dim=1))
        return torch.cat(chunks), pairs

    def _combine(self, probabilities: torch.Tensor, pairs: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Per-(sample, modality) probabilities [P, 2, ...] -> per-sample [B, 2, ...] by ``combine``."""
        sample = pairs[:, 0]
        if self.config["combine"] == "mean":
            combined = torch.zeros((batch_size,) + probabilities.shape[1:], dtype=probabilities.dtype,
                                   device=probabilities.device).index_add_(0, sample, probabilities)
            counts = torch.bincount(sample, minlength=batch_size).to(probabilities.dtype)
            return combined / counts.view(-1, *([1] * (probabilities.dim() - 1)))
        lesion = torch.stack([probabilities[sample == b, 1:].amax(dim=0) for b in range(batch_size)])
        return torch.cat([1.0 - lesion.sum(dim=1, keepdim=True), lesion], dim=1)

    def predict_proba(self, images: torch.Tensor, available: torch.Tensor,
                      boxes: torch.Tensor | None = None) -> torch.Tensor:
        """images [B, 4, D, H, W] in [0, 255], available [B, 4] -> probabilities [B, 2, D, H, W]:
        MoME on each available modality, combined by ``combine`` (see the module docstring). In eval
        mode the gate's weights are accumulated for :meth:`case_weights`. ``boxes`` is not used (the
        engine restricts the output to a box for every method)."""
        probabilities, pairs = self._probabilities_per_modality(images, available, record=not self.training)
        return self._combine(probabilities, pairs, len(images))

    def forward(self, images: torch.Tensor, available: torch.Tensor,
                boxes: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, 2, D, H, W]: the log of the combined probabilities, so their softmax is
        ``predict_proba`` (with one modality: the fused logits up to a per-voxel constant)."""
        probabilities, pairs = self._probabilities_per_modality(images, available, record=False)
        combined = self._combine(probabilities, pairs, len(images))
        return torch.log(combined.clamp_min(torch.finfo(combined.dtype).tiny))

    # -- per-case gate weights ----------------------------------------------------------------------

    def start_case(self) -> None:
        self._gate_sums: dict[int, torch.Tensor] = {}
        self._gate_voxels: dict[int, float] = {}

    def _record_gate(self, gate: torch.Tensor, x: torch.Tensor, modalities: torch.Tensor) -> None:
        """Accumulate each expert's share of the gate over the brain voxels (input > 0) of a chunk."""
        gate = gate.detach().float()
        magnitude = gate.abs() if self.config["gate_activation"] == "none" else gate
        shares = (magnitude / magnitude.sum(dim=1, keepdim=True).clamp_min(1e-12)).mean(dim=2)  # [N, E, ...]
        brain = (x[:, 0] > 0).to(shares.dtype)
        sums = (shares * brain[:, None]).flatten(2).sum(-1).double().cpu()  # [N, E]
        voxels = brain.flatten(1).sum(-1).double().cpu()
        for n, m in enumerate(modalities.tolist()):
            self._gate_sums[m] = self._gate_sums.get(m, torch.zeros(len(self.expert_names), dtype=torch.float64)) + sums[n]
            self._gate_voxels[m] = self._gate_voxels.get(m, 0.0) + float(voxels[n])

    def case_weights(self) -> dict[str, dict[str, float]]:
        """{'gate': {expert: mean share}} since ``start_case`` (plus one group per input modality when
        several ran); {} before any brain voxel was seen."""
        ran = [m for m in sorted(self._gate_sums) if self._gate_voxels[m] > 0]
        if not ran:
            return {}

        def shares(modalities: list[int]) -> dict[str, float]:
            total = sum(self._gate_sums[m] for m in modalities) / sum(self._gate_voxels[m] for m in modalities)
            return {name: float(value) for name, value in zip(self.expert_names, total)}

        weights = {"gate": shares(ran)}
        if len(ran) > 1:
            for m in ran:
                weights[f"gate, {MODALITY_DISPLAY_NAMES[MODALITIES[m]]} input"] = shares([m])
        return weights

    def parameter_counts(self) -> dict[str, int]:
        """Total and trainable (as every method) plus one expert's and the gate's counts."""
        counts = super().parameter_counts()
        counts["per_expert"] = sum(p.numel() for p in self.network.experts[0].parameters())
        counts["gate"] = sum(p.numel() for p in self.network.gate.parameters())
        return counts
