"""Sweeps over sampling settings (``sandbox sweep``): the grid, its points, the results kept row by row, the plots.

A grid maps sampling options -- the options of ``sandbox sample`` (``SAMPLING_TYPES``) or fields of the run's
head (``--head_args``: a head's init argument by name, or ``head_args.NAME``) -- to lists of values; its points
are every combination, in the grid's order (the last key varies fastest). A sweep lives in
RUN/sweeps/<name>/:

    sweep.json        what every point shares (the run's step, images, seeds, reference, the fixed options)
    results.json      one row per point, [{"point": {option: value}, "metrics": {name: mean}, "std": {name: std},
                      "seeds": [{"seed": s, "samples": path, name: value, ...}]}] ("std" only with several seeds)
    results.csv       the same rows as a table: the options, then each metric (and its std)
    <metric>.png      the metric against each option of the grid, one line per value of the others, the best
                      point starred (the real-data floor dashed under a Frechet distance)

Both results files are rewritten (atomically) after every point, so a sweep killed at any moment resumes with
the points it had finished; the sample sets of a point cut short are in RUN/eval/ and are not sampled again.
"""
from __future__ import annotations

import csv
import inspect
import io
import itertools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from sandbox.errors import UserError

# the sampling options a grid may vary and the type of their values (sandbox.cli.sample.add_sampling_arguments)
SAMPLING_TYPES = {"num_iter": int, "cfg": float, "cfg_schedule": str, "temperature": float, "batch_size": int,
                  "ema": bool, "head_steps": (int, str, list), "cache": str}
HEAD_PREFIX = "head_args."
NOT_PLOTTED = ("real_accuracy", "inception_score_std", "sampling_seconds")  # describe the scorer or the machine


# --------------------------------------------------------------------------------------
# The grid
# --------------------------------------------------------------------------------------
def parse_grid(grid) -> dict[str, list]:
    """``--grid`` as {option: [values]}, checked for shape: a non-empty mapping of non-empty lists of distinct
    plain values (a single value stands for a list of one)."""
    if not isinstance(grid, dict) or not grid:
        raise UserError("--grid is empty; give options and their values, e.g. --grid '{cfg: [1.0, 2.0, 3.0]}'")
    axes = {}
    for key, values in grid.items():
        values = list(values) if isinstance(values, (list, tuple)) else [values]
        if not values:
            raise UserError(f"--grid: {key} has no values")
        bad = [v for v in values if not isinstance(v, (int, float, str, bool)) and v is not None]
        if bad:
            raise UserError(f"--grid: {key} takes plain values (numbers, names, true/false), got {bad[0]!r}")
        _distinct(str(key), values)
        axes[str(key)] = values
    return axes


def _distinct(key: str, values: list) -> None:
    seen = [json.dumps(v) for v in values]
    if len(set(seen)) < len(seen):
        raise UserError(f"--grid: {key} lists a value twice ({values})")


@dataclass
class Grid:
    """The checked grid: ``axes`` {key: values} in order, and which keys are head fields (key -> argument)."""

    axes: dict[str, list]
    head_keys: dict[str, str]

    def points(self) -> list[dict]:
        keys = list(self.axes)
        return [dict(zip(keys, combo)) for combo in itertools.product(*self.axes.values())]

    def split(self, point: dict) -> tuple[dict, dict]:
        """(sampling options, head_args) of a point."""
        sampling = {k: v for k, v in point.items() if k not in self.head_keys}
        return sampling, {self.head_keys[k]: v for k, v in point.items() if k in self.head_keys}


def check_grid(axes: dict[str, list], head_cls: type, given: dict, head_args: dict | None) -> Grid:
    """Each key a sampling option or a field of ``head_cls``, none given as a fixed option too (``given``: the
    command's sampling options that are not None, ``head_args`` its --head_args), each sampling value of the
    option's type and range. Head values are checked when the run loads with them (``sandbox sweep``)."""
    from sandbox.config.schema import check_sampling

    fields = head_fields(head_cls)
    head_keys, normalized = {}, {}
    for key, values in axes.items():
        name = key.removeprefix(HEAD_PREFIX)
        if key in SAMPLING_TYPES:
            if key in given:
                raise UserError(f"--grid varies {key}, which is also given as --{key}; give it in one place")
            values = [_typed(key, v) for v in values]
            _distinct(key, values)  # 1 and 1.0 are one guidance scale
            try:
                for v in values:
                    check_sampling({key: v}, "--grid: ")
            except ValueError as e:
                raise UserError(str(e)) from None
        elif name in fields:
            if name in (head_args or {}):
                raise UserError(f"--grid varies {name}, which --head_args fixes too; give it in one place")
            head_keys[key] = name
        else:
            raise UserError(f"--grid key {key!r} is not a sampling option: use {', '.join(SAMPLING_TYPES)} or a field "
                            f"of head {head_cls.__name__} ({', '.join(fields)}, also as head_args.NAME)")
        normalized[key] = values
    return Grid(normalized, head_keys)


