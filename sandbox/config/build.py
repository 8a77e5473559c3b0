"""Building an experiment from a parsed recipe: the tokenizer, the ordering on its token grid, the transformer
and the head, with the arguments that depend on other parts passed in by the core (never written in a recipe),
and the dataset when training."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from jsonargparse import Namespace

from sandbox.config.recipe import instantiate
from sandbox.core.contracts import Dataset, Ordering, Tokenizer
from sandbox.core.model import MAR
from sandbox.core.transformer import MARTransformer
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
    transformer = MARTransformer(model_cfg, ordering.seq_len, tokenizer.token_dim, meta["num_classes"],
                                 ordering.num_groups)
    transformer.set_groups(ordering.groups())
    head = instantiate(cfg, "head", tokenizer.token_dim, model_cfg.decoder_dim)
    if head.token_dim != tokenizer.token_dim or head.cond_dim != model_cfg.decoder_dim:
        raise UserError(
            f"head {type(head).__name__} has token_dim {head.token_dim} / cond_dim {head.cond_dim} but the tokenizer "
            f"gives {tokenizer.token_dim}-dim tokens and the decoder {model_cfg.decoder_dim}-dim conditions"
        )
    tokenizer.requires_grad_(False).eval()
    return Experiment(cfg, tokenizer, ordering, MAR(transformer, head), meta["image_size"], meta["num_classes"],
                      dataset, meta)
