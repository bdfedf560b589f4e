"""Config trees: YAML files with ``_base_`` inheritance, deep merge, dotted overrides and ``${var}``
interpolation. The run-config schema is :mod:`vlmzoo.config`; its typed build (unknown keys and
wrong types are errors that name the key) is :func:`vlmzoo.utils.build_dataclass`."""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any, Callable

import yaml

from .utils import ConfigKeyError

BASE_KEY = "_base_"


# ---- YAML with proper floats ---------------------------------------------------------------------
class _Loader(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, where ``1e-3`` is a string; read it as the float everyone means."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


# ---- loading and merging -------------------------------------------------------------------------
def load_yaml_tree(path: str | os.PathLike, _chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read ``path`` and its ``_base_`` files (relative to it), deep-merged; cycles are errors."""
    path = Path(path).resolve()
    if path in _chain:
        raise ValueError(f"Config inheritance cycle: {' -> '.join(str(p) for p in (*_chain, path))}.")
    if not path.is_file():
        raise FileNotFoundError(f"Config file not found: {path}")
    data = parse_yaml(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"Config file {path} must hold a mapping at the top level, got {type(data).__name__}.")
    bases = data.pop(BASE_KEY, [])
    if isinstance(bases, str):
        bases = [bases]
    merged: dict[str, Any] = {}
    for base in bases:
        merged = deep_merge(merged, load_yaml_tree(path.parent / base, (*_chain, path)), where=str(path))
    return deep_merge(merged, data, where=str(path))


def deep_merge(base: Any, update: Any, where: str = "config") -> Any:
    """``update`` on top of ``base``: mappings merge recursively, a mapping with integer keys
    patches items of a list, anything else replaces. Neither input is modified."""
    if isinstance(base, dict) and isinstance(update, dict):
        out = dict(base)
        for key, value in update.items():
            out[key] = deep_merge(base[key], value, f"{where}.{key}") if key in base else copy.deepcopy(value)
        return out
    if isinstance(base, list) and isinstance(update, dict) and all(isinstance(k, int) for k in update):
        out_list = list(base)
        for idx, value in update.items():
            if not -len(out_list) <= idx < len(out_list):
                raise IndexError(f"{where}: item {idx} patched, but the list has {len(out_list)} items.")
            out_list[idx] = deep_merge(out_list[idx], value, f"{where}.{idx}")
        return out_list
    return copy.deepcopy(update)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b.0.c=1e-3"`` -> (``["a", "b", "0", "c"]``, ``0.001``)."""
    if "=" not in text:
        raise ValueError(f"Override {text!r} must look like dotted.key=value (e.g. training.stages.0.lr=1e-3).")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ValueError(f"Override {text!r} has an empty key segment.")
    if not raw.strip():
        return parts, ""
    try:
        return parts, parse_yaml(raw)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ValueError(
            f"Override {key.strip()}: the value {raw!r} is not valid YAML ({problem}); quote it if it is a string, "
            f"e.g. {key.strip()}='\"...\"'."
        ) from None


def apply_override(tree: dict[str, Any], parts: list[str], value: Any) -> None:
    """Set ``tree[parts[0]][parts[1]]... = value`` in place; integer segments index lists.

    Missing mapping keys are created (the typed build then checks them against the schema)."""
    node: Any = tree
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        here = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            try:
                idx = int(part)
            except ValueError:
                raise ConfigKeyError(f"Override {'.'.join(parts)!r}: {here!r} indexes a list; use an integer.") from None
            if not -len(node) <= idx < len(node):
                raise ConfigKeyError(f"Override {'.'.join(parts)!r}: {here!r} is out of range (the list has {len(node)} items).")
            if last:
                node[idx] = value
            else:
                node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
        else:
            raise ConfigKeyError(f"Override {'.'.join(parts)!r}: {'.'.join(parts[:depth])!r} is a value, not a section.")


# ---- interpolation -------------------------------------------------------------------------------
_VAR = re.compile(r"\$\{([A-Za-z_][\w]*)(?:\.([A-Za-z_]\w*))?\}")


def interpolate(tree: Any, resolve: Callable[[str, str | None], str]) -> Any:
    """Replace ``${name}`` / ``${name.field}`` in every string of ``tree`` by ``resolve(name, field)``."""
    if isinstance(tree, dict):
        return {k: interpolate(v, resolve) for k, v in tree.items()}
    if isinstance(tree, list):
        return [interpolate(v, resolve) for v in tree]
    if isinstance(tree, str) and "${" in tree:
        return _VAR.sub(lambda m: str(resolve(m.group(1), m.group(2))), tree)
    return tree
