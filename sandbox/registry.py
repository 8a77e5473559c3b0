"""Plugin discovery: built-in ``plugins/``, installed entry points, and ``--plugin`` files.

A plugin is a subclass of a kind's base class (``sandbox.kinds``); once its
module is imported, jsonargparse resolves its short class name in recipes.
Discovery therefore only has to import modules and remember where each
class came from, so ``sandbox plugins`` can say so and clashes can name both
sources.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import pkgutil
import sys
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path

from sandbox.errors import UserError
from sandbox.kinds import KINDS

ENTRY_POINT_GROUP = "mar_sandbox.plugins"

# how many leading constructor arguments the core injects, per kind (see sandbox.kinds)
INJECTED_ARGS = {"tokenizer": 0, "ordering": 1, "head": 2, "dataset": 0}

_sources: dict[str, str] = {}  # module name -> where it came from ("built-in", "entry point x", "file p")
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


def _import_module(name: str, source: str) -> None:
    module = importlib.import_module(name)
    _sources.setdefault(module.__name__, source)


def load_builtins() -> None:
    global _builtins_loaded
    if _builtins_loaded:
        return
    import plugins

    for info in pkgutil.walk_packages(plugins.__path__, prefix="plugins."):
        _import_module(info.name, "built-in")
    _builtins_loaded = True


def load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            module = ep.load()
        except Exception as e:  # a broken third-party package must say which one it is
            raise UserError(f"plugin entry point '{ep.name}' ({ep.value}) failed to import: {e}") from e
        name = getattr(module, "__name__", ep.value)
        _sources.setdefault(name if isinstance(module, type(sys)) else module.__module__, f"entry point {ep.name}")
    _entry_points_loaded = True


def load_file(path: str | Path) -> None:
    """Import a plugin file given with ``--plugin``; its classes register by subclassing a kind."""
    path = Path(path).expanduser().resolve()
    if not path.is_file():
        raise UserError(f"plugin file not found: {path}")
    name = f"sandbox_user_plugin_{path.stem}_{abs(hash(str(path))) % 10**8}"
    if name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise UserError(f"plugin file {path} failed to import: {type(e).__name__}: {e}") from e
    _sources[name] = f"file {path}"


def discover(plugin_files: list[str] | tuple[str, ...] = ()) -> None:
    """Import every plugin source, then check that short names are unique within each kind."""
    load_builtins()
    load_entry_points()
    for f in plugin_files:
        load_file(f)
    for kind in KINDS:
        plugins(kind)  # raises on a clash


def _subclasses(base: type) -> list[type]:
    seen, stack = [], list(base.__subclasses__())
    while stack:
        cls = stack.pop()
        if cls not in seen:
            seen.append(cls)
            stack.extend(cls.__subclasses__())
    return seen


def source_of(cls: type) -> str:
    return _sources.get(cls.__module__, f"module {cls.__module__}")


def plugins(kind: str) -> dict[str, type]:
    """Registered plugins of a kind, by short class name. A clash is an error naming both sources."""
    found: dict[str, type] = {}
    for cls in _subclasses(KINDS[kind]):
        if inspect.isabstract(cls) or cls.__dict__.get("__abstract_plugin__", False):
            continue
        other = found.get(cls.__name__)
        if other is not None and other is not cls:
            raise UserError(
                f"two {kind} plugins are named {cls.__name__}: {other.__module__}.{other.__name__} "
                f"({source_of(other)}) and {cls.__module__}.{cls.__name__} ({source_of(cls)}); rename one"
            )
        found[cls.__name__] = cls
    return dict(sorted(found.items()))


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
