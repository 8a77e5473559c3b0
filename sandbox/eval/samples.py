"""Sample sets: images generated in seeded chunks, split over ranks, and evaluation sets kept on disk.

Batched generation (``generate_many``, ``generate_distributed``): chunk k of a label list is generated as one
batch with generator seed (seed, k), so a seed fixes the set whoever generates which chunk.

Image i of an evaluation set of N has class i % K and belongs to chunk i // chunk_size; chunk k is
generated as one batch with generator seed (seed, k). An image therefore depends only on (seed, i,
chunk_size, N) -- not on which process makes it or on what else that process makes -- so the index list
can be split across ranks (rank r takes chunks r, r+W, ...) and the set is the same for any number of
ranks. The set is written as an .npz in the run directory, keyed by everything that fixes it, so a run
can be scored again (another reference, another metric) without sampling again.

References:
    ADM evaluation suite (Dhariwal & Nichol 2021): 50k class-balanced samples in one .npz; MAR sec. 5 (FID-50K).
"""
from __future__ import annotations

import hashlib
import json
import sys
import zipfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from sandbox.core.sampling import batch_size as rows_of
from sandbox.core.sampling import generate, take_rows
from sandbox.errors import UserError
from sandbox.fast.sampling import speed_kwargs
from sandbox.images.io import read_image_set, save_npz, to_uint8


# --------------------------------------------------------------------------------------
# Batched generation
# --------------------------------------------------------------------------------------
def balanced_labels(num_images: int, num_classes: int, device="cpu") -> Tensor:
    """Labels that cycle through the classes: 0, 1, ..., K-1, 0, 1, ..."""
    return torch.arange(num_images, device=device) % num_classes


def conditioning_for(condition, dataset, labels: Tensor):
    """The conditioning data that asks a model's ``condition`` for the classes ``labels`` (B,): the labels for a
    condition that reads them, else the dataset's (``Dataset.conditioning``: prompts, condition images), with one
    error line when the dataset cannot ask that condition (it gives no such field)."""
    if condition.field == "label":
        return labels
    data = dataset.conditioning(labels)
    if not isinstance(data, dict) or condition.field not in data:
        given = sorted(data) if isinstance(data, dict) else "class labels"
        raise UserError(f"condition {type(condition).__name__} reads {condition.field!r}, but dataset "
                        f"{type(dataset).__name__} asks for a class with {given}; give the data yourself (sample: "
                        "--prompt / --prompts; Python: sandbox.generate(run, prompts=...))")
    return data


def data_key(data) -> str:
    """A short digest of conditioning data (prompts, images): part of an evaluation set's settings."""
    h = hashlib.sha1()
    for name in sorted(data) if isinstance(data, dict) else [None]:
        value = data[name] if name is not None else data
        h.update(str(name).encode())
        h.update(value.cpu().numpy().tobytes() if isinstance(value, Tensor) else json.dumps(list(value)).encode())
    return h.hexdigest()[:12]


def chunk_seed(seed: int, chunk: int) -> int:
    """The generator seed of sampling chunk ``chunk``: chunks are seeded by their index, not by who samples them."""
    return seed * 1_000_003 + chunk


def chunk_generator(seed: int, k: int, device) -> torch.Generator:
    """The generator of sampling chunk k (``chunk_seed``)."""
    return torch.Generator(device).manual_seed(chunk_seed(seed, k))


