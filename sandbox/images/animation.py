"""Generation as an animation: one frame per sampling step, tokens appearing as the ordering reveals them.

A frame decodes what is known so far -- ``Ordering.preview`` places the known tokens in the grid (a
coarse-to-fine ordering may show its finest known scale), ``Tokenizer.from_tokens``/``decode`` turn it into
pixels -- and paints grid cells that hold nothing yet grey. Nothing here knows a particular ordering or
tokenizer, so any pair animates. Each frame carries a caption strip, "step i/n" over a progress bar: it
says where in the plan a frame is, and it keeps every frame distinct -- a GIF encoder merges identical
consecutive frames (Pillow does), which would drop steps that change nothing visible (e.g. within one
scale of a coarse-to-fine ordering).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from sandbox.core.sampling import StepState
from sandbox.images.grids import class_grid

GREY = 0.0  # the middle of [-1, 1]: 128 in uint8
CAPTION_HEIGHT = 14  # px: Pillow's default font is ~11 px tall


@torch.no_grad()
def preview_images(exp, tokens: Tensor, known: Tensor) -> Tensor:
    """(tokens (B,L,C), known (B,L)) -> images (B,3,H,W) in [-1,1], unknown cells grey."""
    grid, shown = exp.ordering.preview(tokens, known)  # (B, C, h, w), (B, h, w)
    images = exp.tokenizer.decode(exp.tokenizer.from_tokens(grid)).float().clamp(-1, 1)  # (B, 3, H, W)
    mask = F.interpolate(shown[:, None].float(), size=images.shape[-2:], mode="nearest") > 0.5  # (B, 1, H, W)
    return torch.where(mask, images, torch.full_like(images, GREY))


class FrameRecorder:
    """An ``on_step`` callback for ``generate``/``generate_many`` that draws one frame per step of the first
    batch (``generate_many`` restarts the step index at every batch), laid out one row per class; ``start``
    adds the known tokens of an edit as the first frame."""

    def __init__(self, exp, labels: Tensor):
        self.exp, self.labels = exp, labels.cpu()
        self.frames: list[np.ndarray] = []
        self.count = 0  # images in the animated batch
        self._batch = -1
        self._start = 0  # 1 when the first frame shows the known tokens before any step (``start``)

    def __call__(self, state: StepState) -> None:
        if state.index == 0:
            self._batch += 1
        if self._batch != 0:
            return
        images = preview_images(self.exp, state.tokens, state.known)
        self.count = images.shape[0]
        self.frames.append(class_grid(images, self.labels[: images.shape[0]]))

    def start(self, tokens: Tensor, known: Tensor) -> None:
        """The frame before the first step, when a generation starts from known tokens (editing): what is
        given shows from the start."""
        images = preview_images(self.exp, tokens, known)
        self.frames.append(class_grid(images, self.labels[: images.shape[0]]))
        self._start = 1

    def captioned(self) -> list[np.ndarray]:
        """The frames with a "step i/n" caption and progress bar below each (every frame distinct); an edit's
        first frame, before any step, is step 0."""
        steps = len(self.frames) - self._start
        return [caption_frame(f, i + 1 - self._start, steps) for i, f in enumerate(self.frames)]


def caption_frame(frame: np.ndarray, step: int, total: int) -> np.ndarray:
    """(H,W,3) uint8 -> (H+CAPTION_HEIGHT,W,3): a bar filled to step/total, with "step/total" written on it."""
    from PIL import Image, ImageDraw

    h, w, _ = frame.shape
    strip = Image.new("RGB", (w, CAPTION_HEIGHT), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    if step > 0:  # step 0 (an edit's start): an empty bar
        draw.rectangle((0, 0, round(w * step / total) - 1, CAPTION_HEIGHT - 1), fill=(170, 200, 235))
    draw.text((2, 1), f"{step}/{total}" if w < 80 else f"step {step}/{total}", fill=(0, 0, 0))
    return np.concatenate([frame, np.asarray(strip)], axis=0)
