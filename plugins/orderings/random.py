"""MAR's random order: each image gets a fresh random permutation of its token grid.

Training hides a random subset (mask ratio ~ truncated normal on [0.7, 1]
centred at 1.0, std 0.25, one ratio per batch) and takes the loss on it.
Sampling reveals the permutation in chunks sized by the cosine schedule.

References:
    MAR sec. 4 and 5.1 (masked generalised autoregression, mask-ratio distribution); MAGE/MaskGIT for the schedule.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from sandbox.kinds import Ordering, SampleStep, TrainingSplit
from sandbox.schedules import cosine_schedule


def truncated_normal(mean: float, std: float, low: float, high: float, generator: torch.Generator | None,
                     device: torch.device | str) -> float:
    """One draw from N(mean, std) truncated to [low, high], by inverting the CDF (torch RNG only)."""
    a, b = (torch.tensor([(low - mean) / std, (high - mean) / std], dtype=torch.float64)).unbind()
    cdf_a, cdf_b = torch.special.ndtr(a), torch.special.ndtr(b)
    u = torch.rand(1, generator=generator, device=device, dtype=torch.float64).cpu()[0]
    return float(mean + std * torch.special.ndtri(cdf_a + u * (cdf_b - cdf_a)))


def random_orders(batch: int, seq_len: int, generator: torch.Generator | None, device) -> Tensor:
    """(B, L) long: an independent random permutation per row."""
    return torch.rand(batch, seq_len, generator=generator, device=device).argsort(dim=1)


class RandomOrdering(Ordering):
    """MAR: random order per image; train on a truncated-normal mask ratio; sample with the cosine schedule."""

    def __init__(
        self,
        grid: tuple[int, int],
        mask_ratio_min: float = 0.7,  # MAR sec. 5.1: ratios in [0.7, 1.0]
        mask_ratio_std: float = 0.25,  # MAR sec. 5.1: std 0.25 around 1.0
    ):
        super().__init__(grid)
        if not 0.0 <= mask_ratio_min <= 1.0:
            raise ValueError(f"mask_ratio_min must lie in [0, 1], got {mask_ratio_min}")
        self.mask_ratio_min, self.mask_ratio_std = mask_ratio_min, mask_ratio_std

    def training_split(self, seq: Tensor, generator: torch.Generator | None = None) -> TrainingSplit:
        B, L, _ = seq.shape
        ratio = truncated_normal(1.0, self.mask_ratio_std, self.mask_ratio_min, 1.0, generator, seq.device)
        num_masked = math.ceil(L * ratio)  # one ratio per batch keeps the encoder's length equal across rows
        orders = random_orders(B, L, generator, seq.device)  # (B, L)
        hidden = torch.zeros(B, L, dtype=torch.bool, device=seq.device)
        hidden.scatter_(1, orders[:, :num_masked], True)  # (B, L)
        return TrainingSplit(inputs=seq, visible=~hidden, weight=hidden.to(seq.dtype))

    def sampling_plan(self, batch: int, num_iter: int, generator: torch.Generator | None = None,
                      device: torch.device | str = "cpu") -> list[SampleStep]:
        L = self.seq_len
        orders = random_orders(batch, L, generator, device)  # (B, L)
        steps, masked = [], L
        for revealed, mask_len in cosine_schedule(L, num_iter):
            # the official keeps orders[:, :masked] hidden, so the last positions of the order come first
            predict = torch.zeros(batch, L, dtype=torch.bool, device=device)
            predict.scatter_(1, orders[:, masked - revealed : masked], True)
            masked -= revealed
            steps.append(SampleStep(predict=predict, progress=(L - mask_len) / L))
        return steps
