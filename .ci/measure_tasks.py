#!/usr/bin/env python3
"""Issue 23 on digits: inpainting, class-guided editing and super-resolution with trained runs, scored by the
digits classifier, written into docs/tasks.md between its markers, with the pictures (docs/tasks_*.png).

    python .ci/measure_tasks.py --quickstart runs/quickstart --multiscale runs/quickstart_multiscale
    SANDBOX_TASKS_TINY=1 python .ci/measure_tasks.py --quickstart R --multiscale M --workdir /tmp/t  # tiny runs

.ci/measure_tasks.sh trains the runs and calls this (expected times there). The inputs are the real digits the
digits scorer holds out of its Frechet reference (``DigitsScorer.held``, ~900), so every score is against the
other half, with the floor the held-out digits themselves score. Each edit runs ``sandbox edit`` in this process
(``sandbox.cli.main``: the command's own code, without a new interpreter per pass) and writes an .npz in
WORKDIR; every finished (task, seed) is kept in WORKDIR/results.json, so a stopped measurement continues.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

from sandbox.eval.provenance import git_commit, machine, write_between_markers

REPO = Path(__file__).resolve().parents[1]
TINY = os.environ.get("SANDBOX_TASKS_TINY", "") not in ("", "0")
BEGIN, END = "<!-- measured: begin (.ci/measure_tasks.sh writes it) -->", "<!-- measured: end -->"
NEW_PAGE = "# Other tasks (tiny run)" if TINY else None  # a tiny run writes a page of its own
LOW = 4  # px: the low-resolution side of super-resolution (4x4 -> 16x16, issue 23)
TASKS = ("inpaint", "classedit", "superres")
# the pictures: (file stem, run, edit arguments); one held-out digit per class, seed 0
PICTURES = (("inpaint", "quickstart", ["--images", "{pics}", "--mask", "bottom"]),
            ("outpaint", "quickstart", ["--images", "{pics}", "--mask", "invert:center:0.25"]),
            ("classedit", "quickstart", ["--images", "{pics_new}", "--mask", "bottom"]),
            ("variations", "quickstart", ["--images", "{pics}", "--mask", "random:0.5"]),
            ("superres", "multiscale", ["--low_res", "{pics_low}"]))


def sandbox(args: list[str]) -> float:
    """``sandbox ARGS`` in this process -> wall seconds; stops the measurement on a failure."""
    from sandbox.cli import main

    t0 = time.perf_counter()
    code = main([str(a) for a in args])
    if code:
        sys.exit(f"measure_tasks: `sandbox {' '.join(map(str, args))}` exited {code}")
    return time.perf_counter() - t0


# --------------------------------------------------------------------------------------
# Inputs: the held-out real digits
# --------------------------------------------------------------------------------------
def new_labels(labels):
    """Another class for each digit, every other class equally often: (y + 1 + i mod 9) mod 10."""
    import torch

    return (labels + 1 + torch.arange(len(labels)) % 9) % 10


def prepare(work: Path, scorer, count: int | None) -> dict[str, Path]:
    """The held-out digits as .npz sets: with the true labels, with new labels, at 4x4 px; and the picture sets
    (the first held-out digit of each class)."""
    import torch
    import torch.nn.functional as F

    from sandbox.images.io import save_npz

    held = scorer.held[:: max(1, len(scorer.held) // count)][:count] if count else scorer.held  # every class
    x, y = scorer.real_images[held], scorer.real_labels[held]  # (N, 3, 16, 16) in [-1, 1], (N,)
    first = torch.stack([scorer.held[scorer.real_labels[scorer.held] == c][0] for c in range(10)])
    px, py = scorer.real_images[first], scorer.real_labels[first]
    sets = {"held": (x, y), "held_new": (x, new_labels(y)), "held_low": (F.interpolate(x, size=LOW, mode="area"), y),
            "pics": (px, py), "pics_new": (px, (py + 1) % 10), "pics_low": (F.interpolate(px, size=LOW, mode="area"), py)}
    paths = {}
    for name, (images, labels) in sets.items():
        paths[name] = work / f"{name}.npz"
        save_npz(images, labels, paths[name])
    return paths


# --------------------------------------------------------------------------------------
# One measurement
# --------------------------------------------------------------------------------------
def measure(task: str, seed: int, runs: dict, paths: dict, work: Path, scorer) -> dict:
    """Edit the held-out set for one (task, seed) and score it."""
    import numpy as np
    import torch

    from sandbox.images.io import from_uint8

    out = work / f"{task}-seed{seed}.npz"
    if task == "superres":
        args = ["--run_dir", runs["multiscale"], "--low_res", paths["held_low"]]
    else:
        args = ["--run_dir", runs["quickstart"], "--images", paths["held" if task == "inpaint" else "held_new"],
                "--mask", "bottom"]
    seconds = sandbox(["edit", *args, "--seed", seed, "--out", out, "--progress", "false"])
    images = from_uint8(np.load(out)["images"])
    true = torch.from_numpy(np.load(paths["held"])["labels"])
    s = scorer.score(images, true)
    result = {"task": task, "seed": seed, "seconds": round(seconds, 1), "num_images": len(images),
              "accuracy": s["accuracy"], "frechet_distance": s["frechet_distance"], "floor": s["real_frechet_floor"]}
    if task == "classedit":
        target = torch.from_numpy(np.load(paths["held_new"])["labels"])
        result["new_label"] = scorer.score(images, target)["accuracy"]
    if task == "superres":
        result["low_res_error"] = low_res_error(images, paths["held_low"])
    return result


def low_res_error(images, low_path: Path) -> float:
    """Mean |result area-downsampled to 4x4 - the 4x4 input|, in 0-255 grey levels: how well a result keeps the
    low-resolution image it was made from."""
    import numpy as np
    import torch.nn.functional as F

    from sandbox.images.io import from_uint8

    low = from_uint8(np.load(low_path)["images"])
    return float((F.interpolate(images, size=LOW, mode="area") - low).abs().mean() * 127.5)


def references(paths: dict, scorer) -> dict:
    """What the held-out inputs score (the ceiling), and bicubic upsampling of the 4x4 inputs."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from sandbox.images.io import from_uint8

    real = from_uint8(np.load(paths["held"])["images"])
    labels = torch.from_numpy(np.load(paths["held"])["labels"])
    low = from_uint8(np.load(paths["held_low"])["images"])
    bicubic = F.interpolate(low, size=real.shape[-1], mode="bicubic", align_corners=False).clamp(-1, 1)
    out = {}
    for name, images in (("real", real), ("bicubic", bicubic)):
        s = scorer.score(images, labels)
        out[name] = {"accuracy": s["accuracy"], "frechet_distance": s["frechet_distance"],
                     "floor": s["real_frechet_floor"], "low_res_error": low_res_error(images, paths["held_low"])}
    out["real"]["new_label"] = scorer.score(real, torch.from_numpy(np.load(paths["held_new"])["labels"]))["accuracy"]
    return out


