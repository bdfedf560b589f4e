"""The tiny world as config variables: the ``tiny_world`` section and ``${tiny_world.FIELD}``.

Registered under the ``vlmzoo.config_variables`` entry-point group. Resolving a variable only
computes the world's folder from its config hash (nothing is built); :meth:`TinyWorldVariables.prepare`
builds, verifies or repairs the world when a run needs its files.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from . import TinyWorldConfig, TinyWorldPaths, build_tiny_world, world_root


@dataclass
class TinyWorldSection:
    """The ``tiny_world`` config section.

    Attributes:
        cache_dir: cache root (default ``$VLMZOO_CACHE``, else ``~/.cache/vlmzoo``).
        config: ``TinyWorldConfig`` overrides (nested ``clip`` / ``llm`` dicts override field by field).
        root: not an input: the world's folder (``<cache root>/tiny_world/<world hash>``), recorded
            when the config is resolved. A run's identity names paths under it by the world's hash,
            so moving the cache does not make a run another run.
    """

    cache_dir: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    root: str | None = None


class TinyWorldVariables:
    """``${tiny_world.FIELD}`` = a field of :class:`TinyWorldPaths`."""

    settings_type = TinyWorldSection
    locations = ("cache_dir", "root")

    def values(self, settings: TinyWorldSection) -> dict[str, str]:
        paths = TinyWorldPaths.at(world_root(settings.cache_dir, TinyWorldConfig.from_dict(settings.config)))
        return {f.name: str(getattr(paths, f.name)) for f in dataclasses.fields(paths)}

    def prepare(self, settings: TinyWorldSection) -> None:
        build_tiny_world(cache_dir=settings.cache_dir, config=settings.config or None)


PROVIDER = TinyWorldVariables()
