"""Small helpers shared across the core: strict, typed dataclass construction, name suggestions,
atomic file writes, and the one-line errors of the command-line scripts."""

from __future__ import annotations

import dataclasses
import difflib
import logging
import os
import sys
import tempfile
import types
import typing
from pathlib import Path
from typing import Any, Callable, TypeVar

import transformers

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
    """``value`` checked against (and, where lossless, converted to) type hint ``tp``; a ``Literal``
    value must be one of its choices (the error names ``where`` and the choices); types it cannot
    check (``Any``, classes) pass through."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Literal:
        if not any(type(value) is type(a) and value == a for a in args):
            raise ValueError(f"{where} must be one of {', '.join(map(repr, args))}, got {value!r}.")
        return value
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


# ---- atomic files --------------------------------------------------------------------------------
def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename or removal inside ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder, flushed to disk and
    renamed over it: a reader (or a run after a crash) sees the old file or the new one, never a part."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


# ---- command-line errors -------------------------------------------------------------------------
# Errors that describe bad input (a config key, a value, a data record, a missing file): a script
# prints their message on one line instead of a traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigKeyError, ValueError, TypeError, FileNotFoundError,
                                                NotADirectoryError, IsADirectoryError, PermissionError, ImportError)
DEBUG_FLAG = "--debug"


def setup_logging() -> None:
    """INFO logs with a time stamp for the command lines; transformers' own at WARNING."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S", level=logging.INFO)
    transformers.logging.set_verbosity_warning()


def cli_entry(main: Callable[[list[str]], int], argv: list[str] | None = None) -> int:
    """Run a script's ``main(argv)``; a :data:`USER_ERRORS` exception prints ``error: <message>``
    on stderr (one line, no traceback) and returns 2. ``--debug`` anywhere in ``argv`` (removed
    before ``main`` sees it) lets the exception through with its traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv
    argv = [a for a in argv if a != DEBUG_FLAG]
    try:
        return main(argv)
    except USER_ERRORS as exc:
        if debug:
            raise
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"error: {message} (run with {DEBUG_FLAG} for the traceback)", file=sys.stderr)
        return 2


def default_cache_dir() -> Path:
    """vlmzoo's cache root: ``$VLMZOO_CACHE``, else ``~/.cache/vlmzoo``."""
    return Path(os.environ.get("VLMZOO_CACHE") or Path.home() / ".cache" / "vlmzoo")
