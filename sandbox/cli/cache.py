"""``sandbox cache --config RECIPE --out DIR``: encode a recipe's images (and their flips) once, for faster training."""
from __future__ import annotations

from typing import Literal

from jsonargparse import ArgumentParser, Namespace

from sandbox.config.recipe import add_recipe_arguments
from sandbox.errors import UserError

NAME = "cache"
HELP = "Encode a recipe's dataset with its tokenizer into a latent cache (resumable); train from it after."
ORDER = 15


def parser() -> ArgumentParser:
    p = ArgumentParser(exit_on_error=False, description=HELP)
    add_recipe_arguments(p)
    p.add_argument("--out", type=str, required=True, help="Cache directory (rerun the same command to resume).")
    p.add_argument("--batch_size", type=int, default=64, help="Images per encoder batch (each is encoded twice: "
                                                              "as is and flipped).")
    p.add_argument("--num_workers", type=int, default=4, help="Image-decoding processes (JPEG decoding dominates).")
    p.add_argument("--device", type=str, default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda if available).")
    p.add_argument("--shard_size", type=int, default=100_000,
                   help="Images per shard file (ImageNet at 256 px, float32: 13 shards of ~6.5 GB).")
    p.add_argument("--dtype", type=Literal["float32", "float16"], default="float32", help="float32 (as the official cache) or float16 (half "
                                                                "the disk, ~1e-3 relative rounding of the moments).")
    p.add_argument("--condition_features", type=bool, default=True,
                   help="Also store what the recipe's condition caches of each entry (a frozen text encoder's "
                        "features), so training runs no encoder.")
    p.add_argument("--progress", type=bool, default=True, help="Show a progress bar.")
    return p


def run(cfg: Namespace) -> None:
    from sandbox.run.lock import run_lock

    with run_lock(cfg.out, what="cache directory", flag="--out"):  # one writer per cache
        _write(cfg)


def _write(cfg: Namespace) -> None:
    import torch

    from sandbox.config.recipe import instantiate, recipe_dict
    from sandbox.lab.latent_cache import condition_probe, write_cache
    from sandbox.run.device import resolve_device

    torch.manual_seed(cfg.seed)  # as `build` does: a tokenizer with random weights (tests) is the training run's
    dataset = instantiate(cfg, "data")
    if dataset.provides != "images":
        raise UserError(f"dataset {type(dataset).__name__} provides {dataset.provides}, not images: "
                        "a cache is made from an image dataset")
    if len(dataset) == 0:
        raise UserError(f"dataset {type(dataset).__name__} is empty")
    device = resolve_device(cfg.device)
    tokenizer = instantiate(cfg, "tokenizer").requires_grad_(False).eval().to(device)
    recipe = recipe_dict(cfg)
    made_by = {"data": recipe["data"], "tokenizer": recipe["tokenizer"]}
    condition = None
    if "head" in recipe and cfg.condition_features:  # a MAR recipe: its condition may cache a frozen encoder's output
        # what a condition caches depends on neither the backbone's width nor trained weights (Condition.cached):
        # width 1 builds it without the backbone
        condition = instantiate(cfg, "condition", 1, int(dataset.num_classes)).eval().to(device)
        if condition.field in dataset.fields and condition_probe(condition, cfg.dtype):
            made_by["condition"] = recipe["condition"]
        else:
            condition = None
    write_cache(dataset, tokenizer, cfg.out, recipe=made_by, batch_size=cfg.batch_size, num_workers=cfg.num_workers,
                device=device, shard_size=cfg.shard_size, dtype=cfg.dtype, progress=cfg.progress,
                condition=condition)
    print(f"train from it with the same tokenizer and a latent-cache dataset: "
          f"--data CachedDataset --data.path {cfg.out}")
