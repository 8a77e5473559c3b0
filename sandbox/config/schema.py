"""The typed parts of a recipe: the plugin slots, and the ``model``, ``train`` and ``sample`` settings whose
every field documents its default (jsonargparse checks a recipe against them at parse time)."""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass
from typing import Callable, Literal, Optional, Union

from jsonargparse import Namespace

from sandbox.core.contracts import Backbone, Condition, Dataset, Head, Ordering, Tokenizer
from sandbox.core.transformer import MARConfig


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
    fast_paths: bool = True  # sandbox.fast: the same model computed faster (docs/performance.md); false: plain PyTorch

    def __post_init__(self):  # every value, when the recipe is built: a bad one never starts a run
        _at_least(self, "train.", 1, "steps", "batch_size", "grad_accum", "log_every", "ckpt_every")
        _at_least(self, "train.", 0, "warmup_steps", "sample_every", "keep_checkpoints", "num_workers",
                       "max_nonfinite_steps", "min_lr", "weight_decay", "grad_clip")
        _positive(self, "train.", "blr", *(("lr",) if self.lr is not None else ()))
        if not 0.0 <= self.ema_decay <= 1.0:
            raise ValueError(f"train.ema_decay must be in [0, 1], got {self.ema_decay}")
        betas = tuple(self.betas)
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):  # beta 1: AdamW divides by 1 - beta^t = 0
            raise ValueError(f"train.betas must be two values in [0, 1), got {list(betas)}")
        _choices(self, "train.")


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
    # the head's own steps at each step of the plan (DiSA's annealing: many for the first tokens, few for the last):
    # a count, a share of the head's own count (50%), linear:START:END / cosine:START:END, or a list of counts;
    # None: the head's own count at every step, as the official sampler (sandbox/core/schedules.py, HeadSteps)
    head_steps: Optional[Union[int, str, list[int]]] = None
    # reuse across the plan's steps (sandbox/fast/step_cache.py): off, exact (the same samples within float
    # rounding) or approx:N[:W] (LazyMAR's token and condition caches, a full step every N); off: measured on the
    # quickstart, approx:2 gained only 1.04-1.11x (docs/performance.md#fast-sampling) and off keeps the official
    # sampler's samples; YAML reads a bare `off` as false, so false means off too
    cache: Union[str, bool] = "off"

    def __post_init__(self):  # checked when the recipe is built: before training, not at its final grid
        if self.cache is False:
            self.cache = "off"
        check_sampling(dataclasses.asdict(self), "sample.")
        _at_least(self, "sample.", 1, "grid_classes", "grid_per_class")


def check_sampling(values: dict, prefix: str) -> None:
    """The sampling settings among ``values`` (num_iter, batch_size, temperature, cfg, cfg_schedule), named
    ``prefix + name`` in the error: a recipe's ``sample:`` and the options of the commands that sample."""
    for name in ("num_iter", "batch_size"):
        if name in values and not values[name] >= 1:
            raise ValueError(f"{prefix}{name} must be >= 1, got {values[name]}")
    if "temperature" in values and not (values["temperature"] > 0 and math.isfinite(values["temperature"])):
        raise ValueError(f"{prefix}temperature must be > 0, got {values['temperature']}")
    if "cfg" in values and not math.isfinite(values["cfg"]):  # any finite scale: < 1 leans away from the class
        raise ValueError(f"{prefix}cfg must be a finite number, got {values['cfg']}")
    schedules = typing.get_args(typing.get_type_hints(SampleConfig)["cfg_schedule"])
    if "cfg_schedule" in values and values["cfg_schedule"] not in schedules:
        raise ValueError(f"{prefix}cfg_schedule must be one of {', '.join(schedules)}, got {values['cfg_schedule']!r}")
    _check_speed_options(values, prefix)


def _check_speed_options(values: dict, prefix: str) -> None:
    """``head_steps`` (a ``HeadSteps`` spec) and ``cache`` (a ``CacheMode`` spec), each one error line."""
    from sandbox.core.schedules import HeadSteps
    from sandbox.fast.step_cache import CacheMode

    for name, parse in (("head_steps", HeadSteps.parse), ("cache", CacheMode.parse)):
        if name in values:
            try:
                parse(values[name])
            except ValueError as e:
                raise ValueError(f"{prefix}{name}: {e}") from None


def _at_least(config, prefix: str, low: float, *names: str) -> None:
    """Each field ``names`` of ``config`` >= ``low`` (a NaN fails too)."""
    for name in names:
        value = getattr(config, name)
        if not (value >= low and math.isfinite(value)):
            raise ValueError(f"{prefix}{name} must be >= {low}, got {value}")


def _positive(config, prefix: str, *names: str) -> None:
    """Each field ``names`` of ``config`` a finite number > 0."""
    for name in names:
        value = getattr(config, name)
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{prefix}{name} must be > 0, got {value}")


def _choices(config, prefix: str) -> None:
    """Each ``Literal`` field of ``config`` holds one of its choices (jsonargparse checks a parsed recipe; this
    also covers a config built in Python)."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        hint = hints[f.name]
        options = typing.get_args(hint) if typing.get_origin(hint) is typing.Union else (hint,)  # Optional[...]
        choices = [c for t in options if typing.get_origin(t) is Literal for c in typing.get_args(t)]
        value = getattr(config, f.name)
        if choices and value not in choices and not (value is None and type(None) in options):
            raise ValueError(f"{prefix}{f.name} must be one of {', '.join(map(str, choices))}, got {value!r}")


# the recipe's slots: plugin slots name a subclass; what depends on other parts is passed in by the core, so it
# never appears in a recipe and cannot disagree: an ordering gets the token grid (h, w), a condition (width,
# num_classes), a backbone (model settings, seq_len, token_dim, num_groups), a head (token_dim, cond_dim)
SLOT_TYPES = {
    "data": Dataset,
    "tokenizer": Tokenizer,
    "ordering": Callable[[tuple[int, int]], Ordering],
    "condition": Callable[[int, int], Condition],
    "backbone": Callable[[MARConfig, int, int, int], Backbone],
    "head": Callable[[int, int], Head],
    "model": MARConfig,
    "train": TrainConfig,
    "sample": SampleConfig,
}
SLOT_HELP = {
    "data": "Dataset plugin.",
    "tokenizer": "Tokenizer plugin.",
    "ordering": "Ordering plugin (the core passes the token grid).",
    "condition": "Condition plugin (the core passes the backbone's width and the dataset's num_classes).",
    "backbone": "Backbone plugin (the core passes the model settings, seq_len, token_dim and num_groups).",
    "head": "Head plugin (the core passes token_dim and cond_dim).",
    "model": "Model settings: widths, depths, heads, dropout, the buffer, label drop (every backbone reads them).",
    "train": "Training settings.",
    "sample": "Sampling defaults.",
}
# plugin slots with a default: MAR's class condition and transformer (recipes before 0.3 name neither)
SLOT_DEFAULTS = {
    "condition": Namespace(class_path="sandbox.core.condition.ClassCondition"),
    "backbone": Namespace(class_path="sandbox.core.transformer.MARBackbone"),
}
