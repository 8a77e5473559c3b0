""".ci/tune_quickstart.py, the quickstart tuning campaign (issue 20, item 5), at a tiny scale: every stage runs and
fills the page, a second run computes nothing again, every candidate's overrides and every grid the campaign uses
are ones the commands accept (a typo would stop the real campaign hours in), and the budget arithmetic.

The campaign runs in one interpreter (SANDBOX_TUNING_IN_PROCESS=1; about 30 s), its `python -m sandbox` wrapper
once on its own.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from conftest import REPO

SCRIPT = REPO / ".ci" / "tune_quickstart.py"


def load_script(monkeypatch, tiny: bool = True):
    monkeypatch.setenv("SANDBOX_TUNING_TINY", "1" if tiny else "0")
    monkeypatch.setenv("SANDBOX_TUNING_IN_PROCESS", "1")
    spec = importlib.util.spec_from_file_location("tune_quickstart", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "tune_quickstart", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_campaign_at_a_tiny_scale_fills_the_page_and_resumes(tmp_path):
    env = {**os.environ, "SANDBOX_TUNING_TINY": "1", "SANDBOX_TUNING_IN_PROCESS": "1", "SANDBOX_THREADS": "1",
           "PYTHONPATH": str(REPO)}
    args = [sys.executable, str(SCRIPT), "--workdir", str(tmp_path), "--candidates", "baseline", "flow", "--seeds", "2",
            "--others", "quickstart_raster"]
    first = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert first.returncode == 0, first.stderr[-3000:]
    store = json.loads((tmp_path / "runs" / "tuning" / "results.json").read_text())
    winner = store["final/settings"]["winner"]
    assert store["final/settings"]["point"]["num_iter"] == 2  # the head stage's plan steps: a sampling option,
    assert "num_iter" not in (store["final/settings"]["head_args"] or {})  # not a head argument
    for key in ("train/baseline/seed0", "sweep/baseline", "train/flow/seed0", "sweep/flow", f"head_sweep/{winner}",
                f"eval/{winner}/seed1/tuned", "eval/baseline/seed1/shipped", "others/quickstart_raster/sweep"):
        assert key in store, key
        assert len(store["commits"][key]) >= 7, key  # the commit each step ran at, kept beside it
    page = (tmp_path / "tuning.md").read_text()
    assert "| floor | / floor | commit |" in page and f"`{store['commits']['sweep/flow']}` |" in page
    for text in ("TINY", "### Candidates", "Sweep of **flow**", f"### The winner, {winner}", "Target (",
                 "To adopt it: `recipes/", "**quickstart_raster**", "<!-- tuning tables: end -->"):
        assert text in page, text
    assert (tmp_path / "runs" / "tuning" / "flow" / "seed0" / "sweeps" / "sampling" / "frechet_distance.png").is_file()
    again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.strip().splitlines() == [f"wrote {tmp_path / 'tuning.md'}"]  # nothing computed again
    assert json.loads((tmp_path / "runs" / "tuning" / "results.json").read_text()) == store


def test_every_candidate_and_grid_is_accepted(monkeypatch, tmp_path):
    from sandbox.eval.sweep import check_grid, parse_grid
    from sandbox.plugins.heads.diffusion import DiffusionHead
    from sandbox.plugins.heads.flow import FlowHead

    tune = load_script(monkeypatch)
    for cand in tune.CANDIDATES:  # the resolved recipe of each, as the campaign trains it
        _, text = tune.sandbox(["train", "--config", tune.recipe_path(cand.recipe), *cand.overrides,
                                "--print_config"], tmp_path)
        assert "head:" in text, cand.name
    heads = {"DiffusionHead": DiffusionHead, "FlowHead": FlowHead}
    for grid in (tune.GRID, tune.TINY_GRID, *tune.OTHERS_GRIDS.values()):
        for head in heads.values():
            check_grid(parse_grid(_yaml(grid)), head, {}, None)
    for name, grid in (*tune.HEAD_GRIDS.items(), *tune.TINY_HEAD_GRIDS.items()):
        check_grid(parse_grid(_yaml(grid)), heads[name], {}, None)
    assert {c.recipe for c in tune.CANDIDATES} | set(tune.OTHERS) <= {p.stem for p in (REPO / "recipes").glob("*.yaml")}
    assert set(tune.OTHERS_GRIDS) == set(tune.OTHERS)  # every other quickstart has its grid


def _yaml(text: str):
    import yaml

    return yaml.safe_load(text)


def test_budget_steps_fill_the_budget_at_the_measured_speed(monkeypatch, tmp_path):
    tune = load_script(monkeypatch, tiny=False)
    store = tune.Store(tmp_path)
    store.data.update({"train/baseline/seed0": {"seconds": 350.0, "steps": 700},  # 0.5 s per step
                       "bench/baseline": 200.0, "bench/flow": 100.0, "bench/head_wide": 300.0})
    monkeypatch.setattr(tune, "sandbox", lambda *a: pytest.fail("no command: everything is measured"))
    steps = {c.name: tune.budget_steps(c, store, tmp_path) for c in tune.CANDIDATES
             if c.name in ("baseline", "flow", "head_wide")}
    assert steps == {"baseline": 700, "flow": 2150, "head_wide": 700}  # 540 s / (0.5 s x 0.5), / (0.5 x 1.5)


def test_bench_measures_a_candidates_step_time(monkeypatch, tmp_path):
    tune = load_script(monkeypatch)  # tiny: 3 timed steps of the full-size quickstart model
    ms = tune.bench(tune.CANDIDATES[0], tune.Store(tmp_path), tmp_path)
    assert ms > 0
    recipe = (tmp_path / "runs" / "tuning" / "recipes" / "baseline.yaml").read_text()
    assert "DiffusionHead" in recipe


def test_the_command_wrapper_runs_sandbox_in_a_subprocess(monkeypatch, tmp_path):
    tune = load_script(monkeypatch)
    monkeypatch.setattr(tune, "IN_PROCESS", False)
    seconds, out = tune.sandbox(["plugins"], tmp_path)
    assert seconds > 0 and "DiffusionHead" in out
    with pytest.raises(SystemExit, match="exited 2"):
        tune.sandbox(["sweep", "--run_dir", str(tmp_path / "none"), "--grid", "{cfg: [1.0]}"], tmp_path)


def test_the_chosen_point_and_the_grid_edge(monkeypatch):
    tune = load_script(monkeypatch)

    def row(cfg, acc, fd):
        return {"point": {"cfg": cfg}, "metrics": {"accuracy": acc, "frechet_distance": fd, "real_frechet_floor": 9.2}}

    # no point at 97%: a 0.3-point lead is within the noise of 1,000 samples (2 s.e. ~ 1.5 points), 3 points is not
    rows = [row(2.0, 0.910, 100.0), row(3.0, 0.937, 129.2), row(4.0, 0.940, 163.2)]
    assert tune.choose(rows, 1000)["point"] == {"cfg": 3.0}
    assert tune.choose(rows, 100_000)["point"] == {"cfg": 4.0}  # with far more samples the lead is real
    # a point at 97% or more: the lowest distance among those
    rows = [row(2.0, 0.975, 60.0), row(3.0, 0.990, 50.0), row(4.0, 0.960, 40.0)]
    assert tune.choose(rows, 1000)["point"] == {"cfg": 3.0}
    flagged = {"rows": rows, "best": {"point": {"cfg": 4.0}}}
    assert "edge in cfg" in tune.edges(flagged)
    assert tune.edges({"rows": rows, "best": {"point": {"cfg": 3.0}}}) == ""
    assert tune.edges({"rows": rows[:2], "best": {"point": {"cfg": 3.0}}}) == ""  # of two values, not flagged
