"""DenseConnector: static multi-layer fusion, the instruction-free control for IGVA.

From the DenseConnector paper (Yao et al., NeurIPS 2024, arXiv:2405.13800). Shapes at the reference scale (CLIP-L/336: L = 24,
P = 576 patches of D_v = 1024; Vicuna-7B d_llm = 4096)::

    mode "dci" (dense channel integration, the default):
        G_j = mean of hidden states in group j     groups: [0..11], [12..23] (hidden states 0..L-1
                                                   in ``dci_groups`` contiguous groups)
        connector(CAT(layer -2, G_1, ..., G_J))    (N, P, (1 + J) D_v) -> (N, P, d_llm) = 576 tokens
    mode "sti" (sparse token integration):
        S_i = AvgPool1d(sti_pool)(layer i tokens)  (N, P // sti_pool, D_v) for i in sti_layers (7, 15)
        connector(CAT_tokens(layer -2, S_1, S_2))  (N, P + 2 P // 8, D_v) -> (N, 720, d_llm)

No module besides the connector (``mlp2x_gelu``; its input width follows the mode). Pooling runs
along the token axis in the tower's raster order, as the reference code's ``AvgPool1d`` does.
Module group: ``connector``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
from torch.nn import functional as F

from vlmzoo import (
    CoreDims,
    GuidanceInputs,
    GuidanceStrategy,
    StrategyConfig,
    StrategyNeeds,
    StrategyOutput,
    TokenGrid,
    patch_grid,
    register_strategy,
)
from vlmzoo.layers import MLPConnector
from vlmzoo.multilayer import check_groups, contiguous_groups, mean_of_layers, unique_layers

Mode = Literal["dci", "sti"]


@dataclass
class DenseConnectorConfig(StrategyConfig):
    """Args:
    vision_layer: the base features (-2), first in every concatenation.
    mode: ``dci`` (channel integration) or ``sti`` (token integration).
    dci_groups: number of contiguous groups of hidden states 0..L-1 (2: lower and upper half).
    dci_layer_groups: explicit groups of hidden-state indices (overrides ``dci_groups``).
    sti_layers: hidden states pooled and appended as tokens in ``sti`` mode ((7, 15) at L = 24).
    sti_pool: pooling window and stride along the tokens (8).
    connector_depth / connector_act: the connector (``mlp2x_gelu``).
    """

    vision_layer: int = -2
    mode: Mode = "dci"
    dci_groups: int = 2
    dci_layer_groups: Optional[list[list[int]]] = None
    sti_layers: list[int] = field(default_factory=lambda: [7, 15])
    sti_pool: int = 8
    connector_depth: int = 2
    connector_act: str = "gelu"


@register_strategy("dense_connector")
class DenseConnectorStrategy(GuidanceStrategy):
    """``dci``: ``(N, P, (1 + J) D_v)`` -> ``(N, P, d_llm)``; ``sti``: ``(N, P + S, D_v)`` -> ``(N, P + S, d_llm)``."""

    config_class = DenseConnectorConfig

    def __init__(self, config: DenseConnectorConfig, dims: CoreDims) -> None:
        super().__init__(config, dims)
        if config.mode == "sti" and not 1 <= config.sti_pool <= dims.vision_num_patches:
            raise ValueError(f"dense_connector sti_pool must be in 1..{dims.vision_num_patches}, got {config.sti_pool}.")
        if config.dci_layer_groups is not None:
            self.groups = check_groups(config.dci_layer_groups, "dense_connector dci_layer_groups")
        else:
            self.groups = contiguous_groups(range(dims.vision_num_layers), config.dci_groups)
        d_v = dims.vision_hidden_size
        in_features = d_v * (1 + len(self.groups)) if config.mode == "dci" else d_v
        self.connector = MLPConnector(in_features, dims.llm_hidden_size, depth=config.connector_depth,
                                      act=config.connector_act)

    @property
    def needs(self) -> StrategyNeeds:
        c = self.config
        extra = self.groups if c.mode == "dci" else [list(c.sti_layers)]
        return StrategyNeeds(vision_layers=unique_layers([c.vision_layer], *extra))

    @property
    def num_visual_tokens(self) -> int:
        p = self.dims.vision_num_patches
        if self.config.mode == "dci":
            return p
        return p + len(self.config.sti_layers) * (p // self.config.sti_pool)

    @property
    def visual_token_grids(self) -> tuple[TokenGrid, ...]:
        """``dci``: the P patch tokens, one sqrt(P) x sqrt(P) grid. ``sti``: that grid, then one grid
        per pooled layer whose pooling windows are rectangles of patches (see :func:`pooled_grid`);
        a layer whose windows straddle patch rows is left out."""
        p = self.dims.vision_num_patches
        base = patch_grid(p)
        if self.config.mode == "dci" or not base:
            return base
        grids, start, k = list(base), p, self.config.sti_pool
        for layer in self.config.sti_layers:
            grid = pooled_grid(base[0].rows, k, start, label=f"layer {layer} pooled x{k}")
            if grid is not None:
                grids.append(grid)
            start += p // k
        return tuple(grids)

    def forward(self, inputs: GuidanceInputs) -> StrategyOutput:
        layers = inputs.vision.layers
        base = layers[self.config.vision_layer]  # (N, P, D_v)
        if self.config.mode == "dci":
            means = [mean_of_layers(layers, g) for g in self.groups]  # J x (N, P, D_v)
            features = torch.cat([base, *means], dim=-1)  # (N, P, (1 + J) D_v)
        else:
            k = self.config.sti_pool
            pooled = [F.avg_pool1d(layers[i].transpose(1, 2), k, k).transpose(1, 2) for i in self.config.sti_layers]
            features = torch.cat([base, *pooled], dim=1)  # (N, P + S, D_v)
        return StrategyOutput(visual_embeds=self.connector(features))


def pooled_grid(side: int, pool: int, start: int, label: str = "") -> TokenGrid | None:
    """The grid of ``AvgPool1d(pool)`` windows over a ``side x side`` raster of patches, or ``None``.

    Windows are rectangles when ``pool`` divides ``side`` (1 x pool strips: a side x side/pool grid)
    or when ``pool`` is a whole number of rows that divides the raster (bands: a side*side/pool x 1
    grid); otherwise a window wraps from one row into the next and has no rectangular place.
    """
    if side % pool == 0:
        return TokenGrid(start, side, side // pool, label)
    if pool % side == 0 and (side * side) % pool == 0:
        return TokenGrid(start, side * side // pool, 1, label)
    return None
