"""Reliability: crash-safe checkpoints, kill and resume, bad numbers, safe loading, full disks.

Each test breaks a run the way the world does (a SIGKILL, a signal, a NaN, a
truncated or malicious file, a full disk) and checks the promise: the run
resumes exactly, stops with one clear line, or refuses, and never loses more
than the last checkpoint interval. Tiny recipe (tests/conftest.py), in-process
except the SIGKILL test, which needs a real process to kill.
"""
from __future__ import annotations

import argparse
import ast
import errno
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import REPO, TINY_RECIPE

import sandbox.run.data as data_module
import sandbox.run.files as files_module
import sandbox.run.rundir as rundir_module
import sandbox.run.trainer as train_module
from sandbox.cli import main as cli_main
from sandbox.config.recipe import recipe_parser
from sandbox.errors import UserError
from sandbox.run.checkpoints import UnsafeCheckpointError, load_checkpoint
from sandbox.run.guards import TrainingDiverged
from sandbox.run.rundir import RunDir
from sandbox.run.trainer import train


def recipe_file(tmp_path, **train_overrides):
    recipe = yaml.safe_load(yaml.safe_dump(TINY_RECIPE))
    recipe["train"].update(train_overrides)
    path = tmp_path / f"r{len(list(tmp_path.glob('r*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def parse(tmp_path, **train_overrides):
    return recipe_parser().parse_args(["--config", str(recipe_file(tmp_path, **train_overrides))])


def state_of(run_dir) -> dict:
    return RunDir(run_dir).load_latest()


