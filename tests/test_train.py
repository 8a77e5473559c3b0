"""The training core: exact resume, seeded sampling, recipe checks (in-process, tiny recipe)."""
from __future__ import annotations

import pytest
import torch
import yaml
from conftest import TINY_RECIPE

from sandbox.config.recipe import recipe_parser
from sandbox.errors import UserError
from sandbox.eval.samples import generate_many
from sandbox.run.loading import load_run
from sandbox.run.rundir import RunDir
from sandbox.run.trainer import train


def parse(tmp_path, **train_overrides):
    recipe = yaml.safe_load(yaml.safe_dump(TINY_RECIPE))
    recipe["train"].update(train_overrides)
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return recipe_parser().parse_args(["--config", str(path)])


def tensors_equal(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(tensors_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(tensors_equal(x, y) for x, y in zip(a, b))
    return a == b


def test_resume_equals_uninterrupted(tmp_path):
    train(parse(tmp_path, steps=6), tmp_path / "full", progress=False)
    train(parse(tmp_path, steps=3), tmp_path / "split", progress=False)  # "interrupted" after 3 steps
    train(parse(tmp_path, steps=6), tmp_path / "split", progress=False)  # resumed to 6
    full = RunDir(tmp_path / "full").load_latest()
    split = RunDir(tmp_path / "split").load_latest()
    assert full["step"] == split["step"] == 6
    for key in ("model", "ema", "optimizer"):
        assert tensors_equal(full[key], split[key]), f"{key} differs after resume"
    # and training really changed the weights
    first = RunDir(tmp_path / "full").checkpoints()[-1]
    assert not tensors_equal(torch.load(first, weights_only=True)["model"], full["model"])


def test_seed_fixes_samples(tmp_path):
    train(parse(tmp_path, steps=2), tmp_path / "run", progress=False)
    loaded = load_run(tmp_path / "run")
    exp, model = loaded.exp, loaded.model
    labels = torch.arange(4)
    a = generate_many(exp, labels, batch_size=4, seed=3, model=model, num_iter=3)
    b = generate_many(exp, labels, batch_size=4, seed=3, model=model, num_iter=3)
    c = generate_many(exp, labels, batch_size=4, seed=4, model=model, num_iter=3)
    assert a.shape == (4, 3, 8, 8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_run_dir_with_a_different_recipe_is_refused(tmp_path):
    train(parse(tmp_path, steps=2), tmp_path / "run", progress=False)
    cfg = parse(tmp_path, steps=2)
    cfg.model.encoder_dim = 64
    before = (tmp_path / "run" / "recipe.yaml").read_text()
    with pytest.raises(UserError, match="different recipe"):
        train(cfg, tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "recipe.yaml").read_text() == before


def test_arguments_added_since_a_run_was_stored_take_their_defaults(tmp_path):
    """A run stored before a plugin gained an argument (its recipe lacks the key) continues with a recipe that
    leaves it at its default, and is refused with one that sets it otherwise."""
    train(parse(tmp_path, steps=2), tmp_path / "run", progress=False)
    path = tmp_path / "run" / "recipe.yaml"
    stored = yaml.safe_load(path.read_text())
    for key in ("captions", "held_out_templates", "condition_image"):  # DigitsDataset's arguments of 0.3
        stored["data"]["init_args"].pop(key)
    path.write_text(yaml.safe_dump(stored))
    assert train(parse(tmp_path, steps=2), tmp_path / "run", progress=False)["complete"]
    cfg = parse(tmp_path, steps=2)
    cfg.data.init_args.captions = True
    with pytest.raises(UserError, match="captions"):
        train(cfg, tmp_path / "run", progress=False)


def test_a_refused_resume_keeps_the_stored_recipe(tmp_path):
    train(parse(tmp_path, steps=2), tmp_path / "run", progress=False)
    before = (tmp_path / "run" / "recipe.yaml").read_text()
    with pytest.raises(UserError, match="global batch of 8"):  # steps and batch size are resumable keys
        train(parse(tmp_path, steps=4, batch_size=4), tmp_path / "run", progress=False)
    assert (tmp_path / "run" / "recipe.yaml").read_text() == before


def test_a_complete_run_is_reported_and_left_as_it_is(tmp_path, capsys):
    train(parse(tmp_path, steps=2), tmp_path / "run", progress=False)
    files = {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*") if p.is_file()}
    summary = train(parse(tmp_path, steps=2), tmp_path / "run", progress=False)
    assert summary["complete"] and summary["step"] == 2
    assert "is complete: step 2 of 2" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*") if p.is_file()} == files


def test_a_run_without_its_end_work_does_it_when_rerun(tmp_path):
    from sandbox.run.resume import finished

    train(parse(tmp_path, steps=2), tmp_path / "run", progress=False)
    run = RunDir(tmp_path / "run")
    ckpt = run.load_latest()
    assert finished(run, ckpt, 2) and not finished(run, {**ckpt, "ended": False}, 2)  # stopped by a signal
    assert not finished(run, ckpt, 3)
    (run.samples_dir / "step_0000002.png").unlink()  # the final grid failed (say, a plugin's sampler)
    summary = train(parse(tmp_path, steps=2), tmp_path / "run", progress=False)
    assert "complete" not in summary and (run.samples_dir / "step_0000002.png").is_file()
    assert finished(run, run.load_latest(), 2)


def test_a_run_directory_recipe_continues_that_run(tmp_path, monkeypatch):
    from sandbox.cli.train import default_run_dir

    monkeypatch.chdir(tmp_path)
    train(parse(tmp_path, steps=2), tmp_path / "runs" / "r", progress=False)
    stored = recipe_parser().parse_args(["--config", "runs/r/recipe.yaml"])
    assert default_run_dir(stored) == "runs/r"
    assert default_run_dir(recipe_parser().parse_args(["--config", "r.yaml"])) == "runs/r"


def test_training_lowers_the_loss(tmp_path):
    summary = train(parse(tmp_path, steps=40, log_every=1, ckpt_every=100), tmp_path / "run", progress=False)
    import json

    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert summary["step"] == 40
    assert sum(losses[-10:]) / 10 < sum(losses[:5]) / 5
