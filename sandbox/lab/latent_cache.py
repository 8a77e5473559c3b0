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
    texts.jsonl          a captioned dataset's caption of each entry, one JSON string a line
    condition-NAME.npy   (N, ...) what the recipe's condition caches of each entry (``Condition.cached``: a frozen
                         text encoder's features and mask), so training runs no encoder; condition-probe-NAME.npy:
                         the same of the condition's example data, to check a recipe uses the same encoder

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
    texts: bool = False  # the dataset's items carry captions: stored in texts.jsonl
    condition: dict | None = None  # name -> {"shape", "dtype"} of what the condition caches per entry

    def as_dict(self) -> dict:
        out = {"num_images": self.num_images, "image_size": self.image_size, "num_classes": self.num_classes,
               "moment_shape": list(self.moment_shape), "dtype": self.dtype, "shard_size": self.shard_size,
               "recipe": self.recipe}
        if self.texts:  # only then: an unconditional-text cache keeps the index it had before captions
            out["texts"] = True
        if self.condition:
            out["condition"] = self.condition
        return out


class _Indexed(torch.utils.data.Dataset):
    """(index, item or None) for dataset indices start..N-1, so the loader can skip unreadable images."""

    def __init__(self, dataset, start: int):
        self.dataset, self.start = dataset, start

    def __len__(self) -> int:
        return len(self.dataset) - self.start

    def __getitem__(self, i: int):
        return self.start + i, self.dataset.load(self.start + i)


def _collate(rows):
    """(last index, kept indices, images (b,3,S,S), conditioning data: {"label": (b,) int64, "text": [b str]?, ...})
    of a batch of (index, item or None)."""
    kept = [(i, item) for i, item in rows if item is not None]
    last = max(i for i, _ in rows)
    if not kept:
        return last, [], None, None
    datas = [item[1] if isinstance(item[1], dict) else {"label": item[1]} for _, item in kept]
    data = {name: [d[name] for d in datas] for name in datas[0]}
    data["label"] = torch.tensor([int(x) for x in data.get("label", [0] * len(kept))], dtype=torch.int64)
    if "image" in data:  # a condition image is collated as a batch (a condition may cache its features)
        data["image"] = torch.stack(data["image"])
    return last, [i for i, _ in kept], torch.stack([item[0] for _, item in kept]), data


