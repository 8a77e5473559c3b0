"""A run-comparison page: one static HTML file that needs nothing else (``sandbox report``).

No server, no network, no script: the styles are inline and every picture is a data URI, so the file can
be mailed, archived next to a paper draft or opened from a laptop years later and look the same. A
Content-Security-Policy in the page forbids every outside fetch, so a stray link could not load either.

What it reads from each run directory (``sandbox/checkpoint.py`` lists what a run holds), all optional
but ``recipe.yaml``: a run with no log, scores or grids yet is shown with what it has.

    recipe.yaml                       the recipe differences between the runs
    checkpoints/checkpoint-last.pt    step, version, commit (when recorded), whether training ended
    metrics.jsonl                     the loss curves (log scale, raw and smoothed as in loss_curve.png)
    eval.json                         scores: today's flat dict of one evaluation, or several seeds:
                                      {"seeds": [{flat result}, ...], "mean": {...}, "std": {...}}
    sweeps/<name>/results.json        a sweep: a list of rows
                                      {"point": {option: value}, "metrics": {name: value}, "std": {name: value}}
                                      ("std" only with several seeds); PNG plots beside it are shown too
    samples/final.png                 the sample grid (else the newest samples/step_*.png)
    *.gif, samples/*.gif              sampling animations (``sandbox sample --animate``)
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sandbox.errors import UserError
from sandbox.run.checkpoints import UnsafeCheckpointError, load_checkpoint
from sandbox.run.files import atomic_write_bytes
from sandbox.run.monitor import _smooth, read_metrics
from sandbox.run.rundir import RunDir

# matplotlib's tab10: the loss curves and the swatches beside run names share these colours
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf")


# --------------------------------------------------------------------------------------
# Scores: which keys of eval.json are scores, how each reads, which way is better
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    higher_is_better: bool | None  # None: no best is marked
    percent: bool = False


METRICS = (  # in table order; the keys sandbox eval writes (README "Scores", "FID, Inception Score ...")
    Metric("accuracy", "accuracy", True, percent=True),
    Metric("frechet_distance", "Fréchet distance", False),
    Metric("fid", "FID", False),
    Metric("inception_score", "IS", True),
    Metric("precision", "precision", True),
    Metric("recall", "recall", True),
)
FLOOR = "real_frechet_floor"  # shown beside frechet_distance, never alone: the distance means little without it
# numbers in an eval result that describe the evaluation, not the samples' quality
NOT_SCORES = {"step", "num_images", "seed", "ema", "sampling_seconds", "num_reference", "fidelity_num_images",
              "real_accuracy", FLOOR, "inception_score_std"}


def metric_for(key: str) -> Metric:
    """A known metric, or one named in a future result (a likelihood: lower is better)."""
    known = {m.key: m for m in METRICS}
    if key in known:
        return known[key]
    lower = any(word in key for word in ("nll", "bits", "bpd", "loss"))
    return Metric(key, key.replace("_", " "), False if lower else None)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _mapping(value: Any) -> dict:
    return value if isinstance(value, dict) else {}


@dataclass
class Scores:
    """One run's eval.json: the mean of every number (the value itself for one seed), its std over seeds."""

    mean: dict[str, float] = field(default_factory=dict)
    std: dict[str, float] = field(default_factory=dict)
    per_seed: list[dict] = field(default_factory=list)  # the flat results, one per seed (empty for one)
    info: dict = field(default_factory=dict)  # step, num_images
    error: str | None = None

    @property
    def seeds(self) -> int:
        return max(1, len(self.per_seed))


