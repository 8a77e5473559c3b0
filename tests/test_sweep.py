"""Research instruments through the command line (issue 20): `sandbox sweep` writes one row per grid point and
resumes after a kill, `sandbox eval --seeds` gives the mean and spread of every score, `sandbox eval --nll` the
likelihood of the dataset's held-out split, and bad input is one error line with nothing written.

In-process, on copies of the tiny run of tests/conftest.py with 10-20 images per set (a few seconds each).
"""
from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from sandbox.plugins.datasets.digits import DigitsDataset

pytestmark = pytest.mark.usefixtures("one_thread")  # not a module-level set_num_threads: it would leak

FAST = ("--num_images", "10", "--num_iter", "2")  # 10 images, 2 plan steps: the wiring, not the quality
GRID = "{cfg: [1.0, 3.0], temperature: [0.8, 1.0]}"
POINTS = [{"cfg": c, "temperature": t} for c in (1.0, 3.0) for t in (0.8, 1.0)]


@pytest.fixture
def run(tiny_run, tmp_path):
    """A private copy of the shared tiny run (sweeps and evals write into it)."""
    return shutil.copytree(tiny_run, tmp_path / "run", ignore=shutil.ignore_patterns("eval", "sweeps", "eval.json"))


def ok(proc):
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def one_error_line(proc, *fragments):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def rows(run, name="cfg-temperature"):
    return json.loads((run / "sweeps" / name / "results.json").read_text())


# ----------------------------------------------------------------------------------------
# sandbox sweep
# ----------------------------------------------------------------------------------------
def test_sweep_writes_one_row_per_point_a_table_and_a_plot_per_metric(sandbox_cli, run):
    out = ok(sandbox_cli("sweep", "--run_dir", run, "--grid", GRID, *FAST))
    folder = run / "sweeps" / "cfg-temperature"
    found = rows(run)
    assert [r["point"] for r in found] == POINTS  # grid order, the last key fastest
    for r in found:
        assert {"accuracy", "frechet_distance", "real_frechet_floor"} <= set(r["metrics"]) and "std" not in r
        assert len(r["seeds"]) == 1 and r["seeds"][0]["samples"].startswith(str(run / "eval"))
    table = list(csv.DictReader((folder / "results.csv").open()))
    assert len(table) == 4 and float(table[3]["cfg"]) == 3.0
    assert float(table[0]["frechet_distance"]) == pytest.approx(found[0]["metrics"]["frechet_distance"])
    assert (folder / "accuracy.png").stat().st_size > 5000 and (folder / "frechet_distance.png").is_file()
    best = min(found, key=lambda r: r["metrics"]["frechet_distance"])
    assert out["points"] == 4 and out["best"]["frechet_distance"]["point"] == best["point"]
    # the report reads the sweep as written
    from sandbox.eval.report import read_sweeps

    (sweep,) = read_sweeps(run)
    assert len(sweep.rows) == 4 and sweep.error is None and len(sweep.plots) == 2


def test_sweep_points_share_eval_sets_with_eval(sandbox_cli, run):
    ok(sandbox_cli("eval", "--run_dir", run, "--cfg", "3.0", "--temperature", "0.8", *FAST))
    proc = sandbox_cli("sweep", "--run_dir", run, "--grid", GRID, *FAST)
    ok(proc)
    assert proc.stderr.count("reusing 10 samples") == 1 and proc.stderr.count("wrote 10 samples") == 3


def test_sweep_resumes_computing_only_the_missing_points(sandbox_cli, run, monkeypatch):
    from sandbox.eval import scoring

    ok(sandbox_cli("sweep", "--run_dir", run, "--grid", GRID, *FAST))
    first = rows(run)
    path = run / "sweeps" / "cfg-temperature" / "results.json"
    path.write_text(json.dumps(first[:1] + first[2:]))  # the second point's row lost
    scored, score = [], scoring.score_samples
    monkeypatch.setattr(scoring, "score_samples", lambda *a: scored.append(1) or score(*a))
    proc = sandbox_cli("sweep", "--run_dir", run, "--grid", GRID, *FAST)
    ok(proc)
    assert "1 of 4 points to compute (3 done)" in proc.stderr and len(scored) == 1
    again = rows(run)  # the same row again, in its place (its samples reused: no sampling time this time)
    assert [(r["point"], r["metrics"]) for r in again] == [(r["point"], r["metrics"]) for r in first]

    # killed while scoring the third point of another sweep: the first two rows are kept, the rerun does the rest
    def interrupted(*a):
        if len(scored) == 2:  # two points scored: the third is cut short
            raise KeyboardInterrupt
        scored.append(1)
        return score(*a)

    scored.clear()
    monkeypatch.setattr(scoring, "score_samples", interrupted)
    killed = sandbox_cli("sweep", "--run_dir", run, "--grid", GRID, "--name", "again", *FAST)
    assert killed.returncode == 130 and len(rows(run, "again")) == 2
    scored.clear()
    monkeypatch.setattr(scoring, "score_samples", lambda *a: scored.append(1) or score(*a))
    proc = sandbox_cli("sweep", "--run_dir", run, "--grid", GRID, "--name", "again", *FAST)
    ok(proc)
    assert "2 of 4 points to compute (2 done)" in proc.stderr and len(scored) == 2
    assert [r["metrics"] for r in rows(run, "again")] == [r["metrics"] for r in first]


