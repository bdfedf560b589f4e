"""Small helpers shared across the core: strict, typed dataclass construction and name suggestions."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, TypeVar

_T = TypeVar("_T")


def nearest_names(name: str, candidates: typing.Iterable[str], n: int = 3) -> list[str]:
    """Up to ``n`` candidates that look like ``name`` (for 'did you mean' messages)."""
    return difflib.get_close_matches(name, sorted(candidates), n=n, cutoff=0.5)


class ConfigKeyError(KeyError):
    """An unknown configuration key; the message names it and the nearest valid keys."""

    def __str__(self) -> str:
        return str(self.args[0])


def unknown_key_error(key: str, valid: typing.Iterable[str], where: str) -> ConfigKeyError:
    valid = sorted(valid)
    near = nearest_names(key, valid)
    hint = f" Did you mean {', '.join(repr(k) for k in near)}?" if near else ""
    return ConfigKeyError(f"Unknown key {key!r} in {where}.{hint} Valid keys: {', '.join(valid)}.")


def build_dataclass(cls: type[_T], values: Any, where: str) -> _T:
    """Build dataclass ``cls`` from plain (JSON/YAML) data, recursively and by its type hints.

    Unknown keys raise :class:`ConfigKeyError`; a value of the wrong type raises ``TypeError``
    naming ``where.key``. Lists become tuples for tuple fields (so a config read back from JSON
    equals the defaults), integers become floats for float fields; ``None`` means no values.
    """
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise TypeError(f"{where} must be a mapping, got {values!r}.")
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            raise unknown_key_error(str(key), names, where)
    hints = typing.get_type_hints(cls)
    return cls(**{key: coerce_value(hints[key], value, f"{where}.{key}") for key, value in values.items()})


def coerce_value(tp: Any, value: Any, where: str) -> Any:
    """``value`` checked against (and, where lossless, converted to) type hint ``tp``; types it
    cannot check (``Any``, ``Literal``, classes) pass through."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return coerce_value(arg, value, where)
            except (TypeError, ValueError) as exc:
                errors.append(str(exc))
        raise TypeError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {tp}.")
    if dataclasses.is_dataclass(tp):
        return value if isinstance(value, tp) else build_dataclass(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"{where} must be a list, got {value!r}.")
        if origin is list or (len(args) == 2 and args[1] is Ellipsis):
            items = [coerce_value(args[0], v, f"{where}.{i}") for i, v in enumerate(value)] if args else list(value)
        elif args:
            if len(args) != len(value):
                raise TypeError(f"{where} must have {len(args)} items, got {value!r}.")
            items = [coerce_value(a, v, f"{where}.{i}") for i, (a, v) in enumerate(zip(args, value))]
        else:
            items = list(value)
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise TypeError(f"{where} must be a mapping, got {value!r}.")
        vtype = args[1] if args else Any
        return {k: coerce_value(vtype, v, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise TypeError(f"{where} must be true or false, got {value!r}.")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{where} must be a number, got {value!r}.")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise TypeError(f"{where} must be an integer, got {value!r}.")
        return int(value)
    if tp is str:
        if not isinstance(value, str):
            raise TypeError(f"{where} must be a string, got {value!r}.")
        return value
    return value


def hf_config_spec(hf_config: Any) -> dict[str, Any]:
    """A transformers sub-model config as a JSON spec ``{"backend": "hf", ...}`` (bookkeeping keys dropped)."""
    d = hf_config.to_dict()
    for key in ("transformers_version", "architectures", "_name_or_path", "dtype", "torch_dtype"):
        d.pop(key, None)
    return {"backend": "hf", **d}
