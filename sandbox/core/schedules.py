"""Schedules of generation: the cosine reveal schedule shared by every ordering that reveals tokens in chunks,
the classifier-free guidance scale over the steps, and the head's step count over the steps (``HeadSteps``).

References:
    MaskGIT: Chang et al., CVPR 2022, sec. 3.2 (cosine mask schedule).
    MAR official models/mar.py ``sample_tokens`` (the exact integer rule reproduced here; the linear CFG schedule).
    DiSA: Zhao et al. 2025, arXiv 2505.20297 (diffusion step annealing; ``HeadSteps``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass


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


# --------------------------------------------------------------------------------------
# Head-step annealing: the head's own step count as a schedule over the plan
# --------------------------------------------------------------------------------------
HEAD_STEPS_SYNTAX = ("a step count (10) or a share of the head's own count (50%), a schedule KIND:START:END with "
                     "KIND linear or cosine (linear:50:5, cosine:100%:10%), or a list of counts ([50, 20, 5])")


@dataclass(frozen=True)
class HeadSteps:
    """The head's step count at each step of a sampling plan: DiSA's diffusion step annealing (many steps for the
    first tokens, few for the last, whose distributions the known tokens already narrow), for any head that
    declares ``supports_num_steps``.

    ``kind`` is ``constant`` (``values`` = (k,)), ``linear`` / ``cosine`` (``values`` = (start, end)) or ``list``
    (counts spread evenly over the plan). A value is a count (int) or a share of the head's own count (a str
    ``"P%"``, resolved by ``resolve``). Step i of an n-step plan sits at u = i / (n - 1) (0 for a single step):
    linear gives start + (end - start) u, cosine end + (start - end)(1 + cos(pi u)) / 2 (more steps than linear
    in the first half of the plan, fewer in the second); so the first step takes start and the last end, whatever n the ordering makes of
    num_iter. Counts are rounded half up and at least 1.

    References:
        DiSA: Zhao et al., "Diffusion Step Annealing in Autoregressive Image Generation", 2025 (arXiv 2505.20297):
        50 steps for the first tokens down to 5 for the last (two-stage, linear and cosine schedules).
    """

    kind: str
    values: tuple

    @classmethod
    def parse(cls, spec) -> "HeadSteps | None":
        """``spec`` -> a schedule: None (the head's own count), a count or ``"P%"``, ``"KIND:START:END"`` or a list
        of counts; ValueError (naming the syntax) for anything else."""
        if spec is None or isinstance(spec, HeadSteps):
            return spec
        if isinstance(spec, (list, tuple)):
            if not spec:
                raise ValueError(f"an empty list; give {HEAD_STEPS_SYNTAX}")
            return cls("list", tuple(_step_value(v, spec) for v in spec))
        if isinstance(spec, str) and ":" in spec:
            parts = spec.split(":")
            if len(parts) != 3 or parts[0] not in ("linear", "cosine"):
                raise ValueError(f"{spec!r} is not {HEAD_STEPS_SYNTAX}")
            return cls(parts[0], (_step_value(parts[1], spec), _step_value(parts[2], spec)))
        return cls("constant", (_step_value(spec, spec),))

    def __str__(self) -> str:
        if self.kind == "list":
            return "[" + ", ".join(map(str, self.values)) + "]"
        return ":".join([self.kind, *map(str, self.values)]) if self.kind != "constant" else str(self.values[0])

    def resolve(self, own: int | None) -> "HeadSteps":
        """The schedule in counts: each ``"P%"`` as P% of ``own`` (the head's own count); ValueError without one."""
        if not any(isinstance(v, str) for v in self.values):
            return self
        if own is None:
            raise ValueError(f"{self} gives a share of the head's own step count, and this head declares none "
                             "(default_num_steps); give counts")
        return HeadSteps(self.kind, tuple(v if isinstance(v, int) else max(1, _round(own * float(v[:-1]) / 100))
                                          for v in self.values))

    def at(self, i: int, n: int) -> int:
        """The head's step count at step ``i`` of an ``n``-step plan (a resolved schedule)."""
        if self.kind == "constant":
            return self.values[0]
        if self.kind == "list":
            return self.values[min(len(self.values) - 1, i * len(self.values) // max(n, 1))]
        u = i / (n - 1) if n > 1 else 0.0
        start, end = self.values
        if self.kind == "linear":
            return max(1, _round(start + (end - start) * u))
        return max(1, _round(end + (start - end) * (1 + math.cos(math.pi * u)) / 2))

    def bounds(self) -> tuple[int, int]:
        """(fewest, most) steps any step of any plan gets (a resolved schedule)."""
        return min(self.values), max(self.values)


def _round(x: float) -> int:
    return math.floor(x + 0.5)  # half up: 26.5 -> 27 (Python's round() goes to the even 26)


def _step_value(v, spec):
    """One count of a schedule: an int >= 1, or a share ``"P%"`` with 0 < P; ValueError naming the syntax."""
    if isinstance(v, str):
        text = v.strip()
        if text.endswith("%"):
            try:
                share = float(text[:-1])
            except ValueError:
                share = -1.0
            if share > 0 and math.isfinite(share):
                return text
        elif text.isdigit() and int(text) >= 1:
            return int(text)
    elif isinstance(v, int) and not isinstance(v, bool) and v >= 1:
        return v
    raise ValueError(f"{spec!r} is not {HEAD_STEPS_SYNTAX}")
