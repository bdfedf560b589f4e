"""Helpers for strategies that read several tower layers (IGVA, DenseConnector).

Layer indices are indices into the tower's hidden states, as in :class:`~vlmzoo.strategy.StrategyNeeds`
(``0`` = embedding output, ``L`` = last layer, negatives count from the end).
"""

from __future__ import annotations

from typing import Sequence

import torch


def contiguous_groups(indices: Sequence[int], num_groups: int) -> list[list[int]]:
    """Split ``indices`` in order into ``num_groups`` contiguous groups whose sizes differ by at most
    one (the larger groups first), e.g. ``range(1, 25)`` in 4 -> ``[[1..6], [7..12], [13..18], [19..24]]``."""
    indices = list(indices)
    if not 1 <= num_groups <= len(indices):
        raise ValueError(f"Cannot split {len(indices)} layers into {num_groups} non-empty groups.")
    size, extra = divmod(len(indices), num_groups)
    groups, start = [], 0
    for g in range(num_groups):
        end = start + size + (1 if g < extra else 0)
        groups.append(indices[start:end])
        start = end
    return groups


def check_groups(groups: Sequence[Sequence[int]], where: str) -> list[list[int]]:
    """Explicit layer groups from a config: a non-empty list of non-empty lists of ints."""
    if not groups or any(not g for g in groups):
        raise ValueError(f"{where}: layer groups must be a non-empty list of non-empty lists, got {groups!r}.")
    out = [[int(i) for i in g] for g in groups]
    if any(len(set(g)) != len(g) for g in out):
        raise ValueError(f"{where}: a layer repeats inside a group in {groups!r}.")
    return out


def unique_layers(*layer_lists: Sequence[int]) -> tuple[int, ...]:
    """All layers of the given lists, each once, in first-seen order."""
    return tuple(dict.fromkeys(i for layers in layer_lists for i in layers))


def mean_of_layers(features: dict[int, torch.Tensor], layers: Sequence[int]) -> torch.Tensor:
    """Mean of ``features[i]`` over ``layers``: each ``(N, ...)`` -> ``(N, ...)``."""
    return torch.stack([features[i] for i in layers], dim=0).mean(dim=0)
