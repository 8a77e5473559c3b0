"""Training data: epoch-seeded permutations that restart at any step, on any number of ranks, and the
per-micro-batch seeding that makes a resumed or re-split run draw what an uninterrupted one would.
"""
from __future__ import annotations

import signal
from contextlib import contextmanager

import torch

from sandbox.config.schema import TrainConfig
from sandbox.core.checks import check_labels
from sandbox.errors import UserError
from sandbox.run import distributed


class ResumableBatchSampler(torch.utils.data.Sampler):
    """One rank's micro-batches of per-epoch permutations seeded by (seed, epoch), from any micro-batch on.

    Replaces ``DistributedSampler``, which deals each rank every world_size-th index of the
    permutation (so what a rank sees depends on how many ranks there are) and can only start an
    epoch at its beginning. Here each global batch (batch_size x world_size x accum images) is a
    contiguous slice of the permutation, cut into world_size x accum micro-batches; global
    micro-batch j = a * world_size + rank goes to ``rank`` at accumulation step a. So the same
    global batches are drawn whatever the split into ranks and accumulation steps, and a resumed
    run -- on any number of ranks -- continues exactly where the last one stopped.
    """

    def __init__(self, n: int, batch_size: int, seed: int, start: int = 0, rank: int = 0, world_size: int = 1,
                 accum: int = 1):
        self.n, self.batch_size, self.seed, self.start = n, batch_size, seed, start
        self.rank, self.world_size, self.accum = rank, world_size, accum
        self.global_batch = batch_size * world_size * accum
        if n < self.global_batch:
            raise UserError(f"the dataset has {n} images, fewer than one global batch ({self.global_batch} = "
                            f"{batch_size} per rank x {world_size} ranks x {accum} accumulation steps); "
                            "lower --train.batch_size or --train.grad_accum")
        self.per_epoch = n // self.global_batch  # optimizer steps per epoch; the ragged end is dropped (official)

    def __iter__(self):
        k = self.start  # this rank's micro-batch counter: step * accum + a
        while True:
            epoch, rest = divmod(k, self.per_epoch * self.accum)
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
            for kk in range(rest, self.per_epoch * self.accum):
                s, a = divmod(kk, self.accum)
                lo = s * self.global_batch + (a * self.world_size + self.rank) * self.batch_size
                yield perm[lo : lo + self.batch_size].tolist()
            k = (epoch + 1) * self.per_epoch * self.accum

    def __len__(self) -> int:  # infinite stream; len is one epoch for DataLoader's bookkeeping
        return self.per_epoch * self.accum


def _ignore_stop_signals(worker_id: int) -> None:
    """Loader workers ignore SIGINT/SIGTERM (a Ctrl-C reaches the whole process group): the main process
    finishes its step, saves a checkpoint and shuts them down, instead of dying on a lost worker."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def batches(dataset, tc: TrainConfig, seed: int, start_step: int, device: torch.device,
            dist_info: distributed.DistInfo = distributed.DistInfo(), labelled: bool = False):
    """(images, labels) micro-batches on ``device`` from micro-batch ``start_step * grad_accum`` on; labels are the
    conditioning data ((B,) class indices, or a dict of fields). ``labelled``: the labels condition the model, so
    each batch's are checked against the dataset's classes first."""
    start_micro = start_step * tc.grad_accum
    sampler = ResumableBatchSampler(len(dataset), tc.batch_size, seed, start_micro, dist_info.rank,
                                    dist_info.world_size, tc.grad_accum)
    # the loader draws its worker base seed from `generator`, not from the global RNG that dropout uses
    # (otherwise creating it after a resume would shift every later dropout mask)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=tc.num_workers,
                                         pin_memory=device.type == "cuda", persistent_workers=tc.num_workers > 0,
                                         generator=torch.Generator().manual_seed(seed + start_micro),
                                         worker_init_fn=_ignore_stop_signals if tc.num_workers > 0 else None)
    with open_loader(loader) as stream:  # close() on this generator (or an error in it) stops the workers
        for images, labels in stream:
            if labelled:
                check_labels(dataset, labels)  # on the CPU, before they move: no device sync
            yield images.to(device, non_blocking=True), to_device(labels, device)


def to_device(data, device: torch.device):
    """A batch's conditioning data (labels (B,), or a dict of fields: tensors and lists of strings) on ``device``."""
    if isinstance(data, dict):
        return {name: to_device(value, device) for name, value in data.items()}
    return data.to(device, non_blocking=True) if isinstance(data, torch.Tensor) else data


@contextmanager
def open_loader(loader: torch.utils.data.DataLoader):
    """Iterate ``loader`` and stop its worker processes when the block ends, however it ends.

    Left to Python's exit, the workers are never stopped cleanly: torch's own shutdown is a no-op once the
    interpreter is exiting, and multiprocessing then sends them SIGTERM -- which our workers ignore
    (``_ignore_stop_signals``) -- and joins them without a timeout, so a finished run hung after "done".
    """
    stream = iter(loader)
    try:
        yield stream
    finally:
        shutdown = getattr(stream, "_shutdown_workers", None)  # absent without workers
        if shutdown is not None:
            shutdown()  # a stop message to each worker, then join (torch kills one that does not answer)
        for worker in getattr(stream, "_workers", ()):
            if worker.is_alive():  # SIGTERM, torch's last resort, is ignored by ours
                worker.kill()
                worker.join()


def seed_micro_batch(generator: torch.Generator, seed: int, step: int, micro: int) -> None:
    """Seed the randomness of global micro-batch ``micro`` of ``step``: the trainer's generator (masks,
    label drop, timesteps, noise) and torch's global RNG (dropout).

    Keyed by what is computed rather than by who computes it, so 1 process with accumulation 2 and
    2 processes without draw the same numbers for the same images, and a resumed run (on any
    number of ranks) draws what an uninterrupted one would without restoring RNG state.
    """
    generator.manual_seed(distributed.derive_seed(seed, step, micro))
    torch.manual_seed(distributed.derive_seed(seed, step, micro, "dropout"))
