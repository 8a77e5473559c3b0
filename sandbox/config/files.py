"""Recipe files on a command line: the recipes each builds on (``base:``), and the plugin files a command names
(``--plugin FILE``, ``plugins:`` in a recipe, ``--plugins LIST``). Plugin files are imported before parsing,
because jsonargparse resolves a short class name only among subclasses that are already imported."""
from __future__ import annotations

import os
from pathlib import Path

from sandbox.errors import UserError

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


def _read_recipe(path: Path) -> dict:
    """A recipe file's top level ({} for an empty or unreadable one: the parser reports it); a file that is not
    UTF-8 YAML or not a mapping is one error line naming it."""
    import yaml

    try:
        data = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except OSError:
        return {}
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        raise UserError(f"recipe {path} does not read as YAML ({' '.join(str(e).split())}){_run_hint(path)}") from None
    if data is not None and not isinstance(data, dict):
        raise UserError(f"recipe {path} holds a {type(data).__name__}, not recipe keys{_run_hint(path)}")
    return data or {}


def _run_hint(path: Path) -> str:
    """For the recipe.yaml of a run directory: the checkpoints keep the recipe too."""
    if path.name != "recipe.yaml" or not (path.parent / "checkpoints").is_dir():
        return ""
    return (f"; the checkpoints of run directory {path.parent} hold its recipe: resume it with your recipe file, "
            f"`sandbox train --config RECIPE --run_dir {path.parent}`, which writes recipe.yaml again")


def _recipe_plugins(path: Path) -> list[tuple[Path, str]]:
    """``plugins:`` of a recipe file, relative to the recipe's directory."""
    data = _read_recipe(path)
    return [(path.parent / f, f"listed under plugins: in {path}") for f in _as_list(data.get("plugins"), str(path))]


def _with_bases(path: Path, chain: tuple[Path, ...] = ()) -> list[Path]:
    """A recipe and the recipes it builds on (``base:``, relative to it, recursively), base-most first."""
    data = _read_recipe(path)
    if "config" in data:
        # jsonargparse applies the included file and the including one's keys against the state before both,
        # so an override of a plugin's init_args silently drops the base's (measured with jsonargparse 4.53)
        raise UserError(f"recipe {path} includes another recipe with `config:`; name it with `base: FILE.yaml` "
                        f"instead, or give both on the command line: --config BASE.yaml --config {path}")
    base = data.get("base")
    if base is None:
        return [path]
    if not isinstance(base, str):
        raise UserError(f"base in {path} must be one recipe file path, got {base!r}")
    base_path = path.parent / base
    if not base_path.is_file():
        raise UserError(f"recipe {base_path} not found (base of {path}, relative to it)")
    chain = (*chain, path.resolve())
    if base_path.resolve() in chain:
        cycle = " -> ".join(str(p) for p in (*chain, base_path.resolve()))
        raise UserError(f"recipes build on each other in a circle: {cycle}; remove one base:")
    return _with_bases(base_path, chain) + [path]


def expand_bases(argv: list[str]) -> list[str]:
    """Put the recipes each ``--config`` file builds on (``base:``) before it, as earlier ``--config`` files.

    A base already applied earlier on the line is not applied again: it would undo what the files between
    changed (``--config quickstart.yaml --config gmm_digits.yaml`` stays as it is).
    """
    if any(a == "--base" or a.startswith("--base=") for a in argv):
        raise UserError("base names a recipe's base inside the recipe file; on the command line give the base "
                        "first instead: --config BASE.yaml --config RECIPE.yaml")
    out, applied, i = [], set(), 0
    while i < len(argv):
        if argv[i] == "--config" and i + 1 < len(argv):
            value, i = argv[i + 1], i + 2
        elif argv[i].startswith("--config="):
            value, i = argv[i][len("--config="):], i + 1
        else:
            out.append(argv[i])
            i += 1
            continue
        if not os.path.isfile(value):  # a YAML string, or a missing file the parser reports
            out += ["--config", value]
            continue
        *bases, recipe = _with_bases(Path(value))
        for path in bases:
            if path.resolve() not in applied:
                out += ["--config", str(path)]
                applied.add(path.resolve())
        out += ["--config", str(recipe)]
        applied.add(recipe.resolve())
    return out


def parse_recipe_file(path: Path, overrides: list[str] = ()):
    """A recipe file read as ``sandbox train --config PATH [overrides]`` reads it: the recipes it builds on
    first (``base:``), the plugin files it lists loaded (relative to the recipe listing them), then checked by
    the recipe parser. For commands that take a recipe as one option (``sandbox bench --recipe``)."""
    from sandbox.config import registry
    from sandbox.config.recipe import one_line, recipe_parser

    argv = expand_bases(["--config", str(path)])
    for file, origin in plugin_files(argv):
        registry.load_listed([file], origin)
    registry.discover()  # a name clash is an error naming both sources
    try:
        return recipe_parser().parse_args(argv + ["--base=null", *overrides])
    except Exception as e:  # jsonargparse raises ArgumentError; keep it to one line
        raise UserError(f"recipe {path}: {one_line(e)}") from None


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
