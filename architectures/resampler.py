"""Instruction-agnostic Perceiver resampler: a control for instruction-aware token budgets.

K learnable latents cross-attend to the tower's patch tokens through a few Perceiver-resampler
layers (Flamingo / Idefics style), then an MLP connector maps them to the LLM width. The latents
never see the instruction, so at the same K this isolates what TA-LLaVA's instruction-aware prefix
(8 tokens on the tiny world, 32 at reference scale) adds over a question-blind pooling. Shapes
(N images, P patches, D_v tower width, K latents, d = d_llm; reference: P = 576, D_v = 1024,
K = 64, d = 4096 for Vicuna-7B)::

    context = tower layer -2 patches (CLS dropped)               (N, P, D_v)
    x       = latents                                            (N, K, D_v)   N(0, 0.02) at init
    per layer, num_layers times:
      h = norm(x);  kv = CAT(norm(context), h)                   (N, P + K, D_v)
      x = x + attn(q = h, kv)                                    (N, K, D_v)
      x = x + ffn(norm(x))                                       (N, K, D_v)   D_v -> F -> D_v, GELU
    visual_embeds = connector(final_norm(x))                     (N, K, d)     mlp2x_gelu as in `llava`

Attention and FFN projections are bias-free (as in Flamingo's resampler); every layer has its own
norms. The tokens are a pooled summary with no image position, so ``visual_token_grids`` is the
base class's ``()`` (as for TA-LLaVA's prefix): attention maps cannot be drawn.

Module groups (training stages): ``resampler`` (latents, layers, final norm) and ``connector``
(same shape as `llava`'s, ``D_v -> d``, so a `llava` checkpoint's connector loads by name);
``strategy`` = both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from transformers.activations import ACT2FN

from vlmzoo import (
    CoreDims,
    GuidanceInputs,
    GuidanceStrategy,
    StrategyConfig,
    StrategyNeeds,
    StrategyOutput,
    register_strategy,
)
from vlmzoo.layers import LearnedTokens, MLPConnector, MultiHeadAttention

NormKind = Literal["layernorm", "rmsnorm"]


@dataclass
class ResamplerConfig(StrategyConfig):
    """Every size of the resampler; the defaults are the reference values.

    Args:
        vision_layer: tower hidden state the latents attend to (-2, as `llava`).
        num_latents: K, the latent queries = visual tokens per image (64).
        num_layers: Perceiver-resampler layers (2).
        heads: attention heads (16); ``head_dim``: channels per head (0 = D_v // heads).
        ffn_size: FFN hidden width F (0 = 4 x D_v).
        ffn_act: FFN activation (a ``transformers`` ACT2FN name).
        norm: ``layernorm`` (Flamingo) or ``rmsnorm`` (Idefics2); ``norm_eps`` its eps.
        latent_init_std: the latents are initialised N(0, std).
        connector_depth / connector_act: the connector to d_llm (``mlp2x_gelu``, as `llava`).
    """

    vision_layer: int = -2
    num_latents: int = 64
    num_layers: int = 2
    heads: int = 16
    head_dim: int = 0
    ffn_size: int = 0
    ffn_act: str = "gelu"
    norm: NormKind = "layernorm"
    norm_eps: float = 1e-5
    latent_init_std: float = 0.02
    connector_depth: int = 2
    connector_act: str = "gelu"


def _norm(kind: NormKind, dim: int, eps: float) -> nn.Module:
    return nn.LayerNorm(dim, eps=eps) if kind == "layernorm" else nn.RMSNorm(dim, eps=eps)


class ResamplerLayer(nn.Module):
    """One pre-norm Perceiver-resampler layer: latents ``(N, K, D)`` read ``context (N, S, D)``.

    ``h = latent_norm(x)``; keys/values = ``CAT(context_norm(context), h)`` ``(N, S + K, D)``;
    ``x = x + attn(h, kv)``; ``x = x + ffn(ffn_norm(x))``. -> ``(N, K, D)``.
    """

    def __init__(self, dim: int, cfg: ResamplerConfig) -> None:
        super().__init__()
        ffn = cfg.ffn_size or 4 * dim
        self.latent_norm = _norm(cfg.norm, dim, cfg.norm_eps)
        self.context_norm = _norm(cfg.norm, dim, cfg.norm_eps)
        self.attn = MultiHeadAttention(dim, cfg.heads, head_dim=cfg.head_dim or None, bias=False)
        self.ffn_norm = _norm(cfg.norm, dim, cfg.norm_eps)
        self.ffn_in = nn.Linear(dim, ffn, bias=False)
        self.ffn_act = ACT2FN[cfg.ffn_act]
        self.ffn_out = nn.Linear(ffn, dim, bias=False)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h = self.latent_norm(x)  # (N, K, D)
        kv = torch.cat([self.context_norm(context), h], dim=1)  # (N, S + K, D)
        x = x + self.attn(h, kv)
        return x + self.ffn_out(self.ffn_act(self.ffn_in(self.ffn_norm(x))))


class PerceiverResampler(nn.Module):
    """``context (N, S, D)`` -> ``(N, K, D)``: K learned latents through the layers, then a norm."""

    def __init__(self, dim: int, cfg: ResamplerConfig) -> None:
        super().__init__()
        self.latents = LearnedTokens(cfg.num_latents, dim, std=cfg.latent_init_std)
        self.layers = nn.ModuleList(ResamplerLayer(dim, cfg) for _ in range(cfg.num_layers))
        self.final_norm = _norm(cfg.norm, dim, cfg.norm_eps)

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        x = self.latents(context.shape[0])  # (N, K, D)
        for layer in self.layers:
            x = layer(x, context)
        return self.final_norm(x)


@register_strategy("resampler")
class ResamplerStrategy(GuidanceStrategy):
    """``(N, P, D_v)`` -> K latent tokens ``(N, K, d_llm)``, never reading the instruction."""

    config_class = ResamplerConfig

    def __init__(self, config: ResamplerConfig, dims: CoreDims) -> None:
        super().__init__(config, dims)
        d_v = dims.vision_hidden_size
        if config.num_latents < 1 or config.num_layers < 1:
            raise ValueError(
                f"resampler needs num_latents >= 1 and num_layers >= 1, got {config.num_latents} and {config.num_layers}."
            )
        if config.heads < 1 or (config.head_dim == 0 and d_v % config.heads):
            raise ValueError(
                f"resampler heads={config.heads} must divide the tower width {d_v} when head_dim is 0 (= D_v // heads); "
                "set head_dim explicitly otherwise."
            )
        self.resampler = PerceiverResampler(d_v, config)
        self.connector = MLPConnector(d_v, dims.llm_hidden_size, depth=config.connector_depth, act=config.connector_act)

    @property
    def needs(self) -> StrategyNeeds:
        """Tower layer ``vision_layer`` only: no instruction text, no instruction span."""
        return StrategyNeeds(vision_layers=(self.config.vision_layer,))

    @property
    def num_visual_tokens(self) -> int:
        return self.config.num_latents

    def forward(self, inputs: GuidanceInputs) -> StrategyOutput:
        features = inputs.vision.layers[self.config.vision_layer]  # (N, P, D_v)
        return StrategyOutput(visual_embeds=self.connector(self.resampler(features)))  # (N, K, d_llm)
