"""Writing images: tensors in [-1, 1] -> uint8, sample grids (one row per class), .npz archives."""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from sandbox.checkpoint import atomic_write_bytes


def to_uint8(images: Tensor) -> np.ndarray:
    """(N,3,H,W) in [-1,1] -> (N,H,W,3) uint8."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def make_grid(images: Tensor, ncol: int | None = None, pad: int = 1, upscale: int = 1) -> np.ndarray:
    """Tile (N,3,H,W) into one (rows*H', cols*W', 3) uint8 image; ``upscale`` enlarges tiny images."""
    arr = to_uint8(images)
    n, h, w, _ = arr.shape
    ncol = ncol or math.ceil(math.sqrt(n))
    nrow = math.ceil(n / ncol)
    if upscale > 1:
        arr = arr.repeat(upscale, axis=1).repeat(upscale, axis=2)
        h, w = h * upscale, w * upscale
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i in range(n):
        r, c = divmod(i, ncol)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = arr[i]
    return grid


def default_upscale(image_size: int) -> int:
    """Small images are enlarged (nearest) so a grid is readable: aim for >= 64 px tiles."""
    return max(1, 64 // image_size)


def save_png(array: np.ndarray, path: str | Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(Path(path), buf.getvalue())


def save_grid(images: Tensor, path: str | Path, ncol: int | None = None) -> None:
    save_png(make_grid(images, ncol=ncol, upscale=default_upscale(images.shape[-1])), path)


def save_npz(images: Tensor, labels: Tensor, path: str | Path) -> None:
    """``images`` (N,H,W,3) uint8 and ``labels`` (N,) int64, as the ADM evaluation suite reads them."""
    buf = io.BytesIO()
    np.savez(buf, images=to_uint8(images), labels=labels.cpu().numpy().astype(np.int64))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(Path(path), buf.getvalue())
