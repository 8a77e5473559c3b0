"""Issue 22, item 7: the speed target timed side by side in one process on one trained run.

    python .ci/measure_fast_target.py RUN [--points JSON] [--images 1000] [--repeats 2] [--json FILE]

Each point is a way to sample the run: ``load_run`` options (``head_args``, ``compile``) and ``sandbox.generate``
options (``num_iter``, ``head_steps``, ``cache``); the first point is the reference (the recipe's own settings,
eager). Every point samples ``--images`` class-balanced images once untimed (a warm-up that also compiles), then
the points take turns ``--repeats`` times and each keeps its best wall time, so a neighbour's burst on a shared
CPU slows every point alike instead of one. Quality is not measured here: score the same settings with
``sandbox bench --pareto RUN --pareto_grid ...`` (3 seeds of 1,000 samples); a compiled point samples what its
eager twin samples within float rounding (tests/test_fast_paths.py), so it shares the eager point's scores.
Run it alone on the machine: the times are the result.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def default_points() -> list[dict]:
    """The recipe's settings and what ``--fast true`` sets (``FAST_SAMPLING``), each eager and compiled."""
    from sandbox.fast.sampling import FAST_SAMPLING

    return [{"name": "default"}, {"name": "default, compiled", "compile": True},
            {"name": "--fast", **FAST_SAMPLING}, {"name": "--fast, compiled", **FAST_SAMPLING, "compile": True}]


LOAD_KEYS = ("head_args", "compile")
GENERATE_KEYS = ("num_iter", "head_steps", "cache", "cfg", "temperature")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--points", default=None, help="a JSON list of points (default: default_points())")
    p.add_argument("--device", default="auto", help="where to sample (load_run's device)")
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    import torch

    import sandbox
    from sandbox.eval.provenance import git_commit, machine

    points = json.loads(args.points) if args.points else default_points()
    runs = []
    for point in points:
        run = sandbox.load_run(args.run_dir, device=args.device, **{k: point[k] for k in LOAD_KEYS if k in point})
        kwargs = {k: point[k] for k in GENERATE_KEYS if k in point}
        t0 = time.perf_counter()
        with torch.inference_mode():
            sandbox.generate(run, num_images=args.images, seed=0, **kwargs)
        runs.append((point, run, kwargs, time.perf_counter() - t0))
        print(f"warm-up {point['name']}: {runs[-1][3]:.1f} s", file=sys.stderr)
    best = [float("inf")] * len(runs)
    for r in range(args.repeats):
        for i, (point, run, kwargs, _) in enumerate(runs):
            t0 = time.perf_counter()
            with torch.inference_mode():
                sandbox.generate(run, num_images=args.images, seed=1 + r, **kwargs)
            seconds = time.perf_counter() - t0
            best[i] = min(best[i], seconds)
            print(f"repeat {r} {point['name']}: {seconds:.1f} s", file=sys.stderr)
    rows = [{"point": point, "seconds": round(best[i], 2), "speedup": round(best[0] / best[i], 2)}
            for i, (point, *_rest) in enumerate(runs)]
    result = {"run_dir": str(args.run_dir), "images": args.images, "repeats": args.repeats,
              "commit": git_commit(), "machine": machine(), "rows": rows}
    print(json.dumps(result, indent=1))
    print(f"\nSide by side in one process, {args.images} images, best of {args.repeats}; commit {result['commit']}, "
          f"{result['machine']}.\n\n| point | seconds | speed-up |\n|---|---|---|")
    for row in rows:
        print(f"| {row['point']['name']} | {row['seconds']:.1f} | {row['speedup']:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
