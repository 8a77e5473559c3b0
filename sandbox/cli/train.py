"""``sandbox train --config RECIPE [--run_dir DIR] [overrides]``."""
from __future__ import annotations

import os
from pathlib import Path

from jsonargparse import ArgumentParser, Namespace

from sandbox.config.recipe import add_recipe_arguments

NAME = "train"
HELP = "Train a recipe (resumes when the run directory holds one)."
ORDER = 10


def parser() -> ArgumentParser:
    p = ArgumentParser(exit_on_error=False, description=HELP)
    add_recipe_arguments(p)
    p.add_argument("--run_dir", type=str | None, default=None,
                   help="Where checkpoints, logs and grids go (default: runs/<recipe file name>; for a run "
                        "directory's own recipe.yaml, that run directory).")
    return p


def default_run_dir(cfg: Namespace) -> str:
    """runs/<name of the last recipe file>; a run directory's own recipe.yaml continues that run."""
    configs = cfg.get("config") or []
    if not configs:
        return os.path.join("runs", "run")
    from sandbox.run.rundir import RunDir

    last = Path(str(configs[-1]))
    run = RunDir(last.parent)
    if last.name == run.recipe_path.name and (run.last.is_file() or run.checkpoints()):
        return str(last.parent)
    return os.path.join("runs", last.stem)


def run(cfg: Namespace) -> None:
    from sandbox.run import distributed
    from sandbox.run.lock import run_lock
    from sandbox.run.trainer import train

    run_dir = cfg.run_dir or default_run_dir(cfg)
    # under `torchrun --nproc_per_node N -m sandbox train ...` every rank joins the process group here;
    # one writer per run directory, before its recipe is checked
    with distributed.session(cfg.train.device) as me, run_lock(run_dir):
        summary = train(cfg, run_dir)
    if summary.get("stopped"):  # checkpoint saved; exit as the signal would have (schedulers read "not done")
        raise SystemExit(128 + summary["signal"])
    if not me.is_main or summary.get("complete"):
        return  # rank 0 reports; a complete run said so
    print(f"done: {summary['step']} steps; run directory {summary['run_dir']}; final grid {summary['grid']}; "
          f"loss curve {summary.get('loss_curve')}")
