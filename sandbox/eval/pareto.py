"""The quality-speed map of a trained run (issue 22, item 6): ``sandbox bench --pareto RUN``.

Every point of a grid of sampling options -- by default the number of AR steps, the head-step schedule
(DiSA-style annealing, docs/performance.md#fast-sampling) and the cache across AR steps (LazyMAR) -- is

- scored by ``sandbox sweep`` (the dataset's scorer over ``--pareto_seeds`` seeds of ``--pareto_images``
  samples each, the real-data floor beside the Frechet distance; the sets are shared with eval and sweep), and
- timed here, in this one process, one point after another: a warm-up call, then ``--pareto_timing_images``
  images in batches of the recipe's size (images/s; the machine and commit go into the result).

Quality and time are measured apart on purpose: a sample set reused from an earlier eval has no time, and timing
every point in one process after the others finished keeps the points comparable on a shared CPU (the brief's
rule: compare side by side in one process). Writes RUN/sweeps/<name>/pareto.json, pareto.md (the table, the
frontier marked) and pareto.png (Frechet distance against images/s, the frontier drawn, the recipe's own
settings ringed).

A point is on the frontier when no other point is at least as fast with a lower Frechet distance.
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import time
from pathlib import Path

from sandbox.errors import UserError
from sandbox.eval.provenance import git_commit, machine
from sandbox.eval.sweep import SAMPLING_TYPES

# the speed options of the sampling core, each at today's default and at a faster setting: the recipe's step
# count and fewer (MAR Fig. 6: quality holds down to ~8 steps at 256 tokens), the head's own step count ("100%")
# and DiSA's annealing from it down to a tenth, and no cache and LazyMAR's full step every 2nd
DEFAULT_GRID = {"num_iter": [4, 8, 16], "head_steps": ["100%", "linear:100%:10%"], "cache": ["off", "approx:2"]}
# the sweep's sampling options but ``ema``: those ``sandbox.generate`` takes; a point's other keys are ``ema`` and
# the head's fields (a sampler, its step count), which the timing pass loads the run with -- so every point is
# timed as it was scored
TIMED = tuple(k for k in SAMPLING_TYPES if k != "ema")
FD, ACC, FLOOR = "frechet_distance", "accuracy", "real_frechet_floor"


def run_pareto(run_dir: str, grid: dict | None, seeds: int, num_images: int, timing_images: int, name: str,
               device: str) -> dict:
    """Score (``sandbox sweep``), time and map every point; returns the result written to pareto.json."""
    if seeds < 1 or num_images < 1 or timing_images < 1:
        raise UserError("--pareto_seeds, --pareto_images and --pareto_timing_images must be >= 1")
    from sandbox.run.loading import load_run

    loaded = load_run(run_dir, device=device)
    grid = grid or default_grid(loaded.model)
    rows = _scored(run_dir, grid, seeds, num_images, name, device)
    default = _default_point(loaded, rows)
    variants = {}  # (ema, head fields) -> the run loaded so, for points that sample with other weights or head
    for row in rows:
        key = _variant(row["point"])
        if key not in variants:
            ema, head = json.loads(key)
            variants[key] = loaded if key == _variant({}) else load_run(run_dir, device=device, use_ema=ema,
                                                                          head_args=head or None)
        row["images_per_s"] = _time_point(variants[key], row["point"], timing_images)
    frontier = pareto_frontier(rows)
    result = {"run_dir": str(run_dir), "step": loaded.step, "grid": grid, "seeds": seeds, "num_images": num_images,
              "timing_images": timing_images, "machine": _machine(), "commit": git_commit(), "default_point": default,
              "points": [_summary(r, i in frontier, default) for i, r in enumerate(rows)]}
    _write(loaded.root / "sweeps" / name, result)
    return result


def default_grid(model) -> dict:
    """``DEFAULT_GRID`` less the options the run cannot take: head-step schedules for a head without step counts
    (a categorical head draws once), the approximate cache for a backbone with a cache of its own (causal)."""
    from sandbox.fast.step_cache import check_cache

    grid = dict(DEFAULT_GRID)
    if not (model.head.supports_num_steps and model.head.default_num_steps is not None):
        del grid["head_steps"]
    try:
        check_cache("approx:2", model.backbone)
    except UserError:
        del grid["cache"]
    return grid


def _scored(run_dir: str, grid: dict, seeds: int, num_images: int, name: str, device: str) -> list[dict]:
    """The sweep's rows (one per point; finished points of an earlier run are kept)."""
    from sandbox.cli import sweep

    argv = ["--run_dir", str(run_dir), "--grid", json.dumps(grid), "--name", name, "--seeds", str(seeds),
            "--num_images", str(num_images), "--device", device]
    with contextlib.redirect_stdout(io.StringIO()):  # the sweep's own JSON summary: stdout carries the map's
        sweep.run(sweep.parser().parse_args(argv))
    rows = json.loads((Path(run_dir) / "sweeps" / name / "results.json").read_text())
    if not rows or FD not in rows[0]["metrics"]:
        raise UserError(f"run {run_dir}: its dataset's scorer gives no {FD}; the map needs one")
    return rows


def _variant(point: dict) -> str:
    """What a point loads the run with, as a key: [ema, {head field: value}]."""
    head = {k.removeprefix("head_args."): v for k, v in point.items() if k not in TIMED and k != "ema"}
    return json.dumps([point.get("ema", True), head], sort_keys=True)


def _machine() -> str:
    import torch

    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{machine()}, torch {torch.__version__}{gpu}"


