"""Crop tokens: the base view's patches AND every high-res crop patch handed to the LLM as tokens.

A positive control, not a seed paper's method: TG-DP claims that high-res crops hold detail the
base view erases, and pools them into K latents under the instruction's guidance. This strategy
skips the pooling and the guidance: every crop patch becomes a visual token, as high-resolution
tiling schemes do. The layout mirrors LLaVA-NeXT's AnyRes (Liu et al., "LLaVA-NeXT: Improved
reasoning, OCR, and world knowledge", 2024) on a fixed square grid: the whole image at the tower's
size first, then the ``f x f`` crops of the image at ``f`` times that size, every token through
one shared ``mlp2x_gelu`` connector, the crop patches merged back into one row-major grid over the
whole image (AnyRes's spatial merge). Not built: AnyRes's choice among grid shapes, its un-padding
of non-square images and its learned newline token after each row (the tiny world's images are
square and its grid is fixed). Shapes (``s = sqrt(P)``)::

    base  = tower layer `vision_layer` of the image            (N, P, D_v)
    crops = the same layer of the f^2 crops (TL, TR, BL, BR)    (N, f^2 P, D_v), crop-major
          -> one row-major (f s) x (f s) grid over the image    (N, f^2 P, D_v)
    visual_embeds = connector(CAT(base, crops))                 (N, P + f^2 P, d_llm)

At the tiny world: 16 + 64 = 80 tokens; at the reference scale (CLIP-L/336, f = 2): 576 + 2,304.

``mark_named_object`` (a control of ours, off by default): a learned vector ``v`` ``(D_v,)`` (zero
at the start) is added to the features of the base patches in the question's regions and of the
crop patches inside them, before the connector (``region_mask`` ``(N, P)`` on the base grid, each
base patch's ``f x f`` crop patches marked with it). The model is then handed both the detail and
the object the question names: what is left to learn is reading the mark there.
The connector is named ``connector`` as in `llava`, so a `llava` checkpoint's weights load into it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

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
from vlmzoo.layers import MLPConnector, RegionMarker


@dataclass
class CropTokensConfig(StrategyConfig):
    """Args:
    vision_layer: tower hidden state of the base view and of the crops (-2, as `llava`).
    high_res_factor: f: the image at f times the tower's size, cut into f x f crops (>= 2).
    include_base: also hand the base view's P patches to the LLM, before the crops (AnyRes does).
    connector_depth / connector_act: the one connector every token goes through (``mlp2x_gelu``).
    mark_named_object: add a learned vector to the base and crop patches of the question's regions
        (the named object's location; needs the data's ``regions`` and a square patch grid).
    """

    vision_layer: int = -2
    high_res_factor: int = 2
    include_base: bool = True
    connector_depth: int = 2
    connector_act: str = "gelu"
    mark_named_object: bool = False


def merge_crops(crops: torch.Tensor, factor: int, side: int) -> torch.Tensor:
    """Crop-major patches ``(N, f^2 s^2, D)`` (crop ``i f + j``, then its ``s x s`` patches in raster
    order) -> one raster over the whole image ``(N, f^2 s^2, D)``: token ``R (f s) + C`` is the patch
    at row ``R``, column ``C`` of the ``(f s) x (f s)`` grid."""
    n, _, d = crops.shape
    grid = crops.reshape(n, factor, factor, side, side, d)  # (N, crop row, crop col, row, col, D)
    return grid.permute(0, 1, 3, 2, 4, 5).reshape(n, factor * side * factor * side, d)


@register_strategy("crop_tokens")
class CropTokensStrategy(GuidanceStrategy):
    """``(N, P, D_v)`` + crops ``(N, f^2 P, D_v)`` -> ``(N, [P +] f^2 P, d_llm)``."""

    config_class = CropTokensConfig

    def __init__(self, config: CropTokensConfig, dims: CoreDims) -> None:
        super().__init__(config, dims)
        if config.high_res_factor < 2:
            raise ValueError(
                f"strategy_config[crop_tokens].high_res_factor must be >= 2 (the crops are the point), "
                f"got {config.high_res_factor}."
            )
        self.connector = MLPConnector(
            dims.vision_hidden_size, dims.llm_hidden_size, depth=config.connector_depth, act=config.connector_act
        )
        self.marker: RegionMarker | None = None
        if config.mark_named_object:
            if self._side is None:
                raise ValueError("strategy_config[crop_tokens].mark_named_object needs a square patch grid, got "
                                 f"{dims.vision_num_patches} patches.")
            self.marker = RegionMarker(dims.vision_hidden_size)

    @property
    def _side(self) -> int | None:
        """sqrt(P) if the tower's patches form a square grid, else ``None`` (crops stay crop-major)."""
        side = math.isqrt(self.dims.vision_num_patches)
        return side if side * side == self.dims.vision_num_patches else None

    @property
    def _num_base(self) -> int:
        return self.dims.vision_num_patches if self.config.include_base else 0

    @property
    def needs(self) -> StrategyNeeds:
        c = self.config
        return StrategyNeeds(vision_layers=(c.vision_layer,), high_res_factor=c.high_res_factor,
                             high_res_layers=(c.vision_layer,), query_regions=c.mark_named_object)

    @property
    def num_visual_tokens(self) -> int:
        return self._num_base + self.config.high_res_factor**2 * self.dims.vision_num_patches

    @property
    def visual_token_grids(self) -> tuple[TokenGrid, ...]:
        """The base view's ``s x s`` grid (if included), then the crop patches' ``(f s) x (f s)``
        grid over the whole image; none for a tower whose patches are not a square."""
        side = self._side
        if side is None:
            return ()
        f = self.config.high_res_factor
        base = patch_grid(self.dims.vision_num_patches, label="base patches") if self.config.include_base else ()
        return (*base, TokenGrid(self._num_base, f * side, f * side, "crop patches"))

    def _token_mask(self, region_mask: torch.Tensor) -> torch.Tensor:
        """Base-grid region mask ``(N, P)`` -> one entry per visual token ``(N, [P +] f^2 P)``: the
        base patches as given, then each crop patch (merged raster) taking its base patch's value."""
        f, side = self.config.high_res_factor, self._side
        grid = region_mask.reshape(-1, side, side)
        crops = grid.repeat_interleave(f, dim=1).repeat_interleave(f, dim=2).reshape(region_mask.shape[0], -1)
        return torch.cat([region_mask, crops], dim=1) if self.config.include_base else crops

    def forward(self, inputs: GuidanceInputs) -> StrategyOutput:
        layer = self.config.vision_layer
        crops = inputs.vision.high_res[layer]  # (N, f^2 P, D_v), crop-major
        side = self._side
        if side is not None:
            crops = merge_crops(crops, self.config.high_res_factor, side)
        features = torch.cat([inputs.vision.layers[layer], crops], dim=1) if self.config.include_base else crops
        if self.marker is not None:
            features = features + self.marker(self._token_mask(inputs.region_mask))
        return StrategyOutput(visual_embeds=self.connector(features))  # (N, [P +] f^2 P, d_llm)
