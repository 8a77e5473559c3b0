"""Resuming a run: which recipe changes a run directory accepts, when a run is finished, and the RNG state.

A run directory refuses a recipe that differs from the one it holds, except in keys that do not change what
is trained: ``RESUMABLE_KEYS`` (how the run is computed, logged and checkpointed) and what each plugin
declares in its ``resumable_args``.
"""
from __future__ import annotations

import torch

from sandbox.errors import UserError
from sandbox.run.rundir import RunDir

# recipe keys that may change when a run resumes (they do not change what is being trained)
# (precision and the fp32 head are here too: switching them is how a run that diverged resumes from its last
# good checkpoint; `plugins` only says where the plugin files are, class paths and init_args say what is trained)
RESUMABLE_KEYS = {"train.steps", "train.log_every", "train.ckpt_every", "train.sample_every", "train.num_workers",
                  "train.device", "train.keep_checkpoints", "train.best_metric", "train.max_nonfinite_steps",
                  "train.precision", "train.head_fp32", "train.tensorboard", "train.fast_paths", "sample", "plugins",
                  # how the global batch is split (per-rank batch x ranks x accumulation) and how it is computed;
                  # the global batch itself is checked against the checkpoint's
                  "train.batch_size", "train.grad_accum", "train.compile", "model.grad_checkpointing",
                  "model.attention"}


def resumable_keys(plugin_classes: dict[str, type]) -> set[str]:
    """``RESUMABLE_KEYS`` and each plugin slot's ``<slot>.init_args.<arg>`` for the args its class declares."""
    keys = set(RESUMABLE_KEYS)
    for slot, cls in plugin_classes.items():
        keys |= {f"{slot}.init_args.{arg}" for arg in getattr(cls, "resumable_args", ())}
    return keys


def _differences(a, b, resumable: set[str], prefix="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            key = f"{prefix}.{k}" if prefix else str(k)
            if any(key == r or key.startswith(r + ".") for r in resumable):
                continue
            out += _differences(a.get(k), b.get(k), resumable, key)
        return out
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        a, b = list(a), list(b)
    return [] if a == b else [f"{prefix}: {a!r} -> {b!r}"]


def check_run_recipe(run: RunDir, recipe: dict, plugin_classes: dict[str, type] | None = None) -> None:
    """Refuse to continue a run directory that holds a different recipe (the resumable keys aside, and the
    init_args the recipe's plugins declare resumable)."""
    if not run.exists():
        return
    diffs = _differences(_with_todays_defaults(run.read_recipe()), recipe, resumable_keys(plugin_classes or {}))
    if diffs:
        raise UserError(f"run directory {run.root} holds a different recipe ({'; '.join(diffs[:3])}); "
                        "use a new --run_dir or the stored recipe")


def _with_todays_defaults(stored: dict) -> dict:
    """The stored recipe in today's terms, re-parsed so that keys added since it was written hold their
    defaults (a new plugin argument or config field defaults to what runs did before it existed): a recipe file
    that leaves them out, or sets them to those defaults, continues the run. As stored where it cannot be parsed
    (a plugin file not loaded in this process): then the raw comparison decides."""
    from sandbox.config.recipe import parse_recipe, recipe_dict, upgrade_recipe

    upgraded = upgrade_recipe(stored)
    try:
        return recipe_dict(parse_recipe(upgraded))
    except (UserError, ValueError, TypeError):
        return upgraded


def grid_name(step: int) -> str:
    """The sample grid drawn at ``step`` (samples/<name>.png)."""
    return f"step_{step:07d}"


def finished(run: RunDir, ckpt: dict, steps: int) -> bool:
    """Whether a run reached ``steps`` and did its end work: the end checkpoint, then the final grid (a run
    stopped by a signal in its last step, or whose final grid failed, still does them when rerun)."""
    step = int(ckpt["step"])
    return step >= steps and bool(ckpt.get("ended")) and (run.samples_dir / f"{grid_name(step)}.png").is_file()


def rng_state(generator: torch.Generator) -> dict:
    state = {"generator": generator.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
