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

from sandbox.core.contracts import Ordering, SampleStep, TrainingSplit
from sandbox.core.schedules import cosine_schedule


def truncated_normal(mean: float, std: float, low: float, high: float, generator: torch.Generator | None,
                     device: torch.device | str) -> float:
    """One draw from N(mean, std) truncated to [low, high], by inverting the CDF (torch RNG only)."""
    a, b = (torch.tensor([(low - mean) / std, (high - mean) / std], dtype=torch.float64)).unbind()
    cdf_a, cdf_b = torch.special.ndtr(a), torch.special.ndtr(b)
    u = torch.rand(1, generator=generator, device=device, dtype=torch.float64).cpu()[0]
    return float(mean + std * torch.special.ndtri(cdf_a + u * (cdf_b - cdf_a)))


def random_orders(batch: int, seq_len: int, generator: torch.Generator | None, device,
                  last: Tensor | None = None) -> Tensor:
    """(B, L) long: an independent random permutation per row. Positions marked in ``last`` (B, L) bool come
    after all the others (each part still in a random order); the random draws are the same either way."""
    scores = torch.rand(batch, seq_len, generator=generator, device=device)  # (B, L) in [0, 1)
    if last is not None:
        scores = scores.masked_fill(last.to(scores.device), 2.0)
    return scores.argsort(dim=1)


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

    def generation_order(self, batch: int, generator: torch.Generator | None = None,
                         device: torch.device | str = "cpu") -> Tensor:
        """(B, L): a fresh random permutation per row, what a causal backbone trains on (MAR Table 1's "random
        order, causal" row: every order is as likely as the sampling plan's)."""
        return random_orders(batch, self.seq_len, generator, device)

    def sampling_plan(self, batch: int, num_iter: int, generator: torch.Generator | None = None,
                      device: torch.device | str = "cpu", known: Tensor | None = None) -> list[SampleStep]:
        """Cosine counts over the unknown positions, revealed in a random order of them.

        With ``known``, ``progress`` is the fraction of the whole sequence fixed after the step, known
        positions included -- the quantity MAR's linear CFG schedule reads, (L - masked) / L -- so a step
        is guided as a plain plan's step in the same state (as many tokens fixed) would be. It keeps MAR's
        clamp (schedules.py): the last step reads (L - 1) / L, so known all False is the plain plan exactly.
        """
        L = self.seq_len
        n = L if known is None else self.count_unknown(known, batch, L)
        orders = random_orders(batch, L, generator, device, last=known)  # (B, L) unknown positions first
        steps, masked = [], n
        for revealed, mask_len in (cosine_schedule(n, num_iter) if n else []):
            # the official keeps orders[:, :masked] hidden, so the last positions of the order come first
            predict = torch.zeros(batch, L, dtype=torch.bool, device=device)
            predict.scatter_(1, orders[:, masked - revealed : masked], True)
            masked -= revealed
            steps.append(SampleStep(predict=predict, progress=(L - mask_len) / L))
        return steps
