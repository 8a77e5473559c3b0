"""Latent caches: a tokenizer's posterior moments of every image and of its horizontal flip.

Encoding with a frozen tokenizer (KL-16: 66M parameters at full resolution)
costs as much as a large part of a MAR training step, and the official
augmentation is only a center crop and a flip, so both views can be encoded
once and training can sample latents from the stored moments (the official
reports ~2x faster training). The cache is a directory:

    index.json           format, shapes, dtype, shards, the recipe parts that made it, progress
    labels.npy           (N,) int64 class of each entry
    sources.npy          (N,) int64 dataset index of each entry (unreadable images are left out)
    probe.npy            the tokenizer's moments of a fixed random image: checks a recipe uses the same tokenizer
    moments-00000.npy    (rows, 2, P, h, w) in a few large memory-mapped shards; view 0 = image, 1 = its flip

Writing is resumable: rows are flushed before ``index.json`` (rewritten
atomically) records them, so an interrupted run continues where it stopped.

References:
    MAR official main_cache.py / engine_mar.py cache_latents (moments of x and of x.flip(3), one .npz per image;
    here a few shards instead, so a million images are a dozen files) and util/loader.py CachedFolder.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from numpy.lib.format import open_memmap
from tqdm.auto import tqdm

from sandbox.errors import UserError
from sandbox.run.checkpoints import UnsafeCheckpointError
from sandbox.run.data import open_loader
from sandbox.run.files import atomic_write_bytes

FORMAT = "mar-sandbox latent cache"
VERSION = 1
INDEX = "index.json"
DTYPES = {"float32": np.float32, "float16": np.float16}


def _shard_name(k: int) -> str:
    return f"moments-{k:05d}.npy"


def probe_images(image_size: int) -> torch.Tensor:
    """A fixed random image (1,3,S,S) in [-1,1]: its moments fingerprint the tokenizer that made a cache."""
    return torch.rand(1, 3, image_size, image_size, generator=torch.Generator().manual_seed(0)) * 2 - 1


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------
@dataclass
class CacheSettings:
    """What must not change between a cache and its resumption."""

    num_images: int  # dataset length (entries <= this: unreadable images are left out)
    image_size: int
    num_classes: int
    moment_shape: tuple[int, int, int]  # (P, h, w)
    dtype: str
    shard_size: int
    recipe: dict  # the data and tokenizer parts of the recipe that made the cache

    def as_dict(self) -> dict:
        return {"num_images": self.num_images, "image_size": self.image_size, "num_classes": self.num_classes,
                "moment_shape": list(self.moment_shape), "dtype": self.dtype, "shard_size": self.shard_size,
                "recipe": self.recipe}


class _Indexed(torch.utils.data.Dataset):
    """(index, item or None) for dataset indices start..N-1, so the loader can skip unreadable images."""

    def __init__(self, dataset, start: int):
        self.dataset, self.start = dataset, start

    def __len__(self) -> int:
        return len(self.dataset) - self.start

    def __getitem__(self, i: int):
        return self.start + i, self.dataset.load(self.start + i)


def _collate(rows):
    kept = [(i, item) for i, item in rows if item is not None]
    last = max(i for i, _ in rows)
    if not kept:
        return last, [], None, None
    return (last, [i for i, _ in kept], torch.stack([item[0] for _, item in kept]),
            torch.tensor([int(item[1]) for _, item in kept], dtype=torch.int64))


def write_cache(dataset, tokenizer, out: str | Path, recipe: dict, batch_size: int = 64, num_workers: int = 0,
                device: torch.device | str = "cpu", shard_size: int = 100_000, dtype: str = "float32",
                progress: bool = True) -> dict:
    """Encode every image of ``dataset`` and its flip with ``tokenizer.moments`` into ``out``; resume if started."""
    out = Path(out)
    if dtype not in DTYPES:
        raise UserError(f"cache dtype must be one of {', '.join(DTYPES)}, got {dtype}")
    if shard_size < 1 or batch_size < 1:
        raise UserError("--shard_size and --batch_size must be >= 1")
    S = int(dataset.image_size)
    if S % tokenizer.stride:
        raise UserError(f"image size {S} is not divisible by the tokenizer's stride {tokenizer.stride}")
    settings = CacheSettings(len(dataset), S, int(dataset.num_classes),
                             (tokenizer.moment_channels, S // tokenizer.stride, S // tokenizer.stride),
                             dtype, shard_size, recipe)
    index, mode = _open_index(out, settings, tokenizer, device)
    if index["complete"]:
        print(f"{out} is already a complete cache of {index['count']} images")
        return index
    N, start = settings.num_images, int(index["next_index"])
    arrays = _open_arrays(out, index, settings, mode)
    if start:
        print(f"resuming the cache in {out} at image {start} of {N} ({index['count']} written)")
    loader = torch.utils.data.DataLoader(_Indexed(dataset, start), batch_size=batch_size, num_workers=num_workers,
                                         collate_fn=_collate, pin_memory=torch.device(device).type == "cuda")
    t0, encoded = time.perf_counter(), 0
    bar = tqdm(total=N, initial=start, disable=not progress, desc="cache", unit="img", dynamic_ncols=True)
    with bar, open_loader(loader) as stream:  # its workers stop when the loop ends, however it ends
        for last, kept, images, batch_labels in stream:
            if kept:
                encoded += _write_rows(arrays, index["count"], kept, images, batch_labels, tokenizer, device,
                                       shard_size)
            first = index["next_index"]
            index["skipped"] += sorted(set(range(first, last + 1)) - set(kept))
            index["next_index"], index["count"] = last + 1, index["count"] + len(kept)
            _write_index(out, index)  # only now are these rows part of the cache
            bar.update(last + 1 - first)
    index["complete"] = True
    _write_index(out, index)
    _report(out, index, encoded, time.perf_counter() - t0)
    return index


def _open_index(out: Path, settings: CacheSettings, tokenizer, device) -> tuple[dict, str]:
    """The cache's index (a new one, with the tokenizer's probe, or the one being resumed: same settings) and the
    mode to open its arrays in."""
    if (out / INDEX).is_file():
        index = _read_index(out)
        expected = json.loads(json.dumps(settings.as_dict()))  # as JSON stores it (tuples become lists)
        diffs = [k for k in expected if index.get(k) != expected[k]]
        if diffs:
            raise UserError(f"{out} holds a latent cache made with different settings ({', '.join(diffs)}); "
                            "use another --out or the same recipe and options")
        return index, "r+"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {out}: {e.strerror or e}") from e
    N, size = settings.num_images, settings.shard_size
    capacities = [min(size, N - k * size) for k in range(math.ceil(N / size))]
    index = {"format": FORMAT, "version": VERSION, **settings.as_dict(),
             "shards": [{"file": _shard_name(k), "rows": c} for k, c in enumerate(capacities)],
             "next_index": 0, "count": 0, "skipped": [], "complete": False}
    with torch.no_grad():
        probe = tokenizer.moments(probe_images(settings.image_size).to(device)).float().cpu().numpy()
    np.save(out / "probe.npy", probe)
    _write_index(out, index)
    return index, "w+"


def _open_arrays(out: Path, index: dict, settings: CacheSettings, mode: str) -> dict:
    """The memory-mapped labels, sources and moment shards."""
    N, np_dtype = settings.num_images, DTYPES[settings.dtype]
    return {
        "labels": open_memmap(out / "labels.npy", mode=mode, dtype=np.int64, shape=(N,)),
        "sources": open_memmap(out / "sources.npy", mode=mode, dtype=np.int64, shape=(N,)),
        "shards": [open_memmap(out / s["file"], mode=mode, dtype=np_dtype, shape=(s["rows"], 2, *settings.moment_shape))
                   for s in index["shards"]],
        "dtype": np_dtype,
    }


def _write_rows(arrays: dict, count: int, kept: list[int], images, labels, tokenizer, device, shard_size: int) -> int:
    """Encode a batch and its flips into rows ``count`` on and flush them; returns how many."""
    x = images.to(device, non_blocking=True)  # (b, 3, S, S)
    with torch.no_grad():
        m = tokenizer.moments(torch.cat([x, x.flip(-1)]))  # (2b, P, h, w): the image, then its flip
    m = torch.stack(m.chunk(2), dim=1).float().cpu().numpy().astype(arrays["dtype"])  # (b, 2, P, h, w)
    touched = set()
    for j in range(len(kept)):  # rows may straddle a shard boundary
        k, row = divmod(count + j, shard_size)
        arrays["shards"][k][row] = m[j]
        touched.add(k)
    arrays["labels"][count : count + len(kept)] = labels.numpy()
    arrays["sources"][count : count + len(kept)] = kept
    for k in touched:
        arrays["shards"][k].flush()
    arrays["labels"].flush()
    arrays["sources"].flush()
    return len(kept)


def _report(out: Path, index: dict, encoded: int, seconds: float) -> None:
    size = sum((out / s["file"]).stat().st_size for s in index["shards"])
    skipped = len(index["skipped"])
    print(f"cached {index['count']} images and their flips in {out} ({len(index['shards'])} shard(s), "
          f"{size / 2**30:.2f} GiB" + (f"; {skipped} unreadable image(s) skipped" if skipped else "")
          + (f"; {encoded / max(seconds, 1e-9):.1f} img/s" if encoded else "") + ")")


def _read_index(root: Path) -> dict:
    try:
        index = json.loads((root / INDEX).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"cannot read {root / INDEX}: {e}") from e
    if index.get("format") != FORMAT or index.get("version") != VERSION:
        raise UserError(f"{root} is not a latent cache of this version ({FORMAT} v{VERSION})")
    return index


def _write_index(root: Path, index: dict) -> None:
    atomic_write_bytes(root / INDEX, json.dumps(index, indent=1).encode())


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------
def _load_array(path: Path, mmap_mode: str | None = None) -> np.ndarray:
    """A cache array, numbers only: numpy never unpickles here, and an array of pickled Python objects (which
    would run code if unpickled) is refused by name, like a checkpoint that needs code."""
    try:
        return np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
    except ValueError as e:
        if "object" not in str(e).lower() and "pickle" not in str(e).lower():
            raise
        raise UnsafeCheckpointError(f"refusing to load {path}: it holds pickled Python objects, which would run "
                                    "code when unpickled; a latent cache holds numbers only (remake it with "
                                    "`sandbox cache`)") from None


class LatentCache:
    """Read a complete cache: ``cache[i] -> (moments of both views (2,P,h,w) float32, label)``."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()
        if not (self.root / INDEX).is_file():
            raise UserError(f"latent cache not found: {self.root} (no {INDEX}); make one with "
                            "`sandbox cache --config RECIPE --out DIR`")
        self.index = _read_index(self.root)
        if not self.index["complete"]:
            raise UserError(f"latent cache {self.root} is incomplete ({self.index['next_index']} of "
                            f"{self.index['num_images']} images); rerun `sandbox cache` with the same recipe and "
                            "--out to finish it")
        self.count = int(self.index["count"])
        self.shard_size = int(self.index["shard_size"])
        self.moment_shape = tuple(self.index["moment_shape"])
        self._labels = None
        self._shards: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.count

    # memory maps are opened lazily and never pickled: loader workers reopen them instead of copying data
    def __getstate__(self) -> dict:
        return {**self.__dict__, "_labels": None, "_shards": {}}

    @property
    def labels(self) -> np.ndarray:
        if self._labels is None:
            self._labels = _load_array(self.root / "labels.npy", mmap_mode="r")
        return self._labels

    def _shard(self, k: int) -> np.ndarray:
        if k not in self._shards:
            self._shards[k] = _load_array(self.root / self.index["shards"][k]["file"], mmap_mode="r")
        return self._shards[k]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if not 0 <= i < self.count:
            raise IndexError(i)
        k, row = divmod(i, self.shard_size)
        return torch.from_numpy(np.array(self._shard(k)[row], dtype=np.float32)), int(self.labels[i])

    def probe(self) -> np.ndarray:
        return _load_array(self.root / "probe.npy")
