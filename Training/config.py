"""Training configs: one JSON file per paper (its published hyper-parameters) plus a ``smoke``
variant of each that trains a few steps on the CPU.

A config is a JSON object with these sections (every key and its default is in ``DEFAULTS``;
an unknown key is an error, so a typo never silently falls back to a default):

``method`` / ``method_config`` / ``init``
    the registered method, keyword arguments for its constructor (its ``default_config`` holds the
    paper's network settings; list only what differs) and how its weights start: ``"random"`` (the
    constructor, which loads whatever initial weights the method_config names, e.g. CMAA's
    ``sam_checkpoint``), ``"pretrained"`` (the method's ``pretrained(**method_config)``, third-party
    weights such as LiteMedSAM's; an error if it has none) or ``"auto"`` (pretrained when the method
    offers it, else the constructor). ``init_from`` (``--init-from``): a run folder (its
    ``final.safetensors``) or one of our ``.safetensors`` checkpoints of the same method whose
    weights, every tensor, replace the initial ones: a new run, not a resume (MoME's stage 2 starts
    from the experts' stage 1 this way).
``data``
    where the cases are (``root``, any layout :mod:`Training.datasets` knows, or generated sample
    cases, or ``synthesis``: cases made on the fly by :mod:`Training.synthesis`, a fresh pool of
    ``cases_per_pool`` every ``pool_epochs`` epochs, deterministic by ``seed``; needs
    ``train.steps_per_epoch``), the preprocessed cache, the case-level split file, and how samples are drawn (slice
    balance, boxes, modality dropout, patches).
``augmentation``
    MONAI random transforms (rotation, scaling, flips, intensity).
``optimizer`` / ``scheduler``
    what the paper used; the scheduler's milestones are in epochs.
``train``
    epochs, batch size per process, accumulation, mixed precision, checkpoint and log intervals.
``validation``
    library metrics on validation cases after every ``every_epochs`` epochs.

A file may start from another with ``"extends": "other.json"`` (same folder): sections are merged
key by key, so a smoke config states only what it shrinks. Command-line overrides are
``section.key=value`` with a JSON value (``train.max_steps=10``, ``data.root=/data/BraTS2021``,
``optimizer.lr=3e-5``); a value that is not JSON is taken as a string.
"""
from __future__ import annotations

import copy
import difflib
import json
import os
from pathlib import Path
from typing import Any

from BrainLesionSAMLib.errors import BrainLesionSAMError, UnknownMethodError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
SMOKE_SUFFIX = "_smoke"


class TrainingConfigError(BrainLesionSAMError):
    """A training config is missing, malformed, or names something that does not exist."""


