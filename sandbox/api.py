"""The Python API for notebooks and scripts (``import sandbox``); docs/python-api.md shows it in use.

    run = sandbox.load_run("runs/quickstart")                # the newest checkpoint, EMA weights
    images = sandbox.generate(run, labels=[3] * 8, seed=0)   # (8, 3, H, W) in [-1, 1]
    sandbox.save_grid(images, "threes.png")
    sandbox.generate(text_run, prompts=["a handwritten seven"] * 8)  # a text-conditioned run
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from sandbox.errors import UserError


def build(recipe, overrides: list[str] = ()):
    """The parts of a recipe -- a YAML path (read as ``sandbox train --config`` reads it: ``base:`` recipes and
    plugin files), a dict, or a parsed namespace -- as an ``Experiment`` (dataset, tokenizer, ordering, model).
    The model is the plain PyTorch one; ``sandbox.fast.apply(exp.model)`` switches the speed paths on."""
    from jsonargparse import Namespace

    from sandbox.config.build import build as build_parts
    from sandbox.config.files import parse_recipe_file
    from sandbox.config.recipe import parse_recipe

    if isinstance(recipe, (str, Path)):
        cfg = parse_recipe_file(Path(recipe), list(overrides))
    elif isinstance(recipe, dict):
        cfg = parse_recipe(recipe, origin="the recipe given to sandbox.build", trusted=True)  # the caller's own
    elif isinstance(recipe, Namespace):
        cfg = recipe
    else:
        raise UserError(f"sandbox.build takes a recipe path, dict or namespace, not {type(recipe).__name__}")
    return build_parts(cfg)


@torch.no_grad()
def generate(run, labels=None, *, prompts=None, data=None, num_images: int | None = None, seed: int = 0,
             num_iter: int | None = None, cfg: float | None = None, cfg_schedule: str | None = None,
             temperature: float | None = None, batch_size: int | None = None, head_steps=None,
             cache: str | None = None) -> Tensor:
    """Images (B, 3, H, W) in [-1, 1] from a loaded run (``sandbox.load_run``): one per label in ``labels``
    (class indices), per prompt in ``prompts`` (a text-conditioned run), per row of ``data`` (conditioning data
    as the run's condition reads it, e.g. {"image": images (B, 3, H, W)}), or ``num_images`` class-balanced
    ones. Sampling settings default to the run's recipe (``sample:``); ``seed`` fixes the images, as ``sandbox
    sample --seed`` does (the same images for the same settings and batch size). ``head_steps``
    (``"linear:50:5"``, a count, a list) and ``cache`` (``"exact"``, ``"approx:2"``) are the speed options of
    ``sandbox sample`` (docs/performance.md#fast-sampling)."""
    from sandbox.core.sampling import check_head_steps
    from sandbox.eval.samples import generate_many
    from sandbox.fast.sampling import speed_kwargs
    from sandbox.fast.step_cache import check_cache
    from sandbox.run.device import autocast_dtype

    exp = run.exp
    sc = run.sampling({"num_iter": num_iter, "cfg": cfg, "cfg_schedule": cfg_schedule, "temperature": temperature,
                       "batch_size": batch_size, "head_steps": head_steps, "cache": cache})  # the recipe's where None
    check_head_steps(run.model.head, sc.head_steps)
    check_cache(sc.cache, run.model.backbone)
    data = _asked(run, labels, prompts, data, num_images)
    device = next(run.model.parameters()).device
    return generate_many(exp, data, batch_size=sc.batch_size, seed=seed, model=run.model, num_iter=sc.num_iter,
                         cfg=sc.cfg, cfg_schedule=sc.cfg_schedule, temperature=sc.temperature,
                         autocast_dtype=autocast_dtype(run.train_config.precision, device),
                         **speed_kwargs(sc.head_steps, sc.cache))


def _asked(run, labels, prompts, data, num_images):
    """The conditioning data ``generate`` was asked with, checked against what the run's condition reads."""
    from sandbox.eval.samples import balanced_labels, conditioning_for

    condition, exp = run.model.condition, run.exp
    what = f"this run is conditioned on {condition.field!r} ({type(condition).__name__})"
    if sum(x is not None for x in (labels, prompts, data)) > 1:
        raise UserError("generate takes one of labels, prompts and data")
    if data is not None:
        return data
    if prompts is not None:
        if isinstance(prompts, str) or condition.field != "text":
            raise UserError("prompts must be a list of strings" if isinstance(prompts, str) else
                            f"{what}, not on text: pass labels=[...]" if condition.field == "label" else
                            f"{what}, not on text: pass data={{{condition.field!r}: ...}}")
        return {"text": list(prompts)}
    if labels is not None and condition.field != "label":
        raise UserError(f"{what}, not on class labels: pass "
                        + ("prompts=[...]" if condition.field == "text" else f"data={{{condition.field!r}: ...}}"))
    if labels is None:
        if num_images is None:
            raise UserError("generate needs labels, prompts, data or num_images")
        return conditioning_for(condition, run.dataset(), balanced_labels(num_images, exp.num_classes))
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    if len(labels) and not (0 <= int(labels.min()) and int(labels.max()) < exp.num_classes):
        raise UserError(f"labels must lie in 0..{exp.num_classes - 1}")
    return labels


def save_grid(images: Tensor, path: str | Path, labels=None, prompts=None) -> Path:
    """A PNG grid of ``images`` (B, 3, H, W) in [-1, 1]: one row per class with ``labels``, one captioned row per
    prompt with ``prompts``, else square-ish."""
    from sandbox.images.grids import save_class_grid, save_prompt_grid
    from sandbox.images.grids import save_grid as save_plain

    if prompts is not None:
        save_prompt_grid(images, list(prompts), path)
    elif labels is None:
        save_plain(images, path)
    else:
        save_class_grid(images, torch.as_tensor(labels), path)
    return Path(path)
