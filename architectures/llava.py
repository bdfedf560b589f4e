"""LLaVA-1.5: tower layer -2 patch tokens (CLS dropped) through an ``mlp2x_gelu`` connector.

Reference scale: CLIP-L/336 (576 patches x 1024) -> Linear(1024, 4096), GELU, Linear(4096, 4096)
-> 576 visual tokens for Vicuna-7B.
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass
class LlavaConfig(StrategyConfig):
    """Args:
    vision_layer: which tower hidden state feeds the connector (-2 in LLaVA-1.5).
    connector_depth: linear layers in the connector (2 = ``mlp2x_gelu``).
    connector_act: activation between them.
    """

    vision_layer: int = -2
    connector_depth: int = 2
    connector_act: str = "gelu"


@register_strategy("llava")
class LlavaStrategy(GuidanceStrategy):
    """One visual token per tower patch: ``(N, P, D_v)`` -> ``(N, P, d_llm)``."""

    config_class = LlavaConfig

    def __init__(self, config: LlavaConfig, dims: CoreDims) -> None:
        super().__init__(config, dims)
        self.connector = MLPConnector(
            dims.vision_hidden_size, dims.llm_hidden_size, depth=config.connector_depth, act=config.connector_act
        )

    @property
    def needs(self) -> StrategyNeeds:
        return StrategyNeeds(vision_layers=(self.config.vision_layer,))

    @property
    def num_visual_tokens(self) -> int:
        return self.dims.vision_num_patches

    @property
    def visual_token_grids(self) -> tuple[TokenGrid, ...]:
        """Token i is tower patch i: one sqrt(P) x sqrt(P) grid (24 x 24 at the reference scale)."""
        return patch_grid(self.dims.vision_num_patches)

    def forward(self, inputs: GuidanceInputs) -> StrategyOutput:
        features = inputs.vision.layers[self.config.vision_layer]  # (N, P, D_v)
        return StrategyOutput(visual_embeds=self.connector(features))
