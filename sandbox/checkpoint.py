"""Run directories, atomic checkpoint writes and safe checkpoint loads.

A run directory holds:
    recipe.yaml               the fully resolved recipe (re-runnable with --config)
    checkpoints/checkpoint-last.pt  and the last few numbered ones
    metrics.jsonl             one JSON object per logged step
    samples/                  sample grids written during training

A checkpoint is a plain dict of tensors, numbers and strings -- {model, ema,
optimizer, step, rng, recipe, meta, version} -- so it loads with
``torch.load(weights_only=True)``; nothing in it can run code when loaded.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import torch
import yaml

from sandbox.errors import UserError

LAST = "checkpoint-last.pt"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same directory, fsync it, then rename over ``path``.

    A crash at any moment leaves either the old file or the new one, never a torn one.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UserError(f"could not write {path}: {e.strerror or e}; the previous file is intact") from e
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def save_checkpoint(obj: dict, path: Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: Path, map_location="cpu") -> dict:
    """Load a checkpoint with ``weights_only=True``: tensors and plain containers only."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        msg = " ".join(str(e).split())
        if "weights_only" in msg or "Unsupported global" in msg or "GLOBAL" in msg:
            raise UserError(
                f"refusing to load {path}: it needs arbitrary code to unpickle ({msg[:200]}); "
                "only tensor/number/string checkpoints are accepted"
            ) from e
        raise UserError(f"checkpoint {path} is unreadable or truncated: {type(e).__name__}: {msg[:200]}") from e


class RunDir:
    """Paths and bookkeeping of one run directory."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @property
    def recipe_path(self) -> Path:
        return self.root / "recipe.yaml"

    @property
    def ckpt_dir(self) -> Path:
        return self.root / "checkpoints"

    @property
    def last(self) -> Path:
        return self.ckpt_dir / LAST

    @property
    def metrics_path(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def samples_dir(self) -> Path:
        return self.root / "samples"

    def exists(self) -> bool:
        return self.recipe_path.is_file()

    def require(self) -> "RunDir":
        if not self.root.is_dir():
            raise UserError(f"run directory not found: {self.root}; train one with `sandbox train --config RECIPE`")
        if not self.exists():
            raise UserError(f"{self.root} is not a run directory (no recipe.yaml)")
        return self

    def create(self) -> None:
        """Make the directories and check they are writable before any work starts."""
        try:
            for d in (self.root, self.ckpt_dir, self.samples_dir):
                d.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".write-probe-{os.getpid()}"
            atomic_write_bytes(probe, b"ok")
            probe.unlink()
        except OSError as e:
            raise UserError(f"run directory {self.root} is not writable: {e.strerror or e}") from e

    def read_recipe(self) -> dict:
        try:
            return yaml.safe_load(self.recipe_path.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise UserError(f"cannot read {self.recipe_path}: {e}") from e

    def write_recipe(self, recipe: dict) -> None:
        atomic_write_bytes(self.recipe_path, yaml.safe_dump(recipe, sort_keys=False).encode())

    def checkpoints(self) -> list[Path]:
        """Numbered checkpoints, newest first."""
        found = sorted(self.ckpt_dir.glob("checkpoint-[0-9]*.pt"), key=lambda p: int(p.stem.split("-")[1]))
        return found[::-1]

    def load_latest(self, map_location="cpu") -> dict | None:
        """The newest checkpoint that loads; a truncated or corrupt one is reported and skipped."""
        candidates = [self.last] if self.last.is_file() else []
        candidates += self.checkpoints()
        errors = []
        for path in candidates:
            try:
                ckpt = load_checkpoint(path, map_location)
                if errors:
                    print(f"warning: skipped unreadable checkpoint(s): {'; '.join(errors)}; using {path.name}")
                return ckpt
            except UserError as e:
                if "refusing" in str(e):
                    raise
                errors.append(f"{path.name} ({e})")
        if errors:
            raise UserError(f"no readable checkpoint in {self.ckpt_dir}: {'; '.join(errors)}")
        return None

    def save(self, ckpt: dict, step: int, keep: int) -> None:
        """Write checkpoint-<step>.pt and checkpoint-last.pt; prune numbered ones beyond ``keep``."""
        buf = io.BytesIO()
        torch.save(ckpt, buf)
        data = buf.getvalue()
        if keep > 0:
            atomic_write_bytes(self.ckpt_dir / f"checkpoint-{step}.pt", data)
        atomic_write_bytes(self.last, data)
        for old in self.checkpoints()[max(keep, 0):]:
            old.unlink(missing_ok=True)

    def append_metrics(self, record: dict) -> None:
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
