"""``sandbox report RUN [RUN ...] --out report.html [--animate true]``: one static page comparing runs.

The page (sandbox/eval/report.py) shows each run's recipe differences, scores (eval.json) with the real-data
floor, sweep tables, the loss curves overlaid, the sample grids side by side and the sampling animations.
It only reads the runs; ``--animate true`` additionally samples a small batch per run (the GIF goes into
the page, not into the run) for runs that hold no animation of their own.
"""
from __future__ import annotations

import math
import sys
import tempfile
from pathlib import Path

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from sandbox.errors import UserError

NAME = "report"
HELP = "One self-contained HTML page comparing runs: recipes, scores, sweeps, loss curves, samples."
ORDER = 35


def parser() -> ArgumentParser:
    p = ArgumentParser(exit_on_error=False, description=HELP)
    p.add_argument("--config", action=ActionConfigFile)
    p.add_argument("runs", nargs="*", type=str, help="Run directories written by `sandbox train`.")
    p.add_argument("--out", type=str, default="report.html", help="The page to write (.html).")
    # off by default: a report is a quick read-only view, and sampling a large model on a CPU takes minutes
    p.add_argument("--animate", type=bool, default=False,
                   help="Sample a small batch per run and embed the generation as a GIF, one frame per "
                        "sampling step (runs that hold a GIF already show theirs either way).")
    p.add_argument("--animate_images", type=int, default=16,
                   help="Images in each animation, one row per class: 16 is 4 classes x 4 images.")
    p.add_argument("--seed", type=int, default=0, help="Seed of the animated samples.")
    p.add_argument("--device", type=str, default="auto", help="Where --animate samples (auto: cuda if available).")
    return p


def run(cfg: Namespace) -> None:
    from sandbox.eval.report import build_page, check_out, read_runs, write_page

    out = Path(cfg.out)
    check_out(out)  # before the runs are read or sampled
    if cfg.animate_images < 1:
        raise UserError("--animate_images must be >= 1")
    runs = read_runs(cfg.runs)
    animations = {r.path: _animation(r, cfg) for r in runs if not r.gifs} if cfg.animate else None
    write_page(build_page(runs, animations), out)
    print(f"wrote {out}: {len(runs)} run{'s' * (len(runs) > 1)} ({', '.join(r.name for r in runs)})")


def _labels(run, n: int) -> list[int]:
    """A square-ish grid, one row per class: about sqrt(n) classes of equally many images (the default
    class-balanced labels would give n rows of one image)."""
    classes = max(1, min(int(run.checkpoint.get("meta", {}).get("num_classes", 1)), round(math.sqrt(n))))
    per_class = -(-n // classes)
    return [i // per_class for i in range(n)]


def _animation(run, cfg: Namespace) -> bytes | str:
    """A GIF of the run's first ``--animate_images`` samples being generated, one frame per step, or why
    there is none (a run without a checkpoint is still reported)."""
    from sandbox.cli import sample
    from sandbox.images.animation import FrameRecorder
    from sandbox.images.grids import save_gif

    if "step" not in run.checkpoint:
        return "no checkpoint to sample an animation from"
    n = cfg.animate_images
    args = sample.parser().parse_args([
        "--run_dir", str(run.path), "--num_images", str(n), "--batch_size", str(n), "--labels", str(_labels(run, n)),
        "--seed", str(cfg.seed), "--device", cfg.device, "--progress", "false"])
    recorders = []

    def record(exp, labels):
        recorders.append(FrameRecorder(exp, labels))
        return recorders[-1]

    try:
        sample.sample_from_run(args, on_step=record)  # one batch of n: every image is animated
    except UserError as e:  # e.g. a checkpoint that no longer fits its recipe: the rest of the page still helps
        print(f"warning: no animation for {run.name}: {e}", file=sys.stderr)
        return f"could not sample: {e}"
    with tempfile.TemporaryDirectory() as tmp:  # save_gif encodes to a file; the page wants the bytes
        save_gif(recorders[0].captioned(), Path(tmp) / "sampling.gif")
        return (Path(tmp) / "sampling.gif").read_bytes()
