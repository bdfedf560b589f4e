"""Per-turn image regions: the boxes a human turn is about, and their patch mask.

A human turn of a LLaVA record may carry ``"regions"``: a list of boxes ``[x0, y0, x1, y1]`` in
normalised image coordinates (0..1, x to the right, y down; ``x0 < x1``, ``y0 < y1``), e.g. the
object a question names. ``[]`` says the turn names no region; a turn without the field says
nothing. A model whose input spec asks for them (``InputSpec.query_region_grid``) reads the
regions of each sample's *query*, the last user message (the turn ``query_text`` is taken from),
as a patch mask over the tower's grid (:func:`region_patch_mask`).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch

REGIONS_KEY = "regions"

Box = list[float]


def parse_regions(value: Any) -> list[Box]:
    """A ``regions`` value -> a list of boxes of floats; a ``ValueError`` saying what is wrong otherwise."""
    if not isinstance(value, list):
        raise ValueError(f"'regions' must be a list of [x0, y0, x1, y1] boxes, got {str(value)[:200]}.")
    boxes = []
    for k, box in enumerate(value):
        numbers = isinstance(box, list) and len(box) == 4 and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in box)
        if not numbers or not (0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1):
            raise ValueError(f"'regions' box {k} is {str(box)[:200]}; expected [x0, y0, x1, y1] in normalised image "
                             "coordinates with 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1.")
        boxes.append([float(v) for v in box])
    return boxes


def query_regions(messages: Sequence[Mapping[str, Any]]) -> list[Box] | None:
    """The regions of the last user message (the query), or ``None`` if it has no ``regions`` field
    (or there is no user message)."""
    users = [m for m in messages if m.get("role") == "user"]
    if not users or users[-1].get(REGIONS_KEY) is None:
        return None
    return [list(map(float, box)) for box in users[-1][REGIONS_KEY]]


def region_patch_mask(regions: Sequence[Sequence[float]], grid: int) -> torch.Tensor:
    """Boxes -> ``(grid * grid,)`` float mask over a square patch grid in row-major order (row 0 at
    the top): a patch is 1 if its centre lies inside (or on the edge of) any box, else 0."""
    centres = (torch.arange(grid, dtype=torch.float64) + 0.5) / grid  # (g,)
    mask = torch.zeros(grid, grid, dtype=torch.bool)
    for x0, y0, x1, y1 in regions:
        rows = (centres >= y0) & (centres <= y1)
        cols = (centres >= x0) & (centres <= x1)
        mask |= rows[:, None] & cols[None, :]
    return mask.reshape(-1).to(torch.float32)
