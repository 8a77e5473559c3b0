"""``sandbox plugins``: every registered plugin per kind, its source, one-line doc and arguments."""
from __future__ import annotations

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

NAME = "plugins"
HELP = "List registered plugins per kind, with their arguments and where they come from."
ORDER = 90


def parser() -> ArgumentParser:
    p = ArgumentParser(exit_on_error=False, description=HELP)
    p.add_argument("--config", action=ActionConfigFile)
    return p


def run(cfg: Namespace) -> None:
    from sandbox.config.registry import format_listing

    print(format_listing(), end="")
