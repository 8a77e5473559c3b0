"""Run directories: what a run writes where, and its checkpoints' bookkeeping.

A run directory holds:
    recipe.yaml               the fully resolved recipe (re-runnable with --config)
    checkpoints/checkpoint-last.pt  the newest checkpoint, and the last few numbered ones
    checkpoints/checkpoint-best.pt  the best by a metric, when the recipe sets train.best_metric
    metrics.jsonl             one JSON object per logged step
    samples/                  sample grids written during training

Crash safety: a checkpoint is written once to a temporary file, flushed and fsynced, then renamed into place
(``checkpoint-last.pt`` first, then the numbered and best names, as hard links to the same bytes where the
file system has them). A kill at any moment leaves every name either the old complete file or the new
complete file. Loading the newest checkpoint skips (and reports) one that is unreadable, of the wrong shape
or whose contents do not match their checksum, falling back to the previous one.

Independence: the names of one save share their bytes, so damage in place to ``checkpoint-last.pt`` damages
the newest numbered checkpoint too. Before a save publishes, the newest checkpoint known good (written or
verified by this process) becomes ``checkpoint-prev.pt``, a hard link to it (no copy, no write): a separate
file from the new one, and the fallback that ``keep_checkpoints: 1`` (or 0) would otherwise not leave.
"""
from __future__ import annotations

import errno
import io
import json
import os
import shutil
import sys
from pathlib import Path

import torch
import yaml

from sandbox.errors import UserError
from sandbox.run import files
from sandbox.run.checkpoints import (
    UnsafeCheckpointError,
    checksum_problem,
    has_checksum,
    load_checkpoint,
    run_checkpoint_problem,
    with_checksum,
)
from sandbox.run.files import atomic_write_bytes

LAST = "checkpoint-last.pt"
BEST = "checkpoint-best.pt"
PREV = "checkpoint-prev.pt"


def _step_of(path: Path) -> int:
    return int(path.stem.split("-")[1])


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


