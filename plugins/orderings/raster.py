"""A fixed row-major (raster) order: the classic autoregressive baseline, run through MAR's masked core.

Training hides a suffix of the raster order (the transformer is bidirectional,
so the visible prefix attends to itself and the hidden suffix is decoded from
mask tokens, as in MAR) and takes the loss on the whole suffix. Sampling
reveals the raster order in chunks sized by the cosine schedule;
``num_iter = L`` reveals one token per step (next-token autoregression).

References:
    MAR sec. 4 and Table 1 (raster vs. random order; "MAR with raster order" as the AR special case).
    MaskGIT: Chang et al., CVPR 2022, sec. 3.2 (cosine schedule).
"""
from __future__ import annotations

import math
from typing import Literal, Optional

import torch
from torch import Tensor

from sandbox.core.contracts import Ordering, SampleStep, TrainingSplit
from sandbox.core.schedules import cosine_schedule
from sandbox.errors import UserError
from sandbox.plugins.orderings.random import truncated_normal


class RasterOrdering(Ordering):
    """Row-major order: train on a hidden suffix (uniform or MAR mask ratio); sample in raster order, cosine counts."""

    contract_args = {"mask_ratio": "truncnorm"}  # the default (uniform) is covered by tests/test_orderings.py

    def __init__(
        self,
        grid: tuple[int, int],
        # Sampling in raster order visits every prefix length, from nothing known to all but the last
        # chunk, so training should see them all: uniform suffix lengths. "truncnorm" is MAR's
        # distribution (mostly >70% hidden), which never trains on a long known prefix.
        mask_ratio: Literal["uniform", "truncnorm"] = "uniform",
        # None: 0.0 for uniform (every suffix length), 0.7 for truncnorm (MAR sec. 5.1)
        mask_ratio_min: Optional[float] = None,
        mask_ratio_std: float = 0.25,  # truncnorm only: MAR sec. 5.1, std 0.25 around 1.0
    ):
        super().__init__(grid)
        if mask_ratio not in ("uniform", "truncnorm"):
            raise UserError(f"RasterOrdering mask_ratio must be 'uniform' or 'truncnorm', got {mask_ratio!r}")
        if mask_ratio_min is None:
            mask_ratio_min = 0.0 if mask_ratio == "uniform" else 0.7
        if not 0.0 <= mask_ratio_min <= 1.0:
            raise UserError(f"RasterOrdering mask_ratio_min must lie in [0, 1], got {mask_ratio_min}")
        if mask_ratio_std <= 0:
            raise UserError(f"RasterOrdering mask_ratio_std must be > 0, got {mask_ratio_std}")
        self.mask_ratio, self.mask_ratio_min, self.mask_ratio_std = mask_ratio, mask_ratio_min, mask_ratio_std

    def draw_num_hidden(self, generator: torch.Generator | None, device) -> int:
        """How many positions (a suffix) one batch hides, in [1, L]."""
        L = self.seq_len
        if self.mask_ratio == "truncnorm":
            ratio = truncated_normal(1.0, self.mask_ratio_std, self.mask_ratio_min, 1.0, generator, device)
        else:
            u = float(torch.rand(1, generator=generator, device=device).cpu()[0])
            ratio = self.mask_ratio_min + (1.0 - self.mask_ratio_min) * u
        return min(L, max(1, math.ceil(L * ratio)))

    def training_split(self, seq: Tensor, generator: torch.Generator | None = None) -> TrainingSplit:
        B, L, _ = seq.shape
        num_hidden = self.draw_num_hidden(generator, seq.device)  # one length per batch: equal encoder lengths
        hidden = (torch.arange(L, device=seq.device) >= L - num_hidden).repeat(B, 1)  # (B, L) the suffix
        return TrainingSplit(inputs=seq, visible=~hidden, weight=hidden.to(seq.dtype))

    def sampling_plan(self, batch: int, num_iter: int, generator: torch.Generator | None = None,
                      device: torch.device | str = "cpu", known: Tensor | None = None) -> list[SampleStep]:
        """The unknown positions in raster order, cosine counts; any known set works (a raster prefix is
        what training rehearses; elsewhere the raster order simply skips the known positions).
        ``progress``: as RandomOrdering, the fraction of the sequence fixed, known positions included."""
        L = self.seq_len
        pos = torch.arange(L, device=device)
        n = L if known is None else self.count_unknown(known, batch, L)
        if known is None:
            orders = pos.expand(batch, L)  # (B, L)
        else:  # unknown positions first, each group in raster order (the keys are distinct)
            orders = (pos + L * known.to(device).long()).argsort(dim=1)  # (B, L)
        steps, start = [], 0
        for revealed, mask_len in (cosine_schedule(n, min(num_iter, n)) if n else []):
            predict = torch.zeros(batch, L, dtype=torch.bool, device=device)
            predict.scatter_(1, orders[:, start : start + revealed], True)  # (B, L) the next chunk
            start += revealed
            steps.append(SampleStep(predict=predict, progress=(L - mask_len) / L))  # as RandomOrdering (MAR's CFG)
        return steps
