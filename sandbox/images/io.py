"""Image sets in and out: tensors in [-1, 1] <-> uint8, .npz sets and folders.

An image set on disk is either a folder of PNG/JPEG files (searched recursively, so an ImageNet-style
class-folder layout works) or an .npz holding ``images`` (N,H,W,3) uint8 -- or ``arr_0``, the key the ADM
evaluation suite uses -- optionally with ``labels`` (N,) and, for reference sets, the Inception statistics
``mu`` (F,) / ``sigma`` (F,F) of the ADM reference batches.
"""
from __future__ import annotations

import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from sandbox.errors import UserError
from sandbox.run.files import atomic_write_bytes

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


# --------------------------------------------------------------------------------------
# Tensors <-> uint8
# --------------------------------------------------------------------------------------
def to_uint8(images: Tensor) -> np.ndarray:
    """(N,3,H,W) in [-1,1] -> (N,H,W,3) uint8."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def from_uint8(images: np.ndarray) -> Tensor:
    """(N,H,W,3) uint8 -> (N,3,H,W) float in [-1,1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1


# --------------------------------------------------------------------------------------
# .npz image sets
# --------------------------------------------------------------------------------------
def save_npz(images: Tensor | np.ndarray, labels: Tensor | np.ndarray, path: str | Path,
             meta: dict | None = None) -> None:
    """``images`` (N,H,W,3) uint8 and ``labels`` (N,) int64 (+ ``meta``, a JSON string, when given).

    ``images`` may be (N,3,H,W) floats in [-1,1] or already (N,H,W,3) uint8.
    """
    arr = images if isinstance(images, np.ndarray) else to_uint8(images)
    lab = np.asarray(labels.cpu() if isinstance(labels, Tensor) else labels).astype(np.int64)
    extra = {"meta": np.array(json.dumps(meta))} if meta is not None else {}
    # streamed into the file, never copied in memory first: 50k ImageNet samples are ~10 GB
    atomic_write_bytes(Path(path), lambda f: np.savez(f, images=arr, labels=lab, **extra))


def _npz_members(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as zf:
            return [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
    except (OSError, zipfile.BadZipFile) as e:
        raise UserError(f"{path} is not a readable .npz archive: {e}") from e


def _npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    major, _ = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    return read(f)


@dataclass
class ImageSet:
    """A set of images on disk (folder or .npz) read in batches, never all at once.

    ``count`` images of ``size`` (H, W) (None for a folder of mixed sizes or a statistics-only file),
    ``labels`` (N,) when the .npz has them, ``mu``/``sigma`` when it holds precomputed statistics.
    """

    path: Path
    count: int
    size: tuple[int, int] | None = None
    labels: np.ndarray | None = None
    mu: np.ndarray | None = None
    sigma: np.ndarray | None = None
    meta: dict = field(default_factory=dict)
    _key: str | None = None
    _files: list[Path] | None = None

    def batches(self, batch_size: int = 64) -> Iterator[np.ndarray]:
        """(b,H,W,3) uint8 batches in order; a folder's batch ends early where the image size changes."""
        if self._files is not None:
            yield from self._folder_batches(batch_size)
        elif self._key is not None:
            yield from self._npz_batches(batch_size)

    def read_all(self) -> np.ndarray:
        """Every image as one (N,H,W,3) uint8 array (needs one size)."""
        parts = list(self.batches(256))
        if not parts:
            raise UserError(f"{self.path} holds no images")
        if len({p.shape[1:] for p in parts}) > 1:
            raise UserError(f"images in {self.path} differ in size; resize or center-crop them to one size")
        return np.concatenate(parts)

    def _npz_batches(self, batch_size: int) -> Iterator[np.ndarray]:
        # stream the .npy member out of the zip (as the ADM evaluator does): a 50k set never sits in memory twice
        with zipfile.ZipFile(self.path) as zf, zf.open(f"{self._key}.npy") as f:
            shape, fortran, dtype = _npy_header(f)
            per_image = int(np.prod(shape[1:])) * dtype.itemsize
            for lo in range(0, shape[0], batch_size):
                n = min(batch_size, shape[0] - lo)
                buf = f.read(n * per_image)
                yield np.frombuffer(buf, dtype=dtype).reshape(n, *shape[1:])

    def _folder_batches(self, batch_size: int) -> Iterator[np.ndarray]:
        batch: list[np.ndarray] = []
        for file in self._files:
            try:
                with Image.open(file) as im:
                    arr = np.asarray(im.convert("RGB"))
            except OSError as e:
                raise UserError(f"cannot read image {file}: {e}") from e
            if batch and (arr.shape != batch[0].shape or len(batch) == batch_size):
                yield np.stack(batch)
                batch = []
            batch.append(arr)
        if batch:
            yield np.stack(batch)


def read_image_set(path: str | Path) -> ImageSet:
    """Open a folder of images or an .npz (images/arr_0, labels, mu/sigma, meta) without reading the pixels."""
    path = Path(path).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not files:
            raise UserError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {path}")
        return ImageSet(path, len(files), _files=files)
    if not path.is_file():
        raise UserError(f"image set not found: {path} (give a folder of images or an .npz)")
    if path.suffix != ".npz":
        raise UserError(f"{path}: an image set is a folder of images or an .npz file")
    members = _npz_members(path)
    key = next((k for k in ("images", "arr_0") if k in members), None)
    count, size = 0, None
    if key is not None:
        with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
            shape, fortran, dtype = _npy_header(f)
        if len(shape) != 4 or shape[-1] != 3 or dtype != np.uint8 or fortran:
            raise UserError(f"{path}: '{key}' must be (N,H,W,3) uint8 images, got shape {shape} {dtype}")
        count, size = int(shape[0]), (int(shape[1]), int(shape[2]))
    small = {}
    try:
        with np.load(path, allow_pickle=False) as data:
            for k in ("labels", "mu", "sigma", "meta"):
                if k in members:
                    small[k] = data[k]
    except ValueError as e:
        raise UserError(f"{path}: unreadable member ({e})") from e
    if key is None and not ("mu" in small and "sigma" in small):
        raise UserError(f"{path} holds neither images ('images' or 'arr_0') nor statistics ('mu' and 'sigma')")
    meta = json.loads(str(small["meta"])) if "meta" in small else {}
    labels = small.get("labels")
    if labels is not None and len(labels) != count:
        raise UserError(f"{path}: {len(labels)} labels for {count} images")
    return ImageSet(path, count, size, labels, small.get("mu"), small.get("sigma"), meta, _key=key)
