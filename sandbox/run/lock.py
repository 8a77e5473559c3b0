"""One writer per run directory: ``train``, ``train-tokenizer`` and ``cache --out`` hold an exclusive lock on
``DIR/.lock`` for the whole command, and a second writer is refused with one line naming the holder.

The lock is a POSIX record lock (``fcntl.lockf``). The kernel drops it when its process dies, however it dies
(a SIGKILL, the OOM killer), so a killed run's lock never blocks the next one. Not ``flock``: a flock belongs to
the open file, which forked loader workers share, so a SIGKILLed trainer's orphaned workers would hold its lock
until they notice their parent is gone; a record lock belongs to the process alone. Its one trap -- closing
*any* descriptor of the file in the holding process releases it -- is why a process never opens a lock file it
holds (``_held``). The file holds the holder's pid, host, command and start time, for the refusal.

Where there is no lock to take (no ``fcntl``, as on Windows, or a file system without record locks), the command
warns once and runs unlocked.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from sandbox.errors import UserError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

LOCK_NAME = ".lock"
_held: set[Path] = set()  # the directories this process holds: a record lock does not exclude its own process
_UNSUPPORTED = {errno.ENOLCK, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)}
_HOLDER_WAIT = 1.0  # seconds a refused writer waits for a new holder to write its name (it does so at once)


@contextmanager
def run_lock(root: str | Path, what: str = "run directory", flag: str = "--run_dir"):
    """Hold ``root``'s lock for the block, creating ``root`` if needed; a directory it created and that holds
    nothing else afterwards is removed again (a refused command leaves nothing behind).

    Under torchrun rank 0 takes the lock (it alone writes the run directory) and every rank learns the
    outcome, so a refused job stops on all its ranks instead of leaving them waiting for rank 0."""
    from sandbox.run import distributed

    root, me = Path(root), distributed.info()
    taken, refusal = None, None
    if me.is_main:
        try:
            taken = _acquire(root, what, flag)
        except UserError as e:
            refusal = str(e)
    if me.enabled:
        refusal = distributed.gather_objects(refusal, dst=None)[0]
    if refusal is not None:
        raise UserError(refusal)
    try:
        yield
    finally:
        if taken is not None:
            _release(root, *taken)


def _acquire(root: Path, what: str, flag: str) -> tuple[int | None, list[Path]]:
    """Lock ``root``: (the lock file's descriptor, or None when unlocked, and the directories made for it)."""
    key = root.resolve()
    if key in _held:
        raise UserError(_refusal(root, what, flag, _describe(os.getpid(), "this process")))
    created = [d for d in (root, *root.parents) if not d.exists()][::-1]  # outermost first
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{what} {root} is not writable: {e.strerror or e}") from e
    if fcntl is None:
        _warn_unlocked(root, "this platform has no POSIX record locks")
        return None, created
    path, deadline = root / LOCK_NAME, time.monotonic() + _HOLDER_WAIT
    while True:
        fd = _try_lock(path, root, what)
        if isinstance(fd, int):
            _held.add(key)
            return fd, created
        if fd == "unsupported":
            _warn_unlocked(root, "its file system does not support record locks")
            return None, created
        holder = _read_holder(path)  # fd is None: another process holds it (or just let go)
        if holder is not None or time.monotonic() > deadline:
            _remove_created(created)
            raise UserError(_refusal(root, what, flag, holder or "another process (it gave no name)"))
        time.sleep(0.05)


def _try_lock(path: Path, root: Path, what: str) -> int | str | None:
    """The locked descriptor of ``path`` with this process's name in it; None when another process holds it,
    "unsupported" when the file system cannot lock."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UserError(f"{what} {root} is not writable: {e.strerror or e}") from e
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EACCES, errno.EAGAIN):
            return None
        if e.errno in _UNSUPPORTED:
            return "unsupported"
        raise UserError(f"cannot lock {what} {root}: {e.strerror or e}") from e
    try:  # a holder unlinks the file as it leaves: the lock must be on the file that the name holds now
        same = os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        same = False
    if not same:
        os.close(fd)
        return None
    command = " ".join(["sandbox", *sys.argv[1:]])
    info = {"pid": os.getpid(), "host": socket.gethostname(), "command": command[:200],
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(info).encode())
    return fd


def _release(root: Path, fd: int | None, created: list[Path]) -> None:
    if fd is not None:
        (root / LOCK_NAME).unlink(missing_ok=True)  # while still held, so no one locks a file about to go
        os.close(fd)
        _held.discard(root.resolve())
    _remove_created(created)


def _remove_created(created: list[Path]) -> None:
    """Remove the directories the lock made, innermost first, as long as they are empty."""
    for d in reversed(created):
        try:
            d.rmdir()
        except OSError:
            return


def _read_holder(path: Path) -> str | None:
    try:
        info = json.loads(path.read_text())
        return _describe(int(info["pid"]), f"host {info['host']}", info.get("command"), info.get("since"))
    except (OSError, ValueError, KeyError, TypeError):
        return None  # not written yet, or gone


def _describe(pid: int, where: str, command: str | None = None, since: str | None = None) -> str:
    if where == "this process":
        where = f"host {socket.gethostname()}"
        command = command or "this process"
    details = "; ".join(x for x in (command, f"since {since}" if since else None) if x)
    return f"pid {pid} on {where} ({details})"


def _refusal(root: Path, what: str, flag: str, holder: str) -> str:
    return f"{what} {root} is in use by {holder}; wait for it to end, stop it, or use another {flag}"


def _warn_unlocked(root: Path, why: str) -> None:
    print(f"warning: {root} is not locked against a second writer: {why}; run one command at a time in it",
          file=sys.stderr, flush=True)
