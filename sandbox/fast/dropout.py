"""Dropout whose random mask is cheaper on the CPU. Applied by ``sandbox.fast.apply``; numbers in
docs/performance.md ("Dropout").

MAR trains with dropout 0.1 on the attention probabilities, the attention output
and both MLP layers of every block. On the CPU, ``torch.nn.functional.dropout``
draws each element with ``bernoulli_``: a serial loop over torch's Mersenne
Twister that spends two 32-bit draws per element.

Here every element gets 16 random bits from numpy's PCG64 (``random_raw``: 64
bits per call) and is kept when they are at or above ``round(p * 65536)``. The
keep probability is then ``1 - round(p * 65536) / 65536`` (0.899994 for p = 0.1;
flash-attention's GPU kernels quantise p to 8 bits) and kept elements are scaled
by its inverse, so the output's expectation is exactly the input, as with
``F.dropout``.

Seeding: each mask's PCG64 stream is keyed by a 62-bit seed drawn from torch's
default generator, so ``torch.manual_seed`` (the trainer seeds it per
micro-batch) fixes every mask, and checkpointed blocks replay theirs.
Other devices and dtypes keep ``F.dropout`` (fused and cheap on GPUs).
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

_LEVELS = 1 << 16  # 16 random bits per element


class _Masked(torch.autograd.Function):
    """x * mask with the (already scaled) mask saved for the backward pass instead of x."""

    @staticmethod
    def forward(ctx, x: Tensor, mask: Tensor) -> Tensor:
        ctx.save_for_backward(mask)
        return x * mask

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (mask,) = ctx.saved_tensors
        return grad * mask, None


def cpu_mask(shape: torch.Size, p: float) -> Tensor:
    """A float32 dropout mask of ``shape`` on the CPU: 0 with probability ~p, else 1 / keep probability."""
    n = math.prod(shape)
    threshold = round(p * _LEVELS)
    seed = int(torch.randint(0, 1 << 62, (1,)).item())  # from torch's default generator: manual_seed fixes it
    raw = np.random.Generator(np.random.PCG64(seed)).bit_generator.random_raw((n + 3) // 4)  # (n/4,) uint64
    bits = torch.from_numpy(raw.view(np.int16))[:n].view(shape)  # (shape) uniform in [-2^15, 2^15)
    keep = bits >= threshold - _LEVELS // 2  # (shape) bool, probability 1 - threshold / 2^16
    return keep.float().mul_(_LEVELS / (_LEVELS - threshold))


def apply_mask(x: Tensor, mask: Tensor) -> Tensor:
    """x * mask, with the mask (not x) saved for the backward pass."""
    return _Masked.apply(x, mask)


def use_cpu_mask(x: Tensor, p: float) -> bool:
    """Whether dropout p on ``x`` takes the CPU mask: 0 < p < 1, float32 on the CPU, outside ``torch.compile``
    (which traces ``F.dropout`` into its own kernels; a bf16 mask would round the 1 / keep scale)."""
    return (0.0 < p < 1.0 and x.device.type == "cpu" and x.dtype == torch.float32
            and not torch.compiler.is_compiling())


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """``F.dropout(x, p, training)`` with the cheaper mask on the CPU."""
    if not training or p == 0.0:
        return x
    if not use_cpu_mask(x, p):
        return F.dropout(x, p, True)
    return apply_mask(x, cpu_mask(x.shape, p))


class Dropout(nn.Dropout):
    """``nn.Dropout`` (same ``p``, no parameters) computed by :func:`dropout`."""

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)


def replace_dropout(module: nn.Module, enabled: bool = True) -> None:
    """Every ``nn.Dropout`` inside ``module`` computed by :func:`dropout` (in place, the same ``p``); with
    ``enabled`` False, back to ``nn.Dropout``."""
    for m in module.modules():
        if enabled and type(m) is nn.Dropout:
            m.__class__ = Dropout
        elif not enabled and type(m) is Dropout:
            m.__class__ = nn.Dropout
