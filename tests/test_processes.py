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


HANG = float(os.environ.get("TEST_HANG", 180))  # seconds: far beyond a tiny run on a busy 2-core machine; only a hang reaches it


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
        proc = sandbox_process("train-tokenizer", "--config", tmp_path / "tok.yaml", "--run_dir", tmp_path / f"r{attempt}")
        out, err = finish(proc)
        assert proc.returncode == 0 and out.startswith("done: 3 steps"), err[-2000:]
