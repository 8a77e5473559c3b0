"""Schedules of generation: the cosine reveal schedule shared by every ordering that reveals tokens in chunks,
and the classifier-free guidance scale over the steps.

References:
    MaskGIT: Chang et al., CVPR 2022, sec. 3.2 (cosine mask schedule).
    MAR official models/mar.py ``sample_tokens`` (the exact integer rule reproduced here; the linear CFG schedule).
"""
from __future__ import annotations

import math


def cosine_schedule(seq_len: int, num_iter: int) -> list[tuple[int, int]]:
    """Per step: (tokens revealed, tokens still masked after the step as MAR counts them).

    After step t (0-based) floor(L * cos(pi/2 * (t+1)/T)) tokens stay masked,
    at least one is revealed per step and at least one stays masked until the
    last step, which reveals the rest. Steps that would reveal nothing (when
    num_iter > L) are dropped.

    Quirk kept for reproducibility: the official code clamps the masked count to
    >= 1 even at the last step, and its linear CFG schedule reads that clamped
    count, so the last step's guidance is 1 + (cfg-1)(L-1)/L rather than cfg.
    The second number of each pair is that clamped count.
    """
    if num_iter < 1:
        raise ValueError(f"num_iter must be >= 1, got {num_iter}")
    masked, steps = seq_len, []
    for t in range(num_iter):
        target = math.floor(seq_len * math.cos(math.pi / 2.0 * (t + 1) / num_iter))
        mask_len = max(1, min(masked - 1, target))
        after = 0 if t == num_iter - 1 else mask_len
        if masked - after > 0:
            steps.append((masked - after, mask_len))
        masked = after
    return steps


def cfg_at(cfg: float, schedule: str, progress: float) -> float:
    """Guidance scale of a step. ``linear`` (MAR): 1 + (cfg - 1) * progress; ``constant``: cfg."""
    if schedule == "linear":
        return 1.0 + (cfg - 1.0) * progress
    if schedule == "constant":
        return cfg
    raise ValueError(f"unknown cfg_schedule {schedule!r}; use 'linear' or 'constant'")
