"""Crash-safe file writes: a temporary file, flushed, fsynced and renamed, so a kill at any moment leaves each
name either the old file or the new one, never a torn one. Every file the sandbox writes goes through here.
"""
from __future__ import annotations

import os
from pathlib import Path

from sandbox.errors import UserError


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