def write_cache(dataset, tokenizer, out: str | Path, recipe: dict, batch_size: int = 64, num_workers: int = 0,
                device: torch.device | str = "cpu", shard_size: int = 100_000, dtype: str = "float32",
                progress: bool = True, condition=None) -> dict:
    """Encode every image of ``dataset`` and its flip with ``tokenizer.moments`` into ``out``; resume if started.
    A captioned dataset's captions are kept; ``condition``: what it caches of each entry (``Condition.cached``)
    is stored too."""
    out = Path(out)
    if dtype not in DTYPES:
        raise UserError(f"cache dtype must be one of {', '.join(DTYPES)}, got {dtype}")
    if shard_size < 1 or batch_size < 1:
        raise UserError("--shard_size and --batch_size must be >= 1")
    S = int(dataset.image_size)
    if S % tokenizer.stride:
        raise UserError(f"image size {S} is not divisible by the tokenizer's stride {tokenizer.stride}")
    probe = condition_probe(condition, dtype)
    settings = CacheSettings(len(dataset), S, int(dataset.num_classes),
                             (tokenizer.moment_channels, S // tokenizer.stride, S // tokenizer.stride),
                             dtype, shard_size, recipe, texts="text" in getattr(dataset, "fields", ()),
                             condition={k: {"shape": list(v.shape[1:]), "dtype": str(v.dtype)}
                                        for k, v in probe.items()} or None)
    index, mode = _open_index(out, settings, tokenizer, device, probe)
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
        for last, kept, images, data in stream:
            if kept:
                encoded += _write_rows(arrays, index["count"], kept, images, data, tokenizer, device, shard_size,
                                       condition if settings.condition else None)
            first = index["next_index"]
            index["skipped"] += sorted(set(range(first, last + 1)) - set(kept))
            index["next_index"], index["count"] = last + 1, index["count"] + len(kept)
            _write_index(out, index)  # only now are these rows part of the cache
            bar.update(last + 1 - first)
    index["complete"] = True
    _write_index(out, index)
    _report(out, index, encoded, time.perf_counter() - t0)
    return index


def condition_probe(condition, dtype: str) -> dict[str, np.ndarray]:
    """What ``condition`` caches of its example data (two rows, seed 0), as stored arrays; {} for a condition that
    caches nothing (or none)."""
    if condition is None:
        return {}
    with torch.no_grad():
        cached = condition.cached(condition.example(2, torch.Generator().manual_seed(0)))
    return {name: _stored(value, dtype) for name, value in cached.items()}


def _stored(value: torch.Tensor, dtype: str) -> np.ndarray:
    """A tensor as the cache stores it: floats in the cache's dtype, the rest (masks, ids) as they are."""
    arr = value.detach().cpu()
    return arr.float().numpy().astype(DTYPES[dtype]) if arr.is_floating_point() else arr.numpy()


def _open_index(out: Path, settings: CacheSettings, tokenizer, device, probe: dict) -> tuple[dict, str]:
    """The cache's index (a new one, with the tokenizer's and the condition's probes, or the one being resumed:
    same settings) and the mode to open its arrays in."""
    if (out / INDEX).is_file():
        index = _read_index(out)
        expected = json.loads(json.dumps(settings.as_dict()))  # as JSON stores it (tuples become lists)
        diffs = [k for k in {*expected, *index} - _PROGRESS if index.get(k) != expected.get(k)]
        if diffs:
            raise UserError(f"{out} holds a latent cache made with different settings ({', '.join(sorted(diffs))}); "
                            "use another --out or the same recipe and options")
        _keep_rows(out / TEXTS, int(index["count"]))  # captions written after the last recorded batch: redone
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
        moments = tokenizer.moments(probe_images(settings.image_size).to(device)).float().cpu().numpy()
    np.save(out / "probe.npy", moments)
    for name, value in probe.items():
        np.save(out / f"condition-probe-{name}.npy", value)
    if settings.texts:
        (out / TEXTS).write_bytes(b"")
    _write_index(out, index)
    return index, "w+"


TEXTS = "texts.jsonl"
_PROGRESS = {"format", "version", "shards", "next_index", "count", "skipped", "complete"}  # not settings


def _keep_rows(path: Path, count: int) -> None:
    """Keep the first ``count`` lines of ``path`` (rows a killed run wrote after its last index update)."""
    if not path.is_file():
        return
    lines = path.read_bytes().splitlines(keepends=True)
    if len(lines) != count:
        atomic_write_bytes(path, b"".join(lines[:count]))


def _open_arrays(out: Path, index: dict, settings: CacheSettings, mode: str) -> dict:
    """The memory-mapped labels, sources and moment shards."""
    N, np_dtype = settings.num_images, DTYPES[settings.dtype]
    return {
        "labels": open_memmap(out / "labels.npy", mode=mode, dtype=np.int64, shape=(N,)),
        "sources": open_memmap(out / "sources.npy", mode=mode, dtype=np.int64, shape=(N,)),
        "shards": [open_memmap(out / s["file"], mode=mode, dtype=np_dtype, shape=(s["rows"], 2, *settings.moment_shape))
                   for s in index["shards"]],
        "dtype": np_dtype,
        "texts": out / TEXTS if settings.texts else None,
        "condition": {name: open_memmap(out / f"condition-{name}.npy", mode=mode, dtype=np.dtype(spec["dtype"]),
                                        shape=(N, *spec["shape"])) for name, spec in (settings.condition or {}).items()},
    }


def _write_rows(arrays: dict, count: int, kept: list[int], images, data: dict, tokenizer, device, shard_size: int,
                condition=None) -> int:
    """Encode a batch and its flips into rows ``count`` on (with their captions and what ``condition`` caches of
    them) and flush them; returns how many."""
    _write_condition_rows(arrays, count, data, condition, device)
    x = images.to(device, non_blocking=True)  # (b, 3, S, S)
    with torch.no_grad():
        m = tokenizer.moments(torch.cat([x, x.flip(-1)]))  # (2b, P, h, w): the image, then its flip
    m = torch.stack(m.chunk(2), dim=1).float().cpu().numpy().astype(arrays["dtype"])  # (b, 2, P, h, w)
    touched = set()
    for j in range(len(kept)):  # rows may straddle a shard boundary
        k, row = divmod(count + j, shard_size)
        arrays["shards"][k][row] = m[j]
        touched.add(k)
    arrays["labels"][count : count + len(kept)] = data["label"].numpy()
    arrays["sources"][count : count + len(kept)] = kept
    for k in touched:
        arrays["shards"][k].flush()
    arrays["labels"].flush()
    arrays["sources"].flush()
    return len(kept)


def _write_condition_rows(arrays: dict, count: int, data: dict, condition, device) -> None:
    """A batch's captions (appended to texts.jsonl) and what ``condition`` caches of its data, at rows ``count``
    on; flushed before the index records the rows."""
    if arrays["texts"] is not None:
        with open(arrays["texts"], "a", encoding="utf-8") as f:
            f.writelines(json.dumps(t) + "\n" for t in data["text"])
    if condition is None:
        return
    moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in data.items()}
    with torch.no_grad():
        cached = condition.cached(moved)
    for name, target in arrays["condition"].items():
        value = _stored(cached[name], str(target.dtype))
        target[count : count + len(value)] = value
        target.flush()


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
class PackedStrings:
    """A list of strings as two numpy arrays (UTF-8 bytes and offsets): loader workers read them without the
    copy-on-write growth of Python objects, and one long caption does not widen every row (as numpy's 'U')."""

    def __init__(self, strings: list[str]):
        encoded = [t.encode("utf-8") for t in strings]
        self.offsets = np.cumsum([0] + [len(b) for b in encoded], dtype=np.int64)
        self.data = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        return self.data[self.offsets[i] : self.offsets[i + 1]].tobytes().decode("utf-8")


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
    """Read a complete cache: ``cache[i] -> (moments of both views (2,P,h,w) float32, label)``, or with captions or
    cached condition features ``(moments, {"label": int, "text": str, NAME: tensor, ...})``."""

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
        self.condition_names = tuple(self.index.get("condition") or ())
        self.fields = ("label",) + (("text",) if self.index.get("texts") else ()) + self.condition_names
        self.texts = self._read_texts() if "text" in self.fields else None
        self._labels = None
        self._shards: dict[int, np.ndarray] = {}
        self._condition: dict[str, np.ndarray] = {}

    def _read_texts(self) -> PackedStrings:
        try:
            lines = (self.root / TEXTS).read_text(encoding="utf-8").splitlines()[: self.count]
            texts = [json.loads(line) for line in lines]
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read the captions of latent cache {self.root} ({TEXTS}: {e}); rebuild it") from e
        if len(texts) != self.count or not all(isinstance(t, str) for t in texts):
            raise UserError(f"latent cache {self.root}: {TEXTS} holds {len(texts)} captions for {self.count} "
                            "entries; rebuild it")
        return PackedStrings(texts)

    def __len__(self) -> int:
        return self.count

    # memory maps are opened lazily and never pickled: loader workers reopen them instead of copying data
    def __getstate__(self) -> dict:
        return {**self.__dict__, "_labels": None, "_shards": {}, "_condition": {}}

    @property
    def labels(self) -> np.ndarray:
        if self._labels is None:
            self._labels = _load_array(self.root / "labels.npy", mmap_mode="r")
        return self._labels

    def _shard(self, k: int) -> np.ndarray:
        if k not in self._shards:
            self._shards[k] = _load_array(self.root / self.index["shards"][k]["file"], mmap_mode="r")
        return self._shards[k]

    def condition_array(self, name: str) -> np.ndarray:
        if name not in self._condition:
            self._condition[name] = _load_array(self.root / f"condition-{name}.npy", mmap_mode="r")
        return self._condition[name]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int | dict]:
        if not 0 <= i < self.count:
            raise IndexError(i)
        k, row = divmod(i, self.shard_size)
        views = torch.from_numpy(np.array(self._shard(k)[row], dtype=np.float32))
        if self.fields == ("label",):
            return views, int(self.labels[i])
        data = {"label": int(self.labels[i])}
        if self.texts is not None:
            data["text"] = self.texts[i]
        for name in self.condition_names:
            value = np.array(self.condition_array(name)[i])
            data[name] = torch.from_numpy(value.astype(np.float32) if value.dtype.kind == "f" else value)
        return views, data

    def probe(self) -> np.ndarray:
        return _load_array(self.root / "probe.npy")

    def condition_probe(self) -> dict[str, np.ndarray]:
        """What the condition that made the cache cached of its example data (``condition_probe``)."""
        return {name: _load_array(self.root / f"condition-probe-{name}.npy") for name in self.condition_names}
