"""Run directories, crash-safe checkpoint writes and safe checkpoint loads.

A run directory holds:
    recipe.yaml               the fully resolved recipe (re-runnable with --config)
    checkpoints/checkpoint-last.pt  the newest checkpoint, and the last few numbered ones
    checkpoints/checkpoint-best.pt  the best by a metric, when the recipe sets train.best_metric
    metrics.jsonl             one JSON object per logged step
    samples/                  sample grids written during training

A checkpoint is a plain dict of tensors, numbers and strings -- {model, ema,
optimizer, step, rng, recipe, meta, version} -- so it loads with
``torch.load(weights_only=True)``; nothing in it can run code when loaded.

Crash safety: a checkpoint is written once to a temporary file, flushed and
fsynced, then renamed into place (``checkpoint-last.pt`` first, then the
numbered and best names, as hard links to the same bytes where the file
system has them). A kill at any moment leaves every name either the old
complete file or the new complete file. Loading the newest checkpoint skips
(and reports) one that is unreadable, falling back to the previous one.
"""
from __future__ import annotations

import errno
import io
import json
import os
import re
import shutil
import sys
from pathlib import Path

import torch
import yaml

from sandbox.errors import UserError

LAST = "checkpoint-last.pt"
BEST = "checkpoint-best.pt"

# Globals a checkpoint may reference beyond what torch's weights-only unpickler admits by itself
# (tensors, storages, dtypes, OrderedDict, plain containers, numbers, strings). Sandbox checkpoints
# need nothing more, so the list is empty; a caller importing a foreign file (e.g. an official MAR
# checkpoint, whose ``args`` is an argparse.Namespace) names the few classes it needs per call.
SAFE_GLOBALS: tuple = ()


class UnsafeCheckpointError(UserError):
    """A file that would need arbitrary code (a non-allowlisted global) to unpickle: refused, never skipped."""


