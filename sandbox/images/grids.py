"""Pictures of samples: grids (one row per class, or one captioned row per prompt), PNGs and GIFs."""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from sandbox.errors import UserError
from sandbox.images.io import to_uint8
from sandbox.run.files import atomic_write_bytes


def make_grid(images: Tensor | np.ndarray, ncol: int | None = None, pad: int = 1, upscale: int = 1,
              slots: list[int] | None = None) -> np.ndarray:
    """Tile (N,3,H,W) in [-1,1] (or (N,H,W,3) uint8) into one uint8 image; ``upscale`` enlarges tiny images.

    ``slots`` places image i at grid cell ``slots[i]`` (row-major) instead of cell i; cells left out stay white.
    """
    arr = images if isinstance(images, np.ndarray) else to_uint8(images)
    n, h, w, _ = arr.shape
    slots = list(range(n)) if slots is None else slots
    ncol = ncol or math.ceil(math.sqrt(n))
    nrow = max(1, math.ceil((max(slots) + 1) / ncol)) if slots else 1
    if upscale > 1:
        arr = arr.repeat(upscale, axis=1).repeat(upscale, axis=2)
        h, w = h * upscale, w * upscale
    grid = np.full((nrow * (h + pad) + pad, ncol * (w + pad) + pad, 3), 255, dtype=np.uint8)
    for i, cell in enumerate(slots):
        r, c = divmod(cell, ncol)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + c * (w + pad) : pad + c * (w + pad) + w] = arr[i]
    return grid


def class_layout(labels: Tensor, max_cols: int = 16) -> tuple[list[int], int]:
    """Grid cells for one row per class: (cell of each image, columns). Classes are rows in label order;
    within a row, images keep their order; a class with more than ``max_cols`` images wraps onto more rows."""
    labels = [int(c) for c in labels.tolist()]
    classes = sorted(set(labels))
    counts = {c: labels.count(c) for c in classes}
    ncol = min(max(counts.values(), default=1), max_cols)
    first_row, row = {}, 0
    for c in classes:
        first_row[c], row = row, row + math.ceil(counts[c] / ncol)
    seen = {c: 0 for c in classes}
    slots = []
    for c in labels:
        r, col = divmod(seen[c], ncol)
        slots.append((first_row[c] + r) * ncol + col)
        seen[c] += 1
    return slots, ncol


def class_grid(images: Tensor | np.ndarray, labels: Tensor, pad: int = 1, upscale: int | None = None) -> np.ndarray:
    """A grid with one row per class (rows sorted by label), (N,3,H,W) in [-1,1] or (N,H,W,3) uint8 -> uint8."""
    slots, ncol = class_layout(labels)
    size = images.shape[1] if isinstance(images, np.ndarray) else images.shape[-1]
    return make_grid(images, ncol=ncol, pad=pad, upscale=upscale or default_upscale(size), slots=slots)


CAPTION_HEIGHT = 14  # px: Pillow's default font is ~11 px tall
MIN_CAPTIONED_WIDTH = 240  # px: room for ~40 characters of a prompt beside a short row


def prompt_rows(prompts: list[str]) -> tuple[list[str], Tensor]:
    """(the distinct prompts in order of first appearance, the index of each image's prompt (N,))."""
    distinct = list(dict.fromkeys(prompts))
    where = {p: i for i, p in enumerate(distinct)}
    return distinct, torch.tensor([where[p] for p in prompts], dtype=torch.long)


def prompt_grid(images: Tensor | np.ndarray, prompts: list[str], pad: int = 1, max_cols: int = 16) -> np.ndarray:
    """A grid with one row per distinct prompt (in order of first appearance; a long one wraps), each under a
    caption strip that prints the prompt: (N,3,H,W) in [-1,1] or (N,H,W,3) uint8 -> uint8."""
    from PIL import Image, ImageDraw

    arr = images if isinstance(images, np.ndarray) else to_uint8(images)
    distinct, ids = prompt_rows(list(prompts))
    ncol = min(max(int((ids == i).sum()) for i in range(len(distinct))), max_cols)
    upscale = default_upscale(arr.shape[1])
    parts = []
    for i in range(len(distinct)):
        parts.append(make_grid(arr[(ids == i).numpy()], ncol=ncol, pad=pad, upscale=upscale))  # (h, w, 3)
    width = max(max(p.shape[1] for p in parts), MIN_CAPTIONED_WIDTH)
    out = []
    for prompt, rows in zip(distinct, parts):
        strip = Image.new("RGB", (width, CAPTION_HEIGHT), (255, 255, 255))
        fits = max(4, width // 6)  # the default font is ~6 px a character
        text = prompt if len(prompt) <= fits else prompt[: fits - 3] + "..."
        ImageDraw.Draw(strip).text((2, 1), text, fill=(0, 0, 0))
        padded = np.full((rows.shape[0], width, 3), 255, dtype=np.uint8)
        padded[:, : rows.shape[1]] = rows
        out += [np.asarray(strip), padded]
    return np.concatenate(out, axis=0)


def layout_labels(data) -> Tensor:
    """The rows of a grid of images asked by conditioning ``data``: the class labels, or (prompts alone) the
    index of each image's prompt."""
    if not isinstance(data, dict):
        return torch.as_tensor(data).cpu()
    if "label" in data:
        return torch.as_tensor(data["label"]).cpu()
    if "text" in data:
        return prompt_rows(list(data["text"]))[1]
    return torch.zeros(len(next(iter(data.values()))), dtype=torch.long)


def save_prompt_grid(images: Tensor | np.ndarray, prompts: list[str], path: str | Path) -> None:
    """A PNG with one captioned row per prompt."""
    save_png(prompt_grid(images, prompts), path)


def default_upscale(image_size: int) -> int:
    """Small images are enlarged (nearest) so a grid is readable: aim for >= 64 px tiles."""
    return max(1, 64 // image_size)


def save_png(array: np.ndarray, path: str | Path) -> None:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    atomic_write_bytes(Path(path), buf.getvalue())


def save_grid(images: Tensor, path: str | Path, ncol: int | None = None) -> None:
    save_png(make_grid(images, ncol=ncol, upscale=default_upscale(images.shape[-1])), path)


def save_class_grid(images: Tensor | np.ndarray, labels: Tensor, path: str | Path) -> None:
    """A PNG with one row per class."""
    save_png(class_grid(images, labels), path)


def save_gif(frames: list[np.ndarray], path: str | Path, frame_ms: int = 150, hold_last_ms: int = 1500) -> None:
    """An animated GIF from (H,W,3) uint8 frames, looping; the last frame is held ``hold_last_ms``.

    Identical consecutive frames would be merged by the GIF encoder, so each frame here should differ."""
    if not frames:
        raise UserError(f"no frames to write to {path}")
    images = [Image.fromarray(f) for f in frames]
    durations = [frame_ms] * (len(images) - 1) + [hold_last_ms]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=durations, loop=0)
    atomic_write_bytes(Path(path), buf.getvalue())
