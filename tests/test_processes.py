"""Processes: loader workers that never outlive a run, one writer per run directory, exit codes after
signals and after a plugin that exits, and the CPU threads a run takes on a shared machine.

Real processes where the promise is about a process (it exits, it holds a lock, it is killed); the
tiny recipe (tests/conftest.py). A timeout here only turns a hang into a failure: nothing is timed.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import yaml
from conftest import REPO, TINY_RECIPE

# seconds: far beyond a tiny run on a busy 2-core machine, so only a hang reaches it (TEST_HANG: shorter, to see
# a test fail quickly against code that hangs)
HANG = float(os.environ.get("TEST_HANG", "180"))


def sandbox_process(*args, patch: str = "", **popen) -> subprocess.Popen:
    """``sandbox ARGS`` as its own process (this worktree's code); ``patch``: Python run before the CLI, to
    plant a failure."""
    code = f"{patch}\nimport sys\nfrom sandbox.cli import main\nsys.exit(main(sys.argv[1:]))"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def finish(proc: subprocess.Popen, timeout: float = HANG) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"still running after {timeout} s (hung); stdout ends {out[-300:]!r}, stderr {err[-300:]!r}")


def recipe(tmp_path, name: str = "tiny", **train) -> str:
    r = yaml.safe_load(yaml.safe_dump(TINY_RECIPE))
    r["train"].update(train)
    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(r))
    return str(tmp_path / f"{name}.yaml")


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip()]


# ----------------------------------------------------------------------------------------
# Loader workers: shut down at the end and on every error (issue 18, defect 2)
# ----------------------------------------------------------------------------------------
FAIL_AT_STEP_3 = """
from sandbox.errors import UserError
from sandbox.run import trainer
_one_step = trainer.Trainer.one_step
def one_step(self):
    if self.step == 3:
        raise UserError("planted failure at step 3")
    return _one_step(self)
trainer.Trainer.one_step = one_step
"""


@pytest.mark.parametrize("ending", ["done", "error"])
def test_train_with_loader_workers_exits_after_done_and_after_an_error(tmp_path, ending):
    """Loader workers ignore SIGTERM (a Ctrl-C is the main process's to handle), and Python's exit handler
    terminates them with SIGTERM and then joins them without a timeout: the process hung after "done" (7 of 15
    runs in the probe). The trainer shuts its loader down itself, at the end and when an error stops it."""
    config = recipe(tmp_path)
    for attempt in range(3):  # it hung in about half the runs: a few tries catch it
        proc = sandbox_process("train", "--config", config, "--run_dir", tmp_path / f"run{attempt}",
                               "--train.num_workers", 2, patch=FAIL_AT_STEP_3 if ending == "error" else "")
        out, err = finish(proc)
        if ending == "done":
            assert proc.returncode == 0 and out.startswith("done: 6 steps"), err[-2000:]
        else:
            assert proc.returncode == 2 and error_lines(err)[-1] == "error: planted failure at step 3", err[-2000:]


TOKENIZER_RECIPE = {
    "seed": 0,
    "data": {"class_path": "DigitsDataset", "init_args": {"image_size": 8}},
    "autoencoder": {"block_out_channels": [8, 16], "latent_channels": 4, "norm_num_groups": 4},
    "loss": {"perceptual_weight": 0.0},
    "train": {"steps": 3, "batch_size": 16, "log_every": 1, "ckpt_every": 2, "num_workers": 2},
}


def test_train_tokenizer_with_loader_workers_exits_after_done(tmp_path):
    (tmp_path / "tok.yaml").write_text(yaml.safe_dump(TOKENIZER_RECIPE))
    for attempt in range(2):
        proc = sandbox_process("train-tokenizer", "--config", tmp_path / "tok.yaml",
                               "--run_dir", tmp_path / f"r{attempt}")
        out, err = finish(proc)
        assert proc.returncode == 0 and out.startswith("done: 3 steps"), err[-2000:]


# ----------------------------------------------------------------------------------------
# One writer per run directory (issue 18, defect 3)
# ----------------------------------------------------------------------------------------
LOCKED = re.compile(r"error: run directory (\S+) is in use by pid (\d+) on host \S+ \((.*)\); wait for it to end, "
                    r"stop it, or use another --run_dir")


def first_to_exit(procs: list[subprocess.Popen], timeout: float = HANG) -> subprocess.Popen:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.poll() is not None:
                return p
        time.sleep(0.05)
    for p in procs:
        p.kill()
    pytest.fail(f"both writers still running after {timeout} s: nothing stopped the second one")


@pytest.mark.parametrize("recipes", ["same", "different"])
def test_a_second_writer_is_refused_and_a_killed_holder_blocks_nothing(tmp_path, recipes):
    """Two trainings started together on one run directory: one runs, the other exits 2 with one line naming
    the holder -- also when their recipes differ, where both used to pass the recipe check (the directory held
    no recipe yet). The holder, SIGKILLed with its loader workers still alive, leaves a lock that blocks
    nothing: the kernel drops it with the process."""
    run = tmp_path / "run"
    second = recipe(tmp_path, "b", lr=2e-3) if recipes == "different" else recipe(tmp_path, "a")
    configs = [recipe(tmp_path, "a"), second]
    long = ["--train.steps", 100_000, "--train.ckpt_every", 1_000_000, "--train.num_workers", 2]
    procs = [sandbox_process("train", "--config", c, "--run_dir", run, *long) for c in configs]
    refused = first_to_exit(procs)
    holder = procs[1 - procs.index(refused)]
    _, err = refused.communicate()
    assert refused.returncode == 2 and len(error_lines(err)) == 1, err[-2000:]
    match = LOCKED.fullmatch(err.strip())
    assert match and int(match[2]) == holder.pid and "sandbox train --config" in match[3], err
    assert holder.poll() is None  # it runs on

    holder.kill()
    holder.communicate()
    rerun = sandbox_process("train", "--config", configs[procs.index(holder)], "--run_dir", run, "--train.steps", 2)
    out, err = finish(rerun)
    assert rerun.returncode == 0 and out.startswith("done: 2 steps"), err[-2000:]
    assert not (run / ".lock").exists()  # an ended run leaves no lock file


def test_train_tokenizer_and_cache_take_the_lock_too(tmp_path, sandbox_cli):
    """In-process: this process holds the lock; each writing command is refused with one line naming it."""
    from sandbox.run.lock import run_lock

    (tmp_path / "tok.yaml").write_text(yaml.safe_dump(TOKENIZER_RECIPE))
    for command, config, where, flag in [("train", recipe(tmp_path), "--run_dir", "run directory"),
                                         ("train-tokenizer", tmp_path / "tok.yaml", "--run_dir", "run directory"),
                                         ("cache", recipe(tmp_path), "--out", "cache directory")]:
        target = tmp_path / command
        with run_lock(target, what=flag, flag=where):
            proc = sandbox_cli(command, "--config", config, where, target)
        assert proc.returncode == 2 and len(error_lines(proc.stderr)) == 1, proc.stderr
        assert proc.stderr.startswith(f"error: {flag} {target} is in use by pid {os.getpid()} on host "), proc.stderr
        assert not target.exists()  # the refused command wrote nothing; the released lock left nothing


def test_a_refused_recipe_leaves_no_run_directory_behind(tmp_path, sandbox_cli):
    """The lock is taken before the recipe check, in a directory it may have to create: a refusal removes both."""
    proc = sandbox_cli("train", "--config", recipe(tmp_path), "--run_dir", tmp_path / "new" / "run",
                       "--train.batch_size", 100_000)  # more than the dataset: refused before the first write
    assert proc.returncode == 2 and "fewer than one global batch" in proc.stderr, proc.stderr
    assert not (tmp_path / "new").exists()


def test_under_torchrun_a_refused_job_stops_on_every_rank(tmp_path):
    """Rank 0 takes the lock (it alone writes the run directory); the other ranks learn that it was refused and
    stop too, instead of waiting for rank 0 at their first collective."""
    from sandbox.run.lock import run_lock

    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    with run_lock(run):
        proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                                 "-m", "sandbox", "train", "--config", recipe(tmp_path), "--run_dir", run,
                                 "--train.device", "cpu"], cwd=REPO, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = finish(proc)
    assert proc.returncode != 0
    assert (out + err).count(f"error: run directory {run} is in use by pid {os.getpid()}") == 2, err[-3000:]


# ----------------------------------------------------------------------------------------
# Exit codes: a plugin that exits, a second signal (issue 18, defect 13)
# ----------------------------------------------------------------------------------------
def test_a_plugin_file_that_exits_at_import_is_one_error_line(tmp_path):
    """sys.exit(0) in a plugin file used to end `train` with exit 0, having done nothing."""
    plugin = tmp_path / "quits.py"
    plugin.write_text("import sys\nsys.exit(0)\n")
    proc = sandbox_process("--plugin", plugin, "train", "--config", recipe(tmp_path), "--run_dir", tmp_path / "run")
    _, err = finish(proc)
    assert proc.returncode == 2 and len(error_lines(err)) == 1, err
    assert err.startswith(f"error: plugin file {plugin.resolve()}") and "sys.exit(0)" in err, err
    assert not (tmp_path / "run").exists()


def test_a_second_sigterm_stops_at_once_with_143(tmp_path, monkeypatch, capsys):
    """The first SIGTERM asks for a checkpoint at the end of the step; a second one, during that step, stops at
    once -- and the exit code still says which signal it was (128 + 15), as a scheduler reads it."""
    import sandbox.run.trainer as train_module
    from sandbox.cli import main

    real, calls = train_module.training_loss, []

    def signalled_twice_in_step_two(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "training_loss", signalled_twice_in_step_two)
    assert main(["train", "--config", recipe(tmp_path), "--run_dir", str(tmp_path / "run")]) == 128 + signal.SIGTERM
    assert len(calls) == 2 and "interrupted by signal 15" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the trainer's handlers are gone again


# ----------------------------------------------------------------------------------------
# A shared CPU: threads from the cores left free, a short OpenMP spin (issue 18, defect 14)
# ----------------------------------------------------------------------------------------
def test_free_cores_are_the_cores_others_leave_idle(monkeypatch):
    """Two cores; between the two looks at /proc/stat (100 ticks each) another process used ``busy`` ticks."""
    import sandbox.cli._threads as threads

    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    for busy, free in [((0, 0), 2), ((30, 5), 2), ((100, 0), 1), ((60, 50), 1), ((100, 100), 1)]:
        looks = iter([{0: (0, 0), 1: (0, 0)}, {0: (busy[0], 100), 1: (busy[1], 100)}])
        monkeypatch.setattr(threads, "_busy_fractions", lambda cpus, looks=looks: next(looks))
        assert threads.free_cores(look_s=0) == free, busy


THREADS_PROBE = """
import os, sys
import sandbox.cli._threads as threads
threads.free_cores = lambda look_s=0: 1  # as if one of the cores were busy
from sandbox.cli import main
code = main(["plugins"])
import torch
print(code, torch.get_num_threads(), os.environ.get("GOMP_SPINCOUNT"))
"""


@pytest.mark.parametrize("env, expected", [
    ({}, f"0 {len(os.sched_getaffinity(0))} 10000"),  # every core whatever the load (reproducible), a short spin
    ({"SANDBOX_THREADS": "auto"}, "0 1 10000"),  # asked for: the free cores
    ({"OMP_NUM_THREADS": "2"}, "0 2 10000"),  # the user's choice
    ({"SANDBOX_THREADS": "2", "OMP_NUM_THREADS": "1"}, "0 2 10000"),  # the sandbox's own variable first
    ({"OMP_WAIT_POLICY": "PASSIVE", "SANDBOX_THREADS": "auto"}, "0 1 None"),  # a wait policy set by the user stays
])
def test_the_command_line_sets_threads_and_spin_before_torch_starts(env, expected):
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "SANDBOX_THREADS", "GOMP_SPINCOUNT",
                                                             "OMP_WAIT_POLICY")}
    proc = subprocess.run([sys.executable, "-c", THREADS_PROBE], check=False, cwd=REPO, capture_output=True, text=True,
                          env={**base, "PYTHONPATH": str(REPO), **env}, timeout=HANG)
    assert proc.stdout.splitlines()[-1] == expected, proc.stderr[-2000:]


def test_bad_sandbox_threads_is_one_line():
    proc = subprocess.run([sys.executable, "-m", "sandbox", "plugins"], check=False, cwd=REPO, capture_output=True,
                          text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO), "SANDBOX_THREADS": "many"}, timeout=HANG)
    assert proc.returncode == 2 and proc.stderr == "error: SANDBOX_THREADS must be a whole number >= 1 or auto, got 'many'\n"


def test_a_session_that_imported_torch_keeps_its_threads(sandbox_cli):
    import torch

    before, env = torch.get_num_threads(), dict(os.environ)
    assert sandbox_cli("plugins").returncode == 0
    assert torch.get_num_threads() == before and dict(os.environ) == env
