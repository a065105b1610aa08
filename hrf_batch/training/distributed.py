"""Training on several processes with DistributedDataParallel, as ``torchrun`` launches it.

``torchrun --nproc_per_node N -m hrf_batch train ...`` sets RANK, WORLD_SIZE and LOCAL_RANK (and
where to meet); a process started without them trains alone. The process group uses NCCL on CUDA
(one GPU per process, by LOCAL_RANK) and Gloo on the CPU. Process 0 decides what all share (the
normalisation, restarts) and is the only one that writes files.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from hrf_batch.errors import HrfBatchError


@dataclass(frozen=True)
class Processes:
    """This process's place among the training processes (rank 0 of 1 when training alone)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def share(self, value: Any) -> Any:
        """Process 0's ``value``, on every process (any picklable object)."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def wait_for_all(self) -> None:
        if self.distributed:
            dist.barrier()

    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """The model that takes training steps: gradients averaged over processes when distributed."""
        if not self.distributed:
            return model
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def processes_from_env(env: Mapping[str, str] = os.environ) -> Processes:
    """RANK, WORLD_SIZE and LOCAL_RANK as ``torchrun`` sets them; alone when WORLD_SIZE is unset."""
    if "WORLD_SIZE" not in env:
        return Processes()
    try:
        world, rank, local = int(env["WORLD_SIZE"]), int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0"))
    except ValueError as exc:
        raise HrfBatchError(f"WORLD_SIZE, RANK and LOCAL_RANK must be numbers ({exc})",
                            "launch with torchrun, or unset them to train in one process") from exc
    if world < 1 or not 0 <= rank < world or local < 0:
        raise HrfBatchError(f"rank {rank} of world size {world} (local rank {local}) is impossible",
                            "launch with torchrun, or unset WORLD_SIZE to train in one process")
    return Processes(rank, world, local)


def process_device(procs: Processes, device: torch.device) -> torch.device:
    """One GPU per process on CUDA (by local rank); the CPU is shared."""
    if device.type != "cuda" or not procs.distributed:
        return device
    if procs.local_rank >= torch.cuda.device_count():
        raise HrfBatchError(f"local rank {procs.local_rank} has no GPU ({torch.cuda.device_count()} visible)",
                            "start at most one process per GPU (torchrun --nproc_per_node)")
    torch.cuda.set_device(procs.local_rank)
    return torch.device("cuda", procs.local_rank)


@contextmanager
def process_group(procs: Processes, device: torch.device) -> Iterator[None]:
    """Join the training processes for the duration of the block (nothing to join when alone)."""
    if not procs.distributed or dist.is_initialized():
        yield
        return
    try:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=procs.rank, world_size=procs.world_size)
    except (ValueError, RuntimeError) as exc:
        raise HrfBatchError(f"cannot join the {procs.world_size} training processes: {exc}",
                            "launch with torchrun, which sets MASTER_ADDR and MASTER_PORT") from exc
    try:
        yield
    finally:
        dist.destroy_process_group()