# --------------------------------------------------------------------------------------
# Atomic writes
# --------------------------------------------------------------------------------------
def _write_file(path: Path, data: bytes) -> None:
    """Write, flush and fsync one file (the single place bytes reach the disk; tests patch it
    to simulate a full disk)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """Make renames in ``path`` durable (best effort: some file systems cannot fsync a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def atomic_write_bytes(path: Path, data: bytes, also: tuple[Path, ...] | list[Path] = ()) -> None:
    """Write ``data`` to ``path`` (and the names in ``also``, same directory) so that a crash at any
    moment leaves each name either the old file or the new one, never a torn one.

    The bytes are written once to a temporary file, fsynced, and renamed into place; the extra
    names are hard links to the same file where the file system supports them (one write, one
    copy on disk), a second written copy otherwise. Names are published in order: ``path`` first.
    """
    names = [Path(path), *map(Path, also)]
    tmp = _tmp_name(names[0])
    staged: list[Path] = [tmp]
    try:
        _write_file(tmp, data)
        for name in names[1:]:  # stage every extra name before publishing any: a full disk fails here
            link = _tmp_name(name)
            link.unlink(missing_ok=True)
            try:
                os.link(tmp, link)
            except OSError:  # no hard links here (FAT, some network file systems): write a copy
                _write_file(link, data)
            staged.append(link)
        for src, dst in zip(staged, names):
            os.replace(src, dst)
    except OSError as e:
        for p in staged:
            p.unlink(missing_ok=True)
        raise UserError(f"could not write {names[0]}: {e.strerror or e}; the previous file is intact") from e
    for parent in {n.parent for n in names}:
        _fsync_dir(parent)


def save_checkpoint(obj: dict, path: Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


# --------------------------------------------------------------------------------------
# Safe loads
# --------------------------------------------------------------------------------------
def load_checkpoint(path: Path, map_location="cpu", safe_globals: tuple | list = (), mmap: bool = False):
    """Load a checkpoint with ``weights_only=True`` and an explicit allowlist of globals:
    ``SAFE_GLOBALS`` plus ``safe_globals`` (e.g. ``[argparse.Namespace]`` for an official file). Every
    checkpoint the project reads comes through here (tests/test_reliability.py checks the source).

    A file that references any other global (a class or function: the way a pickle runs code) is
    refused with ``UnsafeCheckpointError``; an unreadable or truncated one raises ``UserError``.
    ``mmap``: map a (zip-format) file instead of reading it, for multi-GB files whose parts are needed.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        with torch.serialization.safe_globals([*SAFE_GLOBALS, *safe_globals]):
            try:
                return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
            except RuntimeError as e:  # a pre-1.6 (non-zip) file cannot be memory-mapped: read it whole
                if not (mmap and "mmap can only be used" in str(e)):
                    raise
                return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        inner = str(e.__cause__ or e)  # torch wraps the unpickler's reason in advice to drop weights_only
        unsafe = re.search(r"Unsupported (?:global|class):? (?:GLOBAL )?([\w.<>]+)", inner)
        if unsafe:
            raise UnsafeCheckpointError(
                f"refusing to load {path}: it references {unsafe.group(1)}, which would run code when unpickled; "
                "only checkpoints of tensors, numbers and strings are loaded (re-save a trusted file's state dicts)"
            ) from None
        msg = " ".join(str(e).split())
        msg = re.sub(r"^Weights only load failed\..*WeightsUnpickler error: ", "", msg).split(". ")[0]
        raise UserError(f"checkpoint {path} is unreadable or truncated ({type(e).__name__}: {msg[:120]})") from e


def state_mismatch(e: RuntimeError, shown: int = 3) -> str:
    """``load_state_dict``'s error (every key on one of several lines) as one short line: which keys are
    missing, unexpected or of another shape, the first ``shown`` of each."""
    lines = [line.strip().rstrip(". ") for line in str(e).splitlines()[1:]]
    parts = []
    for label, pattern in (("missing from the checkpoint", "Missing key(s) in state_dict: "),
                           ("not in the model", "Unexpected key(s) in state_dict: ")):
        for line in lines:
            if line.startswith(pattern):
                keys = re.findall(r'"([^"]+)"', line)
                more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
                parts.append(f"{label}: {', '.join(keys[:shown])}{more}")
    sizes = [re.sub(r"size mismatch for (\S+): copying a param with shape torch.Size\((.*)\) from checkpoint, "
                    r"the shape in current model is torch.Size\((.*)\)", r"\1 (checkpoint \2, model \3)",
                    line) for line in lines if line.startswith("size mismatch for ")]
    if sizes:
        more = f" and {len(sizes) - shown} more" if len(sizes) > shown else ""
        parts.append(f"other shapes: {', '.join(sizes[:shown])}{more}")
    return "; ".join(parts) or str(e).splitlines()[0]


def _step_of(path: Path) -> int:
    return int(path.stem.split("-")[1])


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------
# Run directories
# --------------------------------------------------------------------------------------
class RunDir:
    """Paths and bookkeeping of one run directory."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.loaded_path: Path | None = None  # the file ``load_latest`` used

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
    def best(self) -> Path:
        return self.ckpt_dir / BEST

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

    def create(self, reserve_bytes: int = 0) -> None:
        """Make the directories and check, before any work starts, that they are writable (a probe
        write) and that the file system has ``reserve_bytes`` free beyond the checkpoints already there."""
        existing = next((p for p in (self.root, *self.root.parents) if p.exists()), Path("/"))
        if reserve_bytes > 0 and existing.is_dir():
            needed = reserve_bytes - self.checkpoint_bytes()
            free = shutil.disk_usage(existing).free
            if needed > free:
                raise UserError(
                    f"not enough disk space for run directory {self.root}: its checkpoints need about "
                    f"{needed / 2**20:.0f} MiB more, {free / 2**20:.0f} MiB free; free space, use another "
                    "--run_dir or lower --train.keep_checkpoints"
                )
        try:
            for d in (self.root, self.ckpt_dir, self.samples_dir):
                d.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".write-probe-{os.getpid()}"
            _write_file(probe, b"ok")
            probe.unlink()
        except OSError as e:
            raise UserError(f"run directory {self.root} is not writable: {e.strerror or e}") from e
        self.remove_stale_temporaries()

    def remove_stale_temporaries(self) -> None:
        """Temporary files of writers that died mid-write (a SIGKILL during a save): never published, safe
        to drop. A live process's are left alone (e.g. ``sandbox eval`` writing eval.json meanwhile); this
        process's own can only be left from an earlier failed call."""
        for d in (self.root, self.ckpt_dir, self.samples_dir):
            for tmp in d.glob(".*.tmp*"):
                pid = tmp.name.rsplit(".tmp", 1)[1]
                if pid.isdigit() and (int(pid) == os.getpid() or not _alive(int(pid))):
                    tmp.unlink(missing_ok=True)

    def checkpoint_bytes(self) -> int:
        """Disk space the checkpoints use now (hard-linked names counted once)."""
        seen, total = set(), 0
        for p in self.ckpt_dir.glob("checkpoint-*.pt") if self.ckpt_dir.is_dir() else ():
            st = p.stat()
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
        return total

    def read_recipe(self) -> dict:
        try:
            return yaml.safe_load(self.recipe_path.read_text())
        except (OSError, yaml.YAMLError) as e:
            raise UserError(f"cannot read {self.recipe_path}: {e}") from e

    def write_recipe(self, recipe: dict) -> None:
        atomic_write_bytes(self.recipe_path, yaml.safe_dump(recipe, sort_keys=False).encode())

    def checkpoints(self) -> list[Path]:
        """Numbered checkpoints, newest first."""
        return sorted(self.ckpt_dir.glob("checkpoint-[0-9]*.pt"), key=_step_of, reverse=True)

    def load_latest(self, map_location="cpu") -> dict | None:
        """The newest checkpoint that loads (``checkpoint-last.pt``, then the numbered ones, newest
        first). An unreadable or truncated one is reported on stderr and the previous one is used;
        one that would need code to unpickle stops everything (``UnsafeCheckpointError``)."""
        candidates = [self.last] if self.last.is_file() else []
        candidates += self.checkpoints()
        errors = []
        for path in candidates:
            try:
                ckpt = load_checkpoint(path, map_location)
            except UnsafeCheckpointError:
                raise
            except UserError as e:
                errors.append(str(e).replace(str(path), path.name))
                continue
            if errors:
                _warn(f"skipped {len(errors)} unreadable checkpoint(s) ({'; '.join(errors)}); "
                      f"using {path.name} (step {ckpt.get('step', '?')})")
            self.loaded_path = path
            return ckpt
        if errors:
            raise UserError(f"no readable checkpoint in {self.ckpt_dir}: {'; '.join(errors)}")
        return None

    def save(self, ckpt: dict, step: int, keep: int, best: bool = False) -> Path:
        """Write ``checkpoint-last.pt``, ``checkpoint-<step>.pt`` (if ``keep`` > 0) and, if ``best``,
        ``checkpoint-best.pt``; prune numbered ones beyond ``keep``. Returns the numbered path (or the
        last one when none are kept). On failure (a full disk) nothing is pruned and the previous
        checkpoints are intact."""
        buf = io.BytesIO()
        torch.save(ckpt, buf)
        numbered = self.ckpt_dir / f"checkpoint-{step}.pt"
        names = [numbered] if keep > 0 else []
        names += [self.best] if best else []
        try:
            atomic_write_bytes(self.last, buf.getvalue(), also=names)
        except UserError as e:
            raise UserError(f"could not save the step-{step} checkpoint in {self.ckpt_dir}: "
                            f"{e.__cause__.strerror if isinstance(e.__cause__, OSError) else e}; the previous "
                            "checkpoints are intact: free space and run the same command to resume") from e
        for old in self.checkpoints()[max(keep, 0):]:
            old.unlink(missing_ok=True)
        return numbered if keep > 0 else self.last

    # -- metrics log ----------------------------------------------------------------
    def append_metrics(self, record: dict) -> None:
        try:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise UserError(f"could not append to {self.metrics_path}: {e.strerror or e}") from e

    def truncate_metrics(self, step: int) -> None:
        """On resume: drop records logged after ``step`` (the killed run's steps that will be redone)
        and a torn last line, so the log reads as one uninterrupted run."""
        if not self.metrics_path.is_file():
            return
        kept, changed = [], False
        for line in self.metrics_path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                changed = True
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] > step:
                changed = True
                continue
            kept.append(line)
        if changed:
            atomic_write_bytes(self.metrics_path, "".join(f"{line}\n" for line in kept).encode())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError as e:  # EPERM: it exists, owned by someone else
        return e.errno == errno.EPERM
    return True
