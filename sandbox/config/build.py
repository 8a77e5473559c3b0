"""Building an experiment from a parsed recipe: the tokenizer, the ordering on its token grid, the backbone, the
condition and the head, with the arguments that depend on other parts passed in by the core (never written in
a recipe), and the dataset when training."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from jsonargparse import Namespace

from sandbox.config.recipe import instantiate, slot_classes
from sandbox.core.contracts import Backbone, Condition, Dataset, Head, Ordering, Tokenizer
from sandbox.core.model import MAR
from sandbox.errors import UserError


@dataclass
class Experiment:
    """Everything a recipe builds. ``dataset`` is None when built for sampling only."""

    cfg: Namespace
    tokenizer: Tokenizer
    ordering: Ordering
    model: MAR
    image_size: int
    num_classes: int
    dataset: Dataset | None = None
    meta: dict = field(default_factory=dict)


def build(cfg: Namespace, meta: dict | None = None) -> Experiment:
    """Build the parts of a parsed recipe. With ``meta`` ({image_size, num_classes}, from a run
    directory) the dataset is not built: sampling does not need it."""
    torch.manual_seed(cfg.seed)  # initial weights follow the recipe's seed
    dataset = None
    if meta is None:
        dataset = instantiate(cfg, "data")
        if len(dataset) == 0:
            raise UserError(f"dataset {type(dataset).__name__} is empty")
        meta = {"image_size": int(dataset.image_size), "num_classes": int(dataset.num_classes)}
    tokenizer = instantiate(cfg, "tokenizer")
    if dataset is not None:
        dataset.check_tokenizer(tokenizer)
    grid = tokenizer.grid_size(meta["image_size"])
    ordering = instantiate(cfg, "ordering", grid)
    model_cfg = instantiate(cfg, "model")
    backbone = instantiate(cfg, "backbone", model_cfg, ordering.seq_len, tokenizer.token_dim, ordering.num_groups)
    backbone.check_ordering(ordering)  # e.g. a backbone that generates one token per step
    backbone.set_groups(ordering.groups())
    condition = instantiate(cfg, "condition", backbone.cond_width, meta["num_classes"])
    check_condition_fits(condition, backbone, dataset)
    head = build_head(cfg, tokenizer, backbone.out_dim)
    if head.token_dim != tokenizer.token_dim or head.cond_dim != backbone.out_dim:
        raise UserError(
            f"head {type(head).__name__} has token_dim {head.token_dim} / cond_dim {head.cond_dim} but the tokenizer "
            f"gives {tokenizer.token_dim}-dim tokens and backbone {type(backbone).__name__} {backbone.out_dim}-dim "
            "conditions")
    tokenizer.requires_grad_(False).eval()
    return Experiment(cfg, tokenizer, ordering, MAR(condition, backbone, head, model_cfg), meta["image_size"],
                      meta["num_classes"], dataset, meta)


def check_condition_fits(condition: Condition, backbone: Backbone, dataset: Dataset | None) -> None:
    """The condition's tokens fit the backbone (``max_tokens`` against ``max_condition_tokens``) and the dataset
    gives the field it reads (``Dataset.check_condition``; a latent cache also checks cached encoder outputs)."""
    most, room = condition.max_tokens, backbone.max_condition_tokens
    if most is not None and room is not None and most > room:
        raise UserError(f"condition {type(condition).__name__} gives up to {most} tokens but backbone "
                        f"{type(backbone).__name__} takes {room}; give the backbone room for {most} (MARBackbone: model.buffer_size) or "
                        "the condition fewer tokens (e.g. a smaller max_length)")
    if dataset is not None:
        dataset.check_condition(condition)


def build_head(cfg: Namespace, tokenizer: Tokenizer, cond_dim: int) -> Head:
    """``HeadClass(token_dim, cond_dim, **required, **init_args)``: ``required`` holds the tokenizer properties the
    head names in ``requires`` (e.g. ``codebook``). One error line naming both plugins when the tokenizer has none
    of them, or when the head refuses what it was given (say, a codebook of another size)."""
    cls = slot_classes(cfg)["head"]
    names = tuple(getattr(cls, "requires", ()))
    pair = f"head {cls.__name__} and tokenizer {type(tokenizer).__name__}"
    init_args = cfg.head.get("init_args") or Namespace()
    given = [n for n in names if init_args.get(n) is not None]
    if given:
        raise UserError(f"{pair}: head.init_args.{given[0]} comes from the tokenizer, never from the recipe; "
                        "remove it")
    required = {n: getattr(tokenizer, n, None) for n in names}
    missing = [n for n, v in required.items() if v is None]
    if missing:
        raise UserError(f"{pair} do not fit: the head needs the tokenizer's {missing[0]}, which this tokenizer "
                        f"does not have ({missing[0]} is None{_NONE_MEANS.get(missing[0], '')})")
    try:
        return instantiate(cfg, "head", tokenizer.token_dim, cond_dim, **required)
    except UserError as e:
        if not required:
            raise
        shapes = ", ".join(f"{n} {tuple(v.shape) if hasattr(v, 'shape') else v}" for n, v in required.items())
        reason = str(e).removeprefix(f"cannot build head {cls.__name__}: ")
        raise UserError(f"{pair} do not fit: {reason} (given the tokenizer's {shapes})") from e


_NONE_MEANS = {"codebook": ": its tokens are continuous"}  # what a None tokenizer property means
