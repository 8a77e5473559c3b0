"""Publishing measurements: where one was made (the repository's commit and the machine: every measured number
names both) and writing its table between a page's markers."""
from __future__ import annotations

import os
import platform
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def git_commit(repo: Path = REPO) -> str:
    """The short hash of ``repo``'s HEAD, or "unknown" outside a git checkout."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True,
                             timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip() or "unknown"


def machine() -> str:
    """"N cores (CPU model)": /proc/cpuinfo's model name where there is one."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text()).group(1)
    except (OSError, AttributeError):
        pass
    return f"{os.cpu_count()} cores ({cpu})"


def write_between_markers(path: Path, text: str, begin: str, end: str, who: str, new_page: str | None = None) -> None:
    """Put ``text`` between the markers ``begin`` and ``end`` of the page ``path`` (atomically), the rest of the
    page kept. A page without them (or no page) is an error naming ``who``, unless ``new_page`` is given (a tiny
    run's page: that title, then the markers at its end)."""
    doc = path.read_text() if path.is_file() else f"{new_page}\n"
    if begin not in doc or end not in doc:
        if new_page is None:
            sys.exit(f"{who}: {path} has no markers {begin} ... {end}")
        doc += f"\n{begin}\n{end}\n"
    head, rest = doc.split(begin, 1)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(head + begin + "\n" + text + "\n" + end + rest.split(end, 1)[1])
    tmp.replace(path)