def generate_chunks(exp, labels, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
                    progress: bool = False, **kwargs) -> Iterator[tuple[int, Tensor]]:
    """(k, images of chunk k) for the chunks of ``batch_size`` rows of the conditioning data ``labels`` (class
    labels, or a dict of fields) that ``rank`` owns (k % world_size).

    Chunk k is seeded by (seed, k) whoever samples it, so the images are the same for any number
    of ranks (given the same ``batch_size``). For evaluations that reduce images to features
    per rank (e.g. FID) without gathering the images.
    """
    n = rows_of(labels, None)
    chunks = [take_rows(labels, slice(lo, lo + batch_size)) for lo in range(0, n, batch_size)]
    mine = range(rank, len(chunks), world_size)
    device = next((kwargs.get("model") or exp.model).parameters()).device
    for k in tqdm(mine, desc="batches", disable=not progress or len(mine) <= 1):
        images = generate(exp, chunks[k], generator=chunk_generator(seed, k, device),
                          progress=progress and len(mine) == 1, **kwargs)
        yield k, images.cpu()


def generate_many(exp, labels, batch_size: int, seed: int, progress: bool = False, **kwargs) -> Tensor:
    """Generate in batches of ``batch_size``; batch k uses generator seed (seed, k), so a seed fixes the set."""
    return torch.cat([images for _, images in generate_chunks(exp, labels, batch_size, seed, progress=progress,
                                                              **kwargs)])


def generate_distributed(exp, labels, batch_size: int, seed: int, dst: int | None = 0,
                         progress: bool = False, **kwargs) -> Tensor | None:
    """``generate_many`` split over the ranks of the current process group; every rank must call it.

    Ranks sample interleaved chunks and the images are gathered, in index order, on rank ``dst``
    (None on the others), or on every rank with ``dst=None``. Identical to ``generate_many`` for
    any number of ranks. Without a process group it is ``generate_many``.
    """
    from sandbox.run import distributed

    me = distributed.info()
    if not me.enabled:
        return generate_many(exp, labels, batch_size, seed, progress=progress, **kwargs)
    mine = list(generate_chunks(exp, labels, batch_size, seed, me.rank, me.world_size,
                                progress=progress and me.is_main, **kwargs))
    gathered = distributed.gather_objects(mine, dst)
    if gathered is None:
        return None
    return torch.cat([images for _, images in sorted((c for part in gathered for c in part), key=lambda c: c[0])])


# --------------------------------------------------------------------------------------
# Evaluation sets
# --------------------------------------------------------------------------------------
MODES = {"5k": 5_000, "10k": 10_000, "50k": 50_000}  # FID-5K for quick checks, 10k, and the paper's FID-50K