def pictures(runs: dict, paths: dict, where: Path) -> list[str]:
    """docs/tasks_<task>.png: rows input | what the model is given | result, one digit per class, seed 0; and the
    inpainting animation."""
    written = []
    for stem, run, args in PICTURES:
        args = [a.format(**{k: str(v) for k, v in paths.items()}) for a in args]
        extra = ["--animate", where / "tasks_inpaint.gif"] if stem == "inpaint" else []
        sandbox(["edit", "--run_dir", runs[run], *args, "--seed", 0, "--out", where / f"tasks_{stem}.png", *extra,
                 "--progress", "false"])
        written.append(f"tasks_{stem}.png")
    return written


# --------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------
def mean_std(values: list[float], digits: int = 1) -> str:
    """'m +- s' over the seeds ('m' alone for one value)."""
    if not values:
        return "-"
    m = statistics.mean(values)
    return f"{m:.{digits}f}" if len(values) == 1 else f"{m:.{digits}f} +- {statistics.stdev(values):.{digits}f}"


def cells(runs: list[dict], key: str, scale: float = 1.0, digits: int = 1) -> str:
    return mean_std([scale * r[key] for r in runs], digits)


def tables(results: dict, refs: dict, meta: dict) -> str:
    """The three measured tables (markdown) with their provenance line."""
    by = {t: [results[k] for k in sorted(results) if results[k]["task"] == t] for t in TASKS}
    n = next((r["num_images"] for rs in by.values() for r in rs), 0)
    real, bic = refs["real"], refs["bicubic"]
    tiny = " -- TINY (a few steps of tiny runs: the numbers mean nothing)" if TINY else ""
    seeds = sorted({r["seed"] for rs in by.values() for r in rs})
    lines = [f"Measured at commit `{meta['commit']}` on {meta['machine']}, {meta['date']}{tiny}: {n:,} held-out real "
             f"digits, seeds {', '.join(map(str, seeds))} (mean +- std over the seeds); Frechet distances against "
             "the reference half, whose floor is what the held-out digits themselves score. Time: one pass over the "
             "set.", "",
             "**Inpainting** (the quickstart run; the bottom half regenerated under the true label)", "",
             "| | accuracy % | Frechet distance | floor | time (s) |", "|---|---|---|---|---|",
             f"| the held-out digits themselves | {100 * real['accuracy']:.1f} | {real['frechet_distance']:.1f} | "
             f"{real['floor']:.1f} | |",
             f"| bottom half inpainted | {cells(by['inpaint'], 'accuracy', 100)} | "
             f"{cells(by['inpaint'], 'frechet_distance')} | {real['floor']:.1f} | "
             f"{cells(by['inpaint'], 'seconds', digits=0)} |", "",
             "**Class-guided editing** (the quickstart run; the bottom half regenerated under another label, each "
             "other class equally often)", "",
             "| | read as the new label % | read as the original label % | Frechet distance | time (s) |",
             "|---|---|---|---|---|",
             f"| the held-out digits themselves | {100 * real['new_label']:.1f} | {100 * real['accuracy']:.1f} | "
             f"{real['frechet_distance']:.1f} | |",
             f"| bottom half under the new label | {cells(by['classedit'], 'new_label', 100)} | "
             f"{cells(by['classedit'], 'accuracy', 100)} | {cells(by['classedit'], 'frechet_distance')} | "
             f"{cells(by['classedit'], 'seconds', digits=0)} |", "",
             f"**Super-resolution** {LOW}x{LOW} -> 16x16 (the multiscale quickstart run; the {LOW}x{LOW} area "
             f"average of each digit fixes scales 1, 2, 4, the 8x8-token scale is generated under the true label)", "",
             f"| | accuracy % | Frechet distance | floor | mean abs. error at {LOW}x{LOW} (grey levels) | time (s) |",
             "|---|---|---|---|---|---|",
             f"| bicubic upsampling | {100 * bic['accuracy']:.1f} | {bic['frechet_distance']:.1f} | {bic['floor']:.1f} | "
             f"{bic['low_res_error']:.1f} | |",
             f"| generated finest scale | {cells(by['superres'], 'accuracy', 100)} | "
             f"{cells(by['superres'], 'frechet_distance')} | {real['floor']:.1f} | "
             f"{cells(by['superres'], 'low_res_error')} | {cells(by['superres'], 'seconds', digits=0)} |"]
    return "\n".join(lines)


