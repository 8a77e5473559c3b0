"""Plugin discovery: built-in ``plugins/``, installed entry points, and ``--plugin`` files.

A plugin is a subclass of a kind's base class (``sandbox.core.contracts``); once its
module is imported, jsonargparse resolves its short class name in recipes.
Discovery therefore only has to import modules and remember where each
class came from, so ``sandbox plugins`` can say so and clashes can name both
sources. The registry lists exactly what a recipe can name by its short
class name: concrete subclasses that are not private (``_Name``), not defined
inside a function, not marked ``__abstract_plugin__ = True`` (a shared base
class of several plugins), and still reachable as ``module.Name``.

Three sources, loaded in this order:
    built-in        every module under ``sandbox.plugins`` (the repository's plugins/), and the method's own
                    backbone and condition (sandbox/core/transformer.py, condition.py)
    entry points    group ``mar_sandbox.plugins`` of installed packages; each names a module (or an object in it)
    plugin files    ``--plugin FILE`` on the command line, or ``plugins: [FILE, ...]`` in a recipe the user names

A plugin file is imported as the module ``sandbox_plugin_<file stem>``, so a
recipe stored in a run directory names its classes with a class path that
resolves again in a later process once the file (listed, absolute, under the
recipe's ``plugins:``) is loaded. A stored recipe never loads a file itself
(``require_loaded``): the user names it with ``--plugin``.
"""
from __future__ import annotations

import difflib
import gc
import importlib
import importlib.util
import inspect
import pkgutil
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from types import ModuleType

from sandbox.core.checks import INJECTED_ARGS, with_article
from sandbox.core.contracts import KINDS
from sandbox.errors import UserError

ENTRY_POINT_GROUP = "mar_sandbox.plugins"
FILE_MODULE_PREFIX = "sandbox_plugin_"


CORE_PLUGIN_MODULES = ("sandbox.core.transformer", "sandbox.core.condition")  # MARBackbone, ClassCondition

_sources: dict[str, str] = {}  # module name -> where it came from ("built-in", "entry point x (pkg 1.0)", "file p")
_files: dict[str, Path] = {}  # module name -> the plugin file it was loaded from
_builtins_loaded = False
_entry_points_loaded = False


@dataclass
class PluginInfo:
    kind: str
    name: str  # the short class name recipes use
    cls: type
    source: str
    doc: str
    args: list[tuple[str, str]]  # (name, "type = default")


# --------------------------------------------------------------------------------------
# Loading the three sources
# --------------------------------------------------------------------------------------
def load_builtins() -> None:
    global _builtins_loaded
    if _builtins_loaded:
        return
    import sandbox.plugins as plugins

    for info in pkgutil.walk_packages(plugins.__path__, prefix="sandbox.plugins."):
        module = importlib.import_module(info.name)
        _sources.setdefault(module.__name__, "built-in")
    for name in CORE_PLUGIN_MODULES:  # the method's own backbone and condition are plugins of their kinds too
        _sources.setdefault(importlib.import_module(name).__name__, "built-in")
    _builtins_loaded = True


