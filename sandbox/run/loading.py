"""Loading a trained run for sampling, evaluation and notebooks: the recipe and weights of its newest checkpoint,
rebuilt with nothing else (the checkpoint stores the recipe and what the dataset told the model)."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from sandbox import fast
from sandbox.config.build import Experiment, build
from sandbox.config.recipe import instantiate, one_line, parse_recipe, recipe_parser
from sandbox.config.schema import SampleConfig, TrainConfig, check_sampling
from sandbox.errors import UserError
from sandbox.fast.attention import xformers_available
from sandbox.run import distributed
from sandbox.run.checkpoints import state_mismatch
from sandbox.run.device import resolve_device
from sandbox.run.rundir import RunDir


@dataclass
class LoadedRun:
    """A run rebuilt from its newest checkpoint: ``exp`` (its parts: tokenizer, ordering, model), ``model`` (the
    weights sampled: EMA or raw, on the device, in eval mode), ``checkpoint`` (the loaded dict)."""

    root: Path
    exp: Experiment
    model: nn.Module
    checkpoint: dict
    ema: bool  # whether ``model`` holds the EMA weights

    @property
    def step(self) -> int:
        return int(self.checkpoint["step"])

    @property
    def sample_config(self) -> SampleConfig:
        """The recipe's sampling defaults (``sample:``)."""
        return self.sampling()

    def sampling(self, given: dict | None = None, prefix: str = "") -> SampleConfig:
        """The recipe's sampling defaults with the ``given`` values that are not None over them, every value
        checked; a bad given value is named ``prefix + name`` (``--num_iter``). A stored value that is out of
        range (a run older than the check) can be overridden this way."""
        given = {k: v for k, v in (given or {}).items() if v is not None}
        try:
            check_sampling(given, prefix)
        except ValueError as e:
            raise UserError(str(e)) from None
        try:
            return SampleConfig(**{**self.exp.cfg.sample.as_dict(), **given})
        except ValueError as e:  # only a stored value can be wrong now
            raise UserError(f"{e} in the recipe of {self.root}; give a value for it") from None

    @property
    def train_config(self) -> TrainConfig:
        """The recipe's training settings (its precision samples too)."""
        return instantiate(self.exp.cfg, "train")

    def dataset(self):
        """The recipe's dataset, built once on first use: what asks a run that does not read class labels for a
        class (``Dataset.conditioning``: held-out prompts) and scores its samples."""
        if self.exp.dataset is None:
            self.exp.dataset = instantiate(self.exp.cfg, "data")
        return self.exp.dataset


def load_run(run_dir: str | Path, use_ema: bool = True, device: str = "auto", head_args: dict | None = None,
             compile: bool = False, fast_paths: bool = True, plugins=()) -> LoadedRun:
    """Rebuild a run's parts from its newest checkpoint alone.

    ``head_args`` overrides the head's init_args (sampling options such as a head's sampler or step count);
    the overridden recipe is type-checked like any recipe and must still fit the checkpoint. ``compile``: the
    head samples through ``torch.compile``; ``fast_paths``: the speed paths of ``sandbox.fast``. ``plugins``:
    plugin files to load, as ``--plugin`` does: the run's own recipe never imports the files it lists.
    """
    from sandbox.config import registry

    registry.load_files(plugins, origin="given to load_run")
    run = RunDir(run_dir).require()
    ckpt = run.load_latest()
    if ckpt is None:
        raise UserError(f"{run.root} has no checkpoint yet; train it first")
    cfg = _recipe(run, ckpt, head_args)
    if cfg.model.attention == "xformers" and not xformers_available():
        cfg.model.attention = "sdpa"  # same math; a run trained on GPUs with xformers still samples anywhere
    exp = build(cfg, meta=ckpt["meta"])
    exp.model.head_fp32 = instantiate(cfg, "train").head_fp32
    ema = use_ema and "ema" in ckpt
    try:
        exp.model.load_state_dict(ckpt["ema"] if ema else ckpt["model"])
    except RuntimeError as e:
        raise UserError(f"checkpoint of {run.root} does not fit its recipe's model: {state_mismatch(e)}") from e
    dev = distributed.local_device(resolve_device(device))
    fast.apply(exp.model, fast_paths, cfg.model.attention)
    exp.model.to(dev).eval()
    exp.tokenizer.to(dev)
    if compile:
        from sandbox.fast.compile import compile_sampling

        compile_sampling(exp.model)
    return LoadedRun(run.root, exp, exp.model, ckpt, ema)


def _recipe(run: RunDir, ckpt: dict, head_args: dict | None):
    """The checkpoint's recipe, parsed (and checked) again, with ``head_args`` over the head's init_args."""
    cfg = parse_recipe(ckpt["recipe"], origin=f"run {run.root}", root=run.root)  # imports nothing it names
    if not head_args:
        return cfg
    recipe = copy.deepcopy(ckpt["recipe"])
    recipe["head"].setdefault("init_args", {}).update(head_args)
    try:
        return recipe_parser().parse_object(recipe)
    except Exception as e:
        raise UserError(f"--head_args {head_args} do not fit head {recipe['head']['class_path']}: "
                        f"{one_line(e)}") from e
