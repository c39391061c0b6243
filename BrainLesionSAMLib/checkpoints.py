"""Checkpoints we write: ``safetensors`` tensors plus a JSON header in the safetensors metadata.

Header (key ``brainlesionsam``): format version, method, config, modalities, label set and labels,
training data description, library version and the sha256 of the tensor payload (tensor names,
dtypes, shapes and bytes in sorted name order), verified on load so a damaged file is refused
before it produces nonsense. Third-party ``.pth`` files are read elsewhere with
``torch.load(weights_only=True)``.
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


def save_checkpoint(model: SegmentationMethod, path: str | os.PathLike,
                    training_data: str = "", extra: dict[str, Any] | None = None) -> Path:
    """Write ``model``'s weights and header atomically; returns the path."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
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
            raise WeightsError(f"the packaged weights {weights} are missing; reinstall the package or "
                               "re-create them with scripts/train_sample_weights.py")
    state, header = load_checkpoint(weights, expected_method=name)
    try:
        config = {**(header.get("config") or {}), **{key: None for key in cls.initialisation_keys}}
        model = build_method(name, config)
        model.load_state_dict(state, strict=True)
    except (RuntimeError, ValueError) as error:
        raise WeightsError(f"{weights} does not fit method '{name}' as configured: {error}") from None
    return model.eval()