class RunDir:
    """Paths and bookkeeping of one run directory."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.loaded_path: Path | None = None  # the file ``load_latest`` used
        # the newest checkpoint known good: verified against its checksum by ``load_latest``, or written by ``save``
        # (None: none yet, or only one written before checksums); the non-finite guard names only this one
        self.verified: Path | None = None
        self.recipe_damaged = False  # ``read_recipe`` found recipe.yaml damaged and used a checkpoint's recipe

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
    def prev(self) -> Path:
        return self.ckpt_dir / PREV

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
            files._write_file(probe, b"ok")  # through the module: tests patch it to fill the disk
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
        """recipe.yaml. A damaged one (not UTF-8, not YAML, not a mapping) is stood in for by the recipe the newest
        readable checkpoint stores, with one warning: that copy is the one ``sample`` and ``eval`` load, so the
        run is judged by what it trained, and a resumed ``train`` writes recipe.yaml from it again. Without such
        a checkpoint there is nothing to go by: one error line."""
        try:
            recipe = yaml.safe_load(self.recipe_path.read_bytes().decode("utf-8"))
            damage = None if isinstance(recipe, dict) else f"it holds {type(recipe).__name__}, not a recipe"
        except OSError as e:
            raise UserError(f"cannot read {self.recipe_path}: {e.strerror or e}") from e
        except (UnicodeDecodeError, yaml.YAMLError) as e:
            damage = " ".join(str(e).split())
        if damage is None:
            return recipe
        stored, source = self._checkpoint_recipe()
        if stored is None:
            raise UserError(f"{self.recipe_path} is damaged ({damage}) and no readable checkpoint holds the run's "
                            "recipe: restore the file, or delete it to start this run directory afresh")
        _warn(f"{self.recipe_path} is damaged ({damage}); using the recipe stored in {source.name}")
        self.recipe_damaged = True
        return stored

    def _checkpoint_recipe(self) -> tuple[dict | None, Path | None]:
        """(the recipe, the checkpoint) of the newest checkpoint that reads and stores one; memory-mapped, so a
        multi-GB checkpoint costs milliseconds."""
        for path in ([self.last] if self.last.is_file() else []) + self.checkpoints():
            try:
                ckpt = load_checkpoint(path, mmap=True)
            except UnsafeCheckpointError:
                raise
            except UserError:
                continue
            if isinstance(ckpt, dict) and isinstance(ckpt.get("recipe"), dict):
                return ckpt["recipe"], path
        return None, None

    def write_recipe(self, recipe: dict) -> None:
        atomic_write_bytes(self.recipe_path, yaml.safe_dump(recipe, sort_keys=False).encode())

    def checkpoints(self) -> list[Path]:
        """Numbered checkpoints, newest first."""
        return sorted(self.ckpt_dir.glob("checkpoint-[0-9]*.pt"), key=_step_of, reverse=True)

    def load_latest(self, map_location="cpu") -> dict | None:
        """The newest usable checkpoint (``checkpoint-last.pt``, the numbered ones newest first, then
        ``checkpoint-prev.pt``). One that is unreadable, truncated, not a run's checkpoint (a bare tensor,
        missing keys) or whose contents do not match their checksum is reported on stderr and the previous one
        is used; one that would need code to unpickle stops everything (``UnsafeCheckpointError``)."""
        candidates = [p for p in (self.last, *self.checkpoints(), self.prev) if p.is_file()]
        errors = []
        for path in candidates:
            try:
                ckpt = load_checkpoint(path, map_location)
            except UnsafeCheckpointError:
                raise
            except UserError as e:
                errors.append(str(e).replace(str(path), path.name))
                continue
            problem = run_checkpoint_problem(ckpt) or checksum_problem(ckpt)
            if problem:
                errors.append(f"checkpoint {path.name}: {problem}")
                continue
            if errors:
                _warn(f"skipped {len(errors)} unusable checkpoint(s) ({'; '.join(errors)}); "
                      f"using {path.name} (step {ckpt['step']})")
            self.loaded_path = path
            self.verified = path if has_checksum(ckpt) else None
            return ckpt
        if errors:
            raise UserError(f"no usable checkpoint in {self.ckpt_dir}: {'; '.join(errors)}")
        return None

    def save(self, ckpt: dict, step: int, keep: int, best: bool = False) -> Path:
        """Write ``checkpoint-last.pt``, ``checkpoint-<step>.pt`` (if ``keep`` > 0) and, if ``best``,
        ``checkpoint-best.pt``, with the checksum of their contents; keep the newest checkpoint known good
        before this one as ``checkpoint-prev.pt``; prune numbered ones beyond ``keep``. Returns the numbered
        path (or the last one when none are kept). On failure (a full disk) nothing is pruned and the previous
        checkpoints are intact."""
        buf = io.BytesIO()
        torch.save(with_checksum(ckpt), buf)
        numbered = self.ckpt_dir / f"checkpoint-{step}.pt"
        names = [numbered] if keep > 0 else []
        names += [self.best] if best else []
        try:
            self._keep_previous()
            atomic_write_bytes(self.last, buf.getvalue(), also=names)
        except UserError as e:
            raise UserError(f"could not save the step-{step} checkpoint in {self.ckpt_dir}: "
                            f"{e.__cause__.strerror if isinstance(e.__cause__, OSError) else e}; the previous "
                            "checkpoints are intact: free space and run the same command to resume") from e
        for old in self.checkpoints()[max(keep, 0):]:
            old.unlink(missing_ok=True)
        self.verified = numbered if keep > 0 else self.last
        return self.verified

    def _keep_previous(self) -> None:
        """``checkpoint-prev.pt`` := the newest checkpoint known good, before the next save replaces
        ``checkpoint-last.pt``: a hard link (atomic, no bytes written), or a copy where there are no links."""
        good = self.verified
        if good is None or not good.is_file() or (self.prev.is_file() and os.path.samefile(good, self.prev)):
            return
        tmp = self.ckpt_dir / f".{PREV}.tmp{os.getpid()}"
        tmp.unlink(missing_ok=True)
        try:
            try:
                os.link(good, tmp)
            except OSError:  # no hard links here (FAT, some network file systems)
                shutil.copyfile(good, tmp)
            os.replace(tmp, self.prev)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise UserError(f"could not keep {good.name} as {PREV}: {e.strerror or e}") from e

    # -- metrics log ----------------------------------------------------------------
    def append_metrics(self, record: dict) -> None:
        try:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise UserError(f"could not append to {self.metrics_path}: {e.strerror or e}") from e

    def truncate_metrics(self, step: int) -> None:
        """On resume: drop records logged after ``step`` (the killed run's steps that will be redone)
        and a torn last line, so the log reads as one uninterrupted run; repair damaged records (one warning)."""
        if not self.metrics_path.is_file():
            return
        try:
            records, damaged, unterminated = load_metrics(self.metrics_path)
        except OSError as e:
            raise UserError(f"cannot read {self.metrics_path}: {e.strerror or e}") from e
        kept = [r for r in records if r["step"] <= step]
        if damaged:
            _warn(f"{self.metrics_path}: {damaged_lines(damaged)} repaired (a record that is not UTF-8 or JSON or "
                  "has no step is dropped, a value that is not a number removed)")
        if damaged or unterminated or len(kept) < len(records):  # rewritten whole, each line ended
            atomic_write_bytes(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept).encode())


def load_metrics(path: Path) -> tuple[list[dict], list[int], bool]:
    """(records, numbers of the damaged lines, whether the file lacks its final newline) of a metrics.jsonl.

    A record is a JSON object with an integer ``step``; its other values are numbers (NaN included). A line
    that is not UTF-8, not JSON or has no step is dropped and a value that is not a number (``"loss": null``)
    removed: both count as damaged. A last line without its newline is a write cut short by a kill (expected
    after a SIGKILL, so not damage): kept if it still reads as a record, else dropped."""
    *lines, last = path.read_bytes().split(b"\n")
    records, damaged = [], []
    for number, line in enumerate(lines, 1):
        record, clean = _metrics_record(line)
        if record is not None:
            records.append(record)
        if not clean:
            damaged.append(number)
    record, clean = _metrics_record(last)
    if record is not None and clean:
        records.append(record)
    return records, damaged, bool(last.strip())


def _metrics_record(line: bytes) -> tuple[dict | None, bool]:
    """(the record of one metrics.jsonl line or None, whether the line was clean); a blank line is clean."""
    if not line.strip():
        return None, True
    try:
        record = json.loads(line.decode("utf-8"))
    except ValueError:  # not UTF-8 (UnicodeDecodeError), not JSON (JSONDecodeError)
        return None, False
    if not isinstance(record, dict) or not _is_number(record.get("step"), integer=True):
        return None, False
    numbers = {k: v for k, v in record.items() if _is_number(v)}
    return numbers, len(numbers) == len(record)


def _is_number(value, integer: bool = False) -> bool:
    return isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)


def damaged_lines(numbers: list[int]) -> str:
    """'3 damaged lines (2, 5, 9)', at most ten numbers."""
    shown = ", ".join(map(str, numbers[:10])) + (", ..." if len(numbers) > 10 else "")
    return f"{len(numbers)} damaged line{'s' if len(numbers) > 1 else ''} ({shown})"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError as e:  # EPERM: it exists, owned by someone else
        return e.errno == errno.EPERM
    return True
