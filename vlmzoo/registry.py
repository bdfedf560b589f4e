"""The one strict registry of vision-guidance strategies.

Built-in strategies (``architectures/``) and third-party ones register the same way: a class
decorated with :func:`register_strategy`, found through the ``vlmzoo.strategies`` entry-point
group (or simply imported). Registering a duplicate name, or asking for an unknown one, is an
error that lists what exists.
"""

from __future__ import annotations

import importlib.metadata
import logging
from typing import Callable, TypeVar

from .strategy import GuidanceStrategy

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "vlmzoo.strategies"

_S = TypeVar("_S", bound="type[GuidanceStrategy]")


class UnknownStrategyError(KeyError):
    """Raised when a strategy name is not registered."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


class DuplicateStrategyError(ValueError):
    """Raised when a second, different class is registered under an existing name."""


class StrategyRegistry:
    """Name -> strategy class. Entry points are loaded lazily, once, on first look-up."""

    def __init__(self, group: str = ENTRY_POINT_GROUP) -> None:
        self._group = group
        self._classes: dict[str, type[GuidanceStrategy]] = {}
        self._entry_points_loaded = False

    def register(self, name: str) -> Callable[[_S], _S]:
        """Class decorator: ``@register_strategy("my_method")``."""
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(f"Strategy name must be a Python identifier, got {name!r}.")

        def decorator(cls: _S) -> _S:
            if not (isinstance(cls, type) and issubclass(cls, GuidanceStrategy)):
                raise TypeError(f"@register_strategy({name!r}) must decorate a GuidanceStrategy subclass, got {cls!r}.")
            existing = self._classes.get(name)
            if existing is not None and _qualname(existing) != _qualname(cls):
                raise DuplicateStrategyError(
                    f"Strategy name {name!r} is already registered by {_qualname(existing)}; "
                    f"cannot register {_qualname(cls)}. Registered: {self._names_str()}."
                )
            cls.strategy_name = name
            self._classes[name] = cls
            return cls

        return decorator

    def get(self, name: str | None) -> type[GuidanceStrategy]:
        if name is None:
            self._load_entry_points()
            raise UnknownStrategyError(f"No strategy given. Registered strategies: {self._names_str()}.")
        if name not in self._classes:
            self._load_entry_points()
        if name not in self._classes:
            raise UnknownStrategyError(f"Unknown strategy {name!r}. Registered strategies: {self._names_str()}.")
        return self._classes[name]

    def find(self, name: str) -> type[GuidanceStrategy] | None:
        """The class registered as ``name``, or ``None`` (entry points loaded first)."""
        if name not in self._classes:
            self._load_entry_points()
        return self._classes.get(name)

    def names(self) -> list[str]:
        self._load_entry_points()
        return sorted(self._classes)

    def unregister(self, name: str) -> None:
        """Remove a registration (for tests and interactive sessions)."""
        self.get(name)
        del self._classes[name]

    def _names_str(self) -> str:
        return ", ".join(sorted(self._classes)) or "(none)"

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for ep in importlib.metadata.entry_points(group=self._group):
            try:
                obj = ep.load()  # importing the module runs its @register_strategy decorators
            except Exception as exc:  # a broken plug-in must not hide the others, but must be visible
                raise ImportError(f"Could not load strategy entry point {ep.name!r} ({ep.value}): {exc}") from exc
            if isinstance(obj, type) and ep.name not in self._classes:
                self.register(ep.name)(obj)  # a bare class exposed through an entry point
            if ep.name not in self._classes:
                raise UnknownStrategyError(
                    f"Entry point {ep.name!r} ({ep.value}) of group {self._group!r} did not register a strategy "
                    f"named {ep.name!r}. Registered strategies: {self._names_str()}."
                )


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


STRATEGIES = StrategyRegistry()


def register_strategy(name: str):
    """Register a :class:`~vlmzoo.GuidanceStrategy` subclass under ``name`` (class decorator)."""
    return STRATEGIES.register(name)


def available_strategies() -> list[str]:
    """Sorted names of every registered strategy, entry points included."""
    return STRATEGIES.names()


def get_strategy_class(name: str | None) -> type[GuidanceStrategy]:
    """Look a strategy class up by name; raises :class:`UnknownStrategyError` listing the known names."""
    return STRATEGIES.get(name)
