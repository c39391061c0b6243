"""A SAM backbone's image encoder on OpenVINO's CPU runtime (issue 22): the same network, 2-2.5x
faster than PyTorch on the CPU at float32 (docs/benchmarks.md, "Encoder runtimes").

The image encoder is what the SAM-based methods spend their time in (TinyViT: four encodes per
slice for SOFA). ``benchmarks/bench_encoder_runtimes.py`` measured PyTorch fp32 and bf16 autocast,
channels-last, ``torch.compile``, ONNX Runtime and OpenVINO side by side on the same slices;
OpenVINO at float32 won with the embeddings unchanged to float32 rounding, so the engine runs
the encoder there when the ``openvino`` package is installed (``pip install brainlesionsam[openvino]``;
180 MB, hence optional) and the run is on the CPU. ``encoder_runtime`` ('auto', 'torch',
'openvino'; the command line's ``--encoder-runtime``) chooses; without OpenVINO 'auto' is PyTorch.

What runs there: only ``SamBackbone.encode`` without a block hook, in inference (no autograd),
on CPU tensors - LiteMedSAM, SOFA, MedSAM. Methods that insert their own modules between the
encoder's blocks (CMAA's adapters, BrainSegDMIF's DMIF, DB-SAM's branches) keep PyTorch: their
encoder is not the exported one. The engine's precision carries over: 'fp32' compiles with
OpenVINO's f32 inference precision, 'bf16' with its bf16 one.

Converting a network takes about 20 s, so it happens once per set of encoder weights, at the first
encode (the engine says so in its progress), and the converted model (OpenVINO IR at float32) is
kept in the weights cache folder under ``openvino/`` (``catalogue.cache_folder``), keyed by the
sha256 of the encoder's tensors and the OpenVINO version; later runs and processes compile it from
there in under a second. If the folder cannot be written, the model is converted in memory.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from ..errors import BrainLesionSAMError

if TYPE_CHECKING:
    from .base import SamBackbone

ENCODER_RUNTIMES = ("auto", "torch", "openvino")
OPENVINO_PRECISION = {"fp32": "f32", "bf16": "bf16"}
_COMPILED_KEEP = 4  # compiled encoders kept in this process (about 30 MB each for TinyViT)
_compiled: dict[tuple, object] = {}
_lock = threading.Lock()


def openvino_installed() -> bool:
    return importlib.util.find_spec("openvino") is not None


def resolve_encoder_runtime(runtime: str, device: torch.device) -> str:
    """'torch' or 'openvino' for a run on ``device`` (see the module docstring)."""
    if runtime not in ENCODER_RUNTIMES:
        raise BrainLesionSAMError(f"unknown encoder runtime {runtime!r}; use {', '.join(ENCODER_RUNTIMES)}")
    if runtime == "torch":
        return "torch"
    if device.type != "cpu":
        if runtime == "openvino":
            raise BrainLesionSAMError(f"the OpenVINO encoder runs on the CPU only, not on {device.type}; "
                                      "use --device cpu or --encoder-runtime torch")
        return "torch"
    if not openvino_installed():
        if runtime == "openvino":
            raise BrainLesionSAMError("the OpenVINO encoder needs the 'openvino' package: pip install openvino "
                                      "(or brainlesionsam[openvino]), or use --encoder-runtime torch")
        return "torch"
    return "openvino"


def encoder_key(backbone: "SamBackbone") -> str:
    """sha256 of the encoder's tensors (names, shapes, values), its input size and the OpenVINO version."""
    import openvino

    digest = hashlib.sha256(f"{backbone.name}:{backbone.image_size}:{openvino.__version__}".encode())
    for name, tensor in backbone.image_encoder.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cache_folder_for_openvino(folder: str | os.PathLike | None = None) -> Path:
    """Where converted encoders are kept: ``openvino/`` in the weights cache folder (or in ``folder``)."""
    from ..catalogue import cache_folder

    return cache_folder(folder) / "openvino"


class _PlainEncoder(torch.nn.Module):
    """The backbone's PyTorch encoder as a module to convert (the fast path switched off inside)."""

    def __init__(self, backbone: "SamBackbone"):
        super().__init__()
        self.backbone = backbone

    def forward(self, normalized: torch.Tensor) -> torch.Tensor:
        return self.backbone.torch_encode(normalized)


def _converted_model(backbone: "SamBackbone", key: str, folder: Path, notify: Callable[[str], None]):
    """The OpenVINO model of the encoder: read from ``folder`` when converted before, else converted
    (and saved there, folder-atomically: written under a temporary name, then renamed)."""
    import openvino

    core = openvino.Core()
    target = folder / f"{backbone.name}-{key[:32]}"
    if (target / "encoder.xml").is_file():
        return core.read_model(str(target / "encoder.xml"))
    notify(f"converting the {backbone.name} image encoder for OpenVINO (once per weights, about 20 s)")
    example = torch.zeros(1, 3, backbone.image_size, backbone.image_size)
    with torch.no_grad(), warnings.catch_warnings():
        # tracing warns about the encoders' shape checks, which hold for every input the engine gives
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*torch.jit.trace")  # used by OpenVINO
        model = openvino.convert_model(_PlainEncoder(backbone).eval(), example_input=example)
    model.reshape({model.inputs[0]: openvino.PartialShape([-1, 3, backbone.image_size, backbone.image_size])})
    temporary = target.with_name(f"{target.name}.partial-{os.getpid()}-{threading.get_ident()}")
    try:
        temporary.mkdir(parents=True, exist_ok=True)
        openvino.save_model(model, str(temporary / "encoder.xml"), compress_to_fp16=False)
        os.replace(temporary, target)
    except OSError:  # unwritable cache, or another process renamed its copy first: keep the model in memory
        pass
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return model


class OpenVINOEncoder:
    """Callable normalized images [B, 3, S, S] (CPU) -> embeddings [B, 256, E, E], float32; converts and
    compiles at the first call (see the module docstring)."""

    def __init__(self, backbone: "SamBackbone", precision: str = "fp32", threads: int | None = None,
                 cache_folder: str | os.PathLike | None = None, notify: Callable[[str], None] | None = None):
        if precision not in OPENVINO_PRECISION:
            raise BrainLesionSAMError(f"the OpenVINO encoder runs fp32 or bf16, not {precision!r}")
        self.backbone = backbone
        self.precision = precision
        self.threads = threads or torch.get_num_threads()
        self.cache_folder = Path(cache_folder) if cache_folder is not None else None
        self.notify = notify or (lambda message: None)
        self._request = None

    def _compiled_model(self):
        key = encoder_key(self.backbone)
        handle = (key, self.precision, self.threads)
        with _lock:
            compiled = _compiled.get(handle)
            if compiled is None:
                import openvino

                model = _converted_model(self.backbone, key, cache_folder_for_openvino(self.cache_folder),
                                         self.notify)
                compiled = openvino.Core().compile_model(model, "CPU", {
                    "INFERENCE_NUM_THREADS": self.threads,
                    "INFERENCE_PRECISION_HINT": OPENVINO_PRECISION[self.precision]})
                while len(_compiled) >= _COMPILED_KEEP:
                    _compiled.pop(next(iter(_compiled)))
                _compiled[handle] = compiled
        return compiled

    def __call__(self, normalized: torch.Tensor) -> torch.Tensor:
        if self._request is None:
            self._request = self._compiled_model().create_infer_request()
        array = np.ascontiguousarray(normalized.detach().float().numpy())
        output = self._request.infer({0: array})
        return torch.from_numpy(np.array(next(iter(output.values())), dtype=np.float32, copy=True))
