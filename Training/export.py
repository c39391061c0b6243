"""Export a trained run to the release checkpoint format and describe it for the model catalogue.

The release format is the library's own (``BrainLesionSAMLib.checkpoints.save_checkpoint``:
safetensors + JSON header with method, config, modalities, labels, training data, library version
and the tensors' sha256), so ``brainlesionsam segment --method M --weights FILE`` and the Slicer
module load an export directly. The catalogue entry (a dict, written as JSON beside the export) has
the fields of ``BrainLesionSAMLib/catalogue.py``'s ``Models.json`` entries (id, title, version,
method, config - the method settings that differ from its defaults -, file_name, url, origin,
sha256 and size of the file - what a download is verified against -, modalities, labels, GPU
memory, licence, description) and is validated by that module before it is written; add it to
``Models.json`` by hand.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from BrainLesionSAMLib.checkpoints import load_checkpoint, read_header, save_checkpoint, save_delta_checkpoint
from BrainLesionSAMLib.errors import BrainLesionSAMError
from BrainLesionSAMLib.methods import build_method, get_method_class
from BrainLesionSAMLib.pth import file_sha256

from .state import load_latest_state, write_json

WHICH = ("best", "final", "last")


class ExportError(BrainLesionSAMError):
    """A run cannot be exported (no weights of the requested kind, unreadable run folder)."""


def _run_config(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        raise ExportError(f"{run_dir} is not a training run folder (no readable config.json)") from None


def _json(value: Any) -> Any:
    return json.loads(json.dumps(value))


def estimated_gpu_memory_gb(path: Path) -> float:
    """A rough inference estimate for the catalogue: CUDA context (0.5 GB) + the weights + three times
    the weights for activations, rounded up to 0.5 GB. Give the measured value when you have one."""
    weights_gb = path.stat().st_size / 2**30
    return math.ceil((0.5 + 4.0 * weights_gb) * 2.0) / 2.0


def export_run(run_dir: str | os.PathLike, out: str | os.PathLike, which: str = "best",
               model_id: str | None = None, url: str = "", licence: str = "", version: str = "1",
               gpu_memory_gb: float | None = None, title: str | None = None,
               training_data: str | None = None, delta: bool = False, storage: str = "float32") -> dict[str, Any]:
    """Write ``out`` (release checkpoint) from a run's ``best`` / ``final`` weights or its ``last``
    training checkpoint, and ``<out>.catalogue.json``; returns the catalogue entry, checked by
    ``BrainLesionSAMLib.catalogue.ModelEntry.from_dict`` (the catalogue's own validation).

    ``best`` falls back to ``final`` when the run never validated. ``training_data`` replaces the
    run's own description of its data (which names the data folder on the training machine).
    ``delta``: write only the tensors training changed on the method's third-party base weights
    (``save_delta_checkpoint``; e.g. CMAA on a frozen LiteMedSAM); the file's header names the base
    and its sha256, and a catalogue entry for it needs ``base`` (the base's entry id). ``storage``
    'float16' halves the file (``BrainLesionSAMLib.checkpoints``: half-precision storage).
    """
    from BrainLesionSAMLib.catalogue import ModelEntry

    run_dir, out = Path(run_dir), Path(out)
    if which not in WHICH:
        raise ExportError(f"--which must be one of {', '.join(WHICH)}, not {which!r}")
    config = _run_config(run_dir)
    name = config["method"]
    cls = get_method_class(name)
    if which == "best" and not (run_dir / "best.safetensors").is_file():
        which = "final"
    if which in ("best", "final"):
        source = run_dir / f"{which}.safetensors"
        if not source.is_file():
            raise ExportError(f"{source} does not exist: the run has not finished; export --which last")
        state, header = load_checkpoint(source, expected_method=name)
        method_config = header["config"]
        training = header.get("training_data", "")
        steps = header.get("training_steps")
    else:
        saved = load_latest_state(run_dir)
        if saved is None:
            raise ExportError(f"{run_dir} has no training checkpoint to export")
        state, method_config, steps = saved["model"], json.loads(saved["config"])["method_config"], saved["step"]
        training = f"{config['data']['root']}: config {config['name']}, {steps} steps (training checkpoint)"
    training = training_data or training
    model = build_method(name, {**method_config, **{key: None for key in cls.initialisation_keys}})
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ExportError(f"the weights of {run_dir} do not fit method '{name}' as configured: {error}") from None
    extra = {"training_config": config["name"], "training_steps": steps, "exported_from": which}
    if delta:
        save_delta_checkpoint(model, out, training_data=training, extra=extra, storage=storage)
    else:
        save_checkpoint(model, out, training_data=training, extra=extra, storage=storage)
    header = read_header(out)
    # Only what differs from the method's defaults: the catalogue compares it with the loaded model.
    defaults = _json(cls.default_config)
    changed = {k: v for k, v in _json(header["config"]).items() if defaults.get(k) != v and k not in cls.initialisation_keys}
    facts = model.facts
    entry = {
        "id": model_id or f"{config['name']}-{which}",
        "title": title or f"{cls.facts.title}, trained ({config['name']})",
        "version": str(version),
        "method": name,
        "config": changed,
        "file_name": out.name,
        "url": url or None,
        "origin": (f"Trained with brainlesionsam-train --config {config['name']} on {config['data']['root']} "
                   f"({steps} steps); exported from {run_dir} ({which})" + ("" if url else "; import the file")),
        "sha256": file_sha256(out),
        "size": out.stat().st_size,
        "modalities": list(facts.modalities),
        "required_modalities": list(facts.required_modalities),
        "label_set": facts.label_set,
        "labels": list(facts.labels),
        "gpu_memory_gb": float(gpu_memory_gb) if gpu_memory_gb else estimated_gpu_memory_gb(out),
        "licence": licence or "unspecified",
        "description": f"{training}. Release checkpoint sha256 of the tensors: {header['sha256']}.",
    }
    ModelEntry.from_dict(entry, f"catalogue entry for {out}")
    write_json(Path(f"{out}.catalogue.json"), entry)
    return entry


def export_packaged_weights(run_dir: str | os.PathLike, target: str | os.PathLike, which: str = "final",
                            training_data: str | None = None, delta: bool = False, storage: str = "float32"
                            ) -> dict[str, Any]:
    """Export a run's weights as a file shipped inside the package (``BrainLesionSAMLib/weights/``):
    only the release checkpoint lands at ``target`` (its catalogue entry is the catalogue's, not a
    ``.catalogue.json`` beside it); returns the entry, whose sha256 and size the catalogue must carry."""
    target = Path(target)
    with tempfile.TemporaryDirectory() as folder:
        exported = Path(folder) / target.name
        entry = export_run(run_dir, exported, which=which, training_data=training_data, delta=delta,
                           storage=storage)
        shutil.copyfile(exported, target)
    return entry