def read_scores(path: Path) -> Scores | None:
    """eval.json in either form (None when there is none): flat (one evaluation) or with per-seed values,
    {"seeds": [flat, ...], "mean": {...}, "std": {...}}; a missing mean or std is computed (std: n-1)."""
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        return Scores(error=f"{path.name} is unreadable ({e})")
    if not isinstance(data, dict):
        return Scores(error=f"{path.name} holds no JSON object")
    if not isinstance(data.get("seeds"), list):
        numbers = {k: float(v) for k, v in data.items() if _is_number(v)}
        return Scores(mean=numbers, info=numbers)
    per_seed = [s for s in data["seeds"] if isinstance(s, dict)]
    keys = sorted({k for s in per_seed for k, v in s.items() if _is_number(v)})
    columns = {k: [float(s[k]) for s in per_seed if _is_number(s.get(k))] for k in keys}
    mean = {k: statistics.fmean(v) for k, v in columns.items() if v}
    std = {k: statistics.stdev(v) for k, v in columns.items() if len(v) > 1}
    mean.update({k: float(v) for k, v in _mapping(data.get("mean")).items() if _is_number(v)})
    std.update({k: float(v) for k, v in _mapping(data.get("std")).items() if _is_number(v)})
    info = {k: data.get(k, mean.get(k)) for k in ("step", "num_images") if _is_number(data.get(k, mean.get(k)))}
    return Scores(mean, std, per_seed, info)


def fmt(value: float, std: float | None = None, percent: bool = False) -> str:
    """A score as the page prints it: 4 significant digits, "98.1%" for fractions read as percentages,
    "mean ± std" (std to 2 significant digits) for several seeds."""
    if not math.isfinite(value):
        return str(value)
    if percent:
        return f"{100 * value:.1f}%" if std is None else f"{100 * value:.1f} ± {100 * std:.1f}%"
    text = f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return text if std is None else f"{text} ± {std:.2g}"


# --------------------------------------------------------------------------------------
# Reading a run directory
# --------------------------------------------------------------------------------------
@dataclass
class Sweep:
    name: str
    rows: list[dict]  # {"point": {...}, "metrics": {name: mean}, "std": {name: std}}
    plots: list[tuple[str, bytes]]  # (file name, PNG)
    error: str | None = None


@dataclass
class Run:
    name: str  # the shortest path suffix that tells the runs apart
    path: Path
    recipe: dict
    checkpoint: dict  # step, version, commit, ended, meta: whichever the newest readable checkpoint records
    metrics: list[dict]
    scores: Scores | None
    sweeps: list[Sweep]
    grid: tuple[str, bytes] | None  # (file name relative to the run, PNG)
    gifs: list[tuple[str, bytes]]


def require_run(path: str | Path) -> RunDir:
    """A run directory, or the one-line error saying what it is not."""
    run = RunDir(path).require()
    recipe = run.read_recipe()
    if not isinstance(recipe, dict):
        raise UserError(f"{run.recipe_path} holds no recipe (a YAML mapping)")
    return run


def read_runs(paths: list[str | Path]) -> list[Run]:
    """Every run named (each once, in the order given), all checked before any is read."""
    if not paths:
        raise UserError("no runs given: sandbox report RUN [RUN ...] --out report.html")
    roots = list(dict.fromkeys(require_run(p).root.resolve() for p in paths))
    return [read_run(root, name) for root, name in zip(roots, short_names(roots))]


def read_run(path: str | Path, name: str) -> Run:
    run = require_run(path)
    return Run(name=name, path=run.root.resolve(), recipe=run.read_recipe(), checkpoint=_checkpoint_info(run),
               metrics=read_metrics(run.metrics_path), scores=read_scores(run.root / "eval.json"),
               sweeps=read_sweeps(run.root), grid=_sample_grid(run), gifs=_gifs(run))


def _checkpoint_info(run: RunDir) -> dict:
    """What the newest readable checkpoint records about the run; its tensors are memory-mapped, never read,
    so a multi-GB checkpoint costs milliseconds. A commit shows only where a checkpoint records one."""
    errors = []
    for path in ([run.last] if run.last.is_file() else []) + run.checkpoints():
        try:
            ckpt = load_checkpoint(path, mmap=True)
        except UnsafeCheckpointError:  # planted code: refused, never passed over for an older file
            raise
        except UserError as e:  # an older one may load, as when sampling (RunDir.load_latest)
            errors.append(str(e))
            continue
        return {k: ckpt[k] for k in ("step", "version", "commit", "ended", "meta") if k in ckpt}
    return {"error": errors[0]} if errors else {}  # the page says so; a report needs no weights


