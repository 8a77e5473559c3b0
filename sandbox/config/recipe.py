"""Recipes: parsing and checking them, and instantiating one slot.

A recipe is a YAML file checked by jsonargparse at parse time against the
signatures of ``sandbox.config.schema``: the plugin slots (``data``,
``tokenizer``, ``ordering``, ``head``) take a ``class_path`` (short class
names work) and ``init_args``; ``model``, ``train`` and ``sample`` are
dataclasses whose every field documents its default.
"""
from __future__ import annotations

import importlib
import re
import sys
import traceback
from pathlib import Path
from typing import Optional

from jsonargparse import ActionConfigFile, ArgumentParser, Namespace

from sandbox.config.schema import SLOT_DEFAULTS, SLOT_HELP, SLOT_TYPES
from sandbox.core.checks import check_class
from sandbox.core.contracts import KINDS
from sandbox.errors import UserError


def add_run_arguments(parser: ArgumentParser, seed_help: str, plugins_help: str) -> None:
    """The arguments every recipe-driven command shares (the CLI resolves --base and --plugins before parsing)."""
    parser.add_argument("--config", action=ActionConfigFile, help="Recipe YAML (several allowed; later ones override).")
    parser.add_argument("--seed", type=int, default=0, help=seed_help)
    parser.add_argument("--base", type=Optional[str], default=None,
                        help="A recipe this one builds on, relative to this recipe file: the CLI applies it first "
                             "(as an earlier --config), then this one; never stored (see docs/writing-plugins.md).")
    parser.add_argument("--plugins", type=list[str], default=[], help=plugins_help)


def add_recipe_arguments(parser: ArgumentParser) -> None:
    add_run_arguments(parser, seed_help="Fixes initialisation, data order and all sampling.",
                      plugins_help="Plugin files (.py) the recipe needs, relative to the recipe file; the CLI loads "
                                   "them before parsing and stores them as absolute paths (see "
                                   "docs/writing-plugins.md).")
    for key, typ in SLOT_TYPES.items():
        if key in ("model", "train", "sample"):
            parser.add_argument(f"--{key}", type=typ, default=typ(), help=SLOT_HELP[key])
        elif key in SLOT_DEFAULTS:
            parser.add_argument(f"--{key}", type=typ, default=SLOT_DEFAULTS[key].clone(), help=SLOT_HELP[key])
        else:
            parser.add_argument(f"--{key}", type=typ, required=True, help=SLOT_HELP[key])


RECIPE_KEYS = ("seed", "plugins", "data", "tokenizer", "ordering", "condition", "backbone", "head", "model", "train",
               "sample")


def recipe_parser() -> ArgumentParser:
    parser = ArgumentParser(exit_on_error=False, prog="sandbox recipe")
    add_recipe_arguments(parser)
    return parser


def recipe_dict(cfg: Namespace) -> dict:
    """The recipe part of a parsed namespace as plain data (what a run directory stores)."""
    d = cfg.clone().as_dict()
    return {k: d[k] for k in RECIPE_KEYS if k in d}


# the built-in plugins' package before 0.2 (a top-level `plugins`); recipes stored then name it in class paths
_OLD_BUILTINS = "plugins."


def upgrade_recipe(recipe: dict) -> dict:
    """A stored recipe in today's terms: class paths of the built-ins as they were stored before 0.2
    (``plugins.heads.diffusion.DiffusionHead``) name ``sandbox.plugins...``; recipes before 0.3 name no condition
    and no backbone, which were MAR's class embedding and transformer (the defaults)."""
    out = dict(recipe)
    for slot, default in SLOT_DEFAULTS.items():
        if "head" in out:  # a MAR recipe (a tokenizer recipe has no condition, backbone or head)
            out.setdefault(slot, default.as_dict())
    for slot in _SLOT_KIND:
        part = out.get(slot)
        if isinstance(part, dict) and str(part.get("class_path", "")).startswith(_OLD_BUILTINS):
            out[slot] = {**part, "class_path": "sandbox." + part["class_path"]}
    return out