def test_sweep_over_head_fields_with_seeds(sandbox_cli, run):
    out = ok(sandbox_cli("sweep", "--run_dir", run, "--grid", "{num_sampling_steps: [2, 4], head_args.sampler: [ddim]}",
                         "--seeds", "2", *FAST))
    found = rows(run, "num_sampling_steps-sampler")
    assert [r["point"] for r in found] == [{"num_sampling_steps": 2, "head_args.sampler": "ddim"},
                                           {"num_sampling_steps": 4, "head_args.sampler": "ddim"}]
    for r in found:
        values = [s["frechet_distance"] for s in r["seeds"]]
        assert [s["seed"] for s in r["seeds"]] == [0, 1] and values[0] != values[1]
        assert r["metrics"]["frechet_distance"] == pytest.approx(sum(values) / 2)
        assert r["std"]["frechet_distance"] == pytest.approx(abs(values[0] - values[1]) / math.sqrt(2))
    header = (run / "sweeps" / "num_sampling_steps-sampler" / "results.csv").read_text().splitlines()[0]
    assert "frechet_distance_std" in header and out["seeds"] == [0, 1]
    assert found[0]["seeds"][0]["samples"] != found[1]["seeds"][0]["samples"]  # another sampler, another set


# ----------------------------------------------------------------------------------------
# sandbox eval --seeds
# ----------------------------------------------------------------------------------------
def test_eval_seeds_same_mean_for_identical_runs_spread_over_seeds(sandbox_cli, run, tmp_path):
    twin = shutil.copytree(run, tmp_path / "twin")  # an identical run: the same weights, no samples yet
    a = ok(sandbox_cli("eval", "--run_dir", run, "--seeds", "3", *FAST))
    b = ok(sandbox_cli("eval", "--run_dir", twin, "--seeds", "3", *FAST))
    assert a["mean"] == b["mean"] and a["std"] == b["std"]
    assert [s["seed"] for s in a["seeds"]] == [0, 1, 2] and a["num_images"] == 10
    fd = [s["frechet_distance"] for s in a["seeds"]]
    assert len(set(fd)) == 3 and a["std"]["frechet_distance"] > 0
    assert a["mean"]["frechet_distance"] == pytest.approx(sum(fd) / 3)
    assert "seed" not in a["mean"] and "num_images" not in a["mean"]
    from sandbox.eval.report import read_scores

    scores = read_scores(run / "eval.json")  # what the report shows: mean +- std over 3 seeds
    assert scores.seeds == 3 and scores.std["frechet_distance"] == pytest.approx(a["std"]["frechet_distance"])
    one = ok(sandbox_cli("eval", "--run_dir", run, "--seed", "1", *FAST))  # one seed: today's flat result
    assert "seeds" not in one and one["frechet_distance"] == fd[1]


# ----------------------------------------------------------------------------------------
# sandbox eval --nll
# ----------------------------------------------------------------------------------------
NLL = ("--nll", "--nll_images", "6", "--head_args", "{nll_timesteps: 4}")  # 6 images, 4 + 1 timesteps per token


