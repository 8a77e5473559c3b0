"""Command line entry point: ``sandbox <subcommand>`` (jsonargparse; ``--config`` and ``--print_config`` everywhere).

Subcommands live in ``sandbox/commands/``, one module each. Every user error
ends in one line ``error: ...`` and exit code 2.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from jsonargparse import ArgumentParser

from sandbox.errors import UserError
from sandbox.recipe import one_line


def main_parser() -> ArgumentParser:
    from sandbox.commands import all_commands

    parser = ArgumentParser(prog="sandbox", exit_on_error=False,
                            description="MAR sandbox: masked autoregressive image generation with continuous tokens.")
    parser.add_argument("--plugin", type=list[str], default=[],
                        help="Extra plugin file(s) to load (repeatable; before the subcommand).")
    sub = parser.add_subcommands(dest="command")
    for command in all_commands():
        sub.add_subcommand(command.NAME, command.parser(), help=command.HELP)
    return parser


# --------------------------------------------------------------------------------------
def _prescan_plugins(argv: list[str]) -> list[str]:
    """Plugin files must be imported before parsing, so their class names resolve in recipes."""
    files = []
    for i, a in enumerate(argv):
        if a == "--plugin" and i + 1 < len(argv):
            files.append(argv[i + 1])
        elif a.startswith("--plugin="):
            files.append(a.split("=", 1)[1])
    return files


def _strip_plugin_flags(argv: list[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--plugin":
            skip = True
            continue
        if a.startswith("--plugin="):
            continue
        out.append(a)
    return out


def _recipe_plugin_files(argv: list[str]) -> list[str]:
    """``plugins:`` listed inside recipe files given with --config (relative to the recipe)."""
    import yaml

    files = []
    for i, a in enumerate(argv):
        path = argv[i + 1] if a == "--config" and i + 1 < len(argv) else (a.split("=", 1)[1] if a.startswith("--config=") else None)
        if path and os.path.isfile(path):
            try:
                data = yaml.safe_load(Path(path).read_text()) or {}
            except yaml.YAMLError:
                continue
            for f in (data.get("plugins") or []) if isinstance(data, dict) else []:
                p = Path(f)
                files.append(str(p if p.is_absolute() or p.exists() else Path(path).parent / p))
    return files


def run(argv: list[str]) -> None:
    from sandbox import registry

    files = _prescan_plugins(argv) + _recipe_plugin_files(argv)
    registry.discover(files)
    parser = main_parser()
    try:
        cfg = parser.parse_args(_strip_plugin_flags(argv))
    except Exception as e:  # jsonargparse raises ArgumentError; keep it to one line
        raise UserError(one_line(e)) from None
    from sandbox.commands import all_commands

    command = next(c for c in all_commands() if c.NAME == cfg.command)
    command.run(cfg[cfg.command])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        run(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
