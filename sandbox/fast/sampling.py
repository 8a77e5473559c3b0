"""The sampling options that trade work for speed, as the sampling core takes them, and the one switch that
sets them (``sandbox sample`` / ``sandbox eval --fast true``).

    num_iter      the plan's steps (MAR: fewer steps, more tokens each)
    head_steps    the head's own steps per plan step, annealed (sandbox/core/schedules.py, HeadSteps: DiSA)
    cache         reuse across plan steps (sandbox/fast/step_cache.py: exact, or LazyMAR's approx:N)
    compile       the head's sampling steps under torch.compile (sandbox/fast/compile.py)
    a few-step head (ShortcutHead, recipes/quickstart_shortcut.yaml) is a run of its own: 1-4 steps per token

They stack: every combination runs (tests/test_fast_sampling.py), and ``sandbox bench --pareto RUN`` maps their
quality and speed on a trained run (sandbox/eval/pareto.py).
"""
from __future__ import annotations

import sys

from sandbox.errors import UserError
from sandbox.fast.step_cache import check_cache, sampler_for

# ``--fast true``: the point of the quality-speed map that keeps the default's quality at the most images/s.
# Measured on the quickstart (docs/performance.md#fast-sampling: `sandbox bench --pareto`, 3 seeds x 1,000
# samples; .ci/measure_fast_target.py side by side in one process): 4 plan steps instead of 16, a fifth of the
# head's own steps at every step (DDPM 50 -> 10) and LazyMAR's caches refreshed every other step: 5.85x the
# recipe's settings (1,000 images in 9.2 s against 54.1 s) at a Frechet distance of 64.5 +- 1.5 against
# 64.4 +- 1.5. Why a constant count and not DiSA's annealing (the previous --fast, linear:50:5): annealing was
# slower at the same Frechet distance (linear:50:5: 63.5 +- 2.4 at 75 images/s; a constant 12: 63.5 +- 0.6 at 112)
# and worse at the same speed (linear:30:5: 66.5 +- 1.4 at 97), because the plan's last steps reveal most of the
# tokens (5, 14, 21, 24 of 64 at 4 steps) and so their few head steps decide most of the image.
FAST_SAMPLING = {"num_iter": 4, "head_steps": "20%", "cache": "approx:2"}
FAST_MEASURED: str | None = "commit 9b61bdf on the 2-core CPU"  # None: FAST_SAMPLING is provisional


def fast_options(given: dict, model) -> dict:
    """The options ``--fast true`` sets: ``FAST_SAMPLING`` where the command line gave none (``given``: option ->
    value or None), less those the model cannot follow (head_steps for a head with no step count of its own, a
    cache its backbone refuses). Prints what it sets (stderr)."""
    chosen = {k: v for k, v in FAST_SAMPLING.items() if given.get(k) is None}
    head = model.head
    if "head_steps" in chosen:
        chosen["head_steps"] = fit_schedule(head, chosen["head_steps"])
        if chosen["head_steps"] is None:
            del chosen["head_steps"]
    if "cache" in chosen:
        try:
            check_cache(chosen["cache"], model.backbone)
        except UserError:
            del chosen["cache"]  # a backbone with a cache of its own keeps it
    note = "provisional, not yet measured" if FAST_MEASURED is None else f"measured at {FAST_MEASURED}"
    shown = ", ".join(f"--{k} {v}" for k, v in chosen.items()) or "nothing (every option was given)"
    print(f"--fast true sets {shown} ({note}; docs/performance.md#fast-sampling)", file=sys.stderr)
    return chosen


def fit_schedule(head, spec) -> str | None:
    """``spec`` in the head's counts, its last count raised to the fewest steps the head takes (DDPM: 2); None
    for a head with no step count of its own (nothing to anneal)."""
    from sandbox.core.sampling import check_head_steps
    from sandbox.core.schedules import HeadSteps

    if not (head.supports_num_steps and head.default_num_steps is not None):
        return None
    schedule = HeadSteps.parse(spec).resolve(head.default_num_steps)
    if schedule.kind == "constant":  # a share of a small count can fall below the fewest steps (DDPM: 2)
        candidates = [str(k) for k in range(schedule.values[0], max(schedule.values[0], head.default_num_steps) + 1)]
    elif schedule.kind in ("linear", "cosine") and schedule.values[1] < schedule.values[0]:
        start, end = schedule.values
        candidates = [f"{schedule.kind}:{start}:{last}" for last in range(end, start + 1)]
    else:
        candidates = []
    for candidate in candidates:
        try:
            check_head_steps(head, candidate)
            return candidate
        except UserError:
            continue
    return str(schedule)


def speed_kwargs(head_steps=None, cache="off") -> dict:
    """``sample_tokens`` / ``generate`` keyword arguments for the options: the head-step schedule and the
    sampler of the cache (absent when off)."""
    out = {} if head_steps is None else {"head_steps": head_steps}
    sampler = sampler_for(cache or "off")
    if sampler is not None:
        out["sampler"] = sampler
    return out
