"""The one contract every segmentation method follows.

A method is an ``nn.Module`` subclass of :class:`SegmentationMethod` with class-level
:class:`MethodFacts` (what the engine and the GUI read instead of special-casing names) and a
``default_config`` (the paper's hyper-parameters). Register it with :func:`register_method`.

Tensor conventions (B batch, M = 4 modality channels in ``MODALITIES`` order, K classes):

- 2D methods: ``images`` [B, 4, 256, 256] float in [0, 255] (zeros for missing modalities),
  ``available`` [B, 4] bool, ``boxes`` [B, 4] float (x0, y0, x1, y1) in network pixels or None.
  2.5D methods (``facts.context_slices`` k > 0): ``images`` [B, 4 * (2k + 1), 256, 256], the slice
  and its neighbours, modality channels of slice z - k first (``preprocessing.slices_with_context``).
- 3D methods: ``images`` [B, 4, D, H, W] patches, same value range.
- Output of ``forward``: logits [B, K, ...]; channel k is label value ``LABEL_SETS[label_set][k]``.
  ``predict_proba`` returns class probabilities summing to 1 over K (softmax of the logits unless
  a method decodes classes differently and overrides it).

Training contract (what ``Training/`` calls; it never special-cases method names):

- ``training_loss(batch, progress)`` -> scalar loss. ``batch`` is a dict with ``images``,
  ``available`` (as above), ``target`` (long class indices [B, ...], index k meaning label value
  ``LABEL_SETS[label_set][k]``) and optionally ``boxes`` [B, 4] (from the ground truth, for
  promptable methods) and ``modality`` (long [B], MODALITIES index of a single-modality input, for
  methods that are told which expert matches, e.g. MoME's curriculum). ``progress`` is the fraction
  of training done, in [0, 1] (epoch / epochs), for curricula. The default is
  ``loss(forward(images, available, boxes), target)``; methods with deep supervision, two passes
  or sampled sub-regions override it.
- ``loss(logits, target)``: the paper's loss on ``forward``'s output; default Dice + CE (MONAI's
  ``DiceCELoss``, softmax, one-hot target).
"""
from __future__ import annotations

import abc
import os
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..conventions import LABEL_SETS, MODALITIES, MODALITY_DISPLAY_NAMES
from ..errors import MissingModalityError, UnknownMethodError