def assert_same_state(a: dict, b: dict):
    """Parameters, EMA and optimizer state bitwise equal (the promise of an exact resume)."""
    assert a["step"] == b["step"]
    for key in ("model", "ema"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name} differs"
    for i, sa in a["optimizer"]["state"].items():
        for k in sa:
            assert torch.equal(sa[k], b["optimizer"]["state"][i][k]), f"optimizer state {i}.{k} differs"


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 6-step run; interrupted runs must end in exactly its state."""
    root = tmp_path_factory.mktemp("reference")
    train(parse(root), root / "run", progress=False)
    return state_of(root / "run")


def call_cli(capsys, *args):
    code = cli_main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(code, err, *fragments):
    """Exit code 2 and one ``error:`` line, the last thing printed (after any progress bar), no traceback."""
    assert code == 2, err
    lines = [line for line in re.split(r"[\r\n]", err) if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in err, err
    for f in fragments:
        assert f in errors[0], errors[0]
    return errors[0]


# ----------------------------------------------------------------------------------------
# 1. Crash-safe checkpoints
# ----------------------------------------------------------------------------------------
def test_truncated_checkpoint_is_reported_and_the_previous_one_used(tmp_path, reference, capsys):
    run = tmp_path / "run"
    train(parse(tmp_path), run, progress=False)  # checkpoints at steps 3 and 6; last is a link to checkpoint-6
    ckpts = RunDir(run).ckpt_dir
    assert os.path.samefile(ckpts / "checkpoint-last.pt", ckpts / "checkpoint-6.pt")  # one write, two names
    with open(ckpts / "checkpoint-last.pt", "r+b") as f:  # bit rot / a bad copy: truncates both names
        f.truncate(f.seek(0, 2) // 2)
    capsys.readouterr()
    assert state_of(run)["step"] == 3
    err = capsys.readouterr().err
    assert "checkpoint-last.pt" in err and "checkpoint-6.pt" in err and "truncated" in err and "using checkpoint-3.pt" in err
    train(parse(tmp_path), run, progress=False)  # resumes from step 3 and redoes 4..6
    assert_same_state(state_of(run), reference)


def test_crash_in_the_middle_of_a_save_leaves_the_previous_checkpoint(tmp_path, reference, monkeypatch):
    """A kill during a save: half the bytes reach the temporary file, then the process is gone (an exception
    that skips every cleanup, as SIGKILL would). The published names still hold the previous checkpoint."""

    class Killed(BaseException):
        pass

    real, writes = files_module._write_file, []

    def dies_on_second_checkpoint(path, data):
        writes.append(path.name)
        if sum(".checkpoint-last.pt" in w for w in writes) == 2:
            path.write_bytes(data[: len(data) // 2])
            raise Killed
        real(path, data)

    monkeypatch.setattr(files_module, "_write_file", dies_on_second_checkpoint)
    run = tmp_path / "run"
    with pytest.raises(Killed):
        train(parse(tmp_path), run, progress=False)
    ckpts = RunDir(run).ckpt_dir
    assert [p.name for p in ckpts.glob(".*.tmp*")] == [f".checkpoint-last.pt.tmp{os.getpid()}"]  # the torn write
    assert state_of(run)["step"] == 3
    monkeypatch.setattr(files_module, "_write_file", real)
    train(parse(tmp_path), run, progress=False)
    assert not list(ckpts.glob(".*.tmp*"))  # the dead writer's temporary file is cleaned up
    assert_same_state(state_of(run), reference)


def test_keeps_the_last_k_and_the_best_by_metric(tmp_path):
    run = tmp_path / "run"
    train(parse(tmp_path, steps=12, ckpt_every=2, keep_checkpoints=2, log_every=1, best_metric="loss"), run,
          progress=False)
    ckpts = RunDir(run).ckpt_dir
    assert sorted(p.name for p in ckpts.glob("checkpoint-*.pt")) == [
        "checkpoint-10.pt", "checkpoint-12.pt", "checkpoint-best.pt", "checkpoint-last.pt", "checkpoint-prev.pt"]
    assert os.path.samefile(ckpts / "checkpoint-prev.pt", ckpts / "checkpoint-10.pt")  # a link: no extra disk
    losses = {r["step"]: r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    means = {s: (losses[s - 1] + losses[s]) / 2 for s in range(2, 13, 2)}  # the loss averaged per interval
    best = load_checkpoint(ckpts / "checkpoint-best.pt")
    assert best["step"] == min(means, key=means.get)
    assert best["guards"]["best"]["best"] == pytest.approx(min(means.values()))


def garble(path, tensor) -> None:
    """Bit rot inside a saved checkpoint: NaN bytes over a tensor's stored bytes, in place (the file still
    loads with torch; every hard link of it changes too)."""
    data = path.read_bytes()
    at = data.find(tensor.contiguous().numpy().tobytes())
    assert at > 0
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(b"\xff" * 64)


def test_garbled_tensor_bytes_are_detected_and_the_previous_checkpoint_used(tmp_path, reference, capsys):
    run = tmp_path / "run"
    train(parse(tmp_path), run, progress=False)
    last = RunDir(run).last
    name, weight = max(load_checkpoint(last)["model"].items(), key=lambda kv: kv[1].numel())
    garble(last, weight)
    assert not torch.isfinite(torch.load(last, weights_only=True)["model"][name]).all()  # loads, with NaNs
    capsys.readouterr()
    assert state_of(run)["step"] == 3
    err = capsys.readouterr().err
    assert "checkpoint-last.pt" in err and "checksum" in err and "using checkpoint-3.pt" in err, err
    # resumes from the verified one (never trains on, or names as good, the garbled one) and ends exactly
    train(parse(tmp_path, max_nonfinite_steps=1), run, progress=False)
    assert_same_state(state_of(run), reference)


def test_a_checkpoint_from_before_checksums_still_loads_but_is_not_called_good(tmp_path, tiny_run, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    old = {k: v for k, v in load_checkpoint(RunDir(run).last).items() if k != "checksum"}
    RunDir(run).last.unlink()
    torch.save(old, RunDir(run).last)
    rd = RunDir(run)
    assert rd.load_latest()["step"] == 4 and rd.loaded_path == rd.last and rd.verified is None
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("bad", ["a tensor", "{}", "no model", "no step", "step a string"])
def test_a_checkpoint_of_the_wrong_shape_is_skipped_like_a_truncated_one(tmp_path, tiny_run, capsys, bad):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)  # checkpoints at steps 3 and 4
    good = load_checkpoint(RunDir(run).last)
    wrong = {"a tensor": torch.zeros(3), "{}": {}, "no model": {k: v for k, v in good.items() if k != "model"},
             "no step": {k: v for k, v in good.items() if k != "step"}, "step a string": {**good, "step": "4"}}[bad]
    RunDir(run).last.unlink()  # a new file: checkpoint-4.pt stays as it was
    torch.save(wrong, RunDir(run).last)
    code, _, err = call_cli(capsys, "sample", "--run_dir", run, "--num_images", 2, "--out", tmp_path / "s.npz")
    assert code == 0 and "Traceback" not in err, err
    assert "checkpoint-last.pt" in err and "not a run checkpoint" in err and "using checkpoint-4.pt" in err, err
    for path in RunDir(run).ckpt_dir.glob("checkpoint-*.pt"):  # none usable: one line
        path.unlink()
        torch.save(wrong, path)
    one_error_line(*call_cli(capsys, "sample", "--run_dir", run, "--out", tmp_path / "t.npz")[::2],
                   "no usable checkpoint", "not a run checkpoint")


def test_damage_to_the_newest_checkpoint_leaves_an_independent_previous_one(tmp_path, reference, capsys):
    """keep_checkpoints: 1 keeps one numbered checkpoint, a hard link of checkpoint-last.pt (one write, one copy):
    damage in place hits both names, so the previous checkpoint is kept apart as checkpoint-prev.pt."""
    run = tmp_path / "run"
    train(parse(tmp_path, keep_checkpoints=1), run, progress=False)
    ckpts = RunDir(run).ckpt_dir
    with open(ckpts / "checkpoint-last.pt", "r+b") as f:
        f.truncate(f.seek(0, 2) // 2)
    capsys.readouterr()
    assert state_of(run)["step"] == 3
    assert "using checkpoint-prev.pt" in capsys.readouterr().err
    train(parse(tmp_path, keep_checkpoints=1), run, progress=False)
    assert_same_state(state_of(run), reference)


# ----------------------------------------------------------------------------------------
# 2. Kill and resume
# ----------------------------------------------------------------------------------------
def test_sigkill_at_any_moment_then_resume_continues_exactly(tmp_path):
    """A real process, SIGKILLed while it trains and writes a checkpoint every other step, resumes from its
    last checkpoint; N steps later parameters, EMA and optimizer state equal an uninterrupted run's."""
    killed, log = tmp_path / "killed", tmp_path / "stderr.txt"
    with open(log, "w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sandbox", "train", "--config", recipe_file(tmp_path), "--run_dir", killed,
             "--train.steps", "100000", "--train.ckpt_every", "2", "--train.log_every", "1"],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=stderr,
            # bitwise equality needs the same thread count as this process (float reductions split by threads)
            env={**os.environ, "PYTHONPATH": str(REPO), "SANDBOX_THREADS": str(torch.get_num_threads())})
        fourth, deadline = killed / "checkpoints" / "checkpoint-4.pt", time.monotonic() + 120
        while not fourth.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.05)  # somewhere in a later step or in the middle of a checkpoint write
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, log.read_text()[-2000:]
    logged = max(json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()
                 if line.endswith("}"))
    resumed_from = state_of(killed)["step"]
    assert 4 <= resumed_from <= logged

    target = resumed_from + 4  # N = 4 further steps
    train(parse(tmp_path, steps=target, log_every=1), killed, progress=False)
    train(parse(tmp_path, steps=target, log_every=1), tmp_path / "uninterrupted", progress=False)
    assert_same_state(state_of(killed), state_of(tmp_path / "uninterrupted"))
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, target + 1))  # the log reads as one run: no torn line, no step twice
    assert not list((killed / "checkpoints").glob(".*.tmp*"))


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_save_a_checkpoint_then_resume_exactly(tmp_path, reference, monkeypatch, capsys, signum):
    """The signal arrives in the middle of step 2 (delivered to this process, handled by the trainer's real
    handler): the step finishes, a checkpoint is written, the command exits with 128 + signal."""
    real, calls = train_module.training_loss, []

    def signalled_during_step_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signum)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "training_loss", signalled_during_step_two)
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as stopped:
        cli_main(["train", "--config", str(recipe_file(tmp_path)), "--run_dir", str(run)])
    assert stopped.value.code == 128 + signum
    assert f"stopped by signal {int(signum)} at step 2" in capsys.readouterr().out
    assert state_of(run)["step"] == 2 and len(calls) == 2
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the trainer's handlers are gone again
    monkeypatch.setattr(train_module, "training_loss", real)
    train(parse(tmp_path), run, progress=False)
    assert_same_state(state_of(run), reference)