# Every key a config may have, with its default. ``None`` means "not set".
DEFAULTS: dict[str, Any] = {
    "name": None,            # defaults to the file's stem
    "paper": "",             # the reference the hyper-parameters come from
    "notes": "",             # where the paper is silent and what was chosen
    "method": None,
    "method_config": {},
    "init": "random",        # 'random' | 'pretrained' | 'auto' (pretrained when the method has such weights)
    "init_from": None,       # a run folder (its final.safetensors) or a .safetensors file: start from its weights
    "data": {
        "root": None,                # dataset folder (BraTS 2020/2021/2023, FCD 2023 BIDS, sample cases)
        "sample_cases": None,        # {"n": 4, "seed": 0, "resolution": 2}: generate cases when root is None
        "synthesis": None,           # {"seed": 0, ...} (SYNTHESIS_DEFAULTS): train on Training.synthesis cases
        "cache": None,               # preprocessed cache folder; default <root>/../<root name>_cache
        "splits": None,              # split JSON; default <cache>/splits.json (written when missing)
        "split_seed": 0,
        "split_fractions": [0.7, 0.1, 0.2],  # train / validation / test, per patient
        "folds": 0,                  # k > 1: k-fold cross-validation over train + validation
        "fold": 0,                   # which fold trains (with folds > 1)
        "background_ratio": 1.0,     # 2D: lesion-free brain slices per lesion slice and epoch
        "box_jitter_px": [0, 20],    # promptable methods: ground-truth box grown by 0-20 px per side
        "modality_dropout": 0.0,     # probability of training a sample on a random non-empty subset
        "single_modality": False,    # one modality per sample, its index as batch['modality'] (MoME)
        "modalities": None,          # train (and validate) on this subset only, e.g. ["t1ce", "flair"]
        "foreground_probability": 0.33,  # 3D: patches centred on a lesion voxel this often
        "prepare_workers": 1,        # processes preparing the cache (per training process)
    },
    "augmentation": {
        "enabled": True,
        "rotate_deg": 15.0,          # uniform in +-deg (about the slice normal; every axis for 3D)
        "rotate_probability": 0.5,
        "scale": [0.9, 1.1],         # zoom range
        "scale_probability": 0.5,
        "flip_axes": [],             # spatial axes flipped with probability 0.5 each (2D: 0 = y, 1 = x)
        "intensity_scale": 0.1,      # per-modality multiplicative factor 1 +- this
        "intensity_shift": 0.1,      # per-modality shift, fraction of 255
        "intensity_probability": 0.5,
    },
    "optimizer": {
        "name": "adamw",             # adam | adamw | sgd
        "lr": 1e-4,
        "weight_decay": 0.0,
        "betas": [0.9, 0.999],
        "momentum": 0.0,
        "nesterov": False,
    },
    "scheduler": {
        "name": "constant",          # constant | multistep | cosine | poly
        "milestones_epochs": [],     # multistep
        "gamma": 0.1,                # multistep factor
        "power": 0.9,                # poly
        "min_lr_ratio": 0.0,         # cosine / poly end at lr * this
        "warmup_epochs": 0.0,        # linear warm-up from 0 (fractions allowed)
    },
    "train": {
        "epochs": 1,
        "steps_per_epoch": None,     # None: one pass over the epoch's samples (2D); 3D needs it
        "max_steps": None,           # stop after this many optimiser steps (schedules span them)
        "batch_size": 2,             # per process
        "accumulation_steps": 1,
        "amp": "bf16",               # bf16 | fp16 | none (CUDA only; the CPU always trains in fp32)
        "grad_clip_norm": None,
        "grad_clip_parameters": None,  # name prefixes of the clipped parameters (None: all trainable)
        "seed": 0,
        "num_workers": 4,
        "device": "auto",            # auto | cpu | cuda
        "backend": "auto",           # torch.distributed backend: auto (nccl on CUDA, else gloo)
        "find_unused_parameters": True,  # methods that skip branches per step (one-vs-all, curricula)
        "sync_batchnorm": False,
        "dist_timeout_minutes": 60,
        "checkpoint_every_steps": 500,
        "keep_checkpoints": 2,
        "save_final_state": True,    # also a training checkpoint at the end (needed for export --which last)
        "log_every_steps": 20,
        "threads": None,             # torch CPU threads per process; None leaves torch's choice
        "early_stopping_patience": None,  # validations without improvement before stopping
    },
    "validation": {
        "every_epochs": 1,           # 0 disables validation
        "max_cases": None,
        "batch_size": 8,
    },
    "output": {
        "dir": None,                 # default runs/<name>
    },
}

_FREE_FORM = {"method_config", "data.sample_cases", "data.synthesis"}

# data.synthesis: the domain-randomised training data (Training/synthesis/pools.py).
SYNTHESIS_DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "cases_per_pool": 48,        # cases of one pool
    "pool_epochs": 1,            # epochs that train on one pool before the next
    "validation_cases": 8,       # fixed validation cases (their own seeds)
    "ranges": "training",        # Training.synthesis.ranges: 'training' or a shifted test range
    "background": True,          # make the next pool in a background process
}
_ALLOWED = {
    "init": ("random", "pretrained", "auto"),
    "optimizer.name": ("adam", "adamw", "sgd"),
    "scheduler.name": ("constant", "multistep", "cosine", "poly"),
    "train.amp": ("bf16", "fp16", "none"),
    "train.device": ("auto", "cpu", "cuda"),
    "train.backend": ("auto", "gloo", "nccl"),
}


def available_configs(directory: Path = CONFIG_DIR) -> list[str]:
    """Names of the packaged configs (file stems)."""
    return sorted(p.stem for p in directory.glob("*.json"))


