"""Reading third-party PyTorch weight files (SAM, MedSAM, LiteMedSAM ``.pth``) safely.

One place for what every such reader must do: check the file exists, verify its sha256 before
unpickling when the expected hash is known, and unpickle with ``torch.load(weights_only=True)`` so
a file can never run code. Our own checkpoints are safetensors (``checkpoints.py``).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch

from .errors import WeightsError


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def verify_file_sha256(path: str | os.PathLike, expected: str) -> None:
    actual = file_sha256(path)
    if actual != expected.lower():
        raise WeightsError(f"{path} has sha256 {actual}, expected {expected}; the file is corrupt "
                           "or a different version - delete it and download it again")


def read_pth(path: str | os.PathLike, what: str, expected_sha256: str | None = None,
             hint: str = "") -> Any:
    """Unpickle ``path`` with weights_only=True after the checks above; ``what`` names the file in
    messages (e.g. 'SAM checkpoint') and ``hint`` says what file the user should give instead."""
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"{what} {path} does not exist; check the path{hint}")
    if not path.is_file():
        raise WeightsError(f"{what} {path} is not a file; give the .pth file itself{hint}")
    if expected_sha256 is not None:
        verify_file_sha256(path, expected_sha256)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling failures share no common base class
        lines = str(error).strip().splitlines()
        reason = f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]
        raise WeightsError(f"{what} {path} is not a PyTorch weights file that can be read safely "
                           f"(torch.load with weights_only=True failed: {reason}){hint}") from None