def test_loader_workers_ignore_stop_signals():
    """Ctrl-C reaches every process of the group; workers must leave the stop to the main process."""
    ds = torch.utils.data.TensorDataset(torch.zeros(4, 1))
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=1,
                                         worker_init_fn=data_module._ignore_stop_signals,
                                         collate_fn=lambda _: (signal.getsignal(signal.SIGINT),
                                                               signal.getsignal(signal.SIGTERM)))
    assert next(iter(loader)) == (signal.SIG_IGN, signal.SIG_IGN)


# ----------------------------------------------------------------------------------------
# 3. Bad numbers
# ----------------------------------------------------------------------------------------
def inject(monkeypatch, bad: dict):
    """Make update k (1-based) non-finite: bad[k] = "loss" (a NaN loss) or "grad" (a finite loss whose
    gradient is NaN, through a hook on one parameter)."""
    real, calls = train_module.training_loss, []

    def poisoned(exp, model, images, labels, generator):
        calls.append(1)
        loss = real(exp, model, images, labels, generator)
        kind = bad.get(len(calls))
        if kind == "loss":
            return loss * float("nan")
        if kind == "grad":
            p = next(model.parameters())
            handle = p.register_hook(lambda g: (handle.remove(), g * float("nan"))[1])
        return loss

    monkeypatch.setattr(train_module, "training_loss", poisoned)


