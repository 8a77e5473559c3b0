"""Command line entry point: ``sandbox <subcommand>`` (jsonargparse; ``--config`` and ``--print_config`` everywhere).

Subcommands live in ``sandbox/commands/``, one module each. Every user error
ends in one line ``error: ...`` and exit code 2.
"""
from __future__ import annotations

import json
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
    parser.add_argument("--plugin", type=str, default=None,
                        help="A plugin file to load (repeatable, anywhere on the line; see docs/writing-plugins.md).")
    sub = parser.add_subcommands(dest="command")
    parser.command_parsers = {}
    for command in all_commands():
        parser.command_parsers[command.NAME] = command.parser()
        sub.add_subcommand(command.NAME, parser.command_parsers[command.NAME], help=command.HELP)
    return parser


# --------------------------------------------------------------------------------------
# Plugin files: imported before parsing, because jsonargparse resolves a short class name
# only among subclasses that are already imported
# --------------------------------------------------------------------------------------
FLAG_ORIGIN = "given with --plugin"


def _option_values(argv: list[str], flag: str) -> list[str]:
    """Every value of ``flag`` in argv, in both ``--flag VALUE`` and ``--flag=VALUE`` forms."""
    values = []
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            values.append(argv[i + 1])
        elif a.startswith(flag + "="):
            values.append(a.split("=", 1)[1])
    return values


def _as_list(value, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    raise UserError(f"plugins in {where} must be a list of .py file paths, got {value!r}")


def _recipe_plugins(path: Path) -> list[tuple[Path, str]]:
    """``plugins:`` of a recipe file, relative to the recipe's directory."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return []  # the parser reports an unreadable recipe in its own words
    if not isinstance(data, dict):
        return []
    if "config" in data:
        # jsonargparse applies the included file and the including one's keys against the state before both,
        # so an override of a plugin's init_args silently drops the base's (measured with jsonargparse 4.53)
        raise UserError(f"recipe {path} includes another recipe with `config:`; give both on the command line "
                        f"instead (later files override earlier ones): --config BASE.yaml --config {path}")
    return [(path.parent / f, f"listed under plugins: in {path}") for f in _as_list(data.get("plugins"), str(path))]


def plugin_files(argv: list[str]) -> list[tuple[Path, str]]:
    """Plugin files named on a command line: ``--plugin FILE`` (repeatable, anywhere), ``plugins:`` in
    each ``--config`` recipe (relative to that recipe) and ``--plugins LIST`` -> [(path, where it was given)]."""
    import yaml

    found = [(Path(f), FLAG_ORIGIN) for f in _option_values(argv, "--plugin")]
    for config in _option_values(argv, "--config"):
        if os.path.isfile(config):
            found += _recipe_plugins(Path(config))
    for value in _option_values(argv, "--plugins"):
        try:
            items = yaml.safe_load(value)
        except yaml.YAMLError:
            items = value
        found += [(Path(f), "given with --plugins") for f in _as_list(items, "--plugins")]
    return found


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


def _with_resolved_plugins(argv: list[str], parser: ArgumentParser, files: list[Path]) -> list[str]:
    """Give a recipe command the absolute paths of every plugin file it loaded as its ``plugins``, so
    ``--print_config`` and the run directory's recipe.yaml re-load them from anywhere."""
    names = parser.command_parsers
    command = next((a for a in argv if a in names), None)
    if not files or command is None or not any("--plugins" in a.option_strings for a in names[command]._actions):
        return argv
    value = "--plugins=" + json.dumps([str(f) for f in files])
    at = argv.index("--print_config") if "--print_config" in argv else len(argv)  # it prints what came before
    return argv[:at] + [value] + argv[at:]


def run(argv: list[str]) -> None:
    from sandbox import registry

    registry.load_builtins()
    registry.load_entry_points()
    found = plugin_files(argv)
    given = {registry.module_name_for(path) for path, origin in found if origin == FLAG_ORIGIN}
    for path, origin in found:  # --plugin files first: one stands in for a listed file of the same name
        if origin == FLAG_ORIGIN:
            registry.load_file(path, origin)
    for path, origin in found:
        if origin != FLAG_ORIGIN:
            registry.load_listed([path], origin, stand_ins=given)
    files = []
    for path, _ in found:
        resolved = Path(sys.modules[registry.module_name_for(path)].__file__).resolve()
        if resolved not in files:
            files.append(resolved)
    registry.discover()  # a name clash is an error naming both sources
    parser = main_parser()
    argv = _with_resolved_plugins(_strip_plugin_flags(argv), parser, files)
    try:
        cfg = parser.parse_args(argv)
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
