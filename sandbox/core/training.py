"""The training step: a batch of images -> latents (tokenizer) -> a token sequence with a visible / loss split
(ordering) -> conditions (transformer) -> the head's loss; then one optimizer step.

``training_loss`` is the method (MAR sec. 3-4: Diffusion Loss on the hidden tokens of a random-order masked
sequence); ``train_step`` is the optimizer step the official engine takes (backward, gradient clipping at
max norm 3.0, AdamW), with gradient accumulation, an fp16 grad scaler and a guard that may skip a bad update.
The trainer (sandbox/run/trainer.py) and ``sandbox bench`` both call ``train_step``.

References:
    MAR official engine_mar.py (train_one_epoch: loss scaler, clip_grad 3.0, EMA after the step).
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from sandbox.core.checks import check_split


def training_loss(exp, model: nn.Module, items: Tensor, labels: Tensor, generator: torch.Generator | None) -> Tensor:
    """A batch of dataset items (images, or a latent cache's encoded images) and labels (B,) -> scalar loss.
    ``exp`` is a built ``Experiment``; ``model`` is its model, possibly DDP-wrapped."""
    with torch.no_grad():
        latent = exp.dataset.latents(items, exp.tokenizer, generator)  # (B, c, h*p, w*p)
        seq = exp.ordering.to_sequence(exp.tokenizer.to_tokens(latent))  # (B, L, C)
        split = exp.model.backbone.training_split(exp.ordering, seq, generator)  # the ordering's, or teacher forcing
        check_split(exp.ordering, split, seq)
    return model(seq, split, labels, generator)


@dataclass
class StepResult:
    """What one optimizer step reports."""

    loss: float  # the mean loss over the micro-batches (and ranks, when ``reduce_loss`` averages them)
    grad_norm: Tensor  # the total gradient norm before clipping
    applied: bool  # False when ``accept`` refused the update (e.g. a non-finite loss)


def train_step(forward: Callable[[int], Tensor], opt: torch.optim.Optimizer, params, *, accum: int = 1,
               scaler: torch.amp.GradScaler | None = None, grad_clip: float = 3.0, no_sync=None,
               reduce_loss: Callable[[float], float] | None = None,
               accept: Callable[[float, Tensor], bool] | None = None) -> StepResult:
    """One optimizer step over ``accum`` micro-batches: ``forward(a)`` gives micro-batch a's loss, which is
    scaled by 1/accum and backpropagated (inside ``no_sync()`` for all but the last, so DDP averages gradients
    once); then the gradients are unscaled, clipped to ``grad_clip`` (0: no clipping), and the update is
    applied unless ``accept(loss, grad_norm)`` refuses it; the scaler updates and the gradients are cleared.

    ``reduce_loss`` turns this process's summed loss into the one reported (e.g. the mean over ranks)."""
    scaler = scaler or torch.amp.GradScaler(enabled=False)
    total = 0.0
    for a in range(accum):
        last = a == accum - 1
        with nullcontext() if last or no_sync is None else no_sync():
            loss = forward(a) / accum
            scaler.scale(loss).backward()
        total += loss.item()
    if reduce_loss is not None:
        total = reduce_loss(total)
    scaler.unscale_(opt)
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
    applied = accept is None or accept(total, grad_norm)
    if applied:
        scaler.step(opt)
    scaler.update()  # fp16: backs the scale off after an overflow; a no-op otherwise
    opt.zero_grad(set_to_none=True)
    return StepResult(total, grad_norm, applied)
