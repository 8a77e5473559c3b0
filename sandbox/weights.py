"""Where pretrained weights and computed caches live, and finding a weight file or saying which one is missing.

Nothing downloads at run time. A weight file comes from, in order: an explicit path (a command-line
option), an environment variable, or a known file name in ``$SANDBOX_CACHE/weights`` or torch.hub's
checkpoint folder (``$TORCH_HOME/hub/checkpoints``, where a library that was allowed to download once
left it). Missing, it is one ``UserError`` naming the file and where to put it.
"""
from __future__ import annotations

import os
from pathlib import Path

from sandbox.errors import UserError


def cache_dir() -> Path:
    """``$SANDBOX_CACHE``, default ``~/.cache/mar-sandbox``: trained scorers, feature caches, weights."""
    return Path(os.environ.get("SANDBOX_CACHE", Path.home() / ".cache" / "mar-sandbox"))


def search_dirs() -> list[Path]:
    import torch.hub

    return [cache_dir() / "weights", Path(torch.hub.get_dir()) / "checkpoints"]


def find_weights(explicit: str | os.PathLike | None, env: str, filenames: tuple[str, ...], what: str,
                 option: str, source: str, alternative: str | None = None) -> Path:
    """The weight file to load, or a UserError that names it and where it goes.

    ``filenames``: accepted names (the first is the one to download); ``option``: the command-line flag;
    ``source``: where the file can be obtained, for the message; ``alternative``: a way to run without the
    file, appended to the message (e.g. a setting that does not need it).
    """
    otherwise = f"; or {alternative}" if alternative else ""
    for given, how in ((explicit, option), (os.environ.get(env) or None, f"${env}")):
        if given:
            path = Path(given).expanduser()
            if not path.is_file():
                raise UserError(f"{what} weights not found at {path} (given by {how}); expected the file "
                                f"{filenames[0]}{otherwise}")
            return path
    for folder in search_dirs():
        for name in filenames:
            if (folder / name).is_file():
                return folder / name
    where = " or ".join(str(d) for d in search_dirs())
    raise UserError(f"{what} weights are needed and nothing downloads here: put {filenames[0]} ({source}) in "
                    f"{where}, or pass {option} PATH, or set {env}{otherwise}")
