"""Config variables owned by other packages: ``${NAME.FIELD}`` resolved by a registered provider.

A provider is found through the ``vlmzoo.config_variables`` entry-point group (the entry point's
name is ``NAME``) or registered in code with :func:`register_variable_provider`. Its settings are
the run config's top-level ``NAME`` section, typed by the provider's ``settings_type`` dataclass
(so an unknown key is an error naming it). Two rules keep reading a config cheap and safe:

- :meth:`VariableProvider.values` computes every ``FIELD`` from the settings alone: resolving a
  config (``--help``, ``--print-config``, validation) never creates, builds or downloads anything;
- :meth:`VariableProvider.prepare` makes the files the values point at exist (build, verify,
  repair) and is called by what needs the files: :func:`prepare_variables` at the start of
  training and evaluation.

A provider whose files live under one folder returns it as the ``root`` value; the settings field
``root`` then records it, and a run's identity names paths under it by the folder's name, so the
same files in another cache are the same run. The settings fields in ``locations`` say where
files are, not what they are: changing them does not make a run another run.
"""

from __future__ import annotations

import importlib.metadata
import logging
from typing import Any, Mapping, Protocol, runtime_checkable

from .utils import ConfigKeyError, unknown_key_error

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "vlmzoo.config_variables"


@runtime_checkable
class VariableProvider(Protocol):
    """What a package registers to own a config section and its ``${NAME.FIELD}`` variables."""

    #: dataclass of the section's keys (must have a ``root`` field if ``values`` returns ``root``).
    settings_type: type
    #: settings fields that are locations (e.g. ``cache_dir``, ``root``), not content.
    locations: tuple[str, ...]

    def values(self, settings: Any) -> Mapping[str, str]:
        """``FIELD -> value`` for the typed ``settings``, computed without side effects."""

    def prepare(self, settings: Any) -> None:
        """Make the files behind :meth:`values` exist and check them (may take long; logs progress)."""


_PROVIDERS: dict[str, VariableProvider] = {}
_loaded = False


def register_variable_provider(name: str, provider: VariableProvider) -> None:
    """Register ``provider`` for the config section and variables ``NAME`` (a duplicate is an error)."""
    if not name.isidentifier():
        raise ValueError(f"Variable provider name must be a Python identifier, got {name!r}.")
    if not isinstance(provider, VariableProvider):
        raise TypeError(f"{provider!r} is not a VariableProvider (settings_type, locations, values, prepare).")
    existing = _PROVIDERS.get(name)
    if existing is not None and existing is not provider:
        raise ValueError(f"Config variables {name!r} are already provided by {existing!r}.")
    _PROVIDERS[name] = provider


def variable_providers() -> dict[str, VariableProvider]:
    """Every registered provider by name (entry points loaded on first call)."""
    global _loaded
    if not _loaded:
        _loaded = True
        for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            if ep.name not in _PROVIDERS:
                register_variable_provider(ep.name, ep.load())
    return dict(_PROVIDERS)


class VariableResolver:
    """A ``(name, field) -> str`` for :func:`vlmzoo.config_tree.interpolate`: ``builtins`` answer
    ``${name}``, the providers answer ``${name.field}`` from ``sections`` (name -> typed settings;
    a provider without a section uses its default settings). :attr:`used` then holds the settings
    of every provider a variable was resolved with."""

    def __init__(self, sections: Mapping[str, Any], builtins: Mapping[str, str]) -> None:
        self._sections, self._builtins = sections, builtins
        self._values: dict[str, Mapping[str, str]] = {}
        self.used: dict[str, Any] = {}

    def __call__(self, name: str, attr: str | None) -> str:
        providers = variable_providers()
        if attr is None and name in self._builtins:
            return self._builtins[name]
        if attr is not None and name in providers:
            if name not in self._values:
                settings = self._sections.get(name) or providers[name].settings_type()
                self._values[name], self.used[name] = providers[name].values(settings), settings
            if attr not in self._values[name]:
                raise unknown_key_error(attr, sorted(self._values[name]), f"${{{name}.*}}")
            return str(self._values[name][attr])
        known = [f"${{{b}}}" for b in self._builtins] + [f"${{{p}.FIELD}}" for p in sorted(providers)]
        raise ConfigKeyError(f"Unknown variable ${{{name}{'.' + attr if attr else ''}}}; known: {', '.join(known)}.")


def prepare_variables(sections: Mapping[str, Any]) -> None:
    """Call each provider's :meth:`~VariableProvider.prepare` on its section (name -> typed settings)."""
    providers = variable_providers()
    for name, settings in sections.items():
        providers[name].prepare(settings)