def test_eval_nll_through_the_cli(sandbox_cli, run):
    proc = sandbox_cli("eval", "--run_dir", run, *FAST, *NLL)
    out = ok(proc)
    assert math.isfinite(out["nll_bits_per_dim"]) and "accuracy" in out
    nll = out["nll"]
    assert nll["images"] == 6 and nll["steps"] == 2 and "held-out half" in nll["data"]
    table = Path(nll["table"]).read_text().splitlines()
    assert len(table) == 1 + 1 + 2 + 1 and table[-1].startswith(f"total: {out['nll_bits_per_dim']:.4f}")
    assert Path(nll["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((run / "eval.json").read_text())["nll_bits_per_dim"] == out["nll_bits_per_dim"]
    alone = sandbox_cli("eval", "--run_dir", run, *FAST, *NLL, "--sample", "false")
    assert "reusing the likelihood" in alone.stderr
    alone = ok(alone)
    assert alone["nll_bits_per_dim"] == out["nll_bits_per_dim"] and "accuracy" not in alone
    seeded = ok(sandbox_cli("eval", "--run_dir", run, *NLL, "--sample", "false", "--seeds", "2", "--num_iter", "2"))
    assert seeded["seeds"][0]["nll_bits_per_dim"] == out["nll_bits_per_dim"]  # seed 0 again: reused
    assert seeded["std"]["nll_bits_per_dim"] > 0  # another order and other timesteps


def test_the_digits_heldout_half_is_the_floor_half():
    from sandbox.plugins.datasets.digits_classifier import DigitsScorer

    held = DigitsDataset(8).heldout()
    scorer = DigitsScorer(8)
    assert torch.equal(held.images, scorer.real_images[scorer.held]) and torch.equal(held.labels,
                                                                                       scorer.real_labels[scorer.held])
    reference = DigitsDataset(8, split="reference")
    assert torch.equal(reference.images, scorer.real_images[scorer.ref]) and len(reference) + len(held) == 1797
    assert "seen in training" in repr(held) and "never trained on" in repr(reference.heldout())


# ----------------------------------------------------------------------------------------
# Bad input: one line, exit code 2, nothing written
# ----------------------------------------------------------------------------------------
BAD_GRIDS = {
    "{}": "--grid is empty",
    "{cfg: []}": "cfg has no values",
    "{foo: [1, 2]}": "'foo' is not a sampling option",
    "{seed: [0, 1]}": "'seed' is not a sampling option",
    "{num_iter: [2.5]}": "num_iter takes int values",
    "{temperature: [0.0]}": "temperature must be > 0",
    "{cfg_schedule: [cosine]}": "cfg_schedule must be one of",
    "{cfg: [1, 1.0]}": "lists a value twice",
    "{width: [64]}": "does not fit",  # a head field that changes the weights
    "{num_sampling_steps: [4, 1]}": "num_sampling_steps must be in",
    "[1, 2]": "grid",
}


@pytest.mark.parametrize("grid", list(BAD_GRIDS))
def test_bad_grids(sandbox_cli, run, grid):
    one_error_line(sandbox_cli("sweep", "--run_dir", run, "--grid", grid, "--num_images", "10"), BAD_GRIDS[grid])
    assert not (run / "sweeps").exists() and not (run / "eval").exists()


def test_other_bad_sweeps(sandbox_cli, run, monkeypatch):
    cases = [(("--grid", GRID, "--cfg", "2"), "also given as --cfg"),
             (("--grid", "{sampler: [ddim]}", "--head_args", "{sampler: ddpm}"), "--head_args fixes too"),
             (("--grid", GRID, "--name", "../up"), "plain folder name"),
             (("--grid", GRID, "--seeds", "0"), "--seeds must be >= 1"),
             ((), "give --grid")]
    for args, message in cases:
        one_error_line(sandbox_cli("sweep", "--run_dir", run, "--num_images", "10", *args), message)
    monkeypatch.setattr(DigitsDataset, "scorer", lambda self: None)
    one_error_line(sandbox_cli("sweep", "--run_dir", run, "--grid", GRID), "has no offline scorer; pass --ref")
    assert not (run / "sweeps").exists() and not (run / "eval").exists()


def test_a_sweep_name_made_with_other_settings_is_refused(sandbox_cli, run):
    ok(sandbox_cli("sweep", "--run_dir", run, "--grid", "{cfg: [1.0]}", *FAST))
    before = {p: p.read_bytes() for p in (run / "sweeps" / "cfg").iterdir()}
    one_error_line(sandbox_cli("sweep", "--run_dir", run, "--grid", "{cfg: [1.0]}", "--num_images", "12",
                               "--num_iter", "2"), "holds a sweep with other settings (num_images 10 -> 12)")
    assert {p: p.read_bytes() for p in (run / "sweeps" / "cfg").iterdir()} == before


def test_bad_nll_requests(sandbox_cli, run, monkeypatch):
    from sandbox.plugins.heads.diffusion import DiffusionHead

    one_error_line(sandbox_cli("eval", "--run_dir", run, "--nll", "--nll_images", "0"), "--nll_images must be >= 1")
    one_error_line(sandbox_cli("eval", "--run_dir", run, "--sample", "false"), "nothing to do without --nll")
    one_error_line(sandbox_cli("eval", "--images", run / "x.npz", "--nll"), "--nll needs --run_dir")
    monkeypatch.setattr(DigitsDataset, "heldout", lambda self: None)
    one_error_line(sandbox_cli("eval", "--run_dir", run, *FAST, "--nll"), "has no held-out split")
    monkeypatch.undo()
    monkeypatch.setattr(DiffusionHead, "has_nll", False)
    one_error_line(sandbox_cli("eval", "--run_dir", run, *FAST, "--nll"), "DiffusionHead has no likelihood")
    assert not (run / "eval").exists() and not (run / "eval.json").exists()
