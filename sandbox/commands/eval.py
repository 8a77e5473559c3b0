"""``sandbox eval --run_dir DIR``: the dataset's offline score of class-balanced samples, as JSON."""
from __future__ import annotations

import json
import time
from pathlib import Path

from jsonargparse import ArgumentParser, Namespace

from sandbox.commands.sample import add_sampling_arguments, sample_from_run
from sandbox.errors import UserError

NAME = "eval"
HELP = "Score a run's class-balanced samples (digits: classifier accuracy, Frechet distance, real floor)."
ORDER = 30


def parser() -> ArgumentParser:
    p = ArgumentParser(exit_on_error=False, description=HELP)
    add_sampling_arguments(p)
    p.set_defaults(num_images=1000, progress=False)
    p.add_argument("--json", type=str | None, default=None, help="Also write the result here (default: RUN/eval.json).")
    return p


def run(cfg: Namespace) -> None:
    from sandbox.checkpoint import atomic_write_bytes
    from sandbox.recipe import instantiate

    t0 = time.perf_counter()
    exp, ckpt, images, labels = sample_from_run(cfg)
    if images is None:  # a rank other than 0 of a multi-process run: rank 0 scores
        return
    seconds = time.perf_counter() - t0
    scorer = instantiate(exp.cfg, "data").scorer()
    if scorer is None:
        raise UserError(f"dataset {exp.cfg.data.class_path} has no offline scorer")
    result = {"run_dir": str(cfg.run_dir), "step": int(ckpt["step"]), "ema": cfg.ema, "seed": cfg.seed,
              **scorer.score(images, labels), "sampling_seconds": round(seconds, 2)}
    text = json.dumps(result, indent=2)
    print(text)
    atomic_write_bytes(Path(cfg.json or Path(cfg.run_dir) / "eval.json"), text.encode())