@dataclass(frozen=True)
class MethodFacts:
    name: str                             # registry key, e.g. 'unet2d'
    title: str                            # what the GUI shows
    modalities: tuple[str, ...]           # accepted modalities, an ordered subset of MODALITIES
    required_modalities: tuple[str, ...]  # must be present; the others may be missing
    spatial_dims: int                     # 2 (slice-wise) or 3 (patch-based)
    label_set: str                        # key of LABEL_SETS: 'brats' or 'lesion'
    promptable: bool                      # accepts a box prompt
    cacheable_embeddings: bool            # a box refinement can re-run only the light decoder
    input_size: tuple[int, ...]           # (256, 256) for 2D; the patch size for 3D
    reference: str = ""                   # the paper
    requires_box: bool = False            # segments only inside a box (zero-shot box methods)
    # Measured safe in bfloat16 autocast on a CPU with native bf16 (>= 1.2x faster, Dice within 0.002
    # of fp32; docs/benchmarks.md "CPU precision"): the engine's precision 'auto' uses it there.
    cpu_bf16: bool = False
    # 3D methods: the isotropic voxel size (mm) the network was trained at; the engine resizes a case to
    # it before the sliding window and the probabilities back (None: the input's own grid).
    working_spacing_mm: float | None = None
    # 2D methods that see neighbouring slices (2.5D): the engine and the trainer give each slice with
    # ``context_slices`` neighbours on either side, images [B, 4 * (2k + 1), H, W]
    # (``preprocessing.slices_with_context``); 0: the slice alone.
    context_slices: int = 0

    def __post_init__(self):
        if not set(self.modalities) <= set(MODALITIES) or not self.modalities:
            raise ValueError(f"{self.name}: modalities must be a non-empty subset of {MODALITIES}")
        if not set(self.required_modalities) <= set(self.modalities):
            raise ValueError(f"{self.name}: required modalities must be accepted modalities")
        if self.spatial_dims not in (2, 3) or len(self.input_size) != self.spatial_dims:
            raise ValueError(f"{self.name}: spatial_dims must be 2 or 3 and match input_size")
        if self.requires_box and not self.promptable:
            raise ValueError(f"{self.name}: a method that requires a box must be promptable")
        if self.working_spacing_mm is not None and (self.spatial_dims != 3 or not self.working_spacing_mm > 0):
            raise ValueError(f"{self.name}: working_spacing_mm is a positive voxel size, for 3D methods only")
        if self.context_slices and (self.spatial_dims != 2 or self.context_slices < 0):
            raise ValueError(f"{self.name}: context_slices is a number of neighbouring slices, for 2D methods only")
        if self.label_set not in LABEL_SETS:
            raise ValueError(f"{self.name}: unknown label set {self.label_set!r}")

    @property
    def tolerates_missing(self) -> bool:
        return set(self.required_modalities) != set(self.modalities)

    @property
    def labels(self) -> tuple[int, ...]:
        return LABEL_SETS[self.label_set]

    def check_modalities(self, given: tuple[str, ...] | list[str]) -> None:
        """Raise MissingModalityError naming what is missing and what the method needs."""
        missing = [m for m in self.required_modalities if m not in given]
        if missing:
            names = ", ".join(MODALITY_DISPLAY_NAMES[m] for m in missing)
            needed = ", ".join(MODALITY_DISPLAY_NAMES[m] for m in self.required_modalities)
            raise MissingModalityError(
                f"method '{self.name}' needs {needed}; missing: {names}. Give the missing volume(s) "
                "or choose a method that accepts the modalities you have (see `brainlesionsam info`)")
        if not any(m in given for m in self.modalities):
            accepted = ", ".join(MODALITY_DISPLAY_NAMES[m] for m in self.modalities)
            raise MissingModalityError(f"method '{self.name}' needs at least one of {accepted}")

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "title": self.title, "modalities": list(self.modalities),
                "required_modalities": list(self.required_modalities),
                "tolerates_missing": self.tolerates_missing, "spatial_dims": self.spatial_dims,
                "label_set": self.label_set, "labels": list(self.labels),
                "promptable": self.promptable, "cacheable_embeddings": self.cacheable_embeddings,
                "input_size": list(self.input_size), "reference": self.reference,
                "requires_box": self.requires_box, "cpu_bf16": self.cpu_bf16,
                "context_slices": self.context_slices}


