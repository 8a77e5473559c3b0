"""Recipe files on a command line: the recipes each builds on (``base:``), and the plugin files a command names
(``--plugin FILE``, ``plugins:`` in a recipe, ``--plugins LIST``). Plugin files are imported before parsing,
because jsonargparse resolves a short class name only among subclasses that are already imported.

Trust: a recipe file the user names is like a script they run, so the plugin files it lists are imported. A
run directory's own ``recipe.yaml`` (continuing a run: ``sandbox train --config RUN/recipe.yaml``) is data
someone may have shared: the files it lists are imported only when the user names them with ``--plugin``, and
its plugin slots must name registered plugins.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

from sandbox.errors import UserError

FLAG_ORIGIN = "given with --plugin"
RUN_RECIPE = "recipe.yaml"  # what `sandbox train` stores in a run directory (sandbox/run/rundir.py)


class PluginFile(NamedTuple):
    path: Path
    origin: str  # where it was given (for messages); for a run's recipe, the run ("run runs/x")
    trusted: bool  # named by the user; False: listed by a run directory's recipe.yaml, imported only if given


def is_run_recipe(path: Path) -> bool:
    """A run directory's stored recipe: a ``recipe.yaml`` next to the ``checkpoints/`` folder `sandbox train`
    makes. (Any other recipe file is one the user wrote or chose to run, like a script.)"""
    return path.name == RUN_RECIPE and (path.parent / "checkpoints").is_dir()


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


def _recipe_plugins(path: Path) -> list[PluginFile]:
    """``plugins:`` of a recipe file, relative to the recipe's directory (never the current one)."""
    data, stored = _read_recipe(path), is_run_recipe(path)
    origin = f"run {path.parent}" if stored else f"listed under plugins: in {path}"
    return [PluginFile(path.parent / f, origin, not stored) for f in _as_list(data.get("plugins"), str(path))]


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
    if is_run_recipe(path):  # stored recipes are complete (the bases applied): a base here was added by hand
        raise UserError(f"{path} is a run directory's recipe and names a base ({base!r}); a stored recipe is "
                        "complete: remove base:, or give the base first: --config BASE.yaml --config RECIPE.yaml")
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
    load_plugin_files(argv)
    registry.discover()  # a name clash is an error naming both sources
    try:
        return recipe_parser().parse_args(argv + ["--base=null", *overrides])
    except Exception as e:  # jsonargparse raises ArgumentError; keep it to one line
        raise UserError(f"recipe {path}: {one_line(e)}") from None


def plugin_files(argv: list[str]) -> list[PluginFile]:
    """Plugin files named on a command line: ``--plugin FILE`` (repeatable, anywhere), ``plugins:`` in
    each ``--config`` recipe (relative to that recipe) and ``--plugins LIST``."""
    import yaml

    found = [PluginFile(Path(f), FLAG_ORIGIN, True) for f in _option_values(argv, "--plugin")]
    for config in _option_values(argv, "--config"):
        if os.path.isfile(config):
            found += _recipe_plugins(Path(config))
    for value in _option_values(argv, "--plugins"):
        try:
            items = yaml.safe_load(value)
        except yaml.YAMLError:
            items = value
        found += [PluginFile(Path(f), "given with --plugins", True) for f in _as_list(items, "--plugins")]
    return found


def load_plugin_files(argv: list[str]) -> list[Path]:
    """Import the plugin files a command line names: ``--plugin`` files first (one stands in for a listed file
    of the same file name), then the files trusted recipes list. A file a run directory's recipe lists is never
    imported: it must be given with ``--plugin`` (one error line naming the file and the flag otherwise), and
    that recipe's plugin slots must name registered plugins. Returns the loaded files (absolute, once each)."""
    import sys

    from sandbox.config import registry
    from sandbox.config.recipe import check_stored_classes

    found = plugin_files(argv)
    given = {registry.module_name_for(f.path) for f in found if f.origin == FLAG_ORIGIN}
    for f in found:
        if f.origin == FLAG_ORIGIN:
            registry.load_file(f.path, f.origin)
    for f in found:
        if f.origin != FLAG_ORIGIN and f.trusted:
            registry.load_listed([f.path], f.origin, stand_ins=given)
    for f in found:
        if not f.trusted:
            registry.require_loaded([f.path], f.origin)
    for config in _option_values(argv, "--config"):
        if os.path.isfile(config) and is_run_recipe(Path(config)):
            check_stored_classes(_read_recipe(Path(config)), f"run {Path(config).parent}")
    files = []
    for f in found:
        resolved = Path(sys.modules[registry.module_name_for(f.path)].__file__).resolve()
        if resolved not in files:
            files.append(resolved)
    return files