def parse_recipe(recipe: dict, origin: str = "the stored recipe", root: Path | None = None,
                 trusted: bool = False) -> Namespace:
    """Re-parse a recipe dict into a checked namespace.

    A stored recipe (a checkpoint's: ``trusted=False``) imports nothing. The plugin files it lists must have
    been loaded already, from a source the user named (``--plugin``), else one error line names them and the
    flag; relative ones are shown relative to ``root`` (the run directory), never the current directory. Its
    plugin slots must name registered plugins (``check_stored_classes``). ``origin`` names it in messages
    ("run runs/x"). ``trusted``: a dict the caller wrote (``sandbox.build(dict)``): the files it lists load, as
    a recipe file's do on a command line.
    """
    from sandbox.config import registry

    if not isinstance(recipe, dict):
        raise UserError(f"{origin}: the stored recipe is not a mapping")
    registry.discover()
    files = recipe.get("plugins") or []
    if not (isinstance(files, list) and all(isinstance(f, str) for f in files)):
        raise UserError(f"{origin}: plugins must be a list of .py file paths, got {files!r}")
    if trusted:
        registry.load_listed(files, origin=f"listed under plugins: in {origin}")
    else:
        registry.require_loaded([Path(root) / f if root else Path(f) for f in files], origin)
    registry.discover()  # a name clash is an error naming both sources
    recipe = upgrade_recipe(recipe)
    if not trusted:
        check_stored_classes(recipe, origin)
    try:
        return recipe_parser().parse_object(recipe)
    except Exception as e:
        raise UserError(f"stored recipe no longer parses: {one_line(e)}") from e


def check_stored_classes(recipe: dict, origin: str) -> None:
    """Each plugin slot of a stored recipe names a registered plugin of the slot's kind (its short name or
    ``module.Class``), and nothing else in it names a class: jsonargparse imports whatever module a class
    path names (``this.DiffusionHead`` would print the Zen of Python), so any other class path is refused
    before parsing, never imported."""
    from sandbox.config import registry

    registry.discover()
    for slot, kind in _SLOT_KIND.items():
        value = recipe.get(slot)
        if value is None:
            continue  # the parser reports a missing slot
        path = value.get("class_path") if isinstance(value, dict) else value
        known = registry.plugins(kind)
        if not (isinstance(path, str) and (path in known or path in {_full_name(c) for c in known.values()})):
            raise UserError(f"{origin}: {slot} class {path!r} is not a registered {kind} plugin; a stored recipe "
                            f"names only registered plugins (the {kind}s are {', '.join(known) or '(none)'}; "
                            "load a plugin file with --plugin FILE.py)")
        nested = _class_paths(value.get("init_args") if isinstance(value, dict) else None, f"{slot}.init_args")
        _refuse_nested(nested, origin)
    for key in ("model", "train", "sample"):
        _refuse_nested(_class_paths(recipe.get(key), key), origin)


def _refuse_nested(found, origin: str) -> None:
    for where, path in found:
        raise UserError(f"{origin}: {where} names class {path!r}, which is not a registered plugin in a plugin "
                        "slot; a stored recipe imports nothing else")


