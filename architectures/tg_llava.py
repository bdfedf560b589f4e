"""TG-LLaVA: text-guided feature mask (TG-FOM) and text-guided detail perceiver (TG-DP).

The method of "TG-LLaVA: Text Guided LLaVA via Learnable Latent Embeddings" (Yan et al., AAAI
2025, arXiv:2409.09564); where the paper and the authors' code (AIDC-AI/TG-LLaVA) differ, the defaults follow the
code (docs/tg_llava.md, "Faithfulness"). Shapes at the reference scale (CLIP-L/336: P = 576
patches of D_v = 1024; CLIP text tower D_t = 768; Vicuna-7B d_llm = 4096)::

    F_v   = tower layer -2 patches                          (N, P, D_v)
    TG-FOM: M = fom(pooled text (N, D_t))                   (N, P, D_v), exactly 0 at init
    base  = connector(F_v + M)                              (N, P, d_llm)      as in `llava`
    TG-DP: hr = tower layer -2 of the 2x2 crops of the x2 upsampled image (N, 4P, D_v)
           dp(hr, text tokens (N, L, D_t), mask (N, L))     (N, K, d_llm)
    visual_embeds = CAT(base, dp)                           (N, P + K, d_llm) = 576 + 64

The instruction text is the core's (frozen) text encoder output for the sample's last user turn
(image placeholders removed; see vlmzoo/data/templates.py): ``pooled`` feeds TG-FOM, ``tokens``
feed TG-DP. The base connector is named ``connector`` as in `llava`, so a `llava` checkpoint's
weights load into it and only ``fom.*`` / ``dp.*`` start fresh. Module groups (training stages):
``connector``, ``fom``, ``dp`` (each present only when switched on).

Ours, not the authors': ``fom_source="oracle"`` replaces TG-FOM's text path by an oracle mask,
``M = region_mask[..., None] * v`` with the query's regions ``(N, P)`` (the named object's patches)
and a learned ``v`` ``(D_v,)``: a positive control for "TG-FOM selects the named object"
(docs/controls.md).

Parameter counts at the reference scale: TG-DP 59,328,512 and TG-FOM 31,821,824, the weights the
reference's modules run. Its BLIP-2 Q-Former builds 81,474,362: also a text-branch FFN in each
layer, word and position embeddings and an MLM head, which a queries-only input never runs; we do
not build those.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

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
from vlmzoo.layers import LearnedTokens, MLPConnector, MultiHeadAttention, NormalLinear, RegionMarker, SwiGLU, ZeroLinear
from vlmzoo.strategy import ZeroInitEquivalence


@dataclass
class TGLlavaConfig(StrategyConfig):
    """Every size and switch of TG-LLaVA; the defaults compute what the authors' code computes.

    Args:
        vision_layer: tower hidden state for the base tokens and the high-res crops (-2).
        connector_depth / connector_act: the base connector (``mlp2x_gelu``, shared with `llava`).
        use_fom / use_dp: the ablation switches.
        fom_source: where TG-FOM's mask M comes from. ``"text"`` (the method): the Q-Former on the
            pooled instruction text. ``"oracle"`` (ours, not the authors'; a control): the query's
            regions, ``M = region_mask[..., None] * v`` with ``region_mask`` ``(N, P)`` (1 at the
            patches of the object the question names) and ``v`` ``(D_v,)`` learned, zero at init
            (M = 0, as the text path's zero mask head; ``v`` still gets gradient wherever the
            mask is 1). No text encoder is needed for it (unless TG-DP is on).
        fom_layers: Q-Former layers (2); ``fom_cross_attention_freq``: a layer cross-attends to the
            text iff ``index % freq == 0`` (2: layer 0 only, as BLIP-2's Q-Former).
        fom_heads: attention heads at width D_v (16); ``fom_ffn_size``: FFN width (0 = 4 x D_v = 4096).
        fom_dropout: dropout of the Q-Former (BERT's 0.1) on embeddings, attention probs and outputs.
        fom_norm_eps: LayerNorm eps (BERT's 1e-12).
        fom_init_std: std of the Q-Former's Linear weights (BERT's ``initializer_range`` 0.02;
            biases zero).
        dp_num_latents: TG-DP output tokens K (64; the paper's ablation: 32/64/128/256).
        dp_upscale: upsampling factor of the image before cropping (2 -> 4 crops).
        dp_heads / dp_kv_heads / dp_head_dim: perceiver attention (16 heads x 96, 4 key/value heads).
        dp_ffn_size: SwiGLU feed-forward hidden width (0 = 4 x D_v = 4096).
        dp_norm_eps: RMSNorm eps (1e-5, the reference's Idefics2 perceiver).
        dp_pos_std: std of the high-res position embedding's N(0, std) init (1.0: ``nn.Embedding``'s).
        dp_mask_text_padding: mask the instruction's padding positions in TG-DP's text attention
            (on: the latents attend to the sample's own tokens only, as in the reference's
            evaluation, which runs one sample at a time and so has no padding). Off: they attend
            to every one of the batch's L text positions, padding included, as the reference does
            in batched training, so a sample's DP tokens depend on how long the other instructions
            of its batch are; padding positions then enter as zero features (the reference's hold
            its text tower's states of the padding, which the frozen-feature cache does not keep).
            A batch-dependent result is a reference artifact, so it is not the default.
        dp_connector_depth / dp_connector_act: TG-DP's own connector C^h (``mlp2x_gelu``).
    """

    vision_layer: int = -2
    connector_depth: int = 2
    connector_act: str = "gelu"
    use_fom: bool = True
    use_dp: bool = True
    fom_source: Literal["text", "oracle"] = "text"
    fom_layers: int = 2
    fom_cross_attention_freq: int = 2
    fom_heads: int = 16
    fom_ffn_size: int = 0
    fom_dropout: float = 0.1
    fom_norm_eps: float = 1e-12
    fom_init_std: float = 0.02
    dp_num_latents: int = 64
    dp_upscale: int = 2
    dp_heads: int = 16
    dp_kv_heads: int = 4
    dp_head_dim: int = 96
    dp_ffn_size: int = 0
    dp_norm_eps: float = 1e-5
    dp_pos_std: float = 1.0
    dp_mask_text_padding: bool = True
    dp_connector_depth: int = 2
    dp_connector_act: str = "gelu"


class QFormerLayer(nn.Module):
    """Post-LN BERT/Q-Former layer on queries ``(N, Q, D)``: self-attn -> [cross-attn] -> FFN.

    Each sub-block is ``x = LayerNorm(x + Dropout(sublayer(x)))``; cross-attention reads
    ``context (N, S, D)``. Every Linear starts N(0, ``init_std``) with zero bias (BERT's init).
    """

    def __init__(self, dim: int, heads: int, ffn: int, cross: bool, dropout: float, eps: float,
                 init_std: float) -> None:
        super().__init__()
        self.self_attn = MultiHeadAttention(dim, heads, dropout=dropout, init_std=init_std)
        self.self_norm = nn.LayerNorm(dim, eps=eps)
        self.cross_attn = MultiHeadAttention(dim, heads, dropout=dropout, init_std=init_std) if cross else None
        self.cross_norm = nn.LayerNorm(dim, eps=eps) if cross else None
        self.ffn_in = NormalLinear(dim, ffn, std=init_std)
        self.ffn_act = nn.GELU()
        self.ffn_out = NormalLinear(ffn, dim, std=init_std)
        self.ffn_norm = nn.LayerNorm(dim, eps=eps)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.self_norm(x + self.drop(self.self_attn(x, x)))
        if self.cross_attn is not None:
            x = self.cross_norm(x + self.drop(self.cross_attn(x, context)))
        return self.ffn_norm(x + self.drop(self.ffn_out(self.ffn_act(self.ffn_in(x)))))


class TextGuidedFOM(nn.Module):
    """TG-FOM: pooled text ``(N, D_t)`` -> additive feature mask ``M (N, P, D_v)``.

    ``pooled -> Linear(D_t, D_v)`` (PyTorch's init) is one key/value token; P learnable queries
    (N(0, 0.02)) pass LayerNorm + dropout, then the Q-Former layers (BERT-initialised);
    ``mask_head`` is a zero-initialised ``Linear(D_v, D_v)``, so M = 0 until it trains.
    """

    def __init__(self, cfg: TGLlavaConfig, num_queries: int, dim: int, text_dim: int) -> None:
        super().__init__()
        ffn = cfg.fom_ffn_size or 4 * dim
        self.text_proj = nn.Linear(text_dim, dim)
        self.queries = LearnedTokens(num_queries, dim)
        self.query_norm = nn.LayerNorm(dim, eps=cfg.fom_norm_eps)
        self.query_drop = nn.Dropout(cfg.fom_dropout)
        self.layers = nn.ModuleList(
            QFormerLayer(dim, cfg.fom_heads, ffn, i % cfg.fom_cross_attention_freq == 0, cfg.fom_dropout,
                         cfg.fom_norm_eps, cfg.fom_init_std)
            for i in range(cfg.fom_layers)
        )
        self.mask_head = ZeroLinear(dim, dim)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        text = self.text_proj(pooled).unsqueeze(1)  # (N, 1, D_v)
        x = self.query_drop(self.query_norm(self.queries(pooled.shape[0])))  # (N, P, D_v)
        for layer in self.layers:
            x = layer(x, text)
        return self.mask_head(x)  # (N, P, D_v)


class PerceiverLayer(nn.Module):
    """One TG-DP perceiver layer on latents ``(N, K, D)`` with ``context (N, S, D)``.

    ``h = RMSNorm(latents)``; keys/values = ``CAT(RMSNorm(context), h)``; bias-free GQA attention;
    ``x = latents + attn``; then ``x = x + SwiGLU(RMSNorm(x))`` (an Idefics2 perceiver layer, as
    the reference code builds it; the feed-forward has no skip of its own).
    """

    def __init__(self, dim: int, cfg: TGLlavaConfig) -> None:
        super().__init__()
        eps = cfg.dp_norm_eps
        self.latent_norm = nn.RMSNorm(dim, eps=eps)
        self.context_norm = nn.RMSNorm(dim, eps=eps)
        self.attn = MultiHeadAttention(dim, cfg.dp_heads, head_dim=cfg.dp_head_dim, num_kv_heads=cfg.dp_kv_heads,
                                       bias=False)
        self.ffn_norm = nn.RMSNorm(dim, eps=eps)
        self.mlp = SwiGLU(dim, cfg.dp_ffn_size or 4 * dim)

    def forward(self, latents: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None) -> torch.Tensor:
        """``latents (N, K, D)``, ``context (N, S, D)``, ``context_mask (N, S)`` (1 = attend; ``None``:
        all) -> ``(N, K, D)``."""
        h = self.latent_norm(latents)
        kv = torch.cat([self.context_norm(context), h], dim=1)  # (N, S + K, D)
        mask = None
        if context_mask is not None:
            mask = torch.cat([context_mask.bool(), context_mask.new_ones(h.shape[:2], dtype=torch.bool)], dim=1)
        x = latents + self.attn(h, kv, mask)
        return x + self.mlp(self.ffn_norm(x))


class TextGuidedDP(nn.Module):
    """TG-DP: high-res crop features ``(N, S, D_v)`` (S = upscale^2 x P) and text tokens
    ``(N, L, D_t)`` with mask ``(N, L)`` -> K visual tokens ``(N, K, d_llm)``.

    ``V = MLP(hr + pos_embed)`` (Linear-GELU-Linear at D_v; ``pos_embed`` N(0, ``dp_pos_std``));
    ``T = Linear(D_t, D_v)(tokens)``; K latents (N(0, 0.02)) -> perceiver layer on T (padding
    masked, or attended as zero features with ``dp_mask_text_padding`` off) -> perceiver layer on V ->
    RMSNorm -> ``connector`` (TG-DP's own C^h).
    """

    def __init__(self, cfg: TGLlavaConfig, num_hr_tokens: int, dim: int, text_dim: int, llm_dim: int) -> None:
        super().__init__()
        self.mask_text_padding = cfg.dp_mask_text_padding
        self.pos_embed = LearnedTokens(num_hr_tokens, dim, std=cfg.dp_pos_std)
        self.vision_mlp = MLPConnector(dim, dim, depth=2, act="gelu")
        self.text_proj = nn.Linear(text_dim, dim)
        self.latents = LearnedTokens(cfg.dp_num_latents, dim)
        self.text_layer = PerceiverLayer(dim, cfg)
        self.vision_layer = PerceiverLayer(dim, cfg)
        self.final_norm = nn.RMSNorm(dim, eps=cfg.dp_norm_eps)
        self.connector = MLPConnector(dim, llm_dim, depth=cfg.dp_connector_depth, act=cfg.dp_connector_act)

    def forward(self, high_res: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor | None) -> torch.Tensor:
        n = high_res.shape[0]
        vision = self.vision_mlp(high_res + self.pos_embed(n))  # (N, S, D_v)
        attend_mask = text_mask if self.mask_text_padding else None
        if text_mask is not None and not self.mask_text_padding:  # padding attended, as zero features
            text_tokens = text_tokens * text_mask[..., None].to(text_tokens.dtype)
        text = self.text_proj(text_tokens)  # (N, L, D_v)
        x = self.latents(n)  # (N, K, D_v)
        x = self.text_layer(x, text, attend_mask)
        x = self.vision_layer(x, vision, None)
        return self.connector(self.final_norm(x))  # (N, K, d_llm)


@register_strategy("tg_llava")
class TGLlavaStrategy(GuidanceStrategy):
    """``(N, P, D_v)`` [+ crops ``(N, upscale^2 P, D_v)`` + instruction] -> ``(N, P [+ K], d_llm)``."""

    config_class = TGLlavaConfig
    # TG-FOM's mask head starts at zero, so with TG-DP off a fresh model is `llava` on the shared weights.
    zero_init_equivalences = (
        ZeroInitEquivalence(overrides={"use_dp": False}, reference="llava"),
        ZeroInitEquivalence(overrides={"use_fom": False, "use_dp": False}, reference="llava"),
    )

    def __init__(self, config: TGLlavaConfig, dims: CoreDims) -> None:
        super().__init__(config, dims)
        d_v, d_llm, p = dims.vision_hidden_size, dims.llm_hidden_size, dims.vision_num_patches
        if self._text_fom or config.use_dp:
            if dims.text_encoder_hidden_size is None:
                raise ValueError("tg_llava with use_dp, or use_fom with fom_source 'text', needs an instruction text "
                                 "encoder (text_encoder_config).")
        if config.use_dp and config.dp_upscale < 2:
            raise ValueError(f"tg_llava dp_upscale must be >= 2 when use_dp is on, got {config.dp_upscale}.")
        self.connector = MLPConnector(d_v, d_llm, depth=config.connector_depth, act=config.connector_act)
        self.fom: nn.Module | None = None
        if config.use_fom:
            self.fom = TextGuidedFOM(config, p, d_v, dims.text_encoder_hidden_size) if self._text_fom else RegionMarker(d_v)
        self.dp = None
        if config.use_dp:
            self.dp = TextGuidedDP(config, config.dp_upscale**2 * p, d_v, dims.text_encoder_hidden_size, d_llm)

    @property
    def _text_fom(self) -> bool:
        return self.config.use_fom and self.config.fom_source == "text"

    @property
    def needs(self) -> StrategyNeeds:
        c = self.config
        text = (("pooled",) if self._text_fom else ()) + (("tokens",) if c.use_dp else ())
        return StrategyNeeds(
            vision_layers=(c.vision_layer,),
            high_res_factor=c.dp_upscale if c.use_dp else 1,
            high_res_layers=(c.vision_layer,),
            instruction_text=text,
            query_regions=c.use_fom and c.fom_source == "oracle",
        )

    @property
    def num_visual_tokens(self) -> int:
        return self.dims.vision_num_patches + (self.config.dp_num_latents if self.config.use_dp else 0)

    @property
    def visual_token_grids(self) -> tuple[TokenGrid, ...]:
        """The P base tokens (one per patch) only; the K TG-DP latents that follow them attend
        over the whole high-res image and have no position."""
        return patch_grid(self.dims.vision_num_patches, label="base patches")

    def forward(self, inputs: GuidanceInputs) -> StrategyOutput:
        layer = self.config.vision_layer
        features = inputs.vision.layers[layer]  # (N, P, D_v)
        text = inputs.text
        if self.fom is not None:
            source = text.pooled if self._text_fom else inputs.region_mask  # (N, D_t) or (N, P)
            features = features + self.fom(source.to(features.dtype))  # F* = F_v + M
        tokens = self.connector(features)  # (N, P, d_llm)
        if self.dp is not None:
            detail = self.dp(inputs.vision.high_res[layer], text.tokens.to(features.dtype), text.mask)
            tokens = torch.cat([tokens, detail], dim=1)  # (N, P + K, d_llm)
        return StrategyOutput(visual_embeds=tokens)