def config_path(name_or_path: str | os.PathLike) -> Path:
    """A config file given as a path or as the name of a packaged config (``cmaa``, ``cmaa_smoke``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    packaged = CONFIG_DIR / f"{name_or_path}.json"
    if packaged.is_file() and path.suffix == "":
        return packaged
    known = available_configs()
    close = difflib.get_close_matches(str(name_or_path), known, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    raise TrainingConfigError(f"config {name_or_path!r} is neither a file nor a packaged config{hint}; "
                              f"packaged configs: {', '.join(known)}")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise TrainingConfigError(f"config {path} is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise TrainingConfigError(f"config {path} must hold a JSON object")
    return value


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``update``, nested dicts merged key by key (free-form values replaced)."""
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key not in ("method_config", "sample_cases",
                                                                                         "synthesis"):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _load_file(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise TrainingConfigError(f"config {path} extends itself (through {' -> '.join(p.name for p in seen)})")
    raw = _read_json(path)
    parent = raw.pop("extends", None)
    if parent is None:
        raw.setdefault("name", path.stem)
        return raw
    parent_path = (path.parent / parent)
    if not parent_path.is_file():
        raise TrainingConfigError(f"config {path} extends {parent}, which is not a file in {path.parent}")
    base = _load_file(parent_path, seen + (path,))
    base["name"] = raw.pop("name", path.stem)
    # A variant replaces its parent's method_config only where it says so.
    if "method_config" in raw:
        raw["method_config"] = {**base.get("method_config", {}), **raw["method_config"]}
    return deep_merge(base, raw)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'train.max_steps=10'`` -> (['train', 'max_steps'], 10)."""
    if "=" not in text:
        raise TrainingConfigError(f"override {text!r} must look like section.key=value (e.g. train.max_steps=10)")
    key, value = text.split("=", 1)
    keys = [k for k in key.strip().split(".") if k]
    if not keys:
        raise TrainingConfigError(f"override {text!r} has no key")
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return keys, parsed


def apply_overrides(config: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    config = copy.deepcopy(config)
    for text in overrides:
        keys, value = parse_override(text)
        node = config
        for key in keys[:-1]:
            if not isinstance(node.setdefault(key, {}), dict):
                raise TrainingConfigError(f"override {text!r}: {key} is not a section")
            node = node[key]
        node[keys[-1]] = value
    return config


def _check_keys(config: dict[str, Any], defaults: dict[str, Any], prefix: str = "") -> None:
    for key, value in config.items():
        dotted = f"{prefix}{key}"
        if key not in defaults:
            close = difflib.get_close_matches(key, list(defaults), n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else ""
            raise TrainingConfigError(f"unknown config key {dotted!r}{hint} (known: {', '.join(sorted(defaults))})")
        if dotted in _FREE_FORM:
            if value is not None and not isinstance(value, dict):
                raise TrainingConfigError(f"config key {dotted!r} must be an object")
            continue
        if isinstance(defaults[key], dict):
            if not isinstance(value, dict):
                raise TrainingConfigError(f"config key {dotted!r} must be an object")
            _check_keys(value, defaults[key], dotted + ".")
        elif dotted in _ALLOWED and value not in _ALLOWED[dotted]:
            raise TrainingConfigError(f"config key {dotted!r} is {value!r}; use one of {', '.join(map(str, _ALLOWED[dotted]))}")


def _check_values(config: dict[str, Any]) -> None:
    train, data, opt = config["train"], config["data"], config["optimizer"]

    def positive_int(value, what, allow_none=False):
        if value is None and allow_none:
            return
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise TrainingConfigError(f"{what} must be an integer >= 1, not {value!r}")

    positive_int(train["epochs"], "train.epochs")
    positive_int(train["batch_size"], "train.batch_size")
    positive_int(train["accumulation_steps"], "train.accumulation_steps")
    positive_int(train["steps_per_epoch"], "train.steps_per_epoch", allow_none=True)
    positive_int(train["max_steps"], "train.max_steps", allow_none=True)
    positive_int(train["checkpoint_every_steps"], "train.checkpoint_every_steps")
    positive_int(train["log_every_steps"], "train.log_every_steps")
    positive_int(train["keep_checkpoints"], "train.keep_checkpoints")
    positive_int(data["prepare_workers"], "data.prepare_workers")
    if not isinstance(train["num_workers"], int) or train["num_workers"] < 0:
        raise TrainingConfigError(f"train.num_workers must be an integer >= 0, not {train['num_workers']!r}")
    if not (isinstance(opt["lr"], (int, float)) and opt["lr"] > 0):
        raise TrainingConfigError(f"optimizer.lr must be a positive number, not {opt['lr']!r}")
    fractions = data["split_fractions"]
    if (not isinstance(fractions, list) or len(fractions) != 3 or any(not isinstance(f, (int, float)) or f < 0 for f in fractions)
            or not abs(sum(fractions) - 1.0) < 1e-6 or fractions[0] <= 0):
        raise TrainingConfigError(f"data.split_fractions must be three numbers >= 0 (train > 0) summing to 1, not {fractions!r}")
    if data["folds"] not in (0, 1) and not (isinstance(data["folds"], int) and data["folds"] >= 2):
        raise TrainingConfigError(f"data.folds must be 0 (no cross-validation) or an integer >= 2, not {data['folds']!r}")
    if data["folds"] >= 2 and not (isinstance(data["fold"], int) and 0 <= data["fold"] < data["folds"]):
        raise TrainingConfigError(f"data.fold must be 0 to {data['folds'] - 1}, not {data['fold']!r}")
    jitter = data["box_jitter_px"]
    if not (isinstance(jitter, list) and len(jitter) == 2 and 0 <= jitter[0] <= jitter[1]):
        raise TrainingConfigError(f"data.box_jitter_px must be [low, high] with 0 <= low <= high, not {jitter!r}")
    scale = config["augmentation"]["scale"]
    if not (isinstance(scale, list) and len(scale) == 2 and 0 < scale[0] <= scale[1]):
        raise TrainingConfigError(f"augmentation.scale must be [low, high] with 0 < low <= high, not {scale!r}")
    if not 0.0 <= data["background_ratio"]:
        raise TrainingConfigError("data.background_ratio must be >= 0")
    modalities = data["modalities"]
    if modalities is not None and (not isinstance(modalities, list) or not modalities
                                   or not set(modalities) <= {"t1", "t1ce", "t2", "flair"}):
        raise TrainingConfigError(f"data.modalities must be a non-empty list of t1, t1ce, t2, flair, not {modalities!r}")
    if config["method"] is None:
        raise TrainingConfigError("the config names no method; set \"method\"")
    if data["synthesis"] is not None:
        _check_synthesis(config)
    if config["init_from"] is not None and not (isinstance(config["init_from"], str) and config["init_from"]):
        raise TrainingConfigError(f"init_from must be a run folder or a .safetensors file, not {config['init_from']!r}")


def _check_synthesis(config: dict[str, Any]) -> None:
    """data.synthesis: known keys, sane values, filled in with SYNTHESIS_DEFAULTS (in place)."""
    data = config["data"]
    unknown = set(data["synthesis"]) - set(SYNTHESIS_DEFAULTS)
    if unknown:
        raise TrainingConfigError(f"unknown data.synthesis key(s) {sorted(unknown)} (known: {', '.join(SYNTHESIS_DEFAULTS)})")
    synthesis = data["synthesis"] = {**SYNTHESIS_DEFAULTS, **data["synthesis"]}
    for key in ("cases_per_pool", "pool_epochs", "validation_cases"):
        value = synthesis[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if key == "validation_cases" else 1):
            raise TrainingConfigError(f"data.synthesis.{key} must be an integer >= {0 if key == 'validation_cases' else 1}, "
                                      f"not {value!r}")
    from .synthesis.pools import ranges_named

    try:
        ranges_named(synthesis["ranges"])
    except ValueError as error:
        raise TrainingConfigError(f"data.synthesis.ranges: {error}") from None
    if data["root"] is not None or data["sample_cases"] is not None:
        raise TrainingConfigError("data.synthesis replaces a dataset: leave out data.root and data.sample_cases")
    if config["train"]["steps_per_epoch"] is None:
        raise TrainingConfigError("data.synthesis needs train.steps_per_epoch (an epoch is that many steps on one pool)")


def load_config(name_or_path: str | os.PathLike, overrides: list[str] | None = None) -> dict[str, Any]:
    """The resolved config: file (with ``extends``), overrides, defaults filled in, keys checked."""
    path = config_path(name_or_path)
    raw = apply_overrides(_load_file(path), list(overrides or []))
    _check_keys(raw, DEFAULTS)
    config = deep_merge(DEFAULTS, raw)
    _check_values(config)
    config["source"] = str(path)
    return config


def method_class(config: dict[str, Any]):
    """The registered class of the config's method, or a TrainingConfigError saying why not."""
    from BrainLesionSAMLib.methods import get_method_class, method_names

    try:
        return get_method_class(config["method"])
    except UnknownMethodError:
        raise TrainingConfigError(
            f"config '{config['name']}' trains method '{config['method']}', which is not registered in this "
            f"installation (registered: {', '.join(method_names())}); its module "
            f"BrainLesionSAMLib/methods/{config['method']}.py is missing or did not register it") from None


def smoke_configs() -> dict[str, str]:
    """Method name -> smoke config name, for every packaged ``*_smoke`` config."""
    found = {}
    for name in available_configs():
        if name.endswith(SMOKE_SUFFIX):
            found[_load_file(CONFIG_DIR / f"{name}.json")["method"]] = name
    return found