def _sample_grid(run: RunDir) -> tuple[str, bytes] | None:
    final = run.samples_dir / "final.png"
    steps = sorted(run.samples_dir.glob("step_*.png")) if run.samples_dir.is_dir() else []
    path = final if final.is_file() else (steps[-1] if steps else None)  # zero-padded steps sort in order
    return (str(path.relative_to(run.root)), path.read_bytes()) if path else None


def _gifs(run: RunDir) -> list[tuple[str, bytes]]:
    found = sorted(run.root.glob("*.gif")) + (sorted(run.samples_dir.glob("*.gif")) if run.samples_dir.is_dir() else [])
    return [(str(p.relative_to(run.root)), p.read_bytes()) for p in found if p.is_file()]


def read_sweeps(root: Path) -> list[Sweep]:
    """Every ``sweeps/<name>/results.json`` of a run, with the PNG plots in the same folder."""
    sweeps = []
    for folder in sorted(p for p in (root / "sweeps").glob("*") if (p / "results.json").is_file()):
        plots = [(p.name, p.read_bytes()) for p in sorted(folder.glob("*.png"))]
        try:
            data = json.loads((folder / "results.json").read_text())
        except (OSError, ValueError) as e:
            sweeps.append(Sweep(folder.name, [], plots, f"results.json is unreadable ({e})"))
            continue
        rows = [r for r in map(_sweep_row, data if isinstance(data, list) else []) if r is not None]
        error = None if rows else "results.json holds no rows of the form {\"point\": {...}, \"metrics\": {...}}"
        sweeps.append(Sweep(folder.name, rows, plots, error))
    return sweeps


def _sweep_row(row: Any) -> dict | None:
    """One row, metrics as numbers (a metric may also be {"mean": m, "std": s})."""
    if not (isinstance(row, dict) and isinstance(row.get("point"), dict) and isinstance(row.get("metrics"), dict)):
        return None
    mean, std = {}, {k: float(v) for k, v in _mapping(row.get("std")).items() if _is_number(v)}
    for key, value in row["metrics"].items():
        if isinstance(value, dict) and _is_number(value.get("mean")):
            mean[key] = float(value["mean"])
            if _is_number(value.get("std")):
                std[key] = float(value["std"])
        elif _is_number(value):
            mean[key] = float(value)
    return {"point": row["point"], "metrics": mean, "std": std}