def picture_table(names: list[str]) -> str:
    """The pictures (markdown, relative to the page): one held-out digit per class, seed 0."""
    titles = {"inpaint": "inpainting (bottom half)", "outpaint": "outpainting (keep the centre)",
              "classedit": "class-guided (bottom half as the next class)", "variations": "variations (half the tokens)",
              "superres": f"super-resolution ({LOW}x{LOW} -> 16x16)"}
    stems = [n.removeprefix("tasks_").removesuffix(".png") for n in names]
    return "\n".join(["", "One held-out digit per class, seed 0; each picture's rows are input | what the model is "
                           "given | result:", "", "| " + " | ".join(titles[s] for s in stems) + " |",
                       "|" + "---|" * len(stems), "| " + " | ".join(f"![{titles[s]}]({n})" for s, n in
                                                                    zip(stems, names)) + " |", "",
                       "The inpainting, step by step: ![inpainting animation](tasks_inpaint.gif)"])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quickstart", type=Path, required=True, help="The quickstart run directory.")
    p.add_argument("--multiscale", type=Path, required=True, help="The multiscale quickstart run directory.")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="Sampling seeds (default 0 1 2).")
    p.add_argument("--workdir", type=Path, default=REPO / "runs" / "tasks", help="Inputs, edited sets, results.")
    p.add_argument("--out", type=Path, default=None, help="The page (default docs/tasks.md; TINY: WORKDIR/tasks.md); "
                                                          "the pictures go next to it.")
    p.add_argument("--count", type=int, default=20 if TINY else None, help="Held-out digits used (default: all).")
    args = p.parse_args(argv)
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    out = (args.out or (work / "tasks.md" if TINY else REPO / "docs" / "tasks.md")).resolve()
    runs = {"quickstart": args.quickstart.resolve(), "multiscale": args.multiscale.resolve()}
    from sandbox.plugins.datasets.digits_classifier import DigitsScorer

    scorer = DigitsScorer(16)  # the quickstart's image size; trained once (~20 s) and cached
    paths = prepare(work, scorer, args.count)
    store = work / "results.json"
    results = json.loads(store.read_text()) if store.is_file() else {}
    meta = {"commit": git_commit(), "machine": machine(), "date": time.strftime("%Y-%m-%d")}
    refs = references(paths, scorer)
    for seed in args.seeds:  # seed-major: a stopped measurement already has every task once
        for task in TASKS:
            key = f"{task}/seed{seed}"
            if key not in results:
                results[key] = measure(task, seed, runs, paths, work, scorer)
                store.write_text(json.dumps(results, indent=1))
                print(f"{key}: {json.dumps(results[key])}", flush=True)
            write_between_markers(out, tables(results, refs, meta), BEGIN, END, "measure_tasks", NEW_PAGE)
    names = pictures(runs, paths, out.parent)
    page = tables(results, refs, meta) + "\n" + picture_table(names)
    write_between_markers(out, page, BEGIN, END, "measure_tasks", NEW_PAGE)
    print(f"wrote {', '.join(names)} in {out.parent} and the tables in {out}")


if __name__ == "__main__":
    main()