@torch.no_grad()
def generate_eval_images(exp, model, indices: Sequence[int], total: int, *, seed: int, chunk_size: int,
                         progress: bool = False, conditioning=None, **sampling) -> tuple[np.ndarray, np.ndarray]:
    """Images ``indices`` of the class-balanced evaluation set of ``total`` images -> (uint8 (n,H,W,3), labels (n,)).

    Each chunk that holds a requested index is generated whole (so a request that splits a chunk still gets
    the images a whole-chunk request gets) and converted to uint8 at once (50k float images would not fit).
    ``conditioning``: the conditioning data of all ``total`` images when it is not the class labels (prompts
    that ask for class i % K: ``conditioning_for``). ``sampling``: ``generate`` options (num_iter, cfg,
    cfg_schedule, temperature, autocast_dtype).
    """
    indices = [int(i) for i in indices]
    if not indices or any(not 0 <= i < total for i in indices) or len(set(indices)) < len(indices):
        raise ValueError(f"indices must be distinct, in [0, {total}), and at least one")
    device = next(model.parameters()).device
    wanted: dict[int, list[int]] = {}
    for i in indices:
        wanted.setdefault(i // chunk_size, []).append(i)
    position = {i: n for n, i in enumerate(indices)}
    out = None  # (n, H, W, 3) uint8, filled in place: a 50k set is held once
    for k in tqdm(sorted(wanted), desc="eval samples", disable=not progress, file=sys.stderr):
        lo, hi = k * chunk_size, min((k + 1) * chunk_size, total)
        labels = torch.arange(lo, hi, device=device) % exp.num_classes  # class-balanced by index
        data = labels if conditioning is None else take_rows(conditioning, slice(lo, hi))
        g = chunk_generator(seed, k, device)
        images = to_uint8(generate(exp, data, generator=g, model=model, **sampling))  # (hi-lo, H, W, 3)
        if out is None:
            out = np.empty((len(indices), *images.shape[1:]), dtype=np.uint8)
        for i in wanted[k]:
            out[position[i]] = images[i - lo]
    return out, np.array([i % exp.num_classes for i in indices], dtype=np.int64)


def eval_set_path(run_root: Path, settings: dict) -> Path:
    """RUN/eval/samples-<N>-<hash of the settings>.npz"""
    key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    return Path(run_root) / "eval" / f"samples-{settings['num_images']}-{key}.npz"


def eval_samples(exp, model, settings: dict, run_root: Path, progress: bool = False,
                 autocast_dtype=None, conditioning=None) -> tuple[np.ndarray, np.ndarray, Path | None, bool]:
    """The evaluation set fixed by ``settings`` (num_images, seed, chunk_size, num_iter, cfg, cfg_schedule,
    temperature, step, ema; head_steps and cache when set; a digest of ``conditioning`` when given: the data
    asking for each image's class when it is not the label): read from the run directory when it is there, else
    generated and written.
    Returns (images, labels, path, reused), path None when the set could not be written (a read-only run
    directory: a warning); under several ranks, every rank must call it and only rank 0 gets the images (the
    others get ``(None, None, path, False)``)."""
    path = eval_set_path(run_root, settings)
    cached = _cached_eval_set(path, settings)
    if cached is not None:
        return (*cached, path, True)
    from sandbox.run import distributed

    n, cs, me = settings["num_images"], settings["chunk_size"], distributed.info()
    # in a multi-process run rank r generates chunks r, r + R, ...: a chunk's images depend only on its seed,
    # so the set is the same for any number of ranks; rank 0 gathers, writes and returns it (the others get None)
    mine = [i for k in range(me.rank, -(-n // cs), me.world_size) for i in range(k * cs, min((k + 1) * cs, n))]
    part = generate_eval_images(
        exp, model, mine, n, seed=settings["seed"], chunk_size=cs, progress=progress and me.is_main,
        num_iter=settings["num_iter"], cfg=settings["cfg"], cfg_schedule=settings["cfg_schedule"],
        temperature=settings["temperature"], autocast_dtype=autocast_dtype, conditioning=conditioning,
        **speed_kwargs(settings.get("head_steps"), settings.get("cache", "off"))) if mine else None
    if me.enabled:
        parts = distributed.gather_objects((mine, part), dst=0)
        if parts is None:
            return None, None, path, False
        images = np.empty((n, *next(p for _, p in parts if p is not None)[0].shape[1:]), dtype=np.uint8)
        for indices, (imgs, _) in ((i, p) for i, p in parts if p is not None):
            images[indices] = imgs
        labels = np.arange(n, dtype=np.int64) % exp.num_classes  # class-balanced by index, as generated
    else:
        images, labels = part
    try:
        save_npz(images, labels, path, meta=settings)
    except UserError as e:  # a read-only run directory: the set is scored all the same, just not kept
        print(f"warning: could not keep the samples for the next eval ({e})", file=sys.stderr)
        return images, labels, None, False
    return images, labels, path, False


def _cached_eval_set(path: Path, settings: dict) -> tuple[np.ndarray, np.ndarray] | None:
    """(images, labels) of the set kept at ``path`` when it holds exactly ``settings``' images; a damaged
    file (a copy or an eval killed outside the atomic write, a full disk) is sampled again, with a note."""
    if not path.is_file():
        return None
    try:
        found = read_image_set(path)
        if found.meta != settings or found.count != settings["num_images"]:
            return None
        return found.read_all(), found.labels
    except (UserError, OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        print(f"note: cannot reuse {path} ({e}); sampling it again", file=sys.stderr)
        return None
