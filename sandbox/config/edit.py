"""Setting one value inside a recipe file in place, keeping its comments and layout.

PyYAML drops comments when it rewrites a file, and recipes carry their reasons in comments; the
composed node tree still records where every scalar sits in the text, so a value is replaced (or a
missing key inserted) by editing just those characters. Anything unusual (flow-style mappings, a
key that is not a mapping) falls back to a plain rewrite, which the caller is told about.
Hand-written rather than ruamel.yaml (which round-trips comments): one scalar edit does not justify a new
dependency, and PyYAML's node marks give the exact span to replace.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from sandbox.errors import UserError
from sandbox.run.files import atomic_write_bytes


def _child(node, key: str):
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode) and k.value == key:
                return v
    return None


def _edit(text: str, keys: tuple[str, ...], value: str) -> str | None:
    """The text with ``keys`` set to ``value`` (a YAML scalar), or None when it cannot be done by a local edit."""
    root = yaml.compose(text)
    node, depth = root, 0
    while depth < len(keys):
        child = _child(node, keys[depth])
        if child is None:
            break
        node, depth = child, depth + 1
    if depth == len(keys):  # the key exists: replace its scalar
        if not isinstance(node, yaml.ScalarNode):
            return None
        return text[: node.start_mark.index] + value + text[node.end_mark.index :]
    if not isinstance(node, yaml.MappingNode) or node.flow_style or not node.value:
        return None
    # insert the missing keys after the mapping's last entry, at its indentation
    last_key, last_value = node.value[-1]
    if not isinstance(last_value, yaml.ScalarNode):
        return None
    indent = " " * node.value[0][0].start_mark.column
    lines = [f"{indent}{'  ' * i}{k}:" for i, k in enumerate(keys[depth:])]
    lines[-1] += f" {value}"
    end = text.find("\n", last_value.end_mark.index)
    end = len(text) if end < 0 else end
    return text[:end] + "\n" + "\n".join(lines) + text[end:]


def set_recipe_value(path: str | Path, keys: tuple[str, ...], value: float) -> bool:
    """Set ``keys`` (e.g. ("tokenizer", "init_args", "scale")) to ``value`` in the YAML file ``path``, atomically.

    Returns True when the file was edited in place (comments kept), False when it had to be rewritten whole.
    """
    path = Path(path)
    try:
        text = path.read_text()
        data = yaml.safe_load(text)
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"cannot read the recipe {path}: {' '.join(str(e).split())}") from e
    if not isinstance(data, dict):
        raise UserError(f"{path} is not a recipe (a YAML mapping)")
    edited = _edit(text, keys, yaml.safe_dump(value).splitlines()[0])
    if edited is not None:
        found = yaml.safe_load(edited)
        for k in keys:
            found = found.get(k) if isinstance(found, dict) else None
        if found != value:
            edited = None
    in_place = edited is not None
    if not in_place:  # rewrite the whole mapping (comments are lost)
        node = data
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                node[k] = {} if node.get(k) is None else {"class_path": node[k]}
            node = node[k]
        node[keys[-1]] = value
        edited = yaml.safe_dump(data, sort_keys=False)
    atomic_write_bytes(path, edited.encode())
    return in_place
