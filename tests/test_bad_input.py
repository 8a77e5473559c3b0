"""Bad input and damaged files (issue 18): every value is checked before anything is written, a damaged log
or recipe.yaml is repaired with one warning, a read-only destination is one error line, a truncated cache of
evaluation samples is sampled again, and the output says which weights were sampled.

In-process, on the tiny recipe of tests/conftest.py (a few seconds in all).
"""
from __future__ import annotations

import builtins
import errno
import io
import json
import os
import shutil

import numpy as np
import pytest
import yaml
from test_reliability import call_cli, one_error_line, parse, recipe_file

import sandbox
from sandbox.errors import UserError
from sandbox.run.monitor import plot_metrics, read_metrics
from sandbox.run.rundir import RunDir
from sandbox.run.trainer import train


def snapshot(root) -> dict:
    """Every file under ``root`` and its bytes: "untouched" means equal snapshots."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def own_copy(run, tmp_path, name="run"):
    """A private copy of the shared tiny run (commands below write into it)."""
    return shutil.copytree(run, tmp_path / name)


# ----------------------------------------------------------------------------------------
# Every recipe value is checked when the recipe is built (defect 6)
# ----------------------------------------------------------------------------------------
BAD_RECIPE_VALUES = {  # each let a run start (several let it finish, then fail at the final grid) or tracebacked
    "no sampling steps": (["--sample.num_iter", "0"], "sample.num_iter must be >= 1"),
    "no class buffer": (["--model.buffer_size", "0"], "model.buffer_size must be >= 1"),
    "negative lr": (["--train.lr", "-1"], "train.lr must be > 0"),
    "negative blr": (["--train.lr", "null", "--train.blr=-1e-4"], "train.blr must be > 0"),
    "beta above 1": (["--train.betas", "[0.9, 1.5]"], "train.betas"),
    "beta of 1": (["--train.betas", "[1.0, 0.95]"], "train.betas"),
    "one beta": (["--train.betas", "[0.9]"], "train.betas"),
    "negative weight decay": (["--train.weight_decay", "-0.1"], "train.weight_decay must be >= 0"),
    "negative min_lr": (["--train.min_lr", "-1"], "train.min_lr must be >= 0"),
    "negative grad clip": (["--train.grad_clip", "-1"], "train.grad_clip must be >= 0"),
    "infinite lr": ({"train": {"lr": float("inf")}}, "train.lr"),
    "NaN ema decay": ({"train": {"ema_decay": float("nan")}}, "train.ema_decay"),
    "unknown device": (["--train.device", "tpu"], "device 'tpu'"),
    "meta device": (["--train.device", "meta"], "device 'meta'"),
    "sample batch 0": (["--sample.batch_size", "0"], "sample.batch_size must be >= 1"),
    "no grid rows": (["--sample.grid_classes", "0"], "sample.grid_classes must be >= 1"),
    "no grid columns": (["--sample.grid_per_class", "0"], "sample.grid_per_class must be >= 1"),
    "zero temperature": (["--sample.temperature", "0"], "sample.temperature must be > 0"),
    "NaN guidance": ({"sample": {"cfg": float("nan")}}, "sample.cfg"),
    "unknown guidance schedule": (["--sample.cfg_schedule", "bogus"], "sample.cfg_schedule"),
    "attention dropout 1": (["--model.attn_dropout", "1.0"], "model.attn_dropout must be in [0, 1)"),
    "negative projection dropout": (["--model.proj_dropout", "-0.1"], "model.proj_dropout must be in [0, 1)"),
    "no MLP": (["--model.mlp_ratio", "0"], "model.mlp_ratio must be > 0"),
    "zero norm eps": (["--model.norm_eps", "0"], "model.norm_eps must be > 0"),
    "no encoder blocks": (["--model.encoder_depth", "0"], "model.encoder_depth must be >= 1"),
}


@pytest.mark.parametrize("bad", list(BAD_RECIPE_VALUES.values()), ids=list(BAD_RECIPE_VALUES))
def test_every_recipe_value_is_checked_before_anything_is_written(tmp_path, capsys, bad):
    args, fragment = bad
    if isinstance(args, dict):  # a value the command line cannot spell (inf, NaN): in a YAML file
        (tmp_path / "override.yaml").write_text(yaml.safe_dump(args))
        args = ["--config", tmp_path / "override.yaml"]
    code, _, err = call_cli(capsys, "train", "--config", recipe_file(tmp_path), *args, "--run_dir", tmp_path / "run")
    one_error_line(code, err, fragment)
    assert not (tmp_path / "run").exists()


def test_a_bad_value_on_resume_leaves_the_run_untouched(tmp_path, capsys):
    """Sampling settings may change on resume (they do not change what is trained): a bad one is refused
    before the run directory is touched, not after the remaining steps."""
    run = tmp_path / "run"
    train(parse(tmp_path, steps=3), run, progress=False)
    before = snapshot(run)
    for args, fragment in ((["--sample.num_iter", "0"], "sample.num_iter"), (["--train.device", "meta"], "meta")):
        code, _, err = call_cli(capsys, "train", "--config", recipe_file(tmp_path), "--run_dir", run, *args)
        one_error_line(code, err, fragment)
        assert snapshot(run) == before


BAD_SAMPLING_OPTIONS = {
    "negative num_iter": (["--num_iter", "-2"], "--num_iter must be >= 1, got -2"),
    "zero num_iter": (["--num_iter", "0"], "--num_iter must be >= 1, got 0"),  # not the recipe's value
    "negative batch": (["--batch_size", "-1"], "--batch_size must be >= 1, got -1"),
    "zero batch": (["--batch_size", "0"], "--batch_size must be >= 1, got 0"),  # not the recipe's value
    "zero temperature": (["--temperature", "0"], "--temperature must be > 0"),
    "unknown guidance schedule": (["--cfg_schedule", "bogus"], "cfg_schedule"),
    "no images": (["--num_images", "0"], "--num_images must be >= 1"),
    "unknown device": (["--device", "tpu"], "device 'tpu'"),
    "meta device": (["--device", "meta"], "device 'meta'"),
}


@pytest.mark.parametrize("bad", list(BAD_SAMPLING_OPTIONS.values()), ids=list(BAD_SAMPLING_OPTIONS))
def test_bad_sampling_options_are_one_line(tiny_run, tmp_path, capsys, bad):
    args, fragment = bad
    before = snapshot(tiny_run)
    for out in ("s.png", "s.npz"):
        code, _, err = call_cli(capsys, "sample", "--run_dir", tiny_run, "--out", tmp_path / out, *args)
        one_error_line(code, err, fragment)
    code, out, err = call_cli(capsys, "eval", "--run_dir", tiny_run, "--num_images", 4, *args)
    one_error_line(code, err, fragment)
    assert not out and not list(tmp_path.iterdir()) and snapshot(tiny_run) == before  # nothing written anywhere


@pytest.mark.parametrize("args,fragment", [(["--num_iter", "0"], "--num_iter must be >= 1"),  # not the recipe's
                                           (["--num_iter", "-3"], "--num_iter must be >= 1"),
                                           (["--temperature", "0"], "--temperature must be > 0"),
                                           (["--device", "meta"], "device 'meta'")], ids=["0", "-3", "t0", "meta"])
def test_bench_options_are_checked(tmp_path, capsys, args, fragment):
    code, _, err = call_cli(capsys, "bench", "--recipe", recipe_file(tmp_path), "--batch_size", 0,
                            "--sample_batch_size", 2, *args)
    one_error_line(code, err, fragment)


def test_eval_feature_batch_and_api_generate_are_checked(tiny_run, capsys):
    code, _, err = call_cli(capsys, "eval", "--run_dir", tiny_run, "--num_images", 2, "--fidelity_batch_size", 0)
    one_error_line(code, err, "--fidelity_batch_size must be >= 1")
    run = sandbox.load_run(tiny_run, device="cpu")
    for kwargs, fragment in (({"num_iter": 0}, "num_iter must be >= 1"), ({"batch_size": 0}, "batch_size"),
                             ({"temperature": -1.0}, "temperature"), ({"cfg_schedule": "cosine"}, "cfg_schedule")):
        with pytest.raises(UserError, match=fragment):
            sandbox.generate(run, num_images=2, **kwargs)


# ----------------------------------------------------------------------------------------
# What was sampled is what the output says (defect 13)
# ----------------------------------------------------------------------------------------
def test_a_checkpoint_without_ema_is_reported_as_raw_weights(tiny_run, tmp_path, capsys):
    run = own_copy(tiny_run, tmp_path)
    rd = RunDir(run)
    ckpt = rd.load_latest()
    del ckpt["ema"]  # e.g. an imported or hand-made checkpoint
    rd.save(ckpt, ckpt["step"], keep=0)  # checkpoint-last.pt alone, without EMA weights
    code, out, err = call_cli(capsys, "sample", "--run_dir", run, "--num_images", 2, "--out", tmp_path / "s.png")
    assert code == 0, err
    assert "raw weights" in out and "EMA" not in out.replace("no EMA", ""), out
    assert "holds no EMA weights" in err  # --ema true (the default) could not be honoured: said once
    code, out, err = call_cli(capsys, "eval", "--run_dir", run, "--num_images", 2)
    assert code == 0, err
    assert json.loads(out)["ema"] is False and json.loads((run / "eval.json").read_text())["ema"] is False


def test_a_truncated_eval_samples_cache_is_sampled_again(tiny_run, tmp_path, capsys):
    run = own_copy(tiny_run, tmp_path)
    code, out, err = call_cli(capsys, "eval", "--run_dir", run, "--num_images", 4)
    assert code == 0, err
    first = json.loads(out)
    cache = run / "eval" / os.path.basename(first["samples"])
    images = np.load(cache)["images"]
    for damage in (lambda b: b[: len(b) // 2], lambda b: b"not an archive", lambda b: b""):
        cache.write_bytes(damage(cache.read_bytes()))
        code, out, err = call_cli(capsys, "eval", "--run_dir", run, "--num_images", 4)
        assert code == 0, err
        assert f"cannot reuse {cache}" in err and "sampling it again" in err, err
        assert "sampling_seconds" in json.loads(out)  # sampled, not reused
        assert np.array_equal(np.load(cache)["images"], images)  # the same set, rewritten whole
    code, out, err = call_cli(capsys, "eval", "--run_dir", run, "--num_images", 4)
    assert "reusing" in err and "sampling_seconds" not in json.loads(out)


# ----------------------------------------------------------------------------------------
# A damaged metrics.jsonl or recipe.yaml (defect 8)
# ----------------------------------------------------------------------------------------
def damage_metrics(path):
    """Every kind of bad record: step 2's loss null, and after it invalid UTF-8, a torn line in the middle,
    JSON that is not a record, a step that is not a number."""
    lines = path.read_bytes().splitlines(keepends=True)
    step2 = {**json.loads(lines[1]), "loss": None}
    bad = [b'\xff\xfe{"step": 1, "loss": 0.5}\n', b'{"step": 2, "lo\n', b"[1, 2, 3]\n",
           b'{"step": "three", "loss": 1.0}\n']
    path.write_bytes(b"".join([lines[0], json.dumps(step2).encode() + b"\n", *bad, *lines[2:]]))
    return step2


def warnings_in(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning: ")]


def test_a_damaged_metrics_log_is_repaired_once_on_resume(tmp_path, capsys):
    run = tmp_path / "run"
    train(parse(tmp_path, steps=3, log_every=1), run, progress=False)
    step2 = damage_metrics(run / "metrics.jsonl")
    capsys.readouterr()
    code, out, err = call_cli(capsys, "train", "--config", recipe_file(tmp_path, log_every=1), "--run_dir", run)
    assert code == 0, err
    (warning,) = warnings_in(err)
    assert "metrics.jsonl" in warning and "5 damaged lines (2, 3, 4, 5, 6)" in warning and "repaired" in warning
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]  # the null-loss record keeps its other numbers
    assert "loss" not in records[1] and records[1]["lr"] == step2["lr"]
    assert (run / "loss_curve.png").is_file() and "loss curve" in out


def test_reading_a_damaged_metrics_log_skips_bad_records_with_one_warning(tmp_path, capsys):
    run = tmp_path / "run"
    train(parse(tmp_path, steps=3, log_every=1), run, progress=False)
    damage_metrics(run / "metrics.jsonl")
    capsys.readouterr()
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1, 2, 3]
    assert plot_metrics(run / "metrics.jsonl", tmp_path / "curve.png") == tmp_path / "curve.png"
    assert len(warnings_in(capsys.readouterr().err)) == 2  # one per read, none per record
    (run / "metrics.jsonl").write_bytes(b'{"step": 1, "loss": 0.5}\n{"step": 2, "lo')  # a kill mid-write
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl")] == [1]
    assert not warnings_in(capsys.readouterr().err)  # a torn last line is expected after a kill: no warning


@pytest.mark.parametrize("damage", [b"\xff\xfe\x00garbage", b"train: [unclosed\n", b"- a list\n", b""],
                         ids=["not UTF-8", "not YAML", "not a mapping", "empty"])
def test_a_damaged_recipe_yaml_is_restored_from_the_checkpoint(tmp_path, capsys, damage):
    """The checkpoint stores the recipe (the copy sample and eval read): a resume checks against it, says so
    once, and writes recipe.yaml again. Another recipe is still refused."""
    run = tmp_path / "run"
    train(parse(tmp_path, steps=3), run, progress=False)
    good = (run / "recipe.yaml").read_bytes()
    (run / "recipe.yaml").write_bytes(damage)
    capsys.readouterr()
    code, _, err = call_cli(capsys, "train", "--config", recipe_file(tmp_path), "--run_dir", run,
                            "--model.encoder_dim", 64, "--model.decoder_dim", 64)
    one_error_line(code, err, "different recipe", "encoder_dim")
    (warning,) = warnings_in(err)
    assert "recipe.yaml" in warning and "checkpoint-last.pt" in warning
    code, out, err = call_cli(capsys, "train", "--config", recipe_file(tmp_path, steps=3), "--run_dir", run)
    assert code == 0 and "is complete" in out, err
    assert len(warnings_in(err)) == 1
    assert (run / "recipe.yaml").read_bytes() == good  # a complete run: written again from its checkpoint
    (run / "recipe.yaml").write_bytes(damage)
    code, _, err = call_cli(capsys, "train", "--config", recipe_file(tmp_path), "--run_dir", run)  # 6 steps
    assert code == 0, err
    assert len(warnings_in(err)) == 1
    expected = yaml.safe_load(good)
    expected["train"]["steps"] = 6
    assert yaml.safe_load((run / "recipe.yaml").read_bytes()) == expected
    assert RunDir(run).load_latest()["step"] == 6


def test_a_damaged_recipe_yaml_without_a_checkpoint_is_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_bytes(b"\xff\xfe\x00garbage")
    code, _, err = call_cli(capsys, "train", "--config", recipe_file(tmp_path), "--run_dir", run)
    one_error_line(code, err, "recipe.yaml", "no readable checkpoint")
    code, _, err = call_cli(capsys, "train", "--config", run / "recipe.yaml")
    one_error_line(code, err, "recipe.yaml")


# ----------------------------------------------------------------------------------------
# A read-only destination (defect 10)
# ----------------------------------------------------------------------------------------
@pytest.fixture
def read_only(monkeypatch):
    """``read_only(folder)``: from now on, writes under ``folder`` fail as on a read-only mount (EROFS), and
    so do the removals and renames a writer's cleanup tries (the tests run as root: chmod stops nothing)."""

    def refuse(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    def install(folder):
        folder = str(folder)
        inside = lambda p: isinstance(p, (str, os.PathLike)) and os.path.abspath(p).startswith(folder)  # noqa: E731
        real_open = builtins.open

        def ro_open(file, mode="r", *args, **kwargs):
            if inside(file) and any(c in mode for c in "wax+"):
                refuse(file)
            return real_open(file, mode, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", ro_open)
        monkeypatch.setattr(io, "open", ro_open)  # pathlib opens through io.open
        for name in ("replace", "rename", "unlink", "remove", "mkdir", "link", "rmdir"):
            real = getattr(os, name)
            monkeypatch.setattr(os, name, lambda p, *a, _real=real, **k: refuse(p) if inside(p) else _real(p, *a, **k))

    return install


@pytest.mark.parametrize("out", ["s.png", "s.npz", "new/s.png"])
def test_sample_onto_a_read_only_file_system_is_one_line(tiny_run, tmp_path, capsys, read_only, out):
    (tmp_path / "ro").mkdir()  # the mount point
    read_only(tmp_path / "ro")
    code, _, err = call_cli(capsys, "sample", "--run_dir", tiny_run, "--num_images", 2, "--out", tmp_path / "ro" / out)
    one_error_line(code, err, "Read-only file system")


def test_eval_of_a_read_only_run_is_one_line_and_works_with_json_elsewhere(tiny_run, tmp_path, capsys, read_only):
    run = own_copy(tiny_run, tmp_path)
    before = snapshot(run)
    read_only(run)
    code, out, err = call_cli(capsys, "eval", "--run_dir", run, "--num_images", 2)
    one_error_line(code, err, "could not write", "eval.json", "Read-only file system")
    assert "could not keep the samples" in err  # the cache is a convenience: a warning, and scoring goes on
    code, out, err = call_cli(capsys, "eval", "--run_dir", run, "--num_images", 2, "--json", tmp_path / "e.json")
    assert code == 0, err
    assert json.loads((tmp_path / "e.json").read_text())["num_images"] == 2
    assert snapshot(run) == before
