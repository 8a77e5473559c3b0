"""Shared test fixtures: a tiny recipe, the parity fixture directory, and plugin discovery."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from sandbox.config import registry

REPO = Path(__file__).resolve().parents[1]

registry.discover()

# A recipe small enough to train in a second: 8 px digits, 2x2 patches -> 16 tokens of 12 dims.
TINY_RECIPE = {
    "seed": 0,
    "data": {"class_path": "DigitsDataset", "init_args": {"image_size": 8}},
    "tokenizer": {"class_path": "PixelTokenizer", "init_args": {"patch_size": 2}},
    "ordering": {"class_path": "RandomOrdering"},
    "head": {"class_path": "DiffusionHead", "init_args": {"width": 32, "depth": 1, "num_sampling_steps": 4,
                                                           "x0_clip": 1.0}},
    "model": {"encoder_dim": 32, "encoder_depth": 1, "encoder_heads": 2, "decoder_dim": 32, "decoder_depth": 1,
              "decoder_heads": 2, "buffer_size": 2},
    "train": {"steps": 6, "batch_size": 8, "lr": 1e-3, "log_every": 2, "ckpt_every": 3, "ema_decay": 0.9},
    "sample": {"num_iter": 3, "grid_classes": 2, "grid_per_class": 2, "batch_size": 8},
}


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny models (thread synchronisation costs more than it saves, much more on
    a busy 2-core machine), restored after it, so later modules run with the process's own count. A module asks
    for it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_recipe(tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY_RECIPE))
    return path


def make_mar(cfg, seq_len: int, token_dim: int, num_classes: int, head):
    """A MAR model (class condition, MAR backbone, ``head``) as ``sandbox.config.build`` makes it."""
    from sandbox.core.condition import ClassCondition
    from sandbox.core.model import MAR
    from sandbox.core.transformer import MARBackbone

    return MAR(ClassCondition(cfg.encoder_dim, num_classes), MARBackbone(cfg, seq_len, token_dim), head, cfg)


def class_tokens(labels, width: int, num_classes: int = 10):
    """Condition tokens of ``labels`` from a fresh (random) class condition."""
    from sandbox.core.condition import ClassCondition

    return ClassCondition(width, num_classes)(labels)


def parity_fixture_dir() -> Path | None:
    """$SANDBOX_PARITY_FIXTURES, else ../shared/fixtures next to the repository."""
    env = os.environ.get("SANDBOX_PARITY_FIXTURES")
    if env:
        return Path(env)
    default = REPO.parent / "shared" / "fixtures"
    return default if default.is_dir() else None


def fixture_files(pattern: str) -> list[Path]:
    """The parity fixtures matching ``pattern`` (e.g. ``official_kl16*.pt``), sorted; [] without a directory.
    Fixtures are found by pattern, never by one exact name, so a directory recorded with other seeds or
    configurations (``SANDBOX_PARITY_FIXTURES``) is tested as a whole."""
    d = parity_fixture_dir()
    return sorted(d.glob(pattern)) if d is not None and d.is_dir() else []


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A run directory of the tiny recipe, trained in-process for 4 steps (shared, treat as read-only)."""
    from sandbox.config.recipe import recipe_parser
    from sandbox.run.trainer import train

    root = tmp_path_factory.mktemp("tiny_run")
    recipe = root / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(TINY_RECIPE))
    cfg = recipe_parser().parse_args(["--config", str(recipe), "--train.steps", "4"])
    train(cfg, root / "run", progress=False)
    return root / "run"


@pytest.fixture
def sandbox_cli(capsys):
    """``sandbox.cli.main`` in-process: call(*args) -> CompletedProcess(returncode, stdout, stderr)."""
    import subprocess

    from sandbox.cli import main

    def call(*args):
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)

    return call
