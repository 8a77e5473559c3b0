#!/usr/bin/env python3
"""MAR Table 1 on digits (issue 21): train both tokenizers once, then every cell of recipes/ablations/ for 3 seeds,
score each with `sandbox eval` (1,000 samples, without guidance and with the recipe's), time training and
sampling, and write the table (mean +- std over the seeds) into docs/ablations.md between its markers.

    python .ci/measure_ablations.py                      # the whole grid, from the repository root (resumable)
    python .ci/measure_ablations.py --cells crossent_mar diffloss_mar --seeds 0
    SANDBOX_ABLATIONS_TINY=1 python .ci/measure_ablations.py --workdir /tmp/abl   # a few steps: does it all run?

Run it alone on the machine: the times are part of the result. Measured on a free 2-core CPU: about 7 min for
the tokenizers and 54-58 min per seed of the 8 cells, 2.9 hours in all (docs/ablations.md). Every finished
(cell, seed) is kept in WORKDIR/runs/ablations/results.json, so an interrupted measurement continues where it
stopped; the table is rewritten after every run. (A run stopped mid-training resumes, and its time counts only
the rest: delete its runs/ablations/CELL/seedS for a clean time.)

Every command runs as a subprocess (`python -m sandbox ...`) in --workdir (default: the repository root), where
the recipes' relative tokenizer paths (runs/kl4_digits_tokenizer, runs/vq_digits_tokenizer) resolve. With
SANDBOX_ABLATIONS_TINY=1 every run is a few steps of a tiny model and 20 samples, and the table goes to
WORKDIR/ablations.md unless --out is given: the numbers mean nothing, the wiring is what is tested.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from sandbox.eval.provenance import git_commit, machine, write_between_markers

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes" / "ablations"
TOKENIZERS = ("kl4_digits_tokenizer", "vq_digits_tokenizer")  # recipes/<name>.yaml -> runs/<name>
# Table 1's rows (order, attention, tokens per step) x columns (loss), in the paper's order
ROWS = (("raster_causal", "AR: raster, causal, 1 token/step"),
        ("random_causal", "random, causal, 1 token/step"),
        ("random_bidir_1tok", "random, bidirectional, 1 token/step"),
        ("mar", "MAR: random, bidirectional, 16 steps"))
LOSSES = (("crossent", "cross-entropy (VQ)"), ("diffloss", "Diffusion Loss (KL-4)"))
# MAR Table 1 (ImageNet 256, MAR-L size, 400 epochs), FID-50K without -> with guidance (../shared/DESIGN.md)
PAPER = {"raster_causal": ("19.58 -> 4.92", "19.23 -> 4.69"), "random_causal": ("16.22 -> 4.36", "13.07 -> 4.07"),
         "random_bidir_1tok": ("8.75 -> 3.50", "3.43 -> 1.84"), "mar": ("8.79 -> 3.69", "3.50 -> 1.98")}
CELLS = [f"{loss}_{row}" for loss, _ in LOSSES for row, _ in ROWS]
BEGIN, END = "<!-- measured table: begin (.ci/measure_ablations.py writes it) -->", "<!-- measured table: end -->"

TINY = os.environ.get("SANDBOX_ABLATIONS_TINY", "") not in ("", "0")
TINY_TOKENIZER = ["--train.steps", "2", "--train.batch_size", "8"]
TINY_CELL = ["--train.steps", "3", "--train.batch_size", "8", "--model.encoder_dim", "32", "--model.decoder_dim", "32",
             "--model.encoder_heads", "2", "--model.decoder_heads", "2", "--model.encoder_depth", "1",
             "--model.decoder_depth", "1", "--head.init_args.width", "32", "--head.init_args.depth", "1",
             "--sample.grid_classes", "2", "--sample.grid_per_class", "1"]


def sandbox(args: list[str], cwd: Path) -> tuple[float, str]:
    """``python -m sandbox ARGS`` in ``cwd``: (wall seconds, stdout); stops the measurement on a failure."""
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "sandbox", *args], cwd=cwd, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO),
                                                                                         os.environ.get("PYTHONPATH")]))})
    if res.returncode:
        sys.exit(f"measure_ablations: `sandbox {' '.join(args)}` exited {res.returncode}:\n{res.stderr[-3000:]}")
    return time.perf_counter() - t0, res.stdout


def train_tokenizers(work: Path) -> dict:
    """Both digits tokenizers (a finished run is reported complete, not trained again): wall seconds each, as
    first measured (kept in WORKDIR/runs/ablations/tokenizers.json)."""
    store = work / "runs" / "ablations" / "tokenizers.json"
    times = json.loads(store.read_text()) if store.is_file() else {}
    for name in TOKENIZERS:
        extra = TINY_TOKENIZER if TINY else []
        seconds, _ = sandbox(["train-tokenizer", "--config", str(REPO / "recipes" / f"{name}.yaml"),
                              "--run_dir", f"runs/{name}", *extra], work)
        times.setdefault(name, round(seconds, 1))
        print(f"tokenizer {name}: {times[name]:.0f} s", flush=True)
    store.parent.mkdir(parents=True, exist_ok=True)
    store.write_text(json.dumps(times))
    return times


def measure_run(cell: str, seed: int, work: Path, num_images: int) -> dict:
    """Train one (cell, seed), then score it without guidance (cfg 1) and with the recipe's (cfg 3)."""
    run_dir = f"runs/ablations/{cell}/seed{seed}"
    extra = TINY_CELL + (["--head.init_args.num_sampling_steps", "4"] if TINY and cell.startswith("diffloss") else [])
    train_s, _ = sandbox(["train", "--config", str(RECIPES / f"{cell}.yaml"), "--seed", str(seed), "--run_dir", run_dir,
                          *(extra if TINY else [])], work)
    out = {"cell": cell, "seed": seed, "train_seconds": round(train_s, 1)}
    for cfg in (1.0, 3.0):
        _, text = sandbox(["eval", "--run_dir", run_dir, "--num_images", str(num_images), "--cfg", str(cfg),
                           "--json", f"{run_dir}/eval-cfg{cfg:g}.json"], work)
        scores = json.loads(text)
        out[f"cfg{cfg:g}"] = {k: scores.get(k) for k in ("accuracy", "frechet_distance", "real_frechet_floor",
                                                          "sampling_seconds", "num_images", "step")}
    return out