def short_names(paths: list[Path]) -> list[str]:
    """The last path part of each run, or as many last parts as it takes to tell them apart."""
    parts = [p.resolve().parts for p in paths]
    for k in range(1, max(len(p) for p in parts) + 1):
        names = ["/".join(p[-k:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in paths]


# --------------------------------------------------------------------------------------
# Recipe differences
# --------------------------------------------------------------------------------------
def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    """A recipe as {dotted path: value}, paths as on the command line: ``head`` for the head's class (its
    short name), ``head.width`` for one of its init_args (``--head FlowHead --head.width 64``)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if key == "init_args" and prefix:
            if not value:
                continue  # no arguments: the class name stays the value of ``prefix``
            path = prefix
        elif key == "class_path" and prefix:
            path, value = prefix, str(value).rsplit(".", 1)[-1]  # registry names are unique by short name
        else:
            path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(flatten(value, path))
        else:
            out[path] = value
    return out


MISSING = object()


def recipe_table(runs: list[Run]) -> tuple[list[str], list[str], dict[str, list]]:
    """(keys that differ, keys every run shares, {key: value per run}) in recipe order."""
    flat = [flatten(r.recipe) for r in runs]
    keys = list(dict.fromkeys(k for f in flat for k in f))
    values = {k: [f.get(k, MISSING) for f in flat] for k in keys}
    differ = [k for k in keys if any(v != values[k][0] for v in values[k][1:])]
    return differ, [k for k in keys if k not in differ], values


def show_value(value: Any) -> str:
    if value is MISSING:
        return "—"
    if isinstance(value, (dict, list)):
        return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return json.dumps(value) if value is None or isinstance(value, bool) else str(value)


# --------------------------------------------------------------------------------------
# Loss curves
# --------------------------------------------------------------------------------------
def loss_curves_png(runs: list[Run]) -> bytes | None:
    """One plot, a line per run: raw loss thin, its bias-corrected EMA thick (as loss_curve.png), log scale."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.8), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    positive, drawn = True, 0
    for i, run in enumerate(runs):
        step = np.array([r["step"] for r in run.metrics], dtype=float)
        loss = np.array([float(r.get("loss", math.nan)) for r in run.metrics])
        ok = np.isfinite(loss)
        if not ok.any():
            continue
        colour = COLOURS[i % len(COLOURS)]
        ax.plot(step[ok], loss[ok], color=colour, alpha=0.25, lw=1)
        span = max(2, int(ok.sum()) // 20)  # ~5% of the points, as monitor.plot_metrics
        smooth = _smooth(loss[ok], span) if ok.sum() > 1 else loss[ok]
        ax.plot(step[ok], smooth, color=colour, lw=2, label=run.name, marker="o" if ok.sum() == 1 else None)
        positive &= bool((loss[ok] > 0).all())
        drawn += 1
    if not drawn:
        return None
    if positive:
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.set_yscale("log")
        # labels at 1, 2, 5 x 10^k written as plain numbers ("0.5", not "5 x 10^-1"); other ticks unlabelled
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper right", frameon=False)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


# --------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------
STYLE = """
:root { --ink: #1d232a; --muted: #5f6b76; --rule: #e2e6ea; --soft: #f6f8fa; --accent: #2b5d8a; }
* { box-sizing: border-box; }
body { margin: 0; background: #fff; color: var(--ink);
       font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Noto Sans", "DejaVu Sans", Arial, sans-serif; }
main { max-width: 1120px; margin: 0 auto; padding: 36px 32px 56px; }
h1 { font-size: 26px; font-weight: 650; letter-spacing: -0.01em; margin: 0 0 4px; }
h2 { font-size: 18px; font-weight: 650; margin: 40px 0 12px; padding-bottom: 6px;
     border-bottom: 1px solid var(--rule); }
h3 { font-size: 15px; font-weight: 600; margin: 22px 0 8px; }
p { margin: 8px 0; }
.sub, .note, .path { color: var(--muted); }
.note { font-size: 13px; max-width: 78ch; }
.note code { white-space: nowrap; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; margin: 4px 0; }
th, td { text-align: left; padding: 6px 18px 6px 0; border-bottom: 1px solid var(--rule); vertical-align: top; }
th { font-size: 13px; font-weight: 600; color: var(--muted); white-space: nowrap; }
thead th { border-bottom: 1.5px solid #c9d0d6; }
.num { text-align: right; white-space: nowrap; }
.best { font-weight: 700; }
.missing { color: var(--muted); font-style: italic; }
code, .mono { font-family: ui-monospace, "SF Mono", Menlo, Consolas, "DejaVu Sans Mono", monospace; font-size: 13px; }
.path { font-size: 12.5px; word-break: break-all; }
.swatch { display: inline-block; width: 10px; height: 10px; border-radius: 2px; margin-right: 7px; }
.pictures { display: grid; grid-template-columns: repeat(auto-fit, minmax(280px, 1fr)); gap: 24px; align-items: start; }
figure { margin: 0; }
figure img { display: block; max-width: 100%; height: auto; border: 1px solid var(--rule); }
figcaption { font-size: 13px; margin-top: 6px; }
.plot img { width: 100%; max-width: 990px; border: 0; }
details { margin-top: 12px; }
summary { cursor: pointer; color: var(--accent); font-size: 14px; }
footer { margin-top: 48px; font-size: 12.5px; color: var(--muted); }
@media print {
  body { font-size: 10pt; }
  main { max-width: none; padding: 0; }
  h2 { break-after: avoid; }
  figure, tr, .plot { break-inside: avoid; }
  .swatch { -webkit-print-color-adjust: exact; print-color-adjust: exact; }
  summary { color: var(--ink); }
}
"""
# the page itself forbids every fetch: pictures are data URIs, styles inline, and there is no script
MIN_SHOWN_WIDTH = 260  # px: a grid narrower than this is enlarged (a 2x2 grid of 8 px digits is 131 px)
POLICY = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _swatch(i: int) -> str:
    return f'<span class="swatch" style="background:{COLOURS[i % len(COLOURS)]}"></span>'


def _table(head: list[str], rows: list[list[str]], numeric: set[int] = frozenset()) -> str:
    """Cells are HTML already (a cell that is a whole ``<td ...>``, e.g. one spanning columns, is kept as it
    is); columns in ``numeric`` are right-aligned."""
    def cls(j):
        return ' class="num"' if j in numeric else ""
    thead = "".join(f"<th{cls(j)}>{h}</th>" for j, h in enumerate(head))
    body = "".join("<tr>" + "".join(c if c.startswith("<td") else f"<td{cls(j)}>{c}</td>" for j, c in enumerate(r))
                   + "</tr>" for r in rows)
    return f'<div class="scroll"><table><thead><tr>{thead}</tr></thead><tbody>{body}</tbody></table></div>'


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{_e(title)}</h2>{body}</section>'


def build_page(runs: list[Run], animations: dict[Path, bytes | str] | None = None) -> str:
    """The whole page. ``animations``: for ``--animate``, a GIF sampled for the report per run path (or the
    reason there is none); without it, the GIFs the runs hold are shown."""
    from sandbox import __version__

    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = "".join([
        _runs_section(runs), _recipe_section(runs), _scores_section(runs), _sweeps_section(runs),
        _loss_section(runs), _samples_section(runs), _animation_section(runs, animations),
    ])
    title = "Run report: " + ", ".join(r.name for r in runs)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{POLICY}">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(title)}</title><style>{STYLE}</style></head>\n<body><main>"
            f'<header><h1>Run report</h1><p class="sub">{len(runs)} run{"s" * (len(runs) > 1)} · '
            f"generated {now} by mar-sandbox {_e(__version__)}</p></header>{body}"
            f"<footer>Made by <code>sandbox report</code>. One file: pictures are embedded, nothing is fetched."
            f"</footer></main></body></html>\n")


def _status(run: Run) -> str:
    ck = run.checkpoint
    if "error" in ck:
        return f'<span class="missing">checkpoint unreadable: {_e(ck["error"])}</span>'
    if "step" not in ck:
        return '<span class="missing">no checkpoint yet</span>'
    steps = _mapping(run.recipe.get("train")).get("steps")
    if ck.get("ended") or (_is_number(steps) and ck["step"] >= steps):
        return f"trained, {ck['step']:,} steps"
    return f"step {ck['step']:,}" + (f" of {steps:,}" if _is_number(steps) else "")


def _runs_section(runs: list[Run]) -> str:
    commits = any("commit" in r.checkpoint for r in runs)
    head = ["run", "status", "data · tokenizer · ordering · head", "version"] + (["commit"] if commits else [])
    rows = []
    for i, run in enumerate(runs):
        flat = flatten(run.recipe)
        parts = " · ".join(_e(flat.get(k, "—")) for k in ("data", "tokenizer", "ordering", "head"))
        row = [f'{_swatch(i)}<strong>{_e(run.name)}</strong><div class="path">{_e(run.path)}</div>',
               _status(run), parts, _e(run.checkpoint.get("version", "—"))]
        rows.append(row + ([f'<span class="mono">{_e(run.checkpoint.get("commit", "—"))}</span>'] if commits else []))
    return _section("runs", "Runs", _table(head, rows))


def _recipe_section(runs: list[Run]) -> str:
    differ, shared, values = recipe_table(runs)
    names = [f"{_swatch(i)}{_e(r.name)}" for i, r in enumerate(runs)]
    note = '<p class="note">Paths as on the command line: <code>head</code> is the head\'s class, ' \
           '<code>head.width</code> one of its arguments (<code>--head.width</code>).</p>'
    if len(runs) == 1:
        rows = [[f"<code>{_e(k)}</code>", _e(show_value(values[k][0]))] for k in shared]
        return _section("recipe", "Recipe", f"<details><summary>All {len(shared)} settings of the recipe"
                                            f"</summary>{_table(['setting', 'value'], rows)}{note}</details>")
    if differ:
        rows = [[f"<code>{_e(k)}</code>"] + [_e(show_value(v)) for v in values[k]] for k in differ]
        body = _table(["setting", *names], rows) + note
    else:
        body = "<p>The runs have the same recipe.</p>"
    rows = [[f"<code>{_e(k)}</code>", _e(show_value(values[k][0]))] for k in shared]
    body += f"<details><summary>The {len(shared)} settings every run shares</summary>" \
            f"{_table(['setting', 'value'], rows)}</details>"
    return _section("recipe", "Recipe differences", body)


def _score_keys(all_scores: list[Scores]) -> list[str]:
    """Score columns: the known metrics in their order, then any other score a result holds (sorted)."""
    keys = {k for s in all_scores for k in s.mean if k not in NOT_SCORES}
    known = [m.key for m in METRICS if m.key in keys]
    return known + sorted(keys - set(known))


def _best_marks(values: list[float | None], higher_is_better: bool | None) -> list[bool]:
    """Which cells to print bold: the best of two or more values, when the metric has a direction."""
    present = [v for v in values if v is not None and math.isfinite(v)]
    if higher_is_better is None or len(present) < 2:
        return [False] * len(values)
    best = max(present) if higher_is_better else min(present)
    return [v == best for v in values]


def _score_columns(runs: list[Run]) -> list[tuple[str, str, list[str | None], list[float | None], bool | None]]:
    """(key, header, cell texts, values for the best mark, higher is better) per score column; the real-data
    floor and the distance divided by it follow the Fréchet distance."""
    scores = [r.scores if r.scores and not r.scores.error else None for r in runs]
    columns = []
    for key in _score_keys([s for s in scores if s]):
        metric = metric_for(key)
        values = [s.mean.get(key) if s else None for s in scores]
        texts = [None if v is None else fmt(v, s.std.get(key) if s.seeds > 1 else None, metric.percent)
                 for s, v in zip(scores, values)]
        columns.append((key, metric.label, texts, values, metric.higher_is_better))
        if key == "frechet_distance" and any(s and FLOOR in s.mean for s in scores):
            floors = [s.mean.get(FLOOR) if s else None for s in scores]
            ratios = [v / f if v is not None and f else None for v, f in zip(values, floors)]
            columns.append((FLOOR, "real-data floor", [None if f is None else fmt(f) for f in floors], floors, None))
            columns.append(("ratio", "÷ floor", [None if q is None else f"{q:.1f}×" for q in ratios], ratios, False))
    return columns


def _scores_section(runs: list[Run]) -> str:
    columns = _score_columns(runs)
    several = any(r.scores and r.scores.seeds > 1 for r in runs)
    head = ["run", "step", "images"] + (["seeds"] if several else []) + [_e(c[1]) for c in columns]
    marks = [_best_marks(c[3], c[4]) for c in columns]
    rows = []
    for i, run in enumerate(runs):
        name, s = f"{_swatch(i)}{_e(run.name)}", run.scores
        if s is None or s.error:
            why = _e(s.error) if s else "not evaluated yet"
            rows.append([name, f'<td colspan="{len(head) - 1}" class="missing">{why} · '
                               f"<code>sandbox eval --run_dir {_e(run.path)}</code></td>"])
            continue
        info = [f"{s.info[k]:,.0f}" if k in s.info else "—" for k in ("step", "num_images")]
        cells = [(f'<span class="best">{c[2][i]}</span>' if marks[j][i] else _e(c[2][i])) if c[2][i] else "—"
                 for j, c in enumerate(columns)]
        rows.append([name, *info] + ([str(s.seeds)] if several else []) + cells)
    body = _table(head, rows, numeric=set(range(1, len(head))))
    body += _scores_notes(runs, columns, several) + _per_seed_details(runs)
    return _section("scores", "Scores", body)


def _scores_notes(runs: list[Run], columns: list, several: bool) -> str:
    notes = []
    if len(runs) > 1 and columns:
        notes.append("Bold: the best of the runs.")
    if several:
        notes.append("Several seeds: mean ± standard deviation over the seeds.")
    if any(c[0] == FLOOR for c in columns):
        notes.append("The real-data floor is what held-out real images score against the same reference at "
                     "the same number of images: a Fréchet distance is comparable only to the floor at its own "
                     "size, and 1× is a perfect model.")
    stale = [f"{r.name} (step {r.scores.info['step']:,.0f}; the run is at {r.checkpoint['step']:,})" for r in runs
             if r.scores and "step" in r.scores.info and "step" in r.checkpoint
             and r.scores.info["step"] != r.checkpoint["step"]]
    if stale:
        notes.append(f"Scored at another checkpoint than the run's newest: {', '.join(stale)}.")
    real = {fmt(r.scores.mean["real_accuracy"], percent=True) for r in runs
            if r.scores and "real_accuracy" in r.scores.mean}
    if real:
        notes.append(f"The scorer reads real held-out images with accuracy {', '.join(sorted(real))}.")
    return f'<p class="note">{_e(" ".join(notes))}</p>' if notes else ""


def _per_seed_details(runs: list[Run]) -> str:
    seeded = [(i, r) for i, r in enumerate(runs) if r.scores and r.scores.per_seed]
    if not seeded:
        return ""
    keys = _score_keys([r.scores for _, r in seeded])
    rows = []
    for i, run in seeded:
        for k, result in enumerate(run.scores.per_seed):
            cells = [fmt(float(result[key]), percent=metric_for(key).percent) if _is_number(result.get(key))
                     else "—" for key in keys]
            rows.append([f"{_swatch(i)}{_e(run.name)}", _e(result.get("seed", k))] + cells)
    head = ["run", "seed"] + [_e(metric_for(k).label) for k in keys]
    return f"<details><summary>Per-seed values</summary>" \
           f"{_table(head, rows, numeric=set(range(1, len(head))))}</details>"


def _sweeps_section(runs: list[Run]) -> str:
    parts = []
    for i, run in enumerate(runs):
        for sweep in run.sweeps:
            title = f"<h3>{_swatch(i)}{_e(run.name)} · sweep <code>{_e(sweep.name)}</code></h3>"
            table = f'<p class="missing">{_e(sweep.error)}</p>' if sweep.error else _sweep_table(sweep)
            plots = "".join(f'<figure>{_img(png, "image/png", name)}'
                            f"<figcaption>{_e(name)}</figcaption></figure>" for name, png in sweep.plots)
            parts.append(title + table + (f'<div class="pictures">{plots}</div>' if plots else ""))
    if not parts:
        return ""  # nothing to say: a section per sweep appears once a run has one
    note = '<p class="note">One row per point of the grid; bold: the best point for each metric.</p>'
    return _section("sweeps", "Sweeps", "".join(parts) + note)


def _sweep_table(sweep: Sweep) -> str:
    options = list(dict.fromkeys(k for r in sweep.rows for k in r["point"]))
    keys = _score_keys([Scores(mean=r["metrics"]) for r in sweep.rows])
    floor = any(FLOOR in r["metrics"] for r in sweep.rows)
    head = [f"<code>{_e(o)}</code>" for o in options] + [_e(metric_for(k).label) for k in keys]
    head += ["real-data floor"] if floor else []
    marks = {k: _best_marks([r["metrics"].get(k) for r in sweep.rows], metric_for(k).higher_is_better)
             for k in keys}
    rows = []
    for j, row in enumerate(sweep.rows):
        cells = [_e(show_value(row["point"].get(o, MISSING))) for o in options]
        for k in keys:
            v = row["metrics"].get(k)
            text = "—" if v is None else _e(fmt(v, row["std"].get(k), metric_for(k).percent))
            cells.append(f'<span class="best">{text}</span>' if marks[k][j] else text)
        if floor:
            cells.append(fmt(row["metrics"][FLOOR]) if FLOOR in row["metrics"] else "—")
        rows.append(cells)
    return _table(head, rows, numeric=set(range(len(options), len(head))))


def _loss_section(runs: list[Run]) -> str:
    png = loss_curves_png(runs)
    missing = [r.name for r in runs if not any(math.isfinite(float(m.get("loss", math.nan))) for m in r.metrics)]
    note = ("Thin: the loss at every logged step; thick: its exponential moving average over ~5% of the points "
            "(as each run's loss_curve.png).")
    if missing:
        note += f" No training log yet: {', '.join(missing)}."
    if png is None:
        return _section("loss", "Loss curves", '<p class="missing">No run has a training log yet.</p>')
    figure = f'<figure class="plot"><img src="{_data_uri(png, "image/png")}" alt="training loss of every run"></figure>'
    return _section("loss", "Loss curves", figure + f'<p class="note">{_e(note)}</p>')


def _img(data: bytes, mime: str, alt: str) -> str:
    """An embedded picture; a small one (tiny digit grids) is enlarged by a whole factor, pixels kept sharp."""
    from PIL import Image

    try:
        width, height = Image.open(io.BytesIO(data)).size
    except OSError:  # not a picture PIL reads: the browser may still, at its own size
        return f'<img src="{_data_uri(data, mime)}" alt="{_e(alt)}">'
    k = -(-MIN_SHOWN_WIDTH // max(width, 1))  # ceil: 131 px -> 2x
    size = f' width="{width * k}" height="{height * k}"' + (' style="image-rendering: pixelated"' if k > 1 else "")
    return f'<img src="{_data_uri(data, mime)}"{size} alt="{_e(alt)}">'


def _figure(i: int, run: Run, data: bytes, mime: str, caption: str) -> str:
    return (f"<figure>{_img(data, mime, f'{run.name}: {caption}')}"
            f"<figcaption>{_swatch(i)}<strong>{_e(run.name)}</strong> · {_e(caption)}</figcaption></figure>")


def _samples_section(runs: list[Run]) -> str:
    figures = []
    for i, run in enumerate(runs):
        if run.grid:
            figures.append(_figure(i, run, run.grid[1], "image/png", run.grid[0]))
        else:
            figures.append(f'<figure><figcaption>{_swatch(i)}<strong>{_e(run.name)}</strong> · '
                           f'<span class="missing">no sample grid yet</span></figcaption></figure>')
    note = '<p class="note">One row per class, drawn at the end of training with the EMA weights and the ' \
           "recipe's sampling settings.</p>"
    return _section("samples", "Samples", f'<div class="pictures">{"".join(figures)}</div>{note}')


def _animation_section(runs: list[Run], animations: dict[Path, bytes | str] | None) -> str:
    figures = []
    for i, run in enumerate(runs):
        made = (animations or {}).get(run.path)
        if isinstance(made, bytes):
            figures.append(_figure(i, run, made, "image/gif", "sampled for this report"))
        elif isinstance(made, str):
            figures.append(f'<figure><figcaption>{_swatch(i)}<strong>{_e(run.name)}</strong> · '
                           f'<span class="missing">{_e(made)}</span></figcaption></figure>')
        figures += [_figure(i, run, gif, "image/gif", name) for name, gif in run.gifs]
    if not figures:
        return _section("animation", "Sampling animation",
                        '<p class="missing">None of the runs holds an animation. '
                        "<code>sandbox report --animate true ...</code> samples one per run; "
                        "<code>sandbox sample --animate RUN/samples/sampling.gif</code> keeps one in a run.</p>")
    note = '<p class="note">One frame per sampling step: grey cells are not generated yet.</p>'
    return _section("animation", "Sampling animation", f'<div class="pictures">{"".join(figures)}</div>{note}')


# --------------------------------------------------------------------------------------
# Writing it
# --------------------------------------------------------------------------------------
def check_out(out: Path) -> None:
    """--out must be an .html file we can write; checked before any work (a report may sample first)."""
    if out.suffix.lower() != ".html":
        raise UserError(f"--out must name an .html file, got {out}")
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; name an .html file")
    existing = next((p for p in out.parents if p.exists()), Path("."))
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"cannot write {out}: {existing} is not a writable directory")


def write_page(page: str, out: Path) -> None:
    """Write atomically (a crash leaves the old page or the new one); folders made for it go if it fails."""
    made = [p for p in reversed(out.parents) if not p.exists()]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out, page.encode("utf-8"))
    except (OSError, UserError) as e:
        for folder in reversed(made):
            try:
                folder.rmdir()
            except OSError:
                pass
        if isinstance(e, UserError):
            raise
        raise UserError(f"cannot write {out}: {e.strerror or e}") from e
