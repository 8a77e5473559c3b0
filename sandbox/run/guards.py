"""Guards of a long training run: updates with non-finite numbers, and the best checkpoint.

``NonFiniteGuard`` decides, before every optimizer update, whether the loss and
the gradient norm are finite; a bad step is skipped (no optimizer, scaler-growth
or EMA update), counted and reported, and a run of ``limit`` consecutive bad
steps stops training with a message naming the step and the last good
checkpoint (continuing would only burn compute: the state no longer moves).
``BestMetric`` averages a per-step metric over each checkpoint interval and says
when an interval is the best so far, so ``checkpoint-best.pt`` can be kept.
Both are part of the checkpoint, so a resumed run counts exactly as an
uninterrupted one.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

from sandbox.errors import UserError

# metrics the loop computes every step that can select a best checkpoint, and which way is better
METRIC_GOALS = {"loss": "min"}


class TrainingDiverged(UserError):
    """Too many consecutive non-finite steps: the run stops (exit code 2, one line)."""


class NonFiniteGuard:
    """Counts steps whose loss or gradient is not finite; ``limit`` consecutive ones stop the run (0: never)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.total = 0  # skipped steps over the whole run
        self.consecutive = 0  # skipped steps since the last good one
        self.first_bad = 0  # the first step of the current streak

    def check(self, step: int, loss: float, grad_norm: torch.Tensor) -> bool:
        """True if update ``step`` (1-based) may be applied. Under DDP the gradient norm is the same on
        every rank (gradients are all-reduced first), so every rank takes the same decision."""
        bad_loss, bad_grad = not math.isfinite(loss), not bool(torch.isfinite(grad_norm))
        if not (bad_loss or bad_grad):
            self.consecutive = 0
            return True
        self.total += 1
        self.consecutive += 1
        if self.consecutive == 1:
            self.first_bad = step
        what = "loss" if bad_loss else "gradient"
        print(f"warning: non-finite {what} at step {step} (loss {loss:.4g}, grad norm {float(grad_norm):.4g}); "
              f"update skipped ({self.total} skipped in this run, {self.consecutive} in a row)",
              file=sys.stderr, flush=True)
        return False

    def diverged(self) -> bool:
        return self.limit > 0 and self.consecutive >= self.limit

    def stop(self, step: int, last_good: Path | None) -> TrainingDiverged:
        where = (f"the last good checkpoint is {last_good}" if last_good is not None  # written or verified
                 else "no checkpoint before it is known good (none was saved, or only ones without a checksum)")
        return TrainingDiverged(
            f"training stopped at step {step}: {self.consecutive} consecutive steps ({self.first_bad}-{step}) had a "
            f"non-finite loss or gradient; {where}; resume from it with --train.head_fp32 true or "
            "--train.precision fp32, or start a new run with a lower lr"
        )

    def state_dict(self) -> dict:
        return {"total": self.total, "consecutive": self.consecutive, "first_bad": self.first_bad}

    def load_state_dict(self, state: dict) -> None:
        self.total, self.consecutive, self.first_bad = state["total"], state["consecutive"], state["first_bad"]


class BestMetric:
    """The mean of a per-step metric over each checkpoint interval; remembers the best interval's value."""

    def __init__(self, name: str | None):
        if name is not None and name not in METRIC_GOALS:
            raise UserError(f"train.best_metric {name!r} is not computed every step; use one of {sorted(METRIC_GOALS)}")
        self.name = name
        self.sum, self.count = 0.0, 0
        self.best: float | None = None
        self.best_step: int | None = None

    def add(self, values: dict) -> None:
        v = values.get(self.name) if self.name else None
        if v is not None and math.isfinite(v):
            self.sum += v
            self.count += 1

    def close_interval(self, step: int) -> bool:
        """End the interval at ``step``; True if its mean is the best so far (keep this checkpoint)."""
        if self.name is None or self.count == 0:
            return False
        value = self.sum / self.count
        self.sum, self.count = 0.0, 0
        better = self.best is None or (value < self.best if METRIC_GOALS[self.name] == "min" else value > self.best)
        if better:
            self.best, self.best_step = value, step
        return better

    def state_dict(self) -> dict:
        return {"name": self.name, "sum": self.sum, "count": self.count, "best": self.best, "best_step": self.best_step}

    def load_state_dict(self, state: dict) -> None:
        if state.get("name") != self.name:  # a metric chosen on resume starts from scratch
            return
        self.sum, self.count, self.best, self.best_step = state["sum"], state["count"], state["best"], state["best_step"]
