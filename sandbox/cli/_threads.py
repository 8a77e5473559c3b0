"""CPU threads for a command on a shared machine, chosen before torch starts its OpenMP runtime.

Torch runs one intra-op thread per core, and every parallel region waits for all of them. When another busy
process holds one of the cores, the thread that shares it runs only in the scheduler's slices, and the others
spin-wait for it on their own cores: on the 2-core CPU a quickstart step went from 0.33 to 2.3 s (measured, with
the other candidates, in docs/performance.md "A shared CPU"). So the command line, before it imports torch:

- shortens libgomp's spin before a waiting thread sleeps (``GOMP_SPINCOUNT``), so a busy neighbour costs a
  third of the speed rather than seven eighths, at a few percent when the machine is free;
- keeps one thread per core of its CPU affinity, whatever the load: float reductions split over threads round
  differently, so a thread count chosen from the load at start would make a seed's result (and the bitwise
  exact resume) depend on what else ran. ``SANDBOX_THREADS=auto`` takes only the cores left free at start (the
  affinity minus what other processes used over a short look at ``/proc/stat``): no crawl at all beside a
  process that is already busy, for runs that need not repeat bit for bit.

Both are read by the OpenMP runtime when torch loads it: set later, they do nothing. So they apply to the
``sandbox`` command only, never to a Python session that imported torch already. An explicit choice wins:
``SANDBOX_THREADS=N|auto``, else ``OMP_NUM_THREADS``; ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` keep the wait as
set.
"""
from __future__ import annotations

import os
import sys
import time

from sandbox.errors import UserError

SPIN_COUNT = "10000"  # libgomp's default is 300,000; 10,000 kept 95-98% solo speed and 2.6x contended (measured)
LOOK_S = 0.2  # seconds of /proc/stat per command: 20 scheduler ticks per core, little next to importing torch


def share_cpu(environ=os.environ) -> None:
    """Set the thread count and OpenMP wait of this process in ``environ`` (see the module docstring)."""
    if "torch" in sys.modules:  # its OpenMP runtime has started: the caller chose already
        return
    if "OMP_WAIT_POLICY" not in environ and "GOMP_SPINCOUNT" not in environ:
        environ["GOMP_SPINCOUNT"] = SPIN_COUNT
    wanted = environ.get("SANDBOX_THREADS", "").strip()
    if wanted == "auto":
        environ["OMP_NUM_THREADS"] = str(free_cores())
    elif wanted:
        if not wanted.isdigit() or int(wanted) < 1:
            raise UserError(f"SANDBOX_THREADS must be a whole number >= 1 or auto, got {wanted!r}")
        environ["OMP_NUM_THREADS"] = wanted


def free_cores(look_s: float = LOOK_S) -> int:
    """The cores this process may run on, less the share other processes kept busy over ``look_s`` seconds
    (rounded: a core counts as taken when it was busy more than half the time); at least 1."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    try:
        before = _busy_fractions(cpus)
        time.sleep(look_s)  # this process sleeps meanwhile: what is busy is someone else
        after = _busy_fractions(cpus)
    except (OSError, ValueError, IndexError):  # no /proc (macOS, Windows): every core
        return len(cpus)
    busy = sum((after[c][0] - before[c][0]) / max(after[c][1] - before[c][1], 1) for c in cpus if c in after)
    return max(1, round(len(cpus) - busy))


def _busy_fractions(cpus: list[int]) -> dict[int, tuple[int, int]]:
    """{cpu: (busy ticks, all ticks)} from /proc/stat for the given cpus (idle and iowait count as free)."""
    wanted, out = {f"cpu{c}" for c in cpus}, {}
    with open("/proc/stat") as f:
        for line in f:
            name, *fields = line.split()
            if name in wanted:
                ticks = [int(x) for x in fields[:8]]  # user nice system idle iowait irq softirq steal
                out[int(name[3:])] = (sum(ticks) - ticks[3] - ticks[4], sum(ticks))
    return out
