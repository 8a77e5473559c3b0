"""Generation as an animation: one frame per sampling step, tokens appearing as the ordering reveals them.

A frame decodes what is known so far -- ``Ordering.preview`` places the known tokens in the grid (a
coarse-to-fine ordering may show its finest known scale), ``Tokenizer.from_tokens``/``decode`` turn it into
pixels -- and paints grid cells that hold nothing yet grey. Nothing here knows a particular ordering or
tokenizer, so any pair animates.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from sandbox.generate import StepState
from sandbox.images import class_grid

GREY = 0.0  # the middle of [-1, 1]: 128 in uint8


@torch.no_grad()
def preview_images(exp, tokens: Tensor, known: Tensor) -> Tensor:
    """(tokens (B,L,C), known (B,L)) -> images (B,3,H,W) in [-1,1], unknown cells grey."""
    grid, shown = exp.ordering.preview(tokens, known)  # (B, C, h, w), (B, h, w)
    images = exp.tokenizer.decode(exp.tokenizer.from_tokens(grid)).float().clamp(-1, 1)  # (B, 3, H, W)
    mask = F.interpolate(shown[:, None].float(), size=images.shape[-2:], mode="nearest") > 0.5  # (B, 1, H, W)
    return torch.where(mask, images, torch.full_like(images, GREY))


class FrameRecorder:
    """An ``on_step`` callback for ``generate``/``generate_many`` that draws one frame per step of the first
    batch (``generate_many`` restarts the step index at every batch), laid out one row per class."""

    def __init__(self, exp, labels: Tensor):
        self.exp, self.labels = exp, labels.cpu()
        self.frames: list[np.ndarray] = []
        self.count = 0  # images in the animated batch
        self._batch = -1

    def __call__(self, state: StepState) -> None:
        if state.index == 0:
            self._batch += 1
        if self._batch != 0:
            return
        images = preview_images(self.exp, state.tokens, state.known)
        self.count = images.shape[0]
        self.frames.append(class_grid(images, self.labels[: images.shape[0]]))
