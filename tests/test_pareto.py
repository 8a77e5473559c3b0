"""``sandbox bench --pareto RUN``: the quality-speed map (issue 22, item 6) -- every grid point scored over seeds
(the sweep's rows), timed, the frontier marked, the recipe's own settings found; bad input is one line."""
from __future__ import annotations

import json
import shutil

import pytest

from sandbox.eval.pareto import pareto_frontier, pareto_table

pytestmark = pytest.mark.usefixtures("one_thread")  # not a module-level set_num_threads: it would leak

GRID = "{num_iter: [2, 3], cache: ['off', 'approx:2']}"  # the tiny run samples with num_iter 3: its default


@pytest.fixture
def run(tiny_run, tmp_path):
    return shutil.copytree(tiny_run, tmp_path / "run", ignore=shutil.ignore_patterns("eval", "sweeps", "eval.json"))


def test_the_map_scores_times_and_marks_every_point(sandbox_cli, run):
    proc = sandbox_cli("bench", "--pareto", run, "--pareto_grid", GRID, "--pareto_seeds", "2", "--pareto_images",
                       "10", "--pareto_timing_images", "4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    points = result["points"]
    assert [p["point"] for p in points] == [{"num_iter": n, "cache": c} for n in (2, 3) for c in ("off", "approx:2")]
    for p in points:
        assert p["images_per_s"] > 0 and "frechet_distance_std" in p and "real_frechet_floor" in p
    assert [p["default"] for p in points] == [False, False, True, False]  # num_iter 3, no cache: the recipe's
    assert any(p["frontier"] for p in points) and result["seeds"] == 2
    folder = run / "sweeps" / "pareto"
    assert json.loads((folder / "pareto.json").read_text()) == result
    assert (folder / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    table = (folder / "pareto.md").read_text()
    assert "*default*" in table and "images/s" in table and table.count("\n| ") == 5
    assert len(json.loads((folder / "results.json").read_text())) == 4  # the sweep's rows, reused by a rerun


def test_a_head_field_is_scored_and_timed_with_that_head(sandbox_cli, run, monkeypatch):
    import sandbox.eval.pareto as pareto

    timed = []
    real = pareto._time_point
    monkeypatch.setattr(pareto, "_time_point", lambda loaded, point, n: timed.append(
        (loaded.model.head.sampler, point)) or real(loaded, point, n))
    proc = sandbox_cli("bench", "--pareto", run, "--pareto_grid", "{sampler: [ddpm, ddim], head_steps: [2]}",
                       "--pareto_seeds", "1", "--pareto_images", "4", "--pareto_timing_images", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [(s, p["sampler"]) for s, p in timed] == [("ddpm", "ddpm"), ("ddim", "ddim")]


def test_the_frontier_is_the_points_nothing_beats():
    def row(fd, speed):
        return {"metrics": {"frechet_distance": fd}, "images_per_s": speed}

    rows = [row(10, 1), row(12, 5), row(11, 4), row(20, 5), row(9, 0.5)]
    # 12 @ 5 beats 20 @ 5; 11 @ 4 is slower than 12 @ 5 but better; 10 @ 1 and 9 @ 0.5 likewise
    assert pareto_frontier(rows) == {0, 1, 2, 4}


def test_the_table_gives_the_speed_up_over_the_recipes_settings():
    result = {"run_dir": "r", "step": 1, "seeds": 3, "num_images": 10, "timing_images": 4, "commit": "abc",
              "machine": "m", "points": [
                  {"point": {"num_iter": 16}, "images_per_s": 10.0, "frontier": True, "default": True,
                   "frechet_distance": 50.0, "frechet_distance_std": 2.0, "real_frechet_floor": 9.0},
                  {"point": {"num_iter": 4}, "images_per_s": 50.0, "frontier": True, "default": False,
                   "frechet_distance": 70.0, "real_frechet_floor": 9.0}]}
    table = pareto_table(result)
    assert "5.00x" in table and "1.00x" in table and "50.0 +- 2.0 (9.0)" in table
    assert table.index("| **4**") < table.index("| **16 *default*")  # fastest first


def test_bad_input_is_one_line(sandbox_cli, run):
    for args, fragment in ((("--pareto_seeds", "0"), "--pareto_seeds"),
                           (("--pareto_grid", "{cache: [sometimes]}"), "cache"),
                           (("--recipe", "recipes/quickstart.yaml"), "--pareto RUN"),
                           (("--pareto_grid", "{sampler: [bogus]}"), "sampler")):
        proc = sandbox_cli("bench", "--pareto", run, *args)
        assert proc.returncode == 2, proc.stderr[-2000:]
        lines = [x for x in proc.stderr.strip().splitlines() if x.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], proc.stderr
    assert not (run / "sweeps" / "pareto" / "pareto.json").exists()


def test_a_bare_off_in_a_grid_or_recipe_means_no_cache(sandbox_cli, run):
    """YAML reads `off` as false: a grid and a recipe take it as the cache switched off."""
    from sandbox.config.schema import SampleConfig

    proc = sandbox_cli("sweep", "--run_dir", run, "--grid", "{cache: [off, approx:2]}", "--num_images", "4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = json.loads((run / "sweeps" / "cache" / "results.json").read_text())
    assert [r["point"]["cache"] for r in found] == ["off", "approx:2"]
    assert SampleConfig(cache=False).cache == "off"
    fast = sandbox_cli("sweep", "--run_dir", run, "--grid", "{num_iter: [2]}", "--fast", "true")
    assert fast.returncode == 2 and "--fast" in fast.stderr and "Traceback" not in fast.stderr


def test_fast_sets_the_measured_point_says_so_and_yields_to_given_options(sandbox_cli, run, tmp_path):
    """`--fast true` = the FAST_SAMPLING options, printed (with where they were measured); an option given on
    the command line wins; the images are those of the same options given by hand."""
    import re

    import numpy as np

    from sandbox.fast.sampling import FAST_MEASURED, FAST_SAMPLING

    fast = sandbox_cli("sample", "--run_dir", run, "--num_images", "4", "--out", tmp_path / "fast.npz",
                       "--fast", "true")
    assert fast.returncode == 0, fast.stderr[-2000:]
    line = next(x for x in fast.stderr.splitlines() if x.startswith("--fast true sets"))
    assert FAST_MEASURED is not None and FAST_MEASURED in line
    options = dict(re.findall(r"--(\w+) (\S+?)(?:,| \()", line))
    assert set(options) == set(FAST_SAMPLING) and options["num_iter"] == str(FAST_SAMPLING["num_iter"])
    by_hand = sandbox_cli("sample", "--run_dir", run, "--num_images", "4", "--out", tmp_path / "hand.npz",
                          *[a for k, v in options.items() for a in (f"--{k}", v)])
    assert by_hand.returncode == 0, by_hand.stderr[-2000:]
    assert np.array_equal(np.load(tmp_path / "fast.npz")["images"], np.load(tmp_path / "hand.npz")["images"])
    given = sandbox_cli("sample", "--run_dir", run, "--num_images", "4", "--out", tmp_path / "g.npz", "--fast", "true",
                        "--num_iter", "2")
    assert given.returncode == 0 and "--num_iter" not in next(
        x for x in given.stderr.splitlines() if x.startswith("--fast true sets"))


def test_the_default_grid_leaves_out_what_the_run_cannot_take():
    from types import SimpleNamespace

    from sandbox.eval.pareto import DEFAULT_GRID, default_grid
    from sandbox.plugins.backbones.causal import CausalBackbone

    class NoSteps:
        supports_num_steps, default_num_steps = False, None

    class Steps:
        supports_num_steps, default_num_steps = True, 50

    from sandbox.core.contracts import Backbone

    plain = Backbone.__new__(Backbone)  # check_cache reads only its class
    assert default_grid(SimpleNamespace(head=Steps(), backbone=plain)) == DEFAULT_GRID
    assert "head_steps" not in default_grid(SimpleNamespace(head=NoSteps(), backbone=plain))
    causal = CausalBackbone.__new__(CausalBackbone)
    assert "cache" not in default_grid(SimpleNamespace(head=Steps(), backbone=causal))
