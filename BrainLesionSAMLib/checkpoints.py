"""Checkpoints we write: ``safetensors`` tensors plus a JSON header in the safetensors metadata.

Header (key ``brainlesionsam``): format version, method, config, modalities, label set and labels,
training data description, library version and the sha256 of the tensor payload (tensor names,
dtypes, shapes and bytes in sorted name order), verified on load so a damaged file is refused
before it produces nonsense. Third-party ``.pth`` files are read elsewhere with
``torch.load(weights_only=True)``.

**Delta checkpoints** (``save_delta_checkpoint``): a method trained on top of third-party base
weights with part of them frozen (SOFA and the brain-tuned LiteMedSAM on LiteMedSAM's encoder)
stores only the tensors that training changed (plus any the method initialises at random, which
a fresh build would draw anew), and the header's ``base`` names the base file and its sha256.
Loading builds the method from its base weights (``with_base_weights``), checks that the base the
method actually loaded has that sha256 - a different base would silently give another
network - and then loads the delta over it. A release file thus stays small (SOFA: 16 MB instead
of 39 MB) and never redistributes the base.

**Half-precision storage** (``storage='float16'``, header ``storage``): float32 tensors are stored as
float16 (any that float16 cannot hold - beyond +-65504 - stay float32) to halve a release file;
loading copies them into the float32 network, so inference runs as before on weights rounded to
float16's 11 significant bits (a relative change below 0.05 %; the release notes give the Dice
against the float32 file).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from safetensors import safe_open

from . import __version__
from .errors import WeightsError
from .io import atomic_output
from .methods import SegmentationMethod, build_method, get_method_class
from .pth import file_sha256, verify_file_sha256  # noqa: F401  (re-exported)

HEADER_KEY = "brainlesionsam"
FORMAT_VERSION = 1
PACKAGED_WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
THIRD_PARTY_SUFFIXES = (".pth", ".pt")  # SAM / MedSAM / LiteMedSAM checkpoints (torch.save files)


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        # reshape(-1): a 0-dim tensor cannot be viewed as bytes; the bytes are the same either way
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


STORAGE = ("float32", "float16")


def save_checkpoint(model: SegmentationMethod, path: str | os.PathLike,
                    training_data: str = "", extra: dict[str, Any] | None = None, storage: str = "float32") -> Path:
    """Write ``model``'s weights and header atomically; returns the path."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    return _write(model, tensors, path, training_data, extra, storage)