def load_entry_points() -> None:
    """Import what every installed package lists under the ``mar_sandbox.plugins`` entry-point group."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        dist = f"{ep.dist.name} {ep.dist.version}" if getattr(ep, "dist", None) is not None else "unknown package"
        try:
            obj = ep.load()
        except (Exception, SystemExit) as e:  # a broken third-party package must say which one it is (and not exit)
            raise UserError(f"plugin entry point '{ep.name} = {ep.value}' of {dist} failed to import: "
                            f"{type(e).__name__}: {e}; fix or uninstall that package") from e
        module = obj.__name__ if isinstance(obj, ModuleType) else getattr(obj, "__module__", ep.module)
        _sources.setdefault(module, f"entry point {ep.name} ({dist})")
    _entry_points_loaded = True


def module_name_for(path: str | Path) -> str:
    """The module a plugin file is imported as: ``sandbox_plugin_<stem>`` (a valid identifier).

    It depends on the file name only, not on its directory, so a run whose
    plugin file moved still finds its classes once the new path is given.
    """
    return FILE_MODULE_PREFIX + re.sub(r"\W", "_", Path(path).stem)


def load_file(path: str | Path, origin: str = "") -> ModuleType:
    """Import a plugin file (``--plugin``); its classes register by subclassing a kind. Loading the same
    file twice is a no-op. ``origin`` says where the path was given, for the error messages."""
    path = Path(path).expanduser().resolve()
    where = f" ({origin})" if origin else ""
    if not path.is_file():
        raise UserError(f"plugin file not found: {path}{where}")
    if path.suffix != ".py":
        raise UserError(f"plugin file {path}{where} is not a .py file")
    name = module_name_for(path)
    if name in _files:
        if _files[name] == path:
            return sys.modules[name]
        raise UserError(f"plugin files {_files[name]} and {path} have the same file name; rename one "
                        "(a plugin file is imported under its file name)")
    if name in sys.modules:
        raise UserError(f"plugin file {path}{where}: module name {name} is already taken; rename the file")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before executing it: dataclasses and pickling look the module up by name
    try:
        spec.loader.exec_module(module)
    except SystemExit as e:  # not the command's decision: exit 0 here would end the command "successfully"
        del sys.modules[name]
        raise UserError(f"plugin file {path}{where} called sys.exit({e.code!r}) while being imported") from None
    except Exception as e:
        del sys.modules[name]
        raise UserError(f"plugin file {path}{where} failed to import: {type(e).__name__}: {e}") from e
    _files[name] = path
    _sources[name] = f"file {path}"
    return module


def load_listed(paths, origin: str, stand_ins: set[str] | None = None) -> None:
    """Load the plugin files a recipe lists. A file already loaded under the same file name stands in for
    a listed one (``--plugin NEW/PATH.py`` for a plugin file that moved since the recipe was stored);
    ``stand_ins`` limits that to these module names (default: every loaded plugin file)."""
    for path in paths:
        name = module_name_for(path)
        if name in _files and (stand_ins is None or name in stand_ins):
            continue
        try:
            load_file(path, origin)
        except UserError as e:
            if "not found" not in str(e):
                raise
            raise UserError(f"{e}; if the file moved, give its new path with --plugin") from None


def require_loaded(paths, who: str) -> None:
    """Check, importing nothing, that the plugin files a stored recipe lists (a run directory's) were loaded
    from a source the user named (``--plugin``, or a recipe file they gave), matched by file name as a stand-in
    is. ``who`` names what needs them ("run runs/x"). A run directory is data: the files it names never run
    unless the user names them too."""
    missing = [Path(p) for p in paths if module_name_for(p) not in _files]
    if not missing:
        return
    files = ", ".join(map(str, missing))
    flags = " ".join(f"--plugin {p}" for p in missing)
    moved = "; if the file moved, give its new path with --plugin" if not all(p.is_file() for p in missing) else ""
    many = len(missing) > 1
    raise UserError(f"{who} needs plugin file{'s' * many} {files}: pass {flags} if you trust "
                    f"{'them' if many else 'it'}{moved}")


def load_files(paths, origin: str = "") -> list[Path]:
    """Load several plugin files; returns their resolved absolute paths (what a stored recipe keeps)."""
    return [Path(load_file(p, origin).__file__).resolve() for p in paths]


def loaded_files() -> list[Path]:
    """Every plugin file loaded in this process, in loading order."""
    return list(_files.values())


def discover(plugin_files=(), origin: str = "") -> None:
    """Import every plugin source, then check that short names are unique within each kind."""
    load_builtins()
    load_entry_points()
    load_files(plugin_files, origin)
    for kind in KINDS:
        plugins(kind)  # raises on a clash


@contextmanager
def isolated():
    """Forget the plugin files and entry points loaded inside the block (for tests).

    Their modules leave ``sys.modules`` and, once garbage-collected, their
    classes leave the registry; built-ins and other imported modules stay. Tests that load plugins in
    the test process use it so one test's plugins cannot clash with another's.
    """
    global _entry_points_loaded
    modules, sources, files, eps = set(sys.modules), dict(_sources), dict(_files), _entry_points_loaded
    try:
        yield
    finally:
        added = (set(_sources) - set(sources)) | {m for m in sys.modules if m.startswith(FILE_MODULE_PREFIX)}
        removed = [sys.modules.pop(name) for name in added - modules if name in sys.modules]
        _sources.clear(), _sources.update(sources)
        _files.clear(), _files.update(files)
        _entry_points_loaded = eps
        if removed:
            del removed
            gc.collect()  # subclasses are weakly referenced by their base: collected classes disappear


# --------------------------------------------------------------------------------------
# Looking plugins up
# --------------------------------------------------------------------------------------
def _subclasses(base: type) -> list[type]:
    seen, stack = [], list(base.__subclasses__())
    while stack:
        cls = stack.pop()
        if cls not in seen:
            seen.append(cls)
            stack.extend(cls.__subclasses__())
    return seen


def _is_plugin(cls: type) -> bool:
    """What a recipe can name by short class name (the rule jsonargparse applies, plus the opt-out), and
    still current: a class whose module was unloaded or re-imported since is a stale copy, not a clash."""
    if (inspect.isabstract(cls) or cls.__dict__.get("__abstract_plugin__", False) or cls.__name__.startswith("_")
            or "<locals>" in cls.__qualname__):
        return False
    return getattr(sys.modules.get(cls.__module__), cls.__qualname__, None) is cls


def source_of(cls: type) -> str:
    return _sources.get(cls.__module__, f"module {cls.__module__}")


def kind_of(cls: type) -> str:
    """The kind a plugin class belongs to ('tokenizer', 'ordering', 'head' or 'dataset')."""
    for kind, base in KINDS.items():
        if isinstance(cls, type) and issubclass(cls, base):
            return kind
    raise UserError(f"{getattr(cls, '__name__', cls)!s} is not a plugin: subclass one of "
                    f"{', '.join('sandbox.' + b.__name__ for b in KINDS.values())}")


def plugins(kind: str) -> dict[str, type]:
    """Registered plugins of a kind, by short class name. A clash is an error naming both sources."""
    found: dict[str, type] = {}
    for cls in _subclasses(KINDS[kind]):
        if not _is_plugin(cls):
            continue
        other = found.get(cls.__name__)
        if other is not None and other is not cls:
            first, second = sorted([other, cls], key=lambda c: (source_of(c) != "built-in", c.__module__))
            raise UserError(
                f"two {kind} plugins are named {cls.__name__}: {first.__module__}.{first.__name__} "
                f"({source_of(first)}) and {second.__module__}.{second.__name__} ({source_of(second)}); rename one"
            )
        found[cls.__name__] = cls
    return dict(sorted(found.items()))


def unknown_plugin(kind: str, name: str) -> str:
    """The error for a recipe naming no registered plugin of ``kind``: what it is instead, or the closest
    names, and where the list of plugins is."""
    known = plugins(kind)
    other = next((k for k in KINDS if k != kind and name in plugins(k)), None)
    if other is not None:
        head = f"{name} is {with_article(other)}, not {with_article(kind)}"
    else:
        by_lower = {n.lower(): n for n in known}
        close = [n for n in by_lower if n.startswith(name.lower())]  # 'raster' for RasterOrdering
        close = close or difflib.get_close_matches(name.lower(), by_lower, n=1, cutoff=0.8)  # typos
        head = f"unknown {kind} {name!r}" + (f" (did you mean {by_lower[close[0]]}?)" if len(close) == 1 else "")
    return (f"{head}; the {kind}s are {', '.join(known) or '(none)'} "
            f"(`sandbox plugins` lists their options; load your own with --plugin FILE.py)")


def describe(kind: str, cls: type) -> PluginInfo:
    doc = (inspect.getdoc(cls) or "").strip().splitlines()
    params = list(inspect.signature(cls.__init__).parameters.values())[1 + INJECTED_ARGS[kind] :]
    args = []
    for p in params:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        ann = p.annotation if isinstance(p.annotation, str) else getattr(p.annotation, "__name__", str(p.annotation))
        ann = "" if p.annotation is inspect.Parameter.empty else str(ann).replace("typing.", "")
        default = "" if p.default is inspect.Parameter.empty else f" = {p.default!r}"
        args.append((p.name, f"{ann}{default}".strip()))
    return PluginInfo(kind, cls.__name__, cls, source_of(cls), doc[0] if doc else "", args)


def format_listing() -> str:
    lines = []
    for kind in KINDS:
        lines.append(f"{kind}s:")
        for name, cls in plugins(kind).items():
            info = describe(kind, cls)
            lines.append(f"  {name:<22} {info.doc}  [{info.source}]")
            for arg, spec in info.args:
                lines.append(f"      --{kind if kind != 'dataset' else 'data'}.{arg}: {spec}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
