"""``sandbox calibrate-scale --config RECIPE``: the latent scale that gives unit-variance latents, written into the recipe.

The scale is 1 / std of the unscaled latents over every element of a seeded sample of the recipe's dataset,
one posterior sample per image: how the official KL-16 scale 0.2325 was computed on ImageNet (LTH14/mar#2,
#62). The official does not shift the mean (#100, following DiT); ``--shift true`` also sets ``shift`` to the
latent mean (as Flux's ``shift_factor``) for tokenizers that take one.
"""
from __future__ import annotations

import inspect
import json

from jsonargparse import ArgumentParser, Namespace

from sandbox.config.recipe import add_recipe_arguments
from sandbox.errors import UserError

NAME = "calibrate-scale"
HELP = "Measure the tokenizer's latent std on the recipe's dataset and write scale = 1/std into the recipe."
ORDER = 14


def parser() -> ArgumentParser:
    p = ArgumentParser(exit_on_error=False, description=HELP)
    add_recipe_arguments(p)  # the recipe names the tokenizer and the dataset; its other parts are not built
    p.add_argument("--num_images", type=int, default=1024,
                   help="Images in the seeded random sample (the official used all of ImageNet; 1024 images of "
                        "256 latent values each pin the std to well under 1%).")
    p.add_argument("--batch_size", type=int, default=64, help="Images per tokenizer batch.")
    p.add_argument("--shift", type=bool, default=False,
                   help="Also set the tokenizer's shift to the latent mean (the official MAR does not).")
    p.add_argument("--write", type=bool, default=True, help="Write the result into the recipe file (the last --config).")
    p.add_argument("--device", type=str, default="auto", help="cpu, cuda, ... (auto: cuda if available).")
    return p


def run(cfg: Namespace) -> None:
    import torch

    from sandbox.config.edit import set_recipe_value
    from sandbox.config.recipe import instantiate
    from sandbox.eval.diagnostics import measure_latents
    from sandbox.run.device import resolve_device

    if cfg.num_images < 2 or cfg.batch_size < 1:
        raise UserError("--num_images must be >= 2 and --batch_size >= 1")
    configs = [str(c) for c in (cfg.get("config") or [])]
    if cfg.write and not configs:
        raise UserError("give the recipe with --config RECIPE (the scale is written into it), or pass --write false")
    name = cfg.tokenizer.class_path
    params = inspect.signature(_resolve(name).__init__).parameters
    wanted = ("scale", "shift") if cfg.shift else ("scale",)
    missing = [k for k in wanted if k not in params]
    if missing:
        raise UserError(f"tokenizer {name} takes no {' / '.join(missing)} argument, so there is nothing to calibrate; "
                        "tokenizers that take `scale` are calibrated (see `sandbox plugins`)")
    # measure the raw latents: scale 1 (and shift 0 when the shift is calibrated too)
    raw = cfg.clone()
    raw.tokenizer.init_args = raw.tokenizer.get("init_args") or Namespace()
    raw.tokenizer.init_args.scale = 1.0
    if cfg.shift:
        raw.tokenizer.init_args.shift = 0.0
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)  # as `build` does: a tokenizer with random weights (tests) is the training run's
    dataset = instantiate(cfg, "data")
    if len(dataset) == 0:
        raise UserError(f"dataset {type(dataset).__name__} is empty")
    tokenizer = instantiate(raw, "tokenizer").requires_grad_(False).eval().to(device)
    tokenizer.grid_size(dataset.image_size)  # a clear error when the image size does not fit the tokenizer
    dataset.check_tokenizer(tokenizer)
    stats = measure_latents(tokenizer, dataset, cfg.num_images, cfg.batch_size, cfg.seed, device)
    if not stats["std"] > 0:
        raise UserError(f"the latents of {name} on this dataset are constant (std 0); cannot calibrate a scale")
    scale = float(f"{1.0 / stats['std']:.4g}")  # 4 significant digits, as 0.2325
    result = {"tokenizer": name, "num_images": stats["num_images"], "latent_mean": round(stats["mean"], 6),
              "latent_std": round(stats["std"], 6), "scale": scale}
    if cfg.shift:
        result["shift"] = float(f"{stats['mean']:.4g}")
    if cfg.write:
        kept = [set_recipe_value(configs[-1], ("tokenizer", "init_args", k), result[k]) for k in wanted]
        result["recipe"] = configs[-1]
        if not all(kept):
            result["note"] = "the recipe was rewritten whole: its comments are gone"
    print(json.dumps(result, indent=2))


def _resolve(class_path: str) -> type:
    """The tokenizer class a (short or dotted) class_path names."""
    from sandbox.config import registry

    found = registry.plugins("tokenizer").get(class_path.rsplit(".", 1)[-1])
    if found is not None:
        return found
    import importlib

    module, _, cls = class_path.rpartition(".")
    return getattr(importlib.import_module(module), cls)
