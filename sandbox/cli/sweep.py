"""``sandbox sweep``: score a run's samples at every point of a grid of sampling settings.

    sandbox sweep --run_dir RUN --grid '{cfg: [1.0, 1.5, 2.0, 3.0], temperature: [0.8, 0.9, 1.0]}'
    sandbox sweep --run_dir RUN --grid '{num_sampling_steps: [10, 20, 50], sampler: [ddpm, ddim]}' --seeds 3
    sandbox sweep --run_dir RUN --grid '{cfg: [2.0, 3.0]}' --ref REF.npz --name cfg_fid     # + FID / IS / P/R

Each point is scored as ``sandbox eval`` scores a run (the dataset's offline score, the Inception metrics with
--ref; its sample sets in RUN/eval/ are shared with eval). Writes RUN/sweeps/<name>/results.json, results.csv
and a plot per metric (sandbox/eval/sweep.py); a sweep stopped at any point continues where it stopped when run
again. Under ``torchrun --nproc_per_node N -m sandbox sweep ...`` the ranks split each point's images.
"""
from __future__ import annotations

import json

from jsonargparse import ArgumentParser, Namespace

from sandbox.cli.eval import add_scoring_arguments
from sandbox.cli.sample import SAMPLING, add_sampling_arguments, check_sampling_arguments
from sandbox.errors import UserError

NAME = "sweep"
HELP = "Score a run at every point of a grid of sampling settings (cfg, temperature, num_iter, head fields, ...)."
ORDER = 31


def parser() -> ArgumentParser:
    p = ArgumentParser(exit_on_error=False, description=HELP)
    add_sampling_arguments(p)  # the options the grid does not vary stay fixed at these
    p.set_defaults(num_images=1000, progress=False)  # the digits tables' sample count
    p.add_argument("--grid", type=dict | None, default=None,
                   help="Options and their values, e.g. '{cfg: [1.0, 2.0, 3.0], temperature: [0.8, 1.0]}': any of "
                        "num_iter, cfg, cfg_schedule, temperature, batch_size, ema, head_steps, cache, or a field of "
                        "the run's head "
                        "(num_sampling_steps, sampler, ...; also as head_args.NAME).")
    p.add_argument("--name", type=str | None, default=None,
                   help="The sweep's folder RUN/sweeps/NAME (default: the grid's keys joined by '-').")
    add_scoring_arguments(p)
    return p


def run(cfg: Namespace) -> None:
    from sandbox.run import distributed

    # under torchrun the ranks split each point's images (eval_samples); rank 0 scores and writes
    with distributed.session(cfg.device):
        _run(cfg)


def _run(cfg: Namespace) -> None:
    from sandbox.cli.sample import load
    from sandbox.eval.scoring import check_inception, dataset_scorer, info, seed_list
    from sandbox.eval.sweep import check_grid, finished_rows, parse_grid, point_key, sweep_name

    if cfg.grid is None:
        raise UserError("give --grid, e.g. --grid '{cfg: [1.0, 2.0, 3.0], temperature: [0.8, 1.0]}'")
    if cfg.get("fast"):
        raise UserError("--fast sets several sampling options at once; a sweep varies them itself: put num_iter, "
                        "head_steps and cache in --grid (or map them with `sandbox bench --pareto RUN`)")
    if cfg.labels:
        raise UserError("sweep sets are class-balanced (image i has class i % K); --labels is for `sandbox sample`")
    if cfg.num_images < 1:
        raise UserError(f"--num_images must be >= 1, got {cfg.num_images}")
    seeds = seed_list(cfg.seed, cfg.seeds)
    axes = parse_grid(cfg.grid)
    name = sweep_name(cfg.name, axes)
    check_sampling_arguments(cfg)
    inception = check_inception(cfg.feature_extractor, cfg.inception_weights, cfg.ref, cfg.inception, cfg.device,
                                cfg.fidelity_batch_size)
    loaded = load(cfg)
    given = {k: cfg.get(k) for k in SAMPLING if cfg.get(k) is not None}
    grid = check_grid(axes, type(loaded.model.head), given, cfg.head_args)
    _check_speed_axes(grid, loaded)
    scorer = dataset_scorer(loaded, inception)
    folder = loaded.root / "sweeps" / name
    shared = _shared(cfg, loaded, seeds, given)
    rows = _agreed(finished_rows(folder, shared, grid))
    points = grid.points()
    pending = [p for p in points if point_key(p) not in rows]
    variants = _check_variants(cfg, grid, pending)  # a head field that does not fit fails before any point
    info(f"sweep {name}: {len(pending)} of {len(points)} points to compute ({len(points) - len(pending)} done)")
    for variant, todo in variants.items():
        run_ = loaded if variant == _variant(cfg, grid, {}) else _load(cfg, variant)
        for point in todo:
            row = _score_point(cfg, run_, grid, point, seeds, scorer, inception)
            if row is not None:  # rank 0 keeps it at once: a kill loses at most the point being scored
                rows[point_key(point)] = row
                _write(folder, shared, grid, rows, name, plots=False)
    _finish(folder, shared, grid, rows, name)


