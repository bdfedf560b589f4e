"""Small helpers shared across the core: strict dataclass construction and name suggestions."""

from __future__ import annotations

import dataclasses
import difflib
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


def build_dataclass(cls: type[_T], values: dict[str, Any], where: str) -> _T:
    """Instantiate dataclass ``cls`` from ``values``; unknown keys raise :class:`ConfigKeyError`.

    Lists are turned into tuples for tuple-typed fields so configs read from JSON/YAML
    compare equal to the defaults.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if key not in names:
            raise unknown_key_error(key, names, where)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        origin = typing.get_origin(hints.get(key))
        kwargs[key] = tuple(value) if origin is tuple and isinstance(value, list) else value
    return cls(**kwargs)


def hf_config_spec(hf_config: Any) -> dict[str, Any]:
    """A transformers sub-model config as a JSON spec ``{"backend": "hf", ...}`` (bookkeeping keys dropped)."""
    d = hf_config.to_dict()
    for key in ("transformers_version", "architectures", "_name_or_path", "dtype", "torch_dtype"):
        d.pop(key, None)
    return {"backend": "hf", **d}