def test_nonfinite_loss_or_gradient_skips_the_update(tmp_path, monkeypatch, capsys):
    inject(monkeypatch, {2: "loss", 4: "grad"})
    run = tmp_path / "run"
    assert train(parse(tmp_path, log_every=1), run, progress=False)["step"] == 6
    err = capsys.readouterr().err
    assert "non-finite loss at step 2" in err and "non-finite gradient at step 4" in err
    final = state_of(run)
    assert all(s["step"] == 4 for s in final["optimizer"]["state"].values())  # 6 steps, 4 updates
    assert all(torch.isfinite(t).all() for t in [*final["model"].values(), *final["ema"].values()])
    skipped = [json.loads(line)["skipped"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert skipped == [0, 1, 1, 2, 2, 2] and final["skipped"] == 2


def test_consecutive_nonfinite_steps_stop_the_run_naming_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    inject(monkeypatch, {k: "loss" for k in range(5, 100)})
    run = tmp_path / "run"
    code, _, err = call_cli(capsys, "train", "--config", recipe_file(tmp_path, steps=20, max_nonfinite_steps=3),
                            "--run_dir", run)
    line = one_error_line(code, err, "stopped at step 7", "3 consecutive steps (5-7)", "checkpoint-3.pt")
    assert str(run) in line
    assert state_of(run)["step"] == 3  # the bad streak did not overwrite the last good checkpoint (due at step 6)
    with pytest.raises(TrainingDiverged):  # the run diverges again the same way unless something changes
        train(parse(tmp_path, steps=20, max_nonfinite_steps=3), run, progress=False)


def test_fp32_head_under_bf16_autocast(tmp_path, monkeypatch):
    """train.head_fp32: the head's loss (training) and sampling (the final grid) run in fp32 with autocast
    off, inside the bf16 autocast region of the rest of the model."""
    from sandbox.plugins.heads.diffusion import DiffusionHead

    seen, real_loss, real_sample = [], DiffusionHead.loss, DiffusionHead.sample

    def loss(self, target, cond, *args, **kwargs):
        seen.append(("loss", cond.dtype, torch.is_autocast_enabled("cpu")))
        return real_loss(self, target, cond, *args, **kwargs)

    def sample(self, cond, *args, **kwargs):
        seen.append(("sample", cond.dtype, torch.is_autocast_enabled("cpu")))
        return real_sample(self, cond, *args, **kwargs)

    monkeypatch.setattr(DiffusionHead, "loss", loss)
    monkeypatch.setattr(DiffusionHead, "sample", sample)
    train(parse(tmp_path, steps=1, precision="bf16", head_fp32=True), tmp_path / "fp32", progress=False)
    assert {m for m, _, _ in seen} == {"loss", "sample"}
    assert all(dtype == torch.float32 and not autocast for _, dtype, autocast in seen), seen
    seen.clear()
    train(parse(tmp_path, steps=1, precision="bf16"), tmp_path / "bf16", progress=False)
    assert seen and all(autocast for _, _, autocast in seen), seen  # without the option the head autocasts too


# ----------------------------------------------------------------------------------------
# 6. Safe loading
# ----------------------------------------------------------------------------------------
class Payload:
    """Unpickling this runs code: it creates the marker file. A safe loader must never do so."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def test_a_checkpoint_that_needs_code_to_unpickle_is_refused(tmp_path, capsys):
    marker = tmp_path / "MARKER"
    evil = {"model": Payload(marker), "step": 1}
    torch.save(evil, tmp_path / "zip.pt")
    torch.save(evil, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    (tmp_path / "raw.pkl").write_bytes(pickle.dumps(evil, protocol=2))
    pickle.loads(pickle.dumps(Payload(tmp_path / "SELFTEST")))  # the payload works when unpickled unsafely
    assert (tmp_path / "SELFTEST").exists()

    for name in ("zip.pt", "legacy.pt"):
        with pytest.raises(UnsafeCheckpointError, match="refusing to load .* references exec"):
            load_checkpoint(tmp_path / name)
    with pytest.raises(UserError):
        load_checkpoint(tmp_path / "raw.pkl")
    assert not marker.exists()

    # planted in a run directory: every command refuses it, none falls back past it silently
    run = tmp_path / "run"
    train(parse(tmp_path, steps=3), run, progress=False)
    (run / "checkpoints" / "checkpoint-last.pt").write_bytes((tmp_path / "zip.pt").read_bytes())
    code, _, err = call_cli(capsys, "sample", "--run_dir", run, "--num_images", 2, "--out", tmp_path / "s.png")
    one_error_line(code, err, "refusing to load", "checkpoint-last.pt")
    code, _, err = call_cli(capsys, "train", "--config", run / "recipe.yaml", "--run_dir", run)
    one_error_line(code, err, "refusing to load")
    assert not marker.exists() and not (tmp_path / "s.png").exists()


def code_payload(kind: str, marker) -> object:
    """An object whose unpickling runs code that creates ``marker``, the ways an attacker writes one."""
    calls = {"os.system": (os.system, (f"touch {marker}",)),
             "subprocess": (subprocess.call, (["touch", str(marker)],)),
             "exec": (exec, (f"open({str(marker)!r}, 'w').close()",)),
             "eval": (eval, (f"open({str(marker)!r}, 'w').close()",))}

    class Reduce:
        def __reduce__(self):
            return calls[kind]

    return Reduce()


PAYLOADS = ("os.system", "subprocess", "exec", "eval")
GLOBAL_NAMES = {"os.system": "posix.system", "subprocess": "subprocess.call", "exec": "exec", "eval": "eval"}


def plant(path, kind: str, marker, layout: str = "zip"):
    """A checkpoint-shaped file carrying a payload: torch's zip format, the legacy format, a zip whose pickle is
    protocol 4 (STACK_GLOBAL, which torch's safe unpickler does not even parse), or a torn zip (no directory)."""
    evil = {"model": {"weight": code_payload(kind, marker)}, "step": 1, "state_dict": {}}
    kwargs = {"legacy": {"_use_new_zipfile_serialization": False}, "protocol4": {"pickle_protocol": 4}}
    path.unlink(missing_ok=True)  # a new file, not the bytes of a hard-linked name
    torch.save(evil, path, **kwargs.get(layout, {}))
    if layout == "torn":
        os.truncate(path, path.stat().st_size - 300)
    return path


@pytest.mark.parametrize("layout", ["zip", "legacy", "protocol4", "torn"])
@pytest.mark.parametrize("kind", PAYLOADS)
def test_a_code_payload_is_refused_by_name_whatever_torch_calls_it(tmp_path, kind, layout):
    """torch 2.14 words a blocked module ("unsupported GLOBAL posix.system whose module posix is blocked")
    unlike other globals; the refusal must not depend on the wording, and never pass for a truncated file."""
    marker = tmp_path / "MARKER"
    path = plant(tmp_path / "evil.pt", kind, marker, layout)
    with pytest.raises(UnsafeCheckpointError, match=f"refusing to load .* references {GLOBAL_NAMES[kind]}"):
        load_checkpoint(path)
    assert not marker.exists()


def _loaders():
    """Every loader of a file the user or a download hands the sandbox (grep load_checkpoint)."""
    from jsonargparse import Namespace

    from sandbox.cli.bench import _official_parts
    from sandbox.eval.fidelity import INCEPTION, load_feature_extractor
    from sandbox.eval.reconstruction import load_lpips
    from sandbox.lab.official import load_official_checkpoint
    from sandbox.plugins.tokenizers.kl16 import load_kl16_state_dict
    from sandbox.run.checkpoints import load_cached

    return {
        "official checkpoint": load_official_checkpoint,
        "KL-16 weights": load_kl16_state_dict,
        "Inception weights": lambda p: load_feature_extractor(INCEPTION, weights=str(p)),
        "LPIPS weights": lambda p: load_lpips(weights=str(p)),
        "bench --official_config": lambda p: _official_parts(Namespace(official_config=str(p)), "cpu"),
        "a cache (reference features)": load_cached,
    }


@pytest.mark.parametrize("kind", PAYLOADS)
def test_every_loader_refuses_a_code_payload(tmp_path, kind):
    marker = tmp_path / "MARKER"
    for name, load in _loaders().items():
        path = plant(tmp_path / "evil.pt", kind, marker)
        with pytest.raises(UnsafeCheckpointError, match=GLOBAL_NAMES[kind]):
            load(path)
        assert not marker.exists(), name


@pytest.mark.parametrize("kind", PAYLOADS)
def test_a_code_payload_in_a_run_directory_or_cache_stops_every_command(tmp_path, tiny_run, capsys, monkeypatch,
                                                                        kind):
    """Never skipped for an older checkpoint, never recomputed over: the evidence stays and the command stops."""
    import shutil

    from sandbox.plugins.datasets import digits_classifier

    marker, run = tmp_path / "MARKER", tmp_path / "run"
    shutil.copytree(tiny_run, run)
    plant(RunDir(run).last, kind, marker)
    with pytest.raises(UnsafeCheckpointError):
        RunDir(run).load_latest()
    for line in (["sample", "--run_dir", run, "--num_images", 2, "--out", tmp_path / "s.png"],
                 ["train", "--config", run / "recipe.yaml"], ["report", run, "--out", tmp_path / "r.html"]):
        one_error_line(*call_cli(capsys, *line)[::2], "refusing to load", "checkpoint-last.pt")

    monkeypatch.setenv("SANDBOX_CACHE", str(tmp_path / "cache"))
    scorer_cache = digits_classifier.cache_dir() / (f"digits_classifier_v{digits_classifier.VERSION}_8px_seed"
                                                    f"{digits_classifier.SEED}.pt")
    scorer_cache.parent.mkdir(parents=True)
    plant(scorer_cache, kind, marker)
    with pytest.raises(UnsafeCheckpointError):
        digits_classifier.DigitsScorer(8)
    assert scorer_cache.read_bytes()[:2] == b"PK" and not marker.exists()  # kept as it was


def test_a_latent_cache_of_pickled_objects_is_refused(tmp_path):
    """numpy never unpickles here (allow_pickle=False); an object array is refused by name, not a traceback."""
    import numpy as np

    from sandbox.lab.latent_cache import FORMAT, INDEX, VERSION, LatentCache

    root = tmp_path / "cache"
    root.mkdir()
    (root / INDEX).write_text(json.dumps({"format": FORMAT, "version": VERSION, "complete": True, "count": 1,
                                          "shard_size": 1, "moment_shape": [2, 2, 2, 2], "next_index": 1,
                                          "shards": [{"file": "shard-00000.npy", "rows": 1}]}))
    np.save(root / "labels.npy", np.array([code_payload("exec", tmp_path / "MARKER")], dtype=object),
            allow_pickle=True)
    np.save(root / "shard-00000.npy", np.zeros((1, 2, 2, 2, 2), np.float32))
    with pytest.raises(UnsafeCheckpointError, match="labels.npy"):
        LatentCache(root)[0]
    assert not (tmp_path / "MARKER").exists()


def test_the_allowlist_is_explicit(tmp_path):
    """Beyond tensors and plain containers, only globals the caller names load (e.g. an official MAR
    checkpoint's argparse.Namespace)."""
    torch.save({"args": argparse.Namespace(model="mar_base")}, tmp_path / "official.pth")
    with pytest.raises(UnsafeCheckpointError, match="argparse.Namespace"):
        load_checkpoint(tmp_path / "official.pth")
    assert load_checkpoint(tmp_path / "official.pth", safe_globals=[argparse.Namespace])["args"].model == "mar_base"


def test_every_checkpoint_load_goes_through_the_safe_loader():
    """The source itself: torch.load appears only in sandbox/run/checkpoints.py, and there with weights_only=True."""
    offenders = []
    for path in [*(REPO / "sandbox").rglob("*.py"), *(REPO / "plugins").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                kw = {k.arg: k.value for k in node.keywords}
                safe = isinstance(kw.get("weights_only"), ast.Constant) and kw["weights_only"].value is True
                if path != REPO / "sandbox" / "run" / "checkpoints.py" or not safe:
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not offenders, f"torch.load outside sandbox.run.checkpoints.load_checkpoint: {offenders}"


# ----------------------------------------------------------------------------------------
# 7. Disk full / unwritable run directory
# ----------------------------------------------------------------------------------------
def test_unwritable_run_directory_is_detected_before_training(tmp_path, capsys, monkeypatch):
    """The tests run as root, for whom chmod does not stop writes; an impossible path (under a regular
    file) makes the directory really unwritable, and a patched disk_usage stands in for a full disk."""
    (tmp_path / "file").write_text("not a directory")
    code, _, err = call_cli(capsys, "train", "--config", recipe_file(tmp_path), "--run_dir", tmp_path / "file" / "run")
    one_error_line(code, err, "is not writable", "Not a directory")

    monkeypatch.setattr(rundir_module.shutil, "disk_usage", lambda path: SimpleNamespace(free=1000))
    code, _, err = call_cli(capsys, "train", "--config", recipe_file(tmp_path), "--run_dir", tmp_path / "run")
    one_error_line(code, err, "not enough disk space", "MiB free")
    assert not (tmp_path / "run").exists()


def test_disk_full_at_save_keeps_the_previous_checkpoint(tmp_path, reference, monkeypatch, capsys):
    """The disk fills up during the second checkpoint: half the bytes are written, then ENOSPC (patched
    into the one function that writes files). The error surfaces as one line, the temporary file is gone,
    the step-3 checkpoint is byte-identical and loads, and the run resumes exactly."""
    real, writes = files_module._write_file, []

    def disk_fills(path, data):
        writes.append(path.name)
        if sum(".checkpoint-last.pt" in w for w in writes) == 2:
            path.write_bytes(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, data)

    run = tmp_path / "run"
    before = {}
    real_save = RunDir.save

    def remember(self, ckpt, step, keep, best=False):
        if self.last.exists():
            before.update(last=self.last.read_bytes())
        return real_save(self, ckpt, step, keep, best)

    monkeypatch.setattr(files_module, "_write_file", disk_fills)
    monkeypatch.setattr(RunDir, "save", remember)
    code, _, err = call_cli(capsys, "train", "--config", recipe_file(tmp_path), "--run_dir", run)
    one_error_line(code, err, "could not save the step-6 checkpoint", "No space left on device",
                   "previous checkpoints are intact")
    ckpts = RunDir(run).ckpt_dir
    assert (ckpts / "checkpoint-last.pt").read_bytes() == before["last"]
    assert not list(ckpts.glob(".*.tmp*")) and not (ckpts / "checkpoint-6.pt").exists()
    assert state_of(run)["step"] == 3
    monkeypatch.undo()
    train(parse(tmp_path), run, progress=False)
    assert_same_state(state_of(run), reference)


# ----------------------------------------------------------------------------------------
# 4. Bad data
# ----------------------------------------------------------------------------------------
def broken_image_folder(root):
    """Two classes of good 12 x 10 RGB PNGs, and every kind of bad file a scraped folder holds."""
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(torch.randint(0, 256, (10, 12, 3), generator=g, dtype=torch.uint8).numpy()).save(
                root / c / f"good{i}.png")
    good = (root / "cat" / "good0.png").read_bytes()
    converted = {
        "grey.png": Image.new("L", (12, 12), 200),
        "rgba.png": Image.new("RGBA", (12, 12), (10, 20, 30, 0)),
        "palette.png": Image.new("P", (12, 12), 3),
        "cmyk.jpg": Image.new("CMYK", (12, 12), (0, 255, 255, 0)),
        "grey16.png": Image.fromarray(torch.full((12, 12), 32896, dtype=torch.int32).numpy().astype("uint16")),
    }
    for name, image in converted.items():
        image.save(root / "dog" / name)
    skipped = {
        "corrupt.jpg": b"\xff\xd8\xff\xe0 not a jpeg",
        "truncated.png": good[: len(good) // 2],
        "empty.png": b"",
    }
    for name, data in skipped.items():
        (root / "cat" / name).write_bytes(data)
    Image.new("RGB", (4, 4)).save(root / "cat" / "tiny.png")
    Image.new("RGB", (400, 9)).save(root / "cat" / "strip.png")
    Image.new("F", (12, 12)).save(root / "cat" / "float.tiff")
    return set(converted), {*skipped, "tiny.png", "strip.png", "float.tiff"}


def test_broken_images_are_converted_or_skipped_and_counted_never_crash(tmp_path, capsys):
    from sandbox.plugins.datasets.imagefolder import ImageFolderDataset

    converted, skipped = broken_image_folder(tmp_path / "images")
    ds = ImageFolderDataset(str(tmp_path / "images"), image_size=8)
    items = [ds.load(i) for i in range(len(ds))]
    names = [p.rsplit("/", 1)[1] for p in ds.paths.tolist()]
    assert {n for n, item in zip(names, items) if item is None} == skipped
    assert {os.path.basename(p) for p in ds.unreadable} == skipped  # counted, with a reason each
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning: skipping")]
    assert sorted(line.split()[4].rsplit("/", 1)[1] for line in warnings) == sorted(skipped)  # reported once each
    assert "too small: 4 x 4 px" in err and "too elongated: 400 x 9 px" in err
    loaded = dict(zip(names, items))
    for name in converted:
        image, label = loaded[name]
        assert image.shape == (3, 8, 8) and image.dtype == torch.float32 and label == 1, name
    grey16 = loaded["grey16.png"][0]  # 32896 / 65535 is mid-grey (128), not the white that clipping gives
    assert torch.allclose(grey16, torch.full_like(grey16, 128 / 127.5 - 1), atol=1e-6)

    # and a run trains through them: skipped files are replaced by readable ones
    recipe = yaml.safe_load(yaml.safe_dump(TINY_RECIPE))
    recipe["data"] = {"class_path": "ImageFolderDataset", "init_args": {"root": str(tmp_path / "images"),
                                                                        "image_size": 8}}
    recipe["train"].update(steps=3, batch_size=len(ds) // 2)
    (tmp_path / "folder.yaml").write_text(yaml.safe_dump(recipe))
    summary = train(recipe_parser().parse_args(["--config", str(tmp_path / "folder.yaml")]), tmp_path / "run",
                    progress=False)
    assert summary["step"] == 3


def test_empty_class_folder_or_dataset_is_an_error_before_training(tmp_path, capsys):
    broken_image_folder(tmp_path / "images")
    (tmp_path / "images" / "zebra").mkdir()
    (tmp_path / "images" / "zebra" / "README.txt").write_text("no images here")
    (tmp_path / "nothing" / "cat").mkdir(parents=True)
    for root, fragment in ((tmp_path / "images", "hold no images: zebra"), (tmp_path / "nothing", "no images in")):
        code, _, err = call_cli(capsys, "train", "--config", recipe_file(tmp_path), "--data", "ImageFolderDataset",
                                "--data.root", root, "--data.image_size", "8", "--run_dir", tmp_path / "run")
        one_error_line(code, err, fragment)
        assert not (tmp_path / "run").exists()