def head_fields(head_cls: type) -> list[str]:
    """The init arguments a recipe (and --head_args) may set on a head: all but what the core passes in."""
    params = list(inspect.signature(head_cls.__init__).parameters.values())[1:]  # no self
    injected = {"token_dim", "cond_dim", *getattr(head_cls, "requires", ())}
    return [p.name for p in params if p.name not in injected and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def _typed(key: str, value):
    """A grid value as its option's type (an int where a float is expected becomes a float)."""
    kind = SAMPLING_TYPES[key]
    if key == "cache" and value is False:  # YAML reads a bare `off` as false
        return "off"
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = " or ".join(k.__name__ for k in kind) if isinstance(kind, tuple) else kind.__name__
        raise UserError(f"--grid: {key} takes {names} values, got {value!r}")
    return value


def sweep_name(name: str | None, axes: dict[str, list]) -> str:
    """The sweep's folder name: --name, or the grid's keys joined by '-'."""
    name = name if name is not None else "-".join(k.removeprefix(HEAD_PREFIX) for k in axes)
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.=-]*", name) or len(name) > 100:
        raise UserError(f"--name {name!r} must be a plain folder name (letters, digits, _ . = -; up to 100)")
    return name


def point_key(point: dict) -> str:
    return json.dumps(point, sort_keys=True)


# --------------------------------------------------------------------------------------
# Results kept row by row
# --------------------------------------------------------------------------------------
def finished_rows(folder: Path, shared: dict, grid: Grid) -> dict[str, dict]:
    """The rows of an earlier run of this sweep that are points of ``grid``, by ``point_key``. One error line when
    the folder holds a sweep with other shared settings (its rows would not compare with the new ones)."""
    meta, results = folder / "sweep.json", folder / "results.json"
    if not meta.is_file():
        return {}
    try:
        before = json.loads(meta.read_text())
    except (OSError, ValueError):
        before = None
    if isinstance(before, dict) and before != shared:
        diff = ", ".join(f"{k} {before.get(k)!r} -> {shared.get(k)!r}" for k in sorted({*before, *shared})
                         if before.get(k) != shared.get(k))
        raise UserError(f"{folder} holds a sweep with other settings ({diff}); give another --name or delete it")
    try:
        rows = json.loads(results.read_text()) if results.is_file() else []
    except (OSError, ValueError):
        rows = []  # never torn (written atomically); unreadable: computed again (the samples are kept)
    wanted = {point_key(p) for p in grid.points()}
    return {point_key(r["point"]): r for r in rows if isinstance(r, dict) and isinstance(r.get("point"), dict)
            and isinstance(r.get("metrics"), dict) and point_key(r["point"]) in wanted}


def row_of(point: dict, per_seed: list[dict]) -> dict:
    """A results row from one point's per-seed results: the mean of each metric (and its std with several seeds)."""
    from sandbox.eval.scoring import over_seeds

    metrics, std = over_seeds(per_seed)
    row = {"point": point, "metrics": metrics}
    if len(per_seed) > 1:
        row["std"] = std
    row["seeds"] = per_seed
    return row


def write_results(folder: Path, shared: dict, grid: Grid, rows: dict[str, dict]) -> list[dict]:
    """sweep.json, then results.json and results.csv with the finished rows in grid order; returns them."""
    from sandbox.run.files import atomic_write_bytes

    ordered = [rows[point_key(p)] for p in grid.points() if point_key(p) in rows]
    if not (folder / "sweep.json").is_file():
        atomic_write_bytes(folder / "sweep.json", json.dumps(shared, indent=2).encode())
    atomic_write_bytes(folder / "results.json", json.dumps(ordered, indent=2).encode())
    atomic_write_bytes(folder / "results.csv", results_csv(grid, ordered).encode())
    return ordered


def metric_keys(rows: list[dict]) -> list[str]:
    """The metrics of the rows, in first-seen order."""
    return list(dict.fromkeys(k for r in rows for k in r["metrics"]))


