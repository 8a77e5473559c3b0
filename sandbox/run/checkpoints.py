"""Checkpoints: a plain dict of tensors, numbers and strings, written atomically and loaded safely.

A checkpoint -- {model, ema, optimizer, step, rng, recipe, meta, version, checksum} -- loads with
``torch.load(weights_only=True)`` and an explicit allowlist of globals, so nothing in it can run code when
loaded; a file that would need code is refused (``UnsafeCheckpointError``), never skipped. A run's
checkpoint carries a SHA-256 of its contents (``content_digest``), checked when a run directory loads it.
"""
from __future__ import annotations

import _compat_pickle
import hashlib
import io
import os
import pickletools
import re
import struct
from concurrent.futures import ThreadPoolExecutor
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


# --------------------------------------------------------------------------------------
# What a run's checkpoint holds, and its checksum
# --------------------------------------------------------------------------------------
CHECKSUM = "checksum"  # {"sha256": hex digest of everything else in the checkpoint (content_digest)}
HASH_THREADS = min(8, os.cpu_count() or 1)  # tensors hash in parallel (hashlib lets go of the GIL); 8 caps what a save takes
# what every run checkpoint holds (the trainer's, the tokenizer trainer's, an imported official one), by type
RUN_KEYS = {"model": dict, "optimizer": dict, "step": int, "recipe": dict, "meta": dict}


def run_checkpoint_problem(ckpt) -> str | None:
    """Why a loaded object is not a run's checkpoint (a bare tensor, ``{}``, a missing or mistyped key), or None."""
    if not isinstance(ckpt, dict):
        return f"not a run checkpoint (a {type(ckpt).__name__}, not a dict)"
    missing = [k for k in RUN_KEYS if k not in ckpt]
    if missing:
        return f"not a run checkpoint (no {', '.join(missing)})"
    wrong = [k for k, t in RUN_KEYS.items() if not isinstance(ckpt[k], t) or isinstance(ckpt[k], bool)]
    if wrong:
        return f"not a run checkpoint ({', '.join(f'{k} is a {type(ckpt[k]).__name__}' for k in wrong)})"
    return None


def content_digest(ckpt: dict) -> str:
    """SHA-256 over every tensor's bytes (with its dtype and shape) and every other value of a checkpoint, in a
    fixed order (by key path), leaving out the checksum itself. Computed the same before saving and after
    loading, on any device, so garbled bytes that still load (bit rot, a bad copy) are caught. Each tensor is
    hashed on its own, in threads (hashlib lets go of the GIL), and the digests are hashed in order."""
    leaves = list(_leaves({k: v for k, v in ckpt.items() if k != CHECKSUM}, ()))
    tensors = [v for _, v in leaves if isinstance(v, torch.Tensor)]
    with ThreadPoolExecutor(HASH_THREADS) as pool:
        digests = iter(list(pool.map(_tensor_digest, tensors)))
    h = hashlib.sha256()
    for where, value in leaves:
        h.update(repr(where).encode())
        h.update(next(digests) if isinstance(value, torch.Tensor) else f"{type(value).__name__}:{value!r}".encode())
    return h.hexdigest()


def _tensor_digest(t: torch.Tensor) -> bytes:
    t = t.detach().cpu().contiguous()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().data)  # the bytes as stored, for any dtype
    return h.digest()


def _leaves(value, where: tuple):
    """(key path, value) of every tensor and plain value, dict keys sorted (by repr: keys of mixed types)."""
    if isinstance(value, dict):
        for k in sorted(value, key=repr):
            yield from _leaves(value[k], (*where, k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _leaves(v, (*where, i))
    else:
        yield where, value


def with_checksum(ckpt: dict) -> dict:
    return {**{k: v for k, v in ckpt.items() if k != CHECKSUM}, CHECKSUM: {"sha256": content_digest(ckpt)}}


def checksum_problem(ckpt: dict) -> str | None:
    """Why a checkpoint's contents do not match its stored checksum, or None when they do. A checkpoint
    written before checksums has none: it passes (``has_checksum`` tells it apart)."""
    if not has_checksum(ckpt):
        return None
    if content_digest(ckpt) != ckpt[CHECKSUM]["sha256"]:
        return "its contents do not match their checksum (damaged on disk or in a copy)"
    return None


def has_checksum(ckpt: dict) -> bool:
    return isinstance(ckpt.get(CHECKSUM), dict) and isinstance(ckpt[CHECKSUM].get("sha256"), str)


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
                            r"unrecognized function", re.IGNORECASE)
_STRING_OPS = {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8"}
_GLOBAL_MODULES = {"torch", "collections", "_codecs"}  # torch's own allowlist, where torch does not expose it


def _refused_in_words(e: BaseException) -> list[str]:
    text = f"{e} {e.__cause__ or ''}"
    if not _REFUSAL_WORDS.search(text):
        return []
    named = re.search(r"GLOBAL ([\w.]+)", text, re.IGNORECASE)
    return [named.group(1).removeprefix("builtins.") if named else "a global it may not"]


def _forbidden_globals(path: Path, allowed) -> list[str]:
    """The globals (classes, functions) a file's pickles reference beyond torch's weights-only allowlist and
    ``allowed``, read statically (nothing is imported or called); [] when none or the pickle is not found."""
    try:
        from torch._weights_only_unpickler import _get_allowed_globals

        known = set(_get_allowed_globals())
    except (ImportError, AttributeError, TypeError):  # a torch without it (private API): judge by module
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
    except Exception:  # noqa: BLE001 -- torn or not a pickle at all: the globals read so far
        return found
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
