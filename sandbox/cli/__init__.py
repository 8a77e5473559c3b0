"""The command line: ``main`` (sandbox/cli/_main.py: the parser, plugin files, error handling) and one module
per subcommand, discovered by name.

A subcommand module defines ``NAME`` (the subcommand), ``HELP`` (one line),
``ORDER`` (position in ``sandbox --help``), ``parser() -> ArgumentParser`` and
``run(cfg) -> None``. Adding a subcommand is adding a file.
"""
from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType


def all_commands() -> list[ModuleType]:
    mods = [importlib.import_module(f"{__name__}.{m.name}") for m in pkgutil.iter_modules(__path__)]
    mods = [m for m in mods if hasattr(m, "NAME") and hasattr(m, "run")]
    return sorted(mods, key=lambda m: (getattr(m, "ORDER", 100), m.NAME))


def main(argv: list[str] | None = None) -> int:
    """``sandbox ...``: the console script's entry point (see sandbox/cli/_main.py)."""
    import sys

    from sandbox.cli._threads import share_cpu
    from sandbox.errors import UserError

    try:
        share_cpu()  # before anything imports torch: its OpenMP runtime reads the settings once, at load
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from sandbox.cli._main import main as _main

    return _main(argv)