def _full_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _class_paths(value, where: str):
    """(key, class path) of every ``class_path`` nested anywhere in ``value``."""
    if isinstance(value, dict):
        for k, v in value.items():
            if k == "class_path":
                yield where, v
            else:
                yield from _class_paths(v, f"{where}.{k}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _class_paths(v, f"{where}[{i}]")


# jsonargparse's words for a class name it cannot resolve: in a plugin slot, that is an unknown plugin
_UNRESOLVED = re.compile(r'Parser key "(data|tokenizer|ordering|condition|backbone|head)":\s+Expected a dot import path '
                         r'string: (\S+)')
_SLOT_KIND = {"data": "dataset", "tokenizer": "tokenizer", "ordering": "ordering", "condition": "condition",
              "backbone": "backbone", "head": "head"}
# and for a value outside a Literal's choices (Optional ones list every subtype's error first)
_NOT_A_CHOICE = re.compile(r'Parser key "([^"]+)":.*?Expected a typing\.Literal\[([^\]]*)\].*(?:Got|Given) value: (.*)',
                           re.S)


def one_line(e: BaseException) -> str:
    """A parse error as one readable line (jsonargparse errors span several); an unknown plugin name as
    the registered ones."""
    msg = str(e)
    unresolved = _UNRESOLVED.search(msg)
    if unresolved:
        from sandbox.config.registry import unknown_plugin

        return unknown_plugin(_SLOT_KIND[unresolved.group(1)], unresolved.group(2))
    choice = _NOT_A_CHOICE.search(msg)
    if choice:
        key, choices, value = choice.groups()
        key = key if "." in key else f"--{key}"  # a recipe key (train.precision) or a command's own option
        choices = ", ".join(c.strip(" '\"") for c in choices.split(","))
        return f"{key} must be one of {choices}, got {value.strip()}"
    msg = re.sub(r"Got value: .*", "", msg, flags=re.S)
    msg = " ".join(msg.split())
    return msg.rstrip(" .:")


def instantiate(cfg: Namespace, key: str, *injected, **injected_kw):
    """Build one slot of a parsed recipe; the others (e.g. an expensive dataset) stay unbuilt. ``injected``:
    the arguments the core passes a plugin before its init_args (an ordering's grid, a head's token_dim and
    cond_dim, ...); ``injected_kw``: the tokenizer properties a head ``requires`` (e.g. codebook)."""
    single = ArgumentParser(exit_on_error=False)
    single.add_argument(f"--{key}", type=SLOT_TYPES[key])
    sub = Namespace()
    sub[key] = cfg[key].clone() if isinstance(cfg[key], Namespace) else cfg[key]
    named = isinstance(cfg[key], Namespace) and "class_path" in cfg[key]  # a plugin slot's class
    if named and key in _SLOT_KIND:
        kind = _SLOT_KIND[key]
        check_class(kind, _resolve(cfg[key].class_path), KINDS[kind])  # callable the way the core calls it
    try:
        built = single.instantiate(sub)[key]
        return built(*injected, **injected_kw) if injected else built
    except UserError:
        raise
    except Exception as e:  # a plugin's constructor refusing its settings (or failing): one line that says where
        what = f"{key} {cfg[key].class_path.rsplit('.', 1)[-1]}" if named else None
        if not isinstance(e, (TypeError, ValueError, OSError)):
            if what is None:
                raise
            raise UserError(f"cannot build {what}: {type(e).__name__}: {one_line(e)} "
                            f"({_raised_at(e, cfg[key].class_path)})") from e
        if what is not None:
            raise UserError(f"cannot build {what}: {one_line(e)}") from e
        raise UserError(f"invalid {key} settings: {one_line(e)}") from e


def check_values(cfg: Namespace) -> None:
    """Build the ``model``, ``train`` and ``sample`` settings once, so every value is checked (their
    ``__post_init__``) before a run starts: a value only sampling reads (``sample.num_iter: 0``) would otherwise
    let a whole run train and then fail at its final grid, and again on every rerun."""
    for key in ("model", "train", "sample"):
        instantiate(cfg, key)


def slot_classes(cfg: Namespace) -> dict[str, type]:
    """The plugin class each plugin slot of a parsed recipe names, without building it."""
    return {key: _resolve(cfg[key].class_path) for key in _SLOT_KIND
            if isinstance(cfg.get(key), Namespace) and "class_path" in cfg[key]}


def _resolve(class_path: str) -> type:
    """The class a parsed recipe names (jsonargparse resolved it to an importable path)."""
    module, _, name = class_path.rpartition(".")
    return getattr(sys.modules.get(module) or importlib.import_module(module), name)


def _raised_at(e: BaseException, class_path: str) -> str:
    """'file.py:line' of the deepest frame of ``e`` in the plugin's own file (else the deepest frame)."""
    module = sys.modules.get(class_path.rpartition(".")[0])
    frames = traceback.extract_tb(e.__traceback__)
    own = [f for f in frames if module is not None and f.filename == getattr(module, "__file__", None)]
    frame = (own or frames)[-1]
    return f"{Path(frame.filename).name}:{frame.lineno}"
