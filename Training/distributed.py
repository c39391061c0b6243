"""torch.distributed set-up for torchrun (single process, several GPUs, several nodes).

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; without them the trainer
runs as one process. The backend is NCCL on CUDA and gloo on the CPU unless the config says
otherwise. Rank 0 logs and writes checkpoints; every rank trains.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from BrainLesionSAMLib.engine import resolve_device
from BrainLesionSAMLib.errors import BrainLesionSAMError


@dataclass(frozen=True)
class Context:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    distributed: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return default if value is None else int(value)
    except ValueError:
        raise BrainLesionSAMError(f"environment variable {name}={value!r} is not an integer") from None


def setup(train: dict[str, Any]) -> Context:
    """Join the process group torchrun describes (if any) and choose this process's device."""
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    requested = train["device"]
    if requested == "cuda" or (requested == "auto" and torch.cuda.is_available()):
        resolve_device("cuda")  # a clear error when there is no GPU
        if local_rank >= torch.cuda.device_count():
            raise BrainLesionSAMError(
                f"process with LOCAL_RANK {local_rank} has no GPU ({torch.cuda.device_count()} visible); "
                "start at most one process per GPU (torchrun --nproc_per_node)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    distributed = world_size > 1
    if distributed and not dist.is_initialized():
        backend = train["backend"]
        if backend == "auto":
            backend = "nccl" if device.type == "cuda" else "gloo"
        if backend == "nccl" and device.type != "cuda":
            raise BrainLesionSAMError("train.backend nccl needs CUDA GPUs; use gloo on the CPU")
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                                timeout=datetime.timedelta(minutes=float(train["dist_timeout_minutes"])),
                                **({"device_id": device} if device.type == "cuda" else {}))
    return Context(rank, world_size, local_rank, device, distributed)


def teardown(context: Context) -> None:
    if context.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(context: Context) -> None:
    if context.distributed:
        if context.device.type == "cuda":
            dist.barrier(device_ids=[context.device.index])
        else:
            dist.barrier()


def all_gather_object(context: Context, value: Any) -> list[Any]:
    if not context.distributed:
        return [value]
    gathered: list[Any] = [None] * context.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def broadcast_object(context: Context, value: Any) -> Any:
    """Rank 0's ``value`` on every rank."""
    if not context.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_over_ranks(context: Context, value: torch.Tensor) -> float:
    if context.distributed:
        value = value.detach().clone().to(context.device, torch.float64)
        dist.all_reduce(value)
        value /= context.world_size
    return float(value)


def broadcast_buffers(context: Context, module: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (e.g. BatchNorm statistics, which each rank updates from its
    own batches), so that all ranks validate and end with the same model."""
    if context.distributed:
        for buffer in module.buffers():
            dist.broadcast(buffer.data, src=0)
