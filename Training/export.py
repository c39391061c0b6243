"""Export a trained run to the release checkpoint format and describe it for the model catalogue.

The release format is the library's own (``BrainLesionSAMLib.checkpoints.save_checkpoint``:
safetensors + JSON header with method, config, modalities, labels, training data, library version
and the tensors' sha256), so ``brainlesionsam segment --method M --weights FILE`` and the Slicer
module load an export directly. The catalogue entry (a dict, written as JSON beside the export) is
what ``BrainLesionSAMLib/catalogue.py`` / ``BrainLesionSAM/Resources/Models.json`` list:
id, method, config, url, sha256 and size of the file (what a download is verified against),
modalities, labels, licence, plus the title, the method's config and a training description.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from BrainLesionSAMLib.checkpoints import load_checkpoint, read_header, save_checkpoint
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


def export_run(run_dir: str | os.PathLike, out: str | os.PathLike, which: str = "best",
               model_id: str | None = None, url: str = "", licence: str = "") -> dict[str, Any]:
    """Write ``out`` (release checkpoint) from a run's ``best`` / ``final`` weights or its ``last``
    training checkpoint, and ``<out>.catalogue.json``; returns the catalogue entry.

    ``best`` falls back to ``final`` when the run never validated.
    """
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
    config_for_build = {**method_config, **{key: None for key in cls.initialisation_keys}}
    model = build_method(name, config_for_build)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ExportError(f"the weights of {run_dir} do not fit method '{name}' as configured: {error}") from None
    save_checkpoint(model, out, training_data=training,
                    extra={"training_config": config["name"], "training_steps": steps, "exported_from": which})
    header = read_header(out)
    entry = {
        "id": model_id or f"{config['name']}-{which}",
        "title": f"{cls.facts.title} trained with config {config['name']}",
        "method": name,
        "config": config["name"],
        "method_config": header["config"],
        "url": url,
        "sha256": file_sha256(out),
        "size": out.stat().st_size,
        "modalities": list(cls.facts.modalities),
        "required_modalities": list(cls.facts.required_modalities),
        "label_set": cls.facts.label_set,
        "labels": list(cls.facts.labels),
        "licence": licence,
        "training_data": training,
        "tensors_sha256": header["sha256"],
    }
    write_json(Path(f"{out}.catalogue.json"), entry)
    return entry