def _shared(cfg: Namespace, loaded, seeds: list[int], given: dict) -> dict:
    """What every point of the sweep shares: rows made with other values do not compare (sweep.json)."""
    from pathlib import Path

    return {"step": loaded.step, "num_images": cfg.num_images, "seeds": seeds,
            "options": given, "head_args": cfg.head_args or None, "ema": cfg.ema,
            "ref": str(Path(cfg.ref).resolve()) if cfg.ref else None,
            "inception": cfg.inception, "feature_extractor": cfg.feature_extractor, "compile": cfg.compile,
            "fast_paths": cfg.fast_paths}


def _agreed(rows: dict) -> dict:
    """Rank 0's finished rows on every rank, so that the ranks compute the same points."""
    from sandbox.run import distributed

    if not distributed.info().enabled:
        return rows
    return distributed.gather_objects(rows, dst=None)[0]


def _check_speed_axes(grid, loaded) -> None:
    """Step schedules the head cannot take and caches the backbone refuses: one line before any point."""
    from sandbox.core.sampling import check_head_steps
    from sandbox.fast.step_cache import check_cache

    for value in grid.axes.get("head_steps", []):
        check_head_steps(loaded.model.head, value)
    for value in grid.axes.get("cache", []):
        check_cache(value, loaded.model.backbone)


def _variant(cfg: Namespace, grid, point: dict) -> str:
    """What a point loads the run with: its weights (ema) and head arguments, as a key."""
    sampling, head = grid.split(point)
    return json.dumps({"ema": sampling.get("ema", cfg.ema), "head_args": {**(cfg.head_args or {}), **head}},
                      sort_keys=True)


def _check_variants(cfg: Namespace, grid, pending: list[dict]) -> dict[str, list[dict]]:
    """The pending points grouped by what they load; each load other than the command's own is tried now, so
    head values that do not fit the run (a field that changes the weights, a value out of range) are one error
    line before anything is written."""
    groups: dict[str, list[dict]] = {}
    for point in pending:
        groups.setdefault(_variant(cfg, grid, point), []).append(point)
    base = _variant(cfg, grid, {})
    for variant, points in groups.items():
        if variant != base:
            try:
                _load(cfg, variant)
            except UserError as e:
                _, head = grid.split(points[0])
                raise UserError(f"--grid point {json.dumps(head)}: {e}") from None
    return dict(sorted(groups.items(), key=lambda g: g[0] != base))  # the loaded run's points first


def _load(cfg: Namespace, variant: str):
    from sandbox.run.loading import load_run

    v = json.loads(variant)
    return load_run(cfg.run_dir, use_ema=v["ema"], device=cfg.device, head_args=v["head_args"] or None,
                    compile=cfg.compile, fast_paths=cfg.fast_paths)


def _score_point(cfg: Namespace, loaded, grid, point: dict, seeds: list[int], scorer, inception) -> dict | None:
    """One point's row: each seed's evaluation set (sampled or reused) scored. None on a rank other than 0."""
    from sandbox.eval.scoring import BOOKKEEPING, eval_settings, info, sample_set, score_samples
    from sandbox.eval.sweep import row_of

    sampling, head = grid.split(point)
    sampling.pop("ema", None)  # a loading option (``_variant``)
    opts = {name: getattr(loaded.sampling({**{k: cfg.get(k) for k in SAMPLING}, **sampling}, prefix="--"), name)
            for name in SAMPLING}
    head_args = {**(cfg.head_args or {}), **head} or None
    per_seed = []
    for seed in seeds:
        settings = eval_settings(loaded, opts, num_images=cfg.num_images, seed=seed, head_args=head_args,
                                 compile=cfg.compile, fast_paths=cfg.fast_paths)
        samples = sample_set(loaded, settings, progress=cfg.progress)
        if samples.images is None:
            return None
        scores = score_samples(scorer, inception, samples.images, samples.labels)
        per_seed.append({"seed": seed, **samples.describe(),
                         **{k: v for k, v in scores.items() if k not in BOOKKEEPING}})
    row = row_of(point, per_seed)
    shown = ", ".join(f"{k} {v:.4g}" for k, v in row["metrics"].items() if isinstance(v, float))
    info(f"point {json.dumps(point)}: {shown}")
    return row


def _write(folder, shared: dict, grid, rows: dict, name: str, plots: bool) -> list[dict]:
    from sandbox.eval.sweep import plot_metrics, write_results

    ordered = write_results(folder, shared, grid, rows)
    if plots:
        plot_metrics(folder, grid, ordered, name)
    return ordered


def _finish(folder, shared: dict, grid, rows: dict, name: str) -> None:
    """The results and plots (rank 0), and the best point of each metric as JSON on stdout."""
    from sandbox.eval.sweep import best_row, metric_keys
    from sandbox.run import distributed

    if not distributed.info().is_main:
        return
    ordered = _write(folder, shared, grid, rows, name, plots=True)
    best = {}
    for metric in metric_keys(ordered):
        row = best_row(ordered, metric)
        if row is not None:
            best[metric] = {"point": row["point"], "value": row["metrics"][metric],
                            **({"std": row["std"][metric]} if "std" in row else {})}
    print(json.dumps({"sweep": name, "results": str(folder / "results.json"), "points": len(ordered),
                      "seeds": shared["seeds"], "best": best}, indent=2))
