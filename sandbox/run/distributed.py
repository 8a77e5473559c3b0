"""Multi-process runs under ``torchrun``: process group, ranks, and the few collectives the core needs.

``torchrun --nproc_per_node N -m sandbox train ...`` starts N processes and
gives each RANK, WORLD_SIZE, LOCAL_RANK and a rendezvous address;
``session()`` turns that into torch's default process group (NCCL between
GPUs, gloo between CPU processes) and tears it down afterwards. Without
torchrun every helper here is a cheap no-op, so single-process code paths
do not change.

Randomness is keyed by *what* is computed, not by *who* computes it:
``derive_seed(seed, step, j)`` seeds global micro-batch j of a step and
sampling chunk k (``batch_size`` images) is seeded by (seed, k), so a run gives
the same result on 1 or N ranks (up to float reduction order).

References:
    PyTorch distributed docs (torchrun environment variables, init_process_group, DistributedDataParallel);
    Goyal et al. 2017, "Accurate, Large Minibatch SGD" (global batch = per-GPU batch x GPUs; lr scaling).
"""
from __future__ import annotations

import functools
import hashlib
import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: rank (global), world size, local rank (its GPU on the node)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def info() -> DistInfo:
    """The current process's place in the process group (rank 0 of 1 without one)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return DistInfo()


def launched_with_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def _wants_cuda(device: str) -> bool:
    return device != "cpu" and not device.startswith("cpu") and torch.cuda.is_available()


@contextmanager
def session(device: str = "auto", timeout_minutes: float = 30.0):
    """Join the process group torchrun describes (NCCL for CUDA, gloo for CPU) and leave it on exit.

    A no-op without torchrun, and re-entrant: if a group already exists (a caller or a test made
    one), it is used and left alone.
    """
    if not launched_with_torchrun() or not dist.is_available() or dist.is_initialized():
        yield info()
        return
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = _wants_cuda(device)
    if cuda:
        torch.cuda.set_device(local_rank)  # one GPU per process, picked by its local rank
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(minutes=timeout_minutes))
    try:
        yield info()
    finally:
        dist.destroy_process_group()


def local_device(device: torch.device) -> torch.device:
    """``cuda`` means this process's GPU (cuda:LOCAL_RANK) in a multi-process run."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", info().local_rank if info().enabled else torch.cuda.current_device())
    return device


def derive_seed(*parts) -> int:
    """A 63-bit seed from any tuple of ints/strings (stable across runs, processes and machines)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


# --------------------------------------------------------------------------------------
# Collectives (no-ops in a single process)
# --------------------------------------------------------------------------------------
def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum a few floats over the ranks (one small all-reduce)."""
    if not info().enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def barrier() -> None:
    if info().enabled:
        dist.barrier()


@functools.lru_cache(maxsize=None)
def _cpu_group():
    """A gloo group over all ranks for CPU objects (pickled images), also when the default group is NCCL."""
    if dist.get_backend() == "gloo":
        return None  # the default group already is one
    return dist.new_group(backend="gloo")


def gather_objects(obj, dst: int | None = 0) -> list | None:
    """Every rank's ``obj`` as a list indexed by rank: on rank ``dst`` only (None elsewhere), or on all ranks
    with ``dst=None``. Travels through a gloo group, so large CPU payloads never pass through GPU memory."""
    me = info()
    if not me.enabled:
        return [obj]
    group = _cpu_group()
    if dst is None:
        out = [None] * me.world_size
        dist.all_gather_object(out, obj, group=group)
        return out
    out = [None] * me.world_size if me.rank == dst else None
    dist.gather_object(obj, out, dst=dst, group=group)
    return out
