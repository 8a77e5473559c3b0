"""Command line entry point: ``sandbox <subcommand>`` (jsonargparse; ``--config`` and ``--print_config`` everywhere).

Subcommands live in ``sandbox/cli/``, one module each. Every user error
ends in one line ``error: ...`` and exit code 2.
"""
from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

from jsonargparse import ArgumentParser

from sandbox.config.files import expand_bases, load_plugin_files
from sandbox.config.recipe import one_line
from sandbox.errors import UserError
from sandbox.fast.allocator import keep_freed_memory


def main_parser() -> ArgumentParser:
    from sandbox.cli import all_commands

    parser = ArgumentParser(prog="sandbox", exit_on_error=False,
                            description="MAR sandbox: masked autoregressive image generation with continuous tokens.")
    parser.add_argument("--plugin", type=str, default=None,
                        help="A plugin file to load (repeatable, anywhere on the line; see docs/writing-plugins.md).")
    sub = parser.add_subcommands(dest="command")
    parser.command_parsers = {}
    for command in all_commands():
        parser.command_parsers[command.NAME] = command.parser()
        sub.add_subcommand(command.NAME, parser.command_parsers[command.NAME], help=command.HELP)
    return parser


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


def _resolved_recipe_args(argv: list[str], parser: ArgumentParser, files: list[Path]) -> list[str]:
    """For a recipe command: the absolute paths of every plugin file it loaded as its ``plugins``, so
    ``--print_config`` and the run directory's recipe.yaml re-load them from anywhere; and no ``base``,
    since the bases were applied already (``expand_bases``) and a printed recipe is complete on its own."""
    names = parser.command_parsers
    command = next((a for a in argv if a in names), None)
    if command is None or not any("--plugins" in a.option_strings for a in names[command]._actions):
        return argv
    # the list reaches the parser as YAML, which reads no JSON surrogate pairs (\ud83d\ude00): keep every
    # character as it is, or a plugin path with an emoji breaks the command
    plugins = json.dumps([str(f) for f in files], ensure_ascii=False)
    resolved = ["--base=null"] + ([f"--plugins={plugins}"] if files else [])
    # --print_config prints what came before it
    at = next((i for i, a in enumerate(argv) if a.startswith("--print_config")), len(argv))
    return argv[:at] + resolved + argv[at:]


def run(argv: list[str]) -> None:
    from sandbox.config import registry

    registry.load_builtins()
    registry.load_entry_points()
    argv = expand_bases(argv)
    files = load_plugin_files(argv)  # a run directory's recipe imports only what --plugin names
    registry.discover()  # a name clash is an error naming both sources
    parser = main_parser()
    argv = _resolved_recipe_args(_strip_plugin_flags(argv), parser, files)
    try:
        cfg = parser.parse_args(argv)
    except Exception as e:  # jsonargparse raises ArgumentError; keep it to one line
        raise UserError(one_line(e)) from None
    from sandbox.cli import all_commands

    command = next(c for c in all_commands() if c.NAME == cfg.command)
    command.run(cfg[cfg.command])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    keep_freed_memory()  # fewer page faults on large CPU tensors (sandbox/allocator.py)
    try:
        run(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C (SIGINT), or a second stop signal during training (run/signals.py)
        signum = getattr(e, "signum", int(signal.SIGINT))
        print(f"interrupted by signal {signum}", file=sys.stderr)
        return 128 + signum
    return 0


if __name__ == "__main__":
    sys.exit(main())
