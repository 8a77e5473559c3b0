"""Checkpoints: a plain dict of tensors, numbers and strings, written atomically and loaded safely.

A checkpoint -- {model, ema, optimizer, step, rng, recipe, meta, version} -- loads with
``torch.load(weights_only=True)`` and an explicit allowlist of globals, so nothing in it can run code when
loaded; a file that would need code is refused (``UnsafeCheckpointError``), never skipped.
"""
from __future__ import annotations

import io
import re
from pathlib import Path

import torch

from sandbox.errors import UserError
from sandbox.run.files import atomic_write_bytes

# Globals a checkpoint may reference beyond what torch's weights-only unpickler admits by itself
# (tensors, storages, dtypes, OrderedDict, plain containers, numbers, strings). Sandbox checkpoints
# need nothing more, so the list is empty; a caller importing a foreign file (e.g. an official MAR
# checkpoint, whose ``args`` is an argparse.Namespace) names the few classes it needs per call.
SAFE_GLOBALS: tuple = ()


class UnsafeCheckpointError(UserError):
    """A file that would need arbitrary code (a non-allowlisted global) to unpickle: refused, never skipped."""


def save_checkpoint(obj: dict, path: Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


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