class SegmentationMethod(nn.Module, abc.ABC):
    """Base class of all methods. Subclasses set ``facts`` and ``default_config`` and implement
    ``forward``. The constructor takes the config as keyword arguments (unknown keys are an error)."""

    facts: ClassVar[MethodFacts]
    default_config: ClassVar[dict[str, Any]] = {}
    # Weights shipped with the package for the sample case (file name under BrainLesionSAMLib/weights).
    packaged_weights: ClassVar[str | None] = None
    # Config keys that only say where initial weights come from (e.g. a SAM .pth path). Loading one
    # of our checkpoints sets them to None: the checkpoint holds every weight, and the original file
    # need not exist on the machine that loads it.
    initialisation_keys: ClassVar[tuple[str, ...]] = ()

    def __init__(self, **config: Any):
        super().__init__()
        unknown = set(config) - set(self.default_config)
        if unknown:
            raise ValueError(f"{self.facts.name}: unknown config key(s) {sorted(unknown)}; "
                             f"known: {sorted(self.default_config)}")
        self.config: dict[str, Any] = {**self.default_config, **config}

    @abc.abstractmethod
    def forward(self, images: torch.Tensor, available: torch.Tensor,
                boxes: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, K, ...] for images [B, 4, ...] (see the module docstring)."""

    def predict_proba(self, images: torch.Tensor, available: torch.Tensor,
                      boxes: torch.Tensor | None = None) -> torch.Tensor:
        return torch.softmax(self.forward(images, available, boxes).float(), dim=1)

    # Methods whose facts say ``cacheable_embeddings`` split forward into a heavy ``encode`` (image
    # encoder, run once per slice) and a light ``decode_proba`` (prompt encoder + mask decoder, run
    # again for every new box). The engine caches what ``encode`` returns per case and slice.
    def encode(self, images: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
        """Image embeddings [B, ...] for images [B, 4, H, W]; only for cacheable methods."""
        raise TypeError(f"method '{self.facts.name}' does not cache image embeddings")

    def decode_proba(self, embeddings: torch.Tensor, available: torch.Tensor,
                     boxes: torch.Tensor | None = None) -> torch.Tensor:
        """Class probabilities [B, K, H, W] from ``encode``'s embeddings; only for cacheable methods."""
        raise TypeError(f"method '{self.facts.name}' does not cache image embeddings")

    @classmethod
    def pretrained(cls, weights: "str | os.PathLike | None" = None, **config: Any) -> "SegmentationMethod | None":
        """An instance with ``config`` initialised from third-party pretrained weights: ``weights`` (a
        ``.pth`` in the third party's layout, e.g. a user's ``medsam_vit_b.pth``) or, when None, the
        copy a dependency ships (LiteMedSAM's). None when the method reads no third-party weights as a
        whole (the trainer then builds ``cls(**config)``, whose backbone may still load them)."""
        return None

    @classmethod
    def with_base_weights(cls, **config: Any) -> "SegmentationMethod":
        """An instance initialised from the third-party base weights that a delta checkpoint
        (``checkpoints.save_delta_checkpoint``) was trained on; methods without a base raise."""
        from ..errors import WeightsError

        raise WeightsError(f"method '{cls.facts.name}' has no base weights; its checkpoints hold every tensor")

    def base_weights(self) -> tuple[str, str]:
        """(name, sha256) of the base weights file this instance was initialised from."""
        from ..errors import WeightsError

        raise WeightsError(f"method '{self.facts.name}' has no base weights")

    def adapt_initial_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Another configuration's weights (a trainer's ``init_from``) made to fit this instance, where
        the method knows how (e.g. a 2.5D unet2d from a 2D one); by default unchanged."""
        return state

    # Interpretability: methods that weigh modalities or experts per case (SOFA's sub-region attention,
    # MoME's gate) accumulate those weights over a case's batches. The engine calls ``start_case``
    # before a case and puts ``case_weights()`` into the result (report, Slicer table).
    def start_case(self) -> None:
        """Reset per-case accumulators (called by the engine before a case's first batch)."""

    def case_weights(self) -> dict[str, dict[str, float]]:
        """Per-case weights since ``start_case``: {group: {name: weight}}, e.g.
        {'enhancing tumour': {'t1ce': 0.61, ...}} or {'gate': {'flair': 0.8, ...}}; {} if none."""
        return {}

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The method's loss on ``forward``'s logits [B, K, ...] and class indices [B, ...]."""
        from monai.losses import DiceCELoss  # monai is slow to import; only training needs it
        return DiceCELoss(to_onehot_y=True, softmax=True)(logits.float(), target[:, None])

    def training_loss(self, batch: dict[str, torch.Tensor], progress: float = 0.0) -> torch.Tensor:
        """One training batch's loss (see the module docstring for ``batch`` and ``progress``)."""
        logits = self.forward(batch["images"], batch["available"], batch.get("boxes"))
        return self.loss(logits, batch["target"])

    def parameter_counts(self) -> dict[str, int]:
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return {"total": total, "trainable": trainable}


_REGISTRY: dict[str, type[SegmentationMethod]] = {}


def register_method(cls: type[SegmentationMethod]) -> type[SegmentationMethod]:
    name = cls.facts.name
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"method name {name!r} is already registered by {_REGISTRY[name].__name__}")
    _REGISTRY[name] = cls
    return cls


def method_names() -> list[str]:
    return sorted(_REGISTRY)


def get_method_class(name: str) -> type[SegmentationMethod]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownMethodError(
            f"unknown method '{name}'; available: {', '.join(method_names())}") from None


def build_method(name: str, config: dict[str, Any] | None = None) -> SegmentationMethod:
    return get_method_class(name)(**(config or {}))


class BackboneDeltaBase:
    """Mixin for methods whose constructor initialises their SAM backbone from ``backbone`` /
    ``backbone_weights`` (SOFA, CMAA, DB-SAM, BrainSegDMIF): that backbone file is the base of their
    delta checkpoints, and their added modules start as the constructor makes them."""

    @classmethod
    def with_base_weights(cls, **config: Any):
        return cls(**config)

    def base_weights(self) -> tuple[str, str]:
        from ..backbones import backbone_base

        return backbone_base(self.config["backbone"], self.config["backbone_weights"], self.facts.name)
