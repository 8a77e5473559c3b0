"""Checkpoints: a plain dict of tensors, numbers and strings, written atomically and loaded safely.

A checkpoint -- {model, ema, optimizer, step, rng, recipe, meta, version} -- loads with
``torch.load(weights_only=True)`` and an explicit allowlist of globals, so nothing in it can run code when
loaded; a file that would need code is refused (``UnsafeCheckpointError``), never skipped.
"""
from __future__ import annotations

import _compat_pickle
import io
import pickletools
import re
import struct
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
    allowed = [*SAFE_GLOBALS, *safe_globals]
    try:
        with torch.serialization.safe_globals(allowed):
            try:
                return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
            except RuntimeError as e:  # a pre-1.6 (non-zip) file cannot be memory-mapped: read it whole
                if not (mmap and "mmap can only be used" in str(e)):
                    raise
                return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        forbidden = _forbidden_globals(path, allowed) or _refused_in_words(e)
        if forbidden:
            raise UnsafeCheckpointError(
                f"refusing to load {path}: it references {', '.join(forbidden[:3])}, which would run code when "
                "unpickled; only checkpoints of tensors, numbers and strings are loaded (re-save a trusted file's "
                "state dicts)") from None
        msg = " ".join(str(e).split())
        msg = re.sub(r"^Weights only load failed\..*WeightsUnpickler error: ", "", msg).split(". ")[0]
        raise UserError(f"checkpoint {path} is unreadable or truncated ({type(e).__name__}: {msg[:120]})") from e


def load_cached(path: Path):
    """A cache file the sandbox wrote (scorer weights, reference features): its contents, or None when it is
    missing or unreadable (the caller recomputes it). One that needs code to unpickle was planted: it is
    refused (``UnsafeCheckpointError``), never recomputed over, so the evidence stays."""
    try:
        return load_checkpoint(path)
    except UnsafeCheckpointError:
        raise
    except UserError:
        return None


# --------------------------------------------------------------------------------------
# Why a load failed: a forbidden global, whatever torch's wording
# --------------------------------------------------------------------------------------
# torch's words for refusing a global differ by version ("Unsupported global: GLOBAL builtins.exec was not an
# allowed global", 2.14's "unsupported GLOBAL posix.system whose module posix is blocked", ...): a fallback only,
# for a file whose pickle cannot be found; the file's own globals decide first (_forbidden_globals)
_REFUSAL_WORDS = re.compile(r"unsupported global|whose module \S+ is blocked|not an allowed global|allowlist|"
                            r"unrecognized function", re.I)
_STRING_OPS = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8"}
_GLOBAL_MODULES = {"torch", "collections", "_codecs"}  # torch's own allowlist, where torch does not expose it


def _refused_in_words(e: BaseException) -> list[str]:
    text = f"{e} {e.__cause__ or ''}"
    if not _REFUSAL_WORDS.search(text):
        return []
    named = re.search(r"GLOBAL ([\w.]+)", text, re.I)
    return [named.group(1).removeprefix("builtins.") if named else "a global it may not"]


def _forbidden_globals(path: Path, allowed) -> list[str]:
    """The globals (classes, functions) a file's pickles reference beyond torch's weights-only allowlist and
    ``allowed``, read statically (nothing is imported or called); [] when none or the pickle is not found."""
    try:
        from torch._weights_only_unpickler import _get_allowed_globals

        known = set(_get_allowed_globals())
    except Exception:  # a torch without it: judge by module
        known = None
    user = {f"{g.__module__}.{g.__qualname__}" if not isinstance(g, tuple) else g[1] for g in allowed}

    def ok(name: str) -> bool:
        return name in user or (name.split(".")[0] in _GLOBAL_MODULES if known is None else name in known)

    found = []
    for name in _file_globals(path):
        shown = name.removeprefix("builtins.")
        if not ok(name) and shown not in found:
            found.append(shown)
    return found


def _file_globals(path: Path) -> list[str]:
    """Every global in a checkpoint file's pickles: a zip's ``data.pkl`` (also of a torn zip, from its local
    headers), or the first pickles of a legacy file (magic number, protocol, system info, the object, keys)."""
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"PK\x03\x04":
                f.seek(0)
                return [g for _ in range(5) for g in _pickle_globals(f)]
            start = _zip_record(f, "data.pkl")
            if start is None:
                return []
            f.seek(start)
            return _pickle_globals(f)
    except OSError:
        return []


def _zip_record(f, suffix: str) -> int | None:
    """Offset of the data of the first zip record whose name ends with ``suffix``, from the local headers
    (torch writes records uncompressed; a torn file has no central directory to read)."""
    pos = 0
    while True:
        f.seek(pos)
        header = f.read(30)
        if len(header) < 30 or header[:4] != b"PK\x03\x04":
            return None
        flags, size, name_len, extra_len = (struct.unpack_from("<H", header, 6)[0],
                                            *struct.unpack_from("<I", header, 18), *struct.unpack_from("<HH", header, 26))
        name = f.read(name_len).decode("utf-8", "replace")
        start = pos + 30 + name_len + extra_len
        if name.endswith(suffix):
            return start
        if flags & 8 or size == 0xFFFFFFFF:  # size in a trailing descriptor or a zip64 field: stop looking
            return None
        pos = start + size


def _python3_name(module: str, name: str) -> str:
    """A protocol-2 pickle's global as Python 3 unpickles it (``__builtin__ exec`` is ``builtins.exec``)."""
    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
    return f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{name}"


def _pickle_globals(f) -> list[str]:
    """The globals one pickle references (GLOBAL, INST, and STACK_GLOBAL with the two strings before it), read
    with pickletools; a torn pickle gives those before the tear."""
    found, memo, strings, top = [], {}, [], None
    try:
        for op, arg, _ in pickletools.genops(f):
            if op.name in _STRING_OPS:
                top = arg if isinstance(arg, str) else bytes(arg).decode("latin-1")
                strings.append(top)
                continue
            if op.name in ("GLOBAL", "INST"):
                found.append(_python3_name(*arg.split(" ", 1)))
            elif op.name == "STACK_GLOBAL":
                found.append(".".join(strings[-2:]) if len(strings) >= 2 else "an unnamed global")
            elif op.name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):  # the stack is unchanged
                memo[len(memo) if op.name == "MEMOIZE" else arg] = top
                continue
            elif op.name in ("GET", "BINGET", "LONG_BINGET"):
                top = memo.get(arg)
                if isinstance(top, str):
                    strings.append(top)
                continue
            top = None
    except Exception:  # torn or not a pickle: what was read so far
        pass
    return found


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