def results_csv(grid: Grid, rows: list[dict]) -> str:
    keys, several = metric_keys(rows), any("std" in r for r in rows)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow([*grid.axes, *(c for k in keys for c in ((k, f"{k}_std") if several else (k,)))])
    for r in rows:
        values = [r["metrics"].get(k, "") for k in keys]
        if several:
            values = [c for k, v in zip(keys, values) for c in (v, r.get("std", {}).get(k, ""))]
        writer.writerow([*(r["point"][k] for k in grid.axes), *values])
    return out.getvalue()


def best_row(rows: list[dict], metric: str) -> dict | None:
    """The row with the best value of ``metric`` (None when the metric has no direction or no value)."""
    from sandbox.eval.report import metric_for

    higher = metric_for(metric).higher_is_better
    scored = [r for r in rows if _finite(r["metrics"].get(metric))]
    if higher is None or not scored:
        return None
    return (max if higher else min)(scored, key=lambda r: r["metrics"][metric])


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# --------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------
def plot_metrics(folder: Path, grid: Grid, rows: list[dict], name: str) -> list[Path]:
    """One PNG per metric (the real-data floor and bookkeeping numbers aside); returns the files written."""
    from sandbox.eval.report import FLOOR
    from sandbox.run.files import atomic_write_bytes

    written = []
    for metric in metric_keys(rows):
        if metric in NOT_PLOTTED or metric == FLOOR or not any(_finite(r["metrics"].get(metric)) for r in rows):
            continue
        path = folder / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', metric)}.png"
        atomic_write_bytes(path, metric_png(grid, rows, metric, name))
        written.append(path)
    return written


def metric_png(grid: Grid, rows: list[dict], metric: str, name: str) -> bytes:
    """The metric against each option the grid varies (one panel each), one line per combination of the other
    options, error bars with several seeds, the best point starred in every panel."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from sandbox.eval.report import metric_for

    varying = [k for k, v in grid.axes.items() if len(v) > 1] or list(grid.axes)[:1]
    fig = Figure(figsize=(4.6 * len(varying), 3.8), dpi=100)
    FigureCanvasAgg(fig)
    best = best_row(rows, metric)
    for j, axis in enumerate(varying):
        ax = fig.add_subplot(1, len(varying), j + 1)
        _panel(ax, grid, rows, metric, axis, best)
        ax.set_xlabel(axis)
        ax.set_ylabel(metric_for(metric).label)
    title = f"sweep {name}: {metric_for(metric).label}"
    if best is not None:
        title += "; best at " + ", ".join(f"{k}={v}" for k, v in best["point"].items())
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _panel(ax, grid: Grid, rows: list[dict], metric: str, axis: str, best: dict | None) -> None:
    from sandbox.eval.report import FLOOR

    values = grid.axes[axis]
    numeric = all(_finite(v) for v in values)
    where = {json.dumps(v): (v if numeric else i) for i, v in enumerate(values)}
    others = [k for k, v in grid.axes.items() if k != axis and len(v) > 1]
    lines: dict[tuple, list[dict]] = {}
    for r in rows:
        if _finite(r["metrics"].get(metric)):
            lines.setdefault(tuple(json.dumps(r["point"][k]) for k in others), []).append(r)
    for group, members in lines.items():
        members.sort(key=lambda r: where[json.dumps(r["point"][axis])])
        label = ", ".join(f"{k}={json.loads(v)}" for k, v in zip(others, group)) or None
        ax.errorbar([where[json.dumps(r["point"][axis])] for r in members], [r["metrics"][metric] for r in members],
                    yerr=[r.get("std", {}).get(metric, 0.0) for r in members], marker="o", capsize=3, label=label)
    floors = [r["metrics"][FLOOR] for r in rows if metric == "frechet_distance" and _finite(r["metrics"].get(FLOOR))]
    if floors:  # drawn where it does not flatten the curves; named in the legend either way
        floor, low = sum(floors) / len(floors), min(r["metrics"][metric] for m in lines.values() for r in m)
        if floor >= 0.5 * low:
            ax.axhline(floor, color="grey", linestyle="--", label=f"real-data floor {floor:.3g}")
        else:
            ax.plot([], [], " ", label=f"real-data floor {floor:.3g} (below)")
    if best is not None:
        ax.plot([where[json.dumps(best["point"][axis])]], [best["metrics"][metric]], marker="*", markersize=16,
                color="#d62728", linestyle="none", zorder=5, label="best")
    if not numeric:
        ax.set_xticks(range(len(values)), [str(v) for v in values])
    if len(lines) <= 8:
        ax.legend(fontsize=7)
