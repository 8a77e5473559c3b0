"""Recipes: the typed configuration of an experiment, and building its parts from it.

A recipe is a YAML file checked by jsonargparse at parse time against the
signatures below: the four plugin slots (``data``, ``tokenizer``,
``ordering``, ``head``) take a ``class_path`` (short class names work) and
``init_args``; ``model``, ``train`` and ``sample`` are dataclasses whose
every field documents its default.
"""
from __future__ import annotations

import importlib
import re
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Optional

import torch
from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from sandbox.errors import UserError
from sandbox.guards import check_class
from sandbox.kinds import KINDS, Dataset, Head, Ordering, Tokenizer
from sandbox.mar import MARConfig, MARTransformer
from sandbox.model import MAR


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping. Defaults are the official MAR settings where it has one."""

    steps: int = 1000  # optimizer steps in total; the official counts epochs, steps make short runs comparable
    batch_size: int = 64  # per process; official: 64 per GPU x 32 GPUs = 2048
    grad_accum: int = 1  # micro-batches per optimizer step; the global batch counts them
    blr: float = 1e-4  # official base lr; lr = blr * global_batch / 256 (Goyal et al. linear scaling)
    lr: Optional[float] = None  # absolute lr; overrides blr when set
    lr_schedule: Literal["constant", "cosine"] = "constant"  # official: constant after warmup
    warmup_steps: int = 0  # official: 100 epochs of linear warmup (set it for long runs)
    min_lr: float = 0.0  # floor of the cosine schedule
    weight_decay: float = 0.02  # official; not applied to biases, 1-D parameters and the head
    betas: tuple[float, float] = (0.9, 0.95)  # official AdamW betas
    grad_clip: float = 3.0  # official max grad norm; 0 disables
    ema_decay: float = 0.9999  # official EMA for the long ImageNet runs
    ema_warmup: bool = True  # decay min(ema_decay, (1+n)/(10+n)): a short run's EMA forgets the random init
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    compile: bool = False  # torch.compile the blocks; pays a one-off compile for faster steps on long runs
    device: str = "auto"  # auto: cuda if available, else cpu
    num_workers: int = 0  # data loader processes; 0 keeps in-memory datasets fastest
    log_every: int = 10  # steps between metrics-log lines
    ckpt_every: int = 500  # steps between checkpoints (one is always written at the end)
    sample_every: int = 0  # steps between sample grids (0: only at the end)
    keep_checkpoints: int = 2  # numbered checkpoints kept besides checkpoint-last.pt
    best_metric: Optional[Literal["loss"]] = None  # keep checkpoint-best.pt by this metric's mean per checkpoint
    # interval (the training loss is the one the loop computes every step); None: no best checkpoint
    max_nonfinite_steps: int = 20  # consecutive skipped (non-finite) updates before the run stops: an fp16
    # overflow or one bad batch skips a few, twenty in a row is divergence; 0: never stop
    head_fp32: bool = False  # run the head in fp32 under bf16/fp16 autocast: its loss spans a 1000-step noise
    # schedule whose extreme alpha_bar values bf16's 8-bit mantissa resolves poorly
    tensorboard: bool = False  # also log scalars and sample grids to RUN/tensorboard (needs the [tensorboard] extra)

    def __post_init__(self):
        for name in ("steps", "batch_size", "grad_accum", "log_every", "ckpt_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "sample_every", "keep_checkpoints", "num_workers", "max_nonfinite_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.ema_decay <= 1.0:
            raise ValueError(f"train.ema_decay must be in [0, 1], got {self.ema_decay}")


@dataclass
class SampleConfig:
    """Defaults for generation (grids during training, ``sandbox sample``). Official MAR-B values."""

    num_iter: int = 64  # official default (256 for the paper's table)
    cfg: float = 1.0  # guidance scale; the paper's MAR-B uses 2.9 with the linear schedule
    cfg_schedule: Literal["linear", "constant"] = "linear"  # official: linear ramp of the guidance with progress
    temperature: float = 1.0  # official: 1.0 with cfg (0.95 without)
    ema: bool = True  # sample with the EMA weights
    batch_size: int = 64  # images per sampling batch
    grid_classes: int = 10  # rows of a training sample grid (one class per row)
    grid_per_class: int = 8  # columns of a training sample grid


# the recipe's slots: plugin slots name a subclass; an ordering is built with the token grid (h, w),
# a head with (token_dim, cond_dim), so those never appear in a recipe and cannot disagree
SLOT_TYPES = {
    "data": Dataset,
    "tokenizer": Tokenizer,
    "ordering": Callable[[tuple[int, int]], Ordering],
    "head": Callable[[int, int], Head],
    "model": MARConfig,
    "train": TrainConfig,
    "sample": SampleConfig,
}
SLOT_HELP = {
    "data": "Dataset plugin.",
    "tokenizer": "Tokenizer plugin.",
    "ordering": "Ordering plugin (the core passes the token grid).",
    "head": "Head plugin (the core passes token_dim and cond_dim).",
    "model": "MAR transformer settings.",
    "train": "Training settings.",
    "sample": "Sampling defaults.",
}


def add_run_arguments(parser: ArgumentParser, seed_help: str, plugins_help: str) -> None:
    """The arguments every recipe-driven command shares (the CLI resolves --base and --plugins before parsing)."""
    parser.add_argument("--config", action=ActionConfigFile, help="Recipe YAML (several allowed; later ones override).")
    parser.add_argument("--seed", type=int, default=0, help=seed_help)
    parser.add_argument("--base", type=Optional[str], default=None,
                        help="A recipe this one builds on, relative to this recipe file: the CLI applies it first "
                             "(as an earlier --config), then this one; never stored (see docs/writing-plugins.md).")
    parser.add_argument("--plugins", type=list[str], default=[], help=plugins_help)


def add_recipe_arguments(parser: ArgumentParser) -> None:
    add_run_arguments(parser, seed_help="Fixes initialisation, data order and all sampling.",
                      plugins_help="Plugin files (.py) the recipe needs, relative to the recipe file; the CLI loads "
                                   "them before parsing and stores them as absolute paths (see "
                                   "docs/writing-plugins.md).")
    for key, typ in SLOT_TYPES.items():
        if key in ("model", "train", "sample"):
            parser.add_argument(f"--{key}", type=typ, default=typ(), help=SLOT_HELP[key])
        else:
            parser.add_argument(f"--{key}", type=typ, required=True, help=SLOT_HELP[key])


RECIPE_KEYS = ("seed", "plugins", "data", "tokenizer", "ordering", "head", "model", "train", "sample")


def recipe_parser() -> ArgumentParser:
    parser = ArgumentParser(exit_on_error=False, prog="sandbox recipe")
    add_recipe_arguments(parser)
    return parser


def recipe_dict(cfg: Namespace) -> dict:
    """The recipe part of a parsed namespace as plain data (what a run directory stores)."""
    d = cfg.clone().as_dict()
    return {k: d[k] for k in RECIPE_KEYS if k in d}


def parse_recipe(recipe: dict, origin: str = "the stored recipe") -> Namespace:
    """Re-parse a stored recipe dict (e.g. from a checkpoint) into a checked namespace; first loads the
    plugin files it lists (absolute paths), so their class paths resolve in a fresh process."""
    from sandbox import registry

    registry.discover()
    registry.load_listed(recipe.get("plugins") or [], origin=f"listed under plugins: in {origin}")
    registry.discover()  # a name clash is an error naming both sources
    parser = recipe_parser()
    try:
        return parser.parse_object(recipe)
    except Exception as e:
        raise UserError(f"stored recipe no longer parses: {one_line(e)}") from e


# jsonargparse's words for a class name it cannot resolve: in a plugin slot, that is an unknown plugin
_UNRESOLVED = re.compile(r'Parser key "(data|tokenizer|ordering|head)":\s+Expected a dot import path string: (\S+)')
_SLOT_KIND = {"data": "dataset", "tokenizer": "tokenizer", "ordering": "ordering", "head": "head"}


def one_line(e: BaseException) -> str:
    """A parse error as one readable line (jsonargparse errors span several); an unknown plugin name as
    the registered ones."""
    msg = str(e)
    unresolved = _UNRESOLVED.search(msg)
    if unresolved:
        from sandbox.registry import unknown_plugin

        return unknown_plugin(_SLOT_KIND[unresolved.group(1)], unresolved.group(2))
    msg = re.sub(r"Got value: .*", "", msg, flags=re.S)
    msg = " ".join(msg.split())
    return msg.rstrip(" .:")


# --------------------------------------------------------------------------------------
# Building the parts
# --------------------------------------------------------------------------------------
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


def instantiate(cfg: Namespace, key: str, *injected):
    """Build one slot of a parsed recipe; the others (e.g. an expensive dataset) stay unbuilt. ``injected``:
    the arguments the core passes an ordering (grid) or a head (token_dim, cond_dim) before its init_args."""
    single = ArgumentParser(exit_on_error=False)
    single.add_argument(f"--{key}", type=SLOT_TYPES[key])
    sub = Namespace()
    sub[key] = cfg[key].clone() if isinstance(cfg[key], Namespace) else cfg[key]
    named = isinstance(cfg[key], Namespace) and "class_path" in cfg[key]  # a plugin slot's class
    if named and key in _SLOT_KIND:
        kind = _SLOT_KIND[key]
        check_class(kind, _resolve(cfg[key].class_path), KINDS[kind])  # callable the way the core calls it
    try:
        built = single.instantiate(sub)[key]
        return built(*injected) if injected else built
    except UserError:
        raise
    except Exception as e:  # a plugin's constructor refusing its settings (or failing): one line that says where
        what = f"{key} {cfg[key].class_path.rsplit('.', 1)[-1]}" if named else None
        if not isinstance(e, (TypeError, ValueError, OSError)):
            if what is None:
                raise
            raise UserError(f"cannot build {what}: {type(e).__name__}: {one_line(e)} "
                            f"({_raised_at(e, cfg[key].class_path)})") from e
        if what is not None:
            raise UserError(f"cannot build {what}: {one_line(e)}") from e
        raise UserError(f"invalid {key} settings: {one_line(e)}") from e


def _resolve(class_path: str) -> type:
    """The class a parsed recipe names (jsonargparse resolved it to an importable path)."""
    module, _, name = class_path.rpartition(".")
    return getattr(sys.modules.get(module) or importlib.import_module(module), name)


def _raised_at(e: BaseException, class_path: str) -> str:
    """'file.py:line' of the deepest frame of ``e`` in the plugin's own file (else the deepest frame)."""
    module = sys.modules.get(class_path.rpartition(".")[0])
    frames = traceback.extract_tb(e.__traceback__)
    own = [f for f in frames if module is not None and f.filename == getattr(module, "__file__", None)]
    frame = (own or frames)[-1]
    return f"{Path(frame.filename).name}:{frame.lineno}"


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
