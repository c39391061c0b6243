"""The trainer: one loop for every registered method.

It calls only the training contract of :class:`BrainLesionSAMLib.methods.SegmentationMethod`:
``method.training_loss(batch, progress)`` (the method's own loss, deep supervision, two passes,
curricula) with ``progress = epoch / epochs``. It never looks at a method's name; what a batch
holds follows from the method's facts (:mod:`Training.sampling`).

Around that call: torchrun / DistributedDataParallel (the loss goes through DDP's forward by a thin
wrapper module, so gradients are averaged), a ``DistributedSampler`` that balances lesion and
lesion-free slices, mixed precision on CUDA (bf16, or fp16 with a gradient scaler), gradient
accumulation (no all-reduce on the accumulating micro-batches), gradient clipping, the config's
optimiser and LR schedule, full-state checkpoints every N steps with exact resume, CSV (and
TensorBoard when installed) logs written by rank 0, and validation with the library's engine and
metrics after every epoch (or every ``validation.every_epochs``), tracking the best weights.

Outputs in the run folder (``output.dir``, default ``runs/<config name>``):
``config.json`` (resolved), ``metrics.csv``, ``train.log``, ``checkpoints/step_*.pt`` (training
state), ``best.safetensors`` and ``final.safetensors`` (release format, loadable with
``BrainLesionSAMLib.checkpoints.load_method``) and ``run.json`` (summary: steps, times, best
validation, and each rank's weight digest, which must agree).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from BrainLesionSAMLib.checkpoints import save_checkpoint, tensors_sha256
from BrainLesionSAMLib.engine import Box, InferenceEngine
from BrainLesionSAMLib.errors import BrainLesionSAMError
from BrainLesionSAMLib.methods import SegmentationMethod

from . import distributed
from .cache import CachedCase, prepare_cache
from .config import TrainingConfigError, method_class
from .datasets import find_cases, make_splits, read_splits, select_fold, write_splits
from .optim import build_optimizer, build_scheduler
from .sampling import BalancedDistributedSampler, TrainingSamples
from .state import RunLogger, capture_rng, load_latest_state, restore_rng, save_state, write_json

# Test aid: SIGKILL this process right after this optimiser step (before its checkpoint), as a
# crash or a pre-empted cluster job would; the resume test uses it.
KILL_AT_STEP_ENV = "BRAINLESIONSAM_TRAIN_KILL_AT_STEP"
# Keys that may change between an interrupted run and its resumption.
RESUMABLE_CHANGES = {("train", "max_steps"), ("train", "num_workers"), ("train", "checkpoint_every_steps"),
                     ("train", "log_every_steps"), ("train", "keep_checkpoints"), ("train", "threads"),
                     ("train", "dist_timeout_minutes"), ("train", "early_stopping_patience"),
                     ("data", "prepare_workers")}
PRIMARY_STRUCTURES = {"brats": ("WT", "TC", "ET"), "lesion": ("lesion",)}


class TrainingError(BrainLesionSAMError):
    """Training cannot go on (non-finite loss, a run folder that belongs to another config, ...)."""


class TrainingStep(nn.Module):
    """Routes the training contract through ``forward`` so that DistributedDataParallel sees it."""

    def __init__(self, method: SegmentationMethod):
        super().__init__()
        self.method = method

    def forward(self, batch: dict[str, torch.Tensor], progress: float) -> torch.Tensor:
        return self.method.training_loss(batch, progress)


def resolve_paths(config: dict[str, Any]) -> dict[str, Any]:
    """Fill in the run folder, dataset root, cache and split file as absolute paths (in place; the run's
    config.json is then usable from any folder) and return the config."""
    data = config["data"]
    run_dir = Path(config["output"]["dir"] or Path("runs") / config["name"]).absolute()
    config["output"]["dir"] = str(run_dir)
    base = run_dir.parent / "cache"
    if data["synthesis"] is not None:
        from .synthesis import SYNTHESISER_VERSION

        synthesis = data["synthesis"]
        tag = f"synthesis_v{SYNTHESISER_VERSION}_seed{synthesis['seed']}_{synthesis['ranges']}"
        data["cache"] = str(Path(data["cache"] or base / tag).absolute())
        data["root"] = data["cache"]  # nothing is read from a dataset folder
        data["splits"] = None         # the validation cases are the synthesis's own (no split file)
        return config
    if data["root"] is None:
        if data["sample_cases"] is None:
            raise TrainingConfigError(
                f"config '{config['name']}' names no dataset: add data.root=/path/to/dataset (BraTS 2020/2021/"
                "2023 or FCD 2023 folder) to the command line, or data.sample_cases={\"n\": 8} for generated cases")
        sample = {"n": 4, "seed": 0, "resolution": 2, **data["sample_cases"]}
        data["sample_cases"] = sample
        tag = f"sample_n{sample['n']}_seed{sample['seed']}_res{sample['resolution']}"
        data["cache"] = str(data["cache"] or base / tag)
        data["root"] = str(Path(data["cache"]).parent / f"{tag}_cases")
    else:
        data["sample_cases"] = None  # a dataset is given: nothing is generated into it
    data["root"] = str(Path(data["root"]).absolute())
    data["cache"] = str(Path(data["cache"] or base / Path(data["root"]).resolve().name).absolute())
    if data["splits"] is None:
        fractions = "-".join(f"{f:g}" for f in data["split_fractions"])
        folds = f"_{data['folds']}fold" if data["folds"] >= 2 else ""
        data["splits"] = str(Path(data["cache"]) / f"splits_seed{data['split_seed']}_{fractions}{folds}.json")
    data["splits"] = str(Path(data["splits"]).absolute())
    return config


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    kept = {k: v for k, v in config.items() if k not in ("output", "validation", "source")}
    kept = json.loads(json.dumps(kept))
    for section, key in RESUMABLE_CHANGES:
        kept.get(section, {}).pop(key, None)
    return kept


class Trainer:
    def __init__(self, config: dict[str, Any], resume: bool = True, log: Callable[[str], None] = print):
        self.config = resolve_paths(config)
        self.resume = resume
        self._print = log
        self.run_dir = Path(config["output"]["dir"])
        self.context: distributed.Context | None = None
        self.logger: RunLogger | None = None
        self.initial_digest: str | None = None
        self.validation_cache = Path(config["data"]["cache"])  # synthesis: its validation pool's folder
        self.pools = None  # data.synthesis: the PoolMaker

    # -- logging ------------------------------------------------------------------------------------
    def log(self, message: str) -> None:
        if self.context is None or self.context.is_main:
            self._print(message)
            if self.run_dir.is_dir():
                with open(self.run_dir / "train.log", "a", encoding="utf-8") as handle:
                    handle.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}\n")

    # -- data ---------------------------------------------------------------------------------------
    def prepare_data(self) -> dict[str, list[str]]:
        """Generate sample cases if asked, fill the cache (work shared by all ranks), make or read the
        split file; returns {'train', 'validation', 'test'} case ids of the configured fold."""
        context, data = self.context, self.config["data"]
        if data["synthesis"] is not None:
            return self._prepare_synthesis()
        sample = data["sample_cases"]
        if sample is not None and context.is_main:
            from BrainLesionSAMLib.sample import generate_cases

            root = Path(data["root"])
            expected = [root / f"BLSAM_{sample['seed']:04d}_{i:03d}" for i in range(sample["n"])]
            if not all(p.is_dir() for p in expected):
                self.log(f"generating {sample['n']} sample case(s) into {root}")
                root.mkdir(parents=True, exist_ok=True)
                generate_cases(root, sample["n"], seed=sample["seed"], resolution=sample["resolution"], overwrite=True)
        distributed.barrier(context)
        sources = find_cases(data["root"])
        prepare_cache(sources, data["cache"], context.rank, context.world_size, data["prepare_workers"], log=self.log)
        distributed.barrier(context)
        splits_path = Path(data["splits"])
        if context.is_main and not splits_path.exists():
            labelled = [s for s in sources if s.label is not None]
            if not labelled:
                raise TrainingError(f"no case in {data['root']} has a label map; training needs ground truth")
            splits = make_splits(labelled, data["split_seed"], data["split_fractions"], data["folds"])
            write_splits(splits, splits_path)
            self.log(f"wrote case-level split {splits_path}: {len(splits['train'])} train, "
                     f"{len(splits['validation'])} validation, {len(splits['test'])} test case(s)")
        distributed.barrier(context)
        splits = read_splits(splits_path, known_cases=[s.case_id for s in sources])
        return select_fold(splits, data["fold"] if data["folds"] >= 2 else None)

    def _prepare_synthesis(self) -> dict[str, list[str]]:
        """data.synthesis: the fixed validation cases now (every rank waits for them); the training
        pools as the epochs need them (``_pool_samples``)."""
        from .synthesis.pools import VALIDATION_POOL, PoolMaker, case_ids, pool_folder, write_pool

        context, synthesis = self.context, self.config["data"]["synthesis"]
        cache = self.config["data"]["cache"]
        self.validation_cache = pool_folder(cache, VALIDATION_POOL)
        validation = []
        if synthesis["validation_cases"]:
            if context.is_main:
                self.log(f"synthesis: {synthesis['validation_cases']} validation case(s) in {self.validation_cache}")
                write_pool(cache, synthesis["seed"], VALIDATION_POOL, synthesis["validation_cases"], "training", self.log)
            distributed.barrier(context)
            validation = case_ids(VALIDATION_POOL, synthesis["validation_cases"])
        # Rank 0 writes the pools (one background process); the others wait at the barrier.
        self.pools = PoolMaker(cache, synthesis["seed"], synthesis["cases_per_pool"], synthesis["ranges"],
                               log=self.log, background=synthesis["background"] and context.is_main)
        return {"train": [], "validation": validation, "test": []}

    def _pool_samples(self, pool: int, facts) -> tuple[TrainingSamples, list[str]]:
        from .synthesis.pools import case_ids, pool_folder

        context = self.context
        if context.is_main:
            self.pools.ready(pool)
        distributed.barrier(context)
        ids = case_ids(pool, self.config["data"]["synthesis"]["cases_per_pool"])
        dataset = TrainingSamples(pool_folder(self.config["data"]["cache"], pool), ids, facts, self.config["data"],
                                  self.config["augmentation"], log=self.log)
        return dataset, ids

    # -- the run ------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        config, train = self.config, self.config["train"]
        cls = method_class(config)  # a clear error before anything else when the method is not registered
        self.context = context = distributed.setup(train)
        threads = torch.get_num_threads()
        try:
            if train["threads"]:
                torch.set_num_threads(int(train["threads"]))
            if context.is_main:
                self.run_dir.mkdir(parents=True, exist_ok=True)
            distributed.barrier(context)
            return self._run(cls)
        finally:
            torch.set_num_threads(threads)  # a caller's process (a notebook, a test run) keeps its setting
            if self.pools is not None:
                self.pools.close()  # a pool still being made for an epoch that will not come
            if self.logger is not None:
                self.logger.close()
            distributed.teardown(context)

    def _build_method(self, cls) -> SegmentationMethod:
        config = self.config
        torch.manual_seed(config["train"]["seed"])  # the same initial weights on every rank and run
        method = None
        if config["init"] in ("pretrained", "auto"):
            method = cls.pretrained(**config["method_config"])
            if method is None and config["init"] == "pretrained":
                raise TrainingConfigError(f"method '{cls.facts.name}' has no pretrained weights; use \"init\": \"random\"")
            if method is not None:
                self.log(f"initial weights: {cls.facts.name}.pretrained()")
        method = method if method is not None else cls(**config["method_config"])
        if config["init_from"] is not None:
            if self.resume and any(self.run_dir.glob("checkpoints/step_*.pt")):
                # Resuming: the run's own checkpoint replaces every weight (init_from only started it).
                self.log(f"init_from {config['init_from']}: not read, the run resumes from its own checkpoint")
            else:
                self._load_initial_weights(method, config["init_from"])
        return method

    def _load_initial_weights(self, method: SegmentationMethod, source: str) -> None:
        """``init_from``: every tensor of the method from a run's ``final.safetensors`` (or the given
        ``.safetensors`` file), checked against its sha256 and adapted by the method where its
        configuration differs (``adapt_initial_state``: 2D weights into a 2.5D unet2d); a new run starts
        from them (not a resume: optimiser, schedule and step start afresh)."""
        from BrainLesionSAMLib.checkpoints import load_checkpoint
        from BrainLesionSAMLib.errors import WeightsError

        path = Path(source)
        path = path / "final.safetensors" if path.is_dir() else path
        if not path.is_file():
            raise TrainingConfigError(f"init_from: {path} does not exist; give a finished run folder (one that "
                                      "holds final.safetensors) or a .safetensors checkpoint")
        try:
            state, header = load_checkpoint(path, expected_method=method.facts.name)
            adapted = method.adapt_initial_state(state)
            method.load_state_dict(adapted, strict=True)
        except (WeightsError, RuntimeError) as error:
            raise TrainingConfigError(f"init_from {path} does not fit method '{method.facts.name}' as configured "
                                      f"here: {error}") from None
        expected = header["sha256"] if adapted is state else tensors_sha256(adapted)
        if tensors_sha256(method.state_dict()) != expected:
            raise TrainingError(f"init_from {path}: the loaded weights differ from the file's (dtype conversion?)")
        self.log(f"initial weights: {path} (config {header.get('training_config')}, "
                 f"{header.get('training_steps')} steps, sha256 {header['sha256'][:12]})")

    def _run(self, cls) -> dict[str, Any]:
        config, train, context = self.config, self.config["train"], self.context
        started = time.perf_counter()
        if self.resume:
            state = load_latest_state(self.run_dir, map_location="cpu")
        else:
            state = None
            if any(self.run_dir.glob("checkpoints/step_*.pt")):
                raise TrainingError(f"{self.run_dir} holds a run already; resume it (leave out --no-resume) or "
                                    "choose another output.dir")
        if state is not None:
            saved = json.loads(state["config"])
            if _comparable(saved) != _comparable(config):
                raise TrainingError(f"{self.run_dir} holds a run of a different config ({saved.get('source')}); "
                                    "choose another output.dir, or resume with the same config")
        if context.is_main:
            write_json(self.run_dir / "config.json", config)
        self.log(f"method {cls.facts.name}; {context.world_size} process(es) on {context.device.type}"
                 + (f"; resuming from {state['path']} (step {state['step']})" if state else ""))

        split = self.prepare_data()
        # The instance's facts: a method's config may change them (e.g. a 3D patch size, the modality
        # a box-prompt method segments on).
        method = self._build_method(cls)
        facts = method.facts
        synthesis = config["data"]["synthesis"]
        pool_epochs = synthesis["pool_epochs"] if synthesis is not None else None
        first_epoch = int(state["step"]) // train["steps_per_epoch"] if (state is not None and synthesis) else 0
        pool = first_epoch // pool_epochs if synthesis is not None else None
        if synthesis is not None:
            dataset, _ = self._pool_samples(pool, facts)
        else:
            dataset = TrainingSamples(config["data"]["cache"], split["train"], facts, config["data"],
                                      config["augmentation"], log=self.log)
        batch, accumulation = train["batch_size"], train["accumulation_steps"]
        samples_per_epoch = None
        if train["steps_per_epoch"] is not None:
            samples_per_epoch = train["steps_per_epoch"] * batch * accumulation * context.world_size
        sampler = BalancedDistributedSampler(dataset, context.world_size, context.rank, seed=train["seed"],
                                             background_ratio=config["data"]["background_ratio"],
                                             samples_per_epoch=samples_per_epoch)
        per_process = sampler.epoch_length()
        steps_per_epoch = per_process // (batch * accumulation)
        if steps_per_epoch < 1:
            raise TrainingConfigError(
                f"an epoch has {per_process} sample(s) per process, fewer than one step of batch {batch} x "
                f"accumulation {accumulation}; lower train.batch_size or use more cases")
        total_steps = train["max_steps"] or train["epochs"] * steps_per_epoch
        epochs = math.ceil(total_steps / steps_per_epoch)
        if synthesis is not None and self.pools is not None:
            self.pools.stop_after((epochs - 1) // pool_epochs)
        generator = torch.Generator().manual_seed(train["seed"])  # keeps DataLoader seeding off the global RNG

        def make_loader(dataset: TrainingSamples, sampler: BalancedDistributedSampler) -> DataLoader:
            return DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=train["num_workers"],
                              drop_last=True, generator=generator, pin_memory=context.device.type == "cuda",
                              persistent_workers=False)

        loader = make_loader(dataset, sampler)
        validation_cases = split["validation"][: config["validation"]["max_cases"] or None]
        if synthesis is not None:
            self.log(f"synthesis: a pool of {synthesis['cases_per_pool']} new case(s) every {pool_epochs} epoch(s), "
                     f"seed {synthesis['seed']}, ranges '{synthesis['ranges']}'")
        self.log(f"{len(dataset.cases)} training case(s), {per_process * context.world_size} samples per epoch, "
                 f"{steps_per_epoch} step(s) per epoch of {batch} x {accumulation} x {context.world_size} samples; "
                 f"{total_steps} step(s) = {epochs} epoch(s); {len(validation_cases)} validation case(s)")

        method = method.to(context.device)
        self.initial_digest = tensors_sha256(method.state_dict()) if state is None else state.get("initial_weight_sha256")
        method.train()
        wrapper: nn.Module = TrainingStep(method)
        if train["sync_batchnorm"] and context.distributed:
            wrapper = nn.SyncBatchNorm.convert_sync_batchnorm(wrapper)
            method = wrapper.method
        optimizer = build_optimizer(method.parameters(), config["optimizer"])
        scheduler = build_scheduler(optimizer, config["scheduler"], steps_per_epoch, total_steps)
        cuda = context.device.type == "cuda"
        amp = train["amp"] if cuda else "none"
        if amp == "bf16" and not torch.cuda.is_bf16_supported():
            amp = "fp16"
        scaler = torch.amp.GradScaler("cuda", enabled=amp == "fp16")
        step, best = 0, {"score": None, "step": None, "metrics": {}, "stale": 0}
        if state is not None:
            method.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            step, best = int(state["step"]), dict(state["best"])
            if state["world_size"] == context.world_size:
                restore_rng(state["rng"][context.rank], context.device)
            else:
                warnings.warn(f"resuming a {state['world_size']}-process run with {context.world_size} processes: "
                              "the data order and random states differ from an uninterrupted run", stacklevel=2)
                torch.manual_seed(train["seed"] + 1000 * step + context.rank)
        else:
            torch.manual_seed(train["seed"] + context.rank)  # dropout etc. differ between ranks
        model = wrapper
        if context.distributed:
            model = DistributedDataParallel(wrapper, device_ids=[context.device.index] if cuda else None,
                                            find_unused_parameters=train["find_unused_parameters"])
        if context.is_main:
            self.logger = RunLogger(self.run_dir, step if state is not None else None, log=self.log)
        kill_at = int(os.environ.get(KILL_AT_STEP_ENV, "0") or 0)
        clip_prefixes = train["grad_clip_parameters"]
        clipped = [p for n, p in method.named_parameters() if p.requires_grad
                   and (clip_prefixes is None or any(n.startswith(prefix) for prefix in clip_prefixes))]
        if train["grad_clip_norm"] and not clipped:
            raise TrainingConfigError(f"train.grad_clip_parameters {clip_prefixes} match no trainable parameter of "
                                      f"method '{facts.name}'")
        autocast = (torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)
                    if amp != "none" else contextlib.nullcontext())
        log_every, interval_loss, interval_steps, interval_start = train["log_every_steps"], 0.0, 0, time.perf_counter()
        stop = False

        while step < total_steps and not stop:
            epoch = step // steps_per_epoch
            if synthesis is not None and epoch // pool_epochs != pool:
                # A new pool: its cases replace the last pool's (the sampler keeps its seed and epoch
                # numbering, so the draw order is a function of the step alone, as without synthesis).
                pool = epoch // pool_epochs
                dataset, _ = self._pool_samples(pool, facts)
                sampler = BalancedDistributedSampler(dataset, context.world_size, context.rank, seed=train["seed"],
                                                     background_ratio=config["data"]["background_ratio"],
                                                     samples_per_epoch=samples_per_epoch)
                loader = make_loader(dataset, sampler)
            sampler.set_epoch(epoch)
            sampler.set_start((step % steps_per_epoch) * batch * accumulation)
            batches = iter(loader)
            progress = epoch / epochs
            while step < total_steps:
                optimizer.zero_grad(set_to_none=True)
                step_loss = torch.zeros((), device=context.device)
                for micro in range(accumulation):
                    inputs = {k: v.to(context.device, non_blocking=True) for k, v in next(batches).items()}
                    sync = model.no_sync() if (context.distributed and micro < accumulation - 1) else contextlib.nullcontext()
                    with sync:
                        with autocast:
                            loss = model(inputs, progress)
                        if not torch.isfinite(loss):
                            raise TrainingError(f"the loss is {loss.item()} at step {step + 1} (process {context.rank}); "
                                                "lower optimizer.lr, use train.amp=bf16 or none, or check the data")
                        scaler.scale(loss.float() / accumulation).backward()
                    step_loss += loss.detach().float() / accumulation
                if train["grad_clip_norm"]:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(clipped, float(train["grad_clip_norm"]))
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                step += 1
                interval_loss += float(step_loss)
                interval_steps += 1
                if step == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                if step % log_every == 0 or step == total_steps:
                    mean_loss = distributed.mean_over_ranks(context, torch.tensor(interval_loss / interval_steps))
                    seconds = (time.perf_counter() - interval_start) / interval_steps
                    if self.logger is not None:
                        self.logger.scalars(step, epoch, {"train/loss": mean_loss, "train/lr": optimizer.param_groups[0]["lr"],
                                                          "train/seconds_per_step": seconds})
                    self.log(f"step {step}/{total_steps} epoch {epoch + 1}/{epochs} loss {mean_loss:.4f} "
                             f"lr {optimizer.param_groups[0]['lr']:.3g} {seconds:.2f} s/step")
                    interval_loss, interval_steps, interval_start = 0.0, 0, time.perf_counter()
                epoch_done = step % steps_per_epoch == 0 or step == total_steps
                every = config["validation"]["every_epochs"]
                if epoch_done and every and ((step - 1) // steps_per_epoch + 1) % every == 0 and validation_cases:
                    stop = self._validate(method, validation_cases, step, epoch, best) or stop
                if step % train["checkpoint_every_steps"] == 0 and step < total_steps and not stop:
                    self._checkpoint(method, optimizer, scheduler, scaler, step, epoch, best)
                if epoch_done or stop:
                    break

        distributed.broadcast_buffers(context, method)
        digests = distributed.all_gather_object(context, tensors_sha256(method.state_dict()))
        if len(set(digests)) != 1:
            raise TrainingError(f"the processes end with different weights (sha256 {digests}); "
                                "distributed training did not keep them in sync")
        if train["save_final_state"]:
            self._checkpoint(method, optimizer, scheduler, scaler, step, max(0, (step - 1) // steps_per_epoch), best)
        summary = {"config": config["name"], "method": facts.name, "steps": step, "planned_steps": total_steps,
                   "steps_per_epoch": steps_per_epoch, "epochs": epochs, "world_size": context.world_size,
                   "device": str(context.device), "amp": amp, "seconds": round(time.perf_counter() - started, 3),
                   "best": best, "initial_weight_sha256": self.initial_digest, "rank_weight_sha256": digests, "stopped_early": stop,
                   "tensorboard": bool(self.logger and self.logger.tensorboard is not None),
                   "train_cases": self._train_case_count(dataset, step, steps_per_epoch),
                   "validation_cases": len(validation_cases)}
        if context.is_main:
            final = save_checkpoint(method, self.run_dir / "final.safetensors",
                                    training_data=self._training_data(dataset, step),
                                    extra={"training_config": config["name"], "training_steps": step})
            summary["final"] = str(final)
            write_json(self.run_dir / "run.json", summary)
            self.log(f"done: {step} steps in {summary['seconds']:.1f} s; wrote {final}")
        distributed.barrier(context)
        return summary

    def _train_case_count(self, dataset: TrainingSamples, step: int, steps_per_epoch: int) -> int:
        """Distinct training cases the run has used (synthesis: every pool so far)."""
        synthesis = self.config["data"]["synthesis"]
        if synthesis is None:
            return len(dataset.cases)
        pools = (max(step - 1, 0) // steps_per_epoch) // synthesis["pool_epochs"] + 1
        return pools * synthesis["cases_per_pool"]

    def _training_data(self, dataset: TrainingSamples, step: int) -> str:
        data = self.config["data"]
        if data["synthesis"] is not None:
            from .synthesis import SYNTHESISER_VERSION

            synthesis = data["synthesis"]
            steps_per_epoch = self.config["train"]["steps_per_epoch"]
            return (f"Training.synthesis v{SYNTHESISER_VERSION} (ranges '{synthesis['ranges']}', seed "
                    f"{synthesis['seed']}): {self._train_case_count(dataset, step, steps_per_epoch)} synthetic cases, "
                    f"{synthesis['cases_per_pool']} per pool of {synthesis['pool_epochs']} epoch(s); "
                    f"config {self.config['name']}, {step} steps")
        fold = f", fold {data['fold']} of {data['folds']}" if data["folds"] >= 2 else ""
        return (f"{data['root']}: {len(dataset.cases)} training cases (split {Path(data['splits']).name}{fold}); "
                f"config {self.config['name']}, {step} steps")

    def _checkpoint(self, method, optimizer, scheduler, scaler, step: int, epoch: int, best: dict) -> None:
        context = self.context
        rng = distributed.all_gather_object(context, capture_rng(context.device))
        if context.is_main:
            path = save_state(self.run_dir, {
                "step": step, "epoch": epoch, "world_size": context.world_size, "config": json.dumps(self.config),
                "model": method.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(), "rng": rng, "best": best,
                "initial_weight_sha256": self.initial_digest,
            }, keep=self.config["train"]["keep_checkpoints"])
            self.log(f"saved {path}")
        distributed.barrier(context)

    # -- validation ---------------------------------------------------------------------------------
    def _validate(self, method: SegmentationMethod, case_ids: list[str], step: int, epoch: int, best: dict) -> bool:
        """Validate, log, keep the best weights; returns True when early stopping says stop."""
        context, config = self.context, self.config
        distributed.broadcast_buffers(context, method)
        devices = [context.device] if context.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # validation must not shift the training's random draws
            rows = validate(method, self.validation_cache, case_ids[context.rank::context.world_size],
                            context.device, config["validation"]["batch_size"], amp=config["train"]["amp"] != "none",
                            modalities=config["data"]["modalities"])
        method.train()
        rows = [row for part in distributed.all_gather_object(context, rows) for row in part]
        summary = summarize(rows, method.facts.label_set)
        improved = best["score"] is None or summary["val/score"] > best["score"]
        if improved:
            best.update(score=summary["val/score"], step=step, metrics=summary, stale=0)
        else:
            best["stale"] += 1
        if context.is_main:
            self.logger.scalars(step, epoch, summary)
            self.log(f"validation after epoch {epoch + 1}: " + "  ".join(
                f"{k[4:]}={v:.4f}" for k, v in summary.items() if k.endswith("_dice") or k == "val/score"))
            if improved:
                save_checkpoint(method, self.run_dir / "best.safetensors", training_data=f"best validation score "
                                f"{summary['val/score']:.4f} at step {step}",
                                extra={"training_config": config["name"], "training_steps": step,
                                       "validation": {k[4:]: v for k, v in summary.items()}})
        distributed.barrier(context)
        patience = config["train"]["early_stopping_patience"]
        if patience is not None and best["stale"] >= patience:
            self.log(f"early stopping: no improvement in {patience} validation(s) since step {best['step']}")
            return True
        return False


def ground_truth_box(labels: np.ndarray) -> Box | None:
    """The box (voxel indices, inclusive) around every lesion voxel, None when there is none."""
    points = np.argwhere(np.asarray(labels) > 0)
    if len(points) == 0:
        return None
    (z0, y0, x0), (z1, y1, x1) = points.min(0), points.max(0)
    return Box(int(x0), int(y0), int(z0), int(x1), int(y1), int(z1))


def validate(method: SegmentationMethod, cache_dir, case_ids: list[str], device, batch_size: int = 8,
             amp: bool = True, prediction_dir: Path | None = None,
             modalities: list[str] | None = None, lesion_wise: bool = False) -> list[dict[str, Any]]:
    """Segment cached cases with the library's engine and score them with the library's metrics.

    Promptable methods get the ground truth's box (the box workflow; a case without lesion is left
    out for them). With ``prediction_dir`` the label maps are also written there as
    ``<case>.nii.gz`` on the case's reference grid; ``modalities`` restricts the input further (a
    model trained on a subset). Returns one row per case:
    {'case': id, '<structure>_<metric>': value, ...} (``metrics.flatten_results``)."""
    import SimpleITK as sitk

    from BrainLesionSAMLib.io import write_image
    from BrainLesionSAMLib.metrics import evaluate_labels, flatten_results

    if prediction_dir is not None:
        Path(prediction_dir).mkdir(parents=True, exist_ok=True)

    facts = method.facts
    # PyTorch's encoder: the weights change between validations, and OpenVINO would convert them anew each time
    engine = InferenceEngine(method, device=device, batch_size=batch_size, amp=amp, encoder_runtime="torch")
    rows = []
    for case_id in case_ids:
        cached = CachedCase.open(cache_dir, case_id)
        labels = np.asarray(cached.labels)
        prepared = cached.prepared_case([m for m in facts.modalities if m in (modalities or facts.modalities)])
        box = ground_truth_box(labels) if facts.promptable else None
        if facts.promptable and box is None:
            continue  # nothing to prompt: the box workflow does not apply
        result = engine.segment(prepared, box=box)
        if prediction_dir is not None:
            write_image(result.labels, Path(prediction_dir) / f"{case_id}.nii.gz")
        prediction = sitk.GetArrayFromImage(result.labels)
        truth = (labels > 0).astype(np.uint8) if facts.label_set == "lesion" else labels
        metrics = evaluate_labels(prediction, truth, cached.spacing_zyx, label_set=facts.label_set,
                                  lesion_wise=lesion_wise)
        rows.append({"case": case_id, **flatten_results(metrics)})
    return rows


def summarize(rows: list[dict[str, Any]], label_set: str) -> dict[str, float]:
    """Means over cases as 'val/<column>', plus 'val/score': the mean Dice of the primary
    structures (WT, TC, ET for BraTS sub-regions; the lesion otherwise)."""
    if not rows:
        return {"val/score": float("nan")}
    columns = [k for k in rows[0] if k != "case"]
    summary = {f"val/{c}": float(np.mean([row[c] for row in rows])) for c in columns}
    summary["val/score"] = float(np.mean([summary[f"val/{s}_dice"] for s in PRIMARY_STRUCTURES[label_set]]))
    return summary