def mean_std(values: list[float], digits: int) -> str:
    """'m +- s' over the seeds ('m' alone for one seed)."""
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    m = statistics.mean(values)
    if len(values) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} +- {statistics.stdev(values):.{digits}f}"


def cell_line(cell: str, runs: list[dict]) -> str:
    """One table row: the cell, the paper's FID, then the digits scores and times over its seeds."""
    loss, row = cell.split("_", 1)
    scheme = dict(ROWS)[row]
    paper = PAPER[row][0 if loss == "crossent" else 1]
    acc = " / ".join(mean_std([100 * r[f"cfg{c}"]["accuracy"] for r in runs], 1) for c in ("1", "3"))
    fd = " / ".join(mean_std([r[f"cfg{c}"]["frechet_distance"] for r in runs], 1) for c in ("1", "3"))
    floor = mean_std([r["cfg3"]["real_frechet_floor"] for r in runs], 1)
    train = mean_std([r["train_seconds"] / 60 for r in runs], 1)
    sample = mean_std([r["cfg3"]["sampling_seconds"] for r in runs], 0)
    return (f"| {scheme} | {dict(LOSSES)[loss]} | {paper} | {acc} | {fd} | {floor} | {train} | {sample} | "
            f"{len(runs)} |")


def table(results: dict, meta: dict) -> str:
    """The measured table (markdown) with its provenance line."""
    lines = [f"Measured at commit `{meta['commit']}` on {meta['machine']}, {meta['date']}"
             f"{' -- TINY (a few steps: the numbers mean nothing)' if TINY else ''}. Tokenizers: "
             + ", ".join(f"{k} {v / 60:.1f} min" for k, v in meta["tokenizers"].items()) + ".", "",
             "| scheme | tokens, loss | paper FID (w/o -> w/ CFG) | accuracy % (cfg 1 / 3) | Frechet distance "
             f"(cfg 1 / 3) | floor | train (min) | sample {meta['num_images']:,} (s, cfg 3) | seeds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for cell in CELLS:
        runs = [results[k] for k in sorted(results) if results[k]["cell"] == cell]
        if runs:
            lines.append(cell_line(cell, runs))
    return "\n".join(lines)


def write_doc(path: Path, text: str, begin: str = BEGIN, end: str = END) -> None:
    """``text`` between the markers of ``path`` (shared by measure_speed.py)."""
    write_between_markers(path, text, begin, end, "measure_ablations", "# Ablations (tiny run)" if TINY else None)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cells", nargs="+", default=CELLS, choices=CELLS, help="Which cells (default: all 8).")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="Training seeds (default 0 1 2).")
    p.add_argument("--workdir", type=Path, default=REPO, help="Where runs/ goes (default: the repository root).")
    p.add_argument("--out", type=Path, default=None, help="The page to fill (default docs/ablations.md; TINY: "
                                                          "WORKDIR/ablations.md).")
    p.add_argument("--num_images", type=int, default=20 if TINY else 1000, help="Samples per evaluation.")
    args = p.parse_args(argv)
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    out = args.out or (work / "ablations.md" if TINY else REPO / "docs" / "ablations.md")
    store = work / "runs" / "ablations" / "results.json"
    results = json.loads(store.read_text()) if store.is_file() else {}
    meta = {"commit": git_commit(), "machine": machine(), "date": time.strftime("%Y-%m-%d"),
            "tokenizers": train_tokenizers(work), "num_images": args.num_images}
    for seed in args.seeds:  # seed-major: a stopped measurement already has every cell once
        for cell in args.cells:
            key = f"{cell}/seed{seed}"
            if key not in results:
                results[key] = measure_run(cell, seed, work, args.num_images)
                store.parent.mkdir(parents=True, exist_ok=True)
                store.write_text(json.dumps(results, indent=1))
                print(f"{key}: {json.dumps(results[key])}", flush=True)
            write_doc(out, table(results, meta))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
