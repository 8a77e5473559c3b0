"""Keep freed CPU memory inside the process, so that large tensors stop page-faulting at every step.

glibc's malloc serves blocks above its mmap threshold with a fresh ``mmap`` and
returns free memory at the top of the heap to the system once it exceeds the
trim threshold. Both start small and adapt, but a training or sampling step
frees and re-allocates activations of many sizes (0.1-30 MB on the fixture
models), so the same memory is given back and faulted in again (the kernel zeroes
every 4 KiB page on first touch); numbers in docs/performance.md ("Allocator").
The PyTorch CPU tuning guide reaches the same end by preloading jemalloc or
tcmalloc; this needs no extra library.

The command line (``sandbox ...``) calls :func:`keep_freed_memory` once at start;
``SANDBOX_MALLOC=default`` leaves malloc alone, and so does any ``MALLOC_*``
variable set by the user. The cost: up to ``trim_mb`` of freed memory stays
in the process (the peak resident memory ``sandbox bench`` reports includes it).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameter numbers from glibc's malloc.h
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc refuses larger mmap thresholds on 64-bit systems


def keep_freed_memory(trim_mb: int = 512) -> bool:
    """Set glibc's mmap threshold to its maximum (32 MiB) and the trim threshold to ``trim_mb``.
    Returns True when applied; False on other C libraries or when opted out (nothing changes then)."""
    if os.environ.get("SANDBOX_MALLOC", "") == "default" or any(k.startswith("MALLOC_") for k in os.environ):
        return False
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_mb << 20))