def _default_point(loaded, rows: list[dict]) -> dict | None:
    """The grid point that samples as the recipe does (its num_iter, the head's own steps, no cache), if any."""
    sc = loaded.sampling({}, prefix="--")
    own = {"num_iter": sc.num_iter, "head_steps": sc.head_steps or "100%", "cache": sc.cache or "off"}
    for row in rows:
        if all(row["point"].get(k, own[k]) == own[k] for k in own):
            return row["point"]
    return None


def _time_point(loaded, point: dict, timing_images: int) -> float:
    """Images per second of ``point``'s settings: one warm-up call, then ``timing_images`` class-balanced images
    in batches of the recipe's batch size."""
    from sandbox.api import generate

    options = {k: v for k, v in point.items() if k in TIMED}
    generate(loaded, num_images=min(timing_images, 8), seed=1, **options)  # warm-up: allocations, kernels
    t0 = time.perf_counter()
    generate(loaded, num_images=timing_images, seed=0, **options)
    return timing_images / (time.perf_counter() - t0)


def pareto_frontier(rows: list[dict]) -> set[int]:
    """Indices of the rows no other row beats: none at least as fast with a lower Frechet distance."""
    out = set()
    for i, r in enumerate(rows):
        fd, speed = r["metrics"][FD], r["images_per_s"]
        if not any(o["images_per_s"] >= speed and o["metrics"][FD] < fd for j, o in enumerate(rows) if j != i):
            out.add(i)
    return out


def _summary(row: dict, on_frontier: bool, default: dict | None) -> dict:
    m, s = row["metrics"], row.get("std", {})
    out = {"point": row["point"], "images_per_s": round(row["images_per_s"], 2), "frontier": on_frontier,
           "default": row["point"] == default}
    for key in (ACC, FD, FLOOR):
        if key in m:
            out[key] = m[key]
            if key in s:
                out[key + "_std"] = s[key]
    return out


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------
def _write(folder: Path, result: dict) -> None:
    from sandbox.run.files import atomic_write_bytes

    atomic_write_bytes(folder / "pareto.json", json.dumps(result, indent=2).encode())
    atomic_write_bytes(folder / "pareto.md", pareto_table(result).encode())
    atomic_write_bytes(folder / "pareto.png", pareto_png(result))


def _pm(p: dict, key: str, digits: int) -> str:
    if key not in p:
        return "-"
    scale = 100 if key == ACC else 1
    text = f"{p[key] * scale:.{digits}f}"
    return text + (f" +- {p[key + '_std'] * scale:.{digits}f}" if key + "_std" in p else "")


def pareto_table(result: dict) -> str:
    """A markdown table of the points, fastest first; the frontier in bold, the recipe's own settings marked."""
    points = sorted(result["points"], key=lambda p: -p["images_per_s"])
    base = next((p for p in points if p["default"]), None)
    keys = list(points[0]["point"]) if points else []
    head = "| " + " | ".join(keys) + " | images/s | speed-up | accuracy % | Frechet distance (floor) |"
    lines = [f"Quality-speed map of `{result['run_dir']}` (step {result['step']}): {result['seeds']} seeds x "
             f"{result['num_images']} samples per point; time over {result['timing_images']} images in one process. "
             f"Commit {result['commit']}, {result['machine']}. **Bold**: on the frontier; *default*: the recipe's "
             "own settings.", "", head, "|" + "---|" * (len(keys) + 4)]
    for p in points:
        cells = [str(p["point"][k]) for k in keys]
        if p["default"]:
            cells[0] += " *default*"
        speedup = f"{p['images_per_s'] / base['images_per_s']:.2f}x" if base else "-"
        fd = f"{_pm(p, FD, 1)} ({p[FLOOR]:.1f})" if FLOOR in p else _pm(p, FD, 1)
        row = [*cells, f"{p['images_per_s']:.1f}", speedup, _pm(p, ACC, 1), fd]
        if p["frontier"]:
            row = [f"**{c}**" for c in row]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def pareto_png(result: dict) -> bytes:
    """Frechet distance (error bars over seeds) against images/s, the frontier drawn, the floor dashed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    pts = result["points"]
    for p in pts:
        ax.errorbar(p["images_per_s"], p[FD], yerr=p.get(FD + "_std", 0), fmt="o", ms=5, capsize=2,
                    color="tab:red" if p["frontier"] else "tab:gray")
        ax.annotate(_label(p["point"]), (p["images_per_s"], p[FD]), fontsize=6, xytext=(3, 3),
                    textcoords="offset points")
        if p["default"]:
            ax.plot(p["images_per_s"], p[FD], "o", ms=12, mfc="none", color="tab:blue", label="recipe's settings")
    front = sorted((p for p in pts if p["frontier"]), key=lambda p: p["images_per_s"])
    ax.plot([p["images_per_s"] for p in front], [p[FD] for p in front], "-", color="tab:red", label="frontier")
    floors = [p[FLOOR] for p in pts if FLOOR in p]
    if floors:
        ax.axhline(sum(floors) / len(floors), ls="--", color="k", lw=1, label="real-data floor")
    ax.set_xscale("log")
    ax.set_xlabel("images / s (log)")
    ax.set_ylabel("Frechet distance")
    ax.set_title(f"{Path(result['run_dir']).name}: quality against speed ({result['seeds']} seeds x "
                 f"{result['num_images']} samples; commit {result['commit']})", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _label(point: dict) -> str:
    short = {"num_iter": "it", "head_steps": "hs", "cache": "c"}
    return " ".join(f"{short.get(k, k)}={v}" for k, v in point.items() if not (isinstance(v, float) and math.isnan(v)))
