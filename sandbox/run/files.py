"""Crash-safe file writes: a temporary file, flushed, fsynced and renamed, so a kill at any moment leaves each
name either the old file or the new one, never a torn one. Every file the sandbox writes goes through here.

A write that fails (a full disk, a read-only file system) is one ``UserError`` line; its cleanup never raises
(on a read-only file system removing the temporary file fails too, and there is none to remove).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO, Callable, Union

from sandbox.errors import UserError

# what a file holds: its bytes, or a function that writes them into the open file (a 50k-image .npz is streamed,
# never held in memory twice)
Content = Union[bytes, Callable[[BinaryIO], object]]


def _write_file(path: Path, data: Content) -> None:
    """Write, flush and fsync one file (the single place bytes reach the disk; tests patch it
    to simulate a full disk)."""
    with open(path, "wb") as f:
        if callable(data):
            data(f)
        else:
            f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _discard(path: Path) -> None:
    """Remove a temporary file if there is one; a failure here must not hide the error that led here."""
    try:
        path.unlink(missing_ok=True)
    except OSError:
        pass


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


def atomic_write_bytes(path: Path, data: Content, also: tuple[Path, ...] | list[Path] = ()) -> None:
    """Write ``data`` (bytes, or a function writing into the open binary file) to ``path`` (and the names in
    ``also``, same directory) so that a crash at any moment leaves each name either the old file or the new
    one, never a torn one. The folder is made when missing.

    The bytes are written once to a temporary file, fsynced, and renamed into place; the extra
    names are hard links to the same file where the file system supports them (one write, one
    copy on disk), a second written copy otherwise. Names are published in order: ``path`` first.
    """
    names = [Path(path), *map(Path, also)]
    tmp = _tmp_name(names[0])
    staged: list[Path] = [tmp]
    try:
        names[0].parent.mkdir(parents=True, exist_ok=True)
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
            _discard(p)
        raise UserError(f"could not write {names[0]}: {e.strerror or e}; the previous file is intact") from e
    for parent in {n.parent for n in names}:
        _fsync_dir(parent)