def half_precision(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """float32 tensors as float16, except those float16 cannot hold (they stay float32); others as they are."""
    def half(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dtype != torch.float32:
            return tensor
        converted = tensor.to(torch.float16)
        return converted if torch.isfinite(converted).all() or not torch.isfinite(tensor).all() else tensor
    return {name: half(tensor) for name, tensor in tensors.items()}


def _write(model: SegmentationMethod, tensors: dict[str, torch.Tensor], path: str | os.PathLike,
           training_data: str, extra: dict[str, Any] | None, storage: str = "float32") -> Path:
    if storage not in STORAGE:
        raise ValueError(f"storage must be one of {STORAGE}, not {storage!r}")
    if storage == "float16":
        tensors = half_precision(tensors)
        extra = {**(extra or {}), "storage": storage}
    facts = model.facts
    header = {
        "format_version": FORMAT_VERSION,
        "method": facts.name,
        "config": _jsonable(model.config),
        "modalities": list(facts.modalities),
        "label_set": facts.label_set,
        "labels": list(facts.labels),
        "training_data": training_data,
        "library_version": __version__,
        "sha256": tensors_sha256(tensors),
        **(extra or {}),
    }
    path = Path(path)
    with atomic_output(path) as temporary:
        save_file(tensors, str(temporary), metadata={HEADER_KEY: json.dumps(header)})
    return path


def changed_tensors(model: SegmentationMethod, base: SegmentationMethod) -> dict[str, torch.Tensor]:
    """The tensors of ``model``'s state that differ from ``base``'s (or that ``base`` lacks)."""
    reference = base.state_dict()
    return {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()
            if name not in reference or reference[name].shape != tensor.shape
            or not torch.equal(reference[name].cpu(), tensor.detach().cpu())}


def randomly_initialised(cls: type[SegmentationMethod], config: dict[str, Any]) -> set[str]:
    """Names of the tensors that ``cls.with_base_weights(**config)`` initialises at random (two
    builds under two seeds differ there): a delta must hold them even where training left them
    alone, since loading builds them anew from another random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        first = cls.with_base_weights(**config).state_dict()
        torch.manual_seed(2)
        second = cls.with_base_weights(**config).state_dict()
    return {name for name, tensor in first.items() if not torch.equal(tensor, second[name])}


def save_delta_checkpoint(model: SegmentationMethod, path: str | os.PathLike, training_data: str = "",
                          extra: dict[str, Any] | None = None, storage: str = "float32") -> Path:
    """Write only the tensors of ``model`` that differ from its base weights, or that the base
    initialises at random (see the module docstring), with the base's name and sha256 in the header;
    returns the path."""
    base = type(model).with_base_weights(**model.config)
    name, sha256 = base.base_weights()
    tensors = changed_tensors(model, base)
    state = model.state_dict()
    tensors.update({key: state[key].detach().cpu().contiguous()
                    for key in randomly_initialised(type(model), model.config) if key not in tensors})
    if not tensors:
        raise WeightsError(f"{model.facts.name}: nothing differs from the base weights; there is no delta to save")
    return _write(model, tensors, path, training_data, {**(extra or {}), "base": {"name": name, "sha256": sha256}},
                  storage)


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist; check the path")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise WeightsError(f"{path} is not a BrainLesionSAM weights file (safetensors): {error}") from None
    if HEADER_KEY not in metadata:
        raise WeightsError(f"{path} is a safetensors file without a BrainLesionSAM header; "
                           "it was not written by this library")
    return json.loads(metadata[HEADER_KEY])


def load_checkpoint(path: str | os.PathLike, expected_method: str | None = None
                    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read and verify a checkpoint; returns (state dict, header)."""
    header = read_header(path)
    if expected_method is not None and header.get("method") != expected_method:
        raise WeightsError(
            f"{path} holds weights for method '{header.get('method')}', not '{expected_method}'; "
            f"choose method '{header.get('method')}' or weights trained for '{expected_method}'")
    tensors = load_file(str(path))
    if tensors_sha256(tensors) != header.get("sha256"):
        raise WeightsError(f"{path} is damaged: its tensors do not match the sha256 in its header; "
                           "download or copy it again")
    return tensors, header


def load_method(name: str, weights: str | os.PathLike | None = None) -> SegmentationMethod:
    """Build method ``name`` from a checkpoint (its config comes from the header) in eval mode.

    Without ``weights`` the method's packaged weights are used, else its third-party pretrained
    weights (``pretrained()``); a method with neither raises WeightsError (an untrained network
    would give meaningless output). A ``.pth`` / ``.pt`` file is a third-party checkpoint (SAM,
    MedSAM, LiteMedSAM layouts), read by the method's ``pretrained(weights)``.
    """
    cls = get_method_class(name)
    if weights is not None and Path(weights).suffix.lower() in THIRD_PARTY_SUFFIXES:
        model = cls.pretrained(weights)
        if model is None:
            raise WeightsError(f"method '{name}' does not read third-party {Path(weights).suffix} files; "
                               "give one of our .safetensors checkpoints (brainlesionsam-train exports them)")
        return model.eval()
    if weights is None:
        if cls.packaged_weights is None:
            model = cls.pretrained()
            if model is None:
                raise WeightsError(f"method '{name}' ships no weights; give a weights file with --weights")
            return model.eval()
        weights = PACKAGED_WEIGHTS_DIR / cls.packaged_weights
        if not weights.is_file():
            raise WeightsError(f"the packaged weights {weights} are missing; reinstall the package or re-create "
                               "the file with the script its catalogue entry's origin names")
    state, header = load_checkpoint(weights, expected_method=name)
    config = {**(header.get("config") or {}), **{key: None for key in cls.initialisation_keys}}
    if header.get("base"):
        return _load_delta(cls, config, state, header["base"], weights)
    try:
        model = build_method(name, config)
        model.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError) as error:
        raise WeightsError(f"{weights} does not fit method '{name}' as configured: {error}") from None
    return model.eval()


def _load_delta(cls, config: dict[str, Any], state: dict[str, torch.Tensor], base: dict[str, Any],
                weights: str | os.PathLike) -> SegmentationMethod:
    name = cls.facts.name
    try:
        model = cls.with_base_weights(**config)
    except (RuntimeError, ValueError) as error:
        raise WeightsError(f"{weights} does not fit method '{name}' as configured: {error}") from None
    base_name, base_sha256 = model.base_weights()
    if base_sha256 != base.get("sha256"):
        raise WeightsError(
            f"{weights} holds only what training changed on the base weights {base.get('name')} "
            f"(sha256 {str(base.get('sha256'))[:16]}...), but this installation's base {base_name} has sha256 "
            f"{base_sha256[:16]}...; install the base file it was made for (reinstall the versions "
            "BrainLesionSAM requires) or use weights made for this base")
    own = model.state_dict()
    foreign = [key for key in state if key not in own or own[key].shape != state[key].shape]
    if foreign:
        raise WeightsError(f"{weights} does not fit method '{name}' as configured: tensors {foreign[:5]} "
                           "are not (or not so shaped) in the network")
    model.load_state_dict(state, strict=False)
    return model.eval()
