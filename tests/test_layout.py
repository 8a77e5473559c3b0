"""The house's promises about its own layout: what installs, what the method core imports, how long functions
get, and that every link in the README and the docs leads somewhere."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import tomllib
from conftest import REPO

MAX_FUNCTION_LINES = 80


def test_the_wheel_names_every_package_and_claims_no_generic_top_level_name():
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(tool["packages"])
    assert all(name == "sandbox" or name.startswith("sandbox.") for name in listed), listed
    on_disk = set()
    for top, folder in (("sandbox", REPO / "sandbox"), ("sandbox.plugins", REPO / "plugins")):
        for init in folder.rglob("__init__.py"):
            rel = init.parent.relative_to(folder).parts
            on_disk.add(".".join((top, *rel)))
    assert listed == on_disk, f"pyproject.toml lists {sorted(listed ^ on_disk)} differently from the folders"
    assert tool["package-dir"] == {"sandbox": "sandbox", "sandbox.plugins": "plugins"}


def _functions(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


def test_no_function_in_sandbox_is_longer_than_a_screen():
    long = [f"{path.relative_to(REPO)}:{fn.lineno} {fn.name} ({fn.end_lineno - fn.lineno + 1} lines)"
            for path in sorted((REPO / "sandbox").rglob("*.py")) for fn in _functions(path)
            if fn.end_lineno - fn.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, "functions over 80 lines: " + "; ".join(long)


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return found


def test_the_method_core_never_imports_the_speed_paths_or_the_run_machinery():
    for path in sorted((REPO / "sandbox" / "core").glob("*.py")):
        bad = sorted(m for m in _imports(path) if re.match(r"sandbox\.(fast|run|cli|eval|lab)\b", m)
                     or m in ("sandbox.fast", "sandbox.run"))
        assert not bad, f"{path.relative_to(REPO)} imports {bad}"


def test_the_method_core_holds_no_timings():
    """Numbers of milliseconds or speed-ups live in docs/performance.md, not in the method files."""
    timing = re.compile(r"\b\d+(\.\d+)?\s*(ms|us|s per|seconds?)\b|\b\d+(\.\d+)?x (faster|slower)")
    hits = [f"{path.relative_to(REPO)}:{i}" for path in sorted((REPO / "sandbox" / "core").glob("*.py"))
            for i, line in enumerate(path.read_text().splitlines(), 1) if timing.search(line)]
    assert not hits, hits


LINK = re.compile(r"\]\(([^)#\s]+)(#[^)\s]*)?\)")


def test_every_relative_link_in_the_readme_and_docs_resolves():
    pages = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md")), REPO / "CHANGELOG.md"]
    broken = []
    for page in pages:
        for target, _ in LINK.findall(page.read_text()):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(REPO)} -> {target}")
    assert not broken, broken


def test_the_readme_is_a_front_door():
    assert len((REPO / "README.md").read_text().splitlines()) <= 250


def test_import_sandbox_offers_the_api():
    import sandbox

    for name in ("load_run", "generate", "build", "save_grid", "Tokenizer", "Ordering", "Head", "Dataset"):
        assert getattr(sandbox, name) is not None, name
    assert callable(sandbox.testing.check_plugin)
    from sandbox.core.contracts import Head

    assert sandbox.Head is Head
