"""IGVA: instruction-guided weighting of the tower's layer groups.

Li et al., "Instruction-Guided Fusion of Multi-Layer Visual Features in Large Vision-Language
Models" (arXiv 2501.08443); where the paper and the authors' code (YiZheng-zy/IGVA) differ, the
defaults follow the code. Shapes at the reference scale (CLIP-L/336: L = 24 layers, P = 576
patches of D_v = 1024; all-mpnet-base-v2 instruction embedding D_s = 768; Vicuna-7B d_llm = 4096;
K = 4 groups)::

    hidden states 1..L in K groups, averaged:  patch_k (N, K, P, D_v), cls_k (N, K, D_v)
    allocator(s (N, D_s), cls_k)                -> logits (N, K) -> softmax -> w (N, K)
        (no allocator: w = 1/K, the plain mean of the groups; stage 1 of the recipe)
    F = sum_k w_k patch_k                       (N, P, D_v)
    connector(CAT(layer -2 patches, F))         (N, P, 2 D_v) -> (N, P, d_llm) = 576 tokens

The allocator: query ``Linear(D_s, D_v)(s)`` (one token); keys/values ``Linear(D_v, D_v)(cls_k)``
(K tokens, shared by every block); N post-LN blocks ``x = LN(x + MHA(x, c, c))``,
``x = LN(x + FFN(x))`` (FFN Linear-ReLU-Linear); head ``Linear(D_v, K)``. Initialisation as the
authors' modules: PyTorch's defaults, and the attention initialised as ``nn.MultiheadAttention``
(q, k, v: Xavier-uniform over the packed ``(3 D_v, D_v)`` in-projection; zero q, k, v and output
biases). Reference-scale size: 27,047,940 parameters.

Instruction embedding ``s`` (``instruction_source``): ``text_encoder`` = the core's frozen text
encoder's pooled output (sentence-transformers: mean pooled, L2-normalised; CLIP: EOS feature);
``llm_embeddings`` = the LLM's own input embeddings averaged over the instruction's tokens
(``instruction_mask``), detached. Towers without a CLS token use each group's mean patch as cls_k.

The weights are returned in ``StrategyOutput.extras["layer_weights"]`` (N, K) (the model returns
them with ``output_strategy_extras=True``). ``entropy_weight`` (lambda > 0) adds an entropy
regulariser on the weights as ``aux_loss`` (``entropy_form``, see :meth:`IGVAStrategy.entropy_loss`).
Module groups: ``connector``, ``allocator`` (when present).

Switches whose non-default value is our choice (docs/igva.md, "Faithfulness"): ``concat_order``
``fused_first`` (the paper's formula), ``zero_init_head`` (a fresh allocator starts exactly uniform),
``entropy_form`` ``kl_uniform`` (the regulariser on the weights themselves).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Optional

import torch
from torch import nn

from vlmzoo import (
    CoreDims,
    ExtraOutput,
    GuidanceInputs,
    GuidanceStrategy,
    StrategyConfig,
    StrategyNeeds,
    StrategyOutput,
    TokenGrid,
    patch_grid,
    register_strategy,
)
from vlmzoo.layers import MLPConnector, MultiHeadAttention, ZeroLinear
from vlmzoo.multilayer import check_groups, contiguous_groups, mean_of_layers, unique_layers
from vlmzoo.strategy import ZeroInitEquivalence

InstructionSource = Literal["text_encoder", "llm_embeddings"]
ConcatOrder = Literal["base_first", "fused_first"]
EntropyForm = Literal["double_softmax", "kl_uniform"]


@dataclass
class IGVAConfig(StrategyConfig):
    """Every size and choice of IGVA; the defaults reproduce the authors' code.

    Args:
        vision_layer: tower hidden state concatenated with the fused features (-2).
        num_groups: K, used when ``layer_groups`` is unset: hidden states 1..L in K contiguous groups
            (sizes differ by at most one when K does not divide L).
        layer_groups: explicit groups of hidden-state indices, e.g. ``[[1, 2], [3, 4]]``.
        use_allocator: False = uniform weights 1/K without any allocator module (stage 1).
        instruction_source: ``text_encoder`` (the core's text encoder, pooled) or ``llm_embeddings``.
        allocator_blocks / allocator_heads: post-LN attention blocks (4) and their heads (4).
        allocator_ffn_size: FFN hidden width (0 = D_v).
        allocator_dropout: dropout on the attention probabilities and sub-block outputs.
        allocator_norm_eps: LayerNorm eps.
        concat_order: connector input ``CAT(layer -2, F)`` (``base_first``, the authors' code: the
            first D_v input channels are layer -2) or ``CAT(F, layer -2)`` (``fused_first``, the
            order of the paper's formula).
        zero_init_head: False = PyTorch's default init (the authors' code); True = the head starts at
            zero, so a fresh allocator gives exactly the uniform weights of stage 1.
        entropy_weight: lambda of the regulariser (0 = off; the authors' stage-2 script passes 0.02).
        entropy_form: ``double_softmax`` (the authors' code: minus the entropy of softmax(w), a second
            softmax over the weights) or ``kl_uniform`` (KL(w || uniform) on the weights themselves).
        connector_depth / connector_act: the ``mlp2x_gelu`` connector on 2 D_v channels.
    """

    vision_layer: int = -2
    num_groups: int = 4
    layer_groups: Optional[list[list[int]]] = None
    use_allocator: bool = True
    instruction_source: InstructionSource = "text_encoder"
    allocator_blocks: int = 4
    allocator_heads: int = 4
    allocator_ffn_size: int = 0
    allocator_dropout: float = 0.0
    allocator_norm_eps: float = 1e-5
    concat_order: ConcatOrder = "base_first"
    zero_init_head: bool = False
    entropy_weight: float = 0.0
    entropy_form: EntropyForm = "double_softmax"
    connector_depth: int = 2
    connector_act: str = "gelu"


class PackedInProjLinear(nn.Linear):
    """A q, k or v projection initialised as its third of ``nn.MultiheadAttention``'s packed
    in-projection: Xavier-uniform over a ``(3 out, in)`` matrix, zero bias."""

    def reset_parameters(self) -> None:
        bound = math.sqrt(6.0 / (self.in_features + 3 * self.out_features))
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class ZeroBiasLinear(nn.Linear):
    """PyTorch's default weight init, zero bias (``nn.MultiheadAttention``'s output projection)."""

    def reset_parameters(self) -> None:
        super().reset_parameters()
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class AllocatorBlock(nn.Module):
    """Post-LN block on the query ``x (N, 1, D)`` with context ``c (N, K, D)``:
    ``x = LN(x + MHA(x, c, c))``; ``x = LN(x + FFN(x))``, FFN = Linear-ReLU-Linear."""

    def __init__(self, dim: int, heads: int, ffn: int, dropout: float, eps: float) -> None:
        super().__init__()
        self.attn = MultiHeadAttention(dim, heads, dropout=dropout)
        # nn.MultiheadAttention's initialisation (the authors' module), in our q/k/v/o layout.
        self.attn.q_proj, self.attn.k_proj, self.attn.v_proj = (PackedInProjLinear(dim, dim) for _ in range(3))
        self.attn.o_proj = ZeroBiasLinear(dim, dim)
        self.attn_norm = nn.LayerNorm(dim, eps=eps)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn), nn.ReLU(), nn.Linear(ffn, dim))
        self.ffn_norm = nn.LayerNorm(dim, eps=eps)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = self.attn_norm(x + self.drop(self.attn(x, context)))
        return self.ffn_norm(x + self.drop(self.ffn(x)))


class WeightAllocator(nn.Module):
    """Instruction ``s (N, D_s)`` and group CLS features ``cls (N, K, D_v)`` -> logits ``(N, K)``."""

    def __init__(self, cfg: IGVAConfig, instruction_dim: int, dim: int, num_groups: int) -> None:
        super().__init__()
        self.query_proj = nn.Linear(instruction_dim, dim)
        self.context_proj = nn.Linear(dim, dim)
        ffn = cfg.allocator_ffn_size or dim
        self.blocks = nn.ModuleList(
            AllocatorBlock(dim, cfg.allocator_heads, ffn, cfg.allocator_dropout, cfg.allocator_norm_eps)
            for _ in range(cfg.allocator_blocks)
        )
        self.head = (ZeroLinear if cfg.zero_init_head else nn.Linear)(dim, num_groups)

    def forward(self, instruction: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
        x = self.query_proj(instruction).unsqueeze(1)  # (N, 1, D_v)
        context = self.context_proj(cls)  # (N, K, D_v)
        for block in self.blocks:
            x = block(x, context)
        return self.head(x.squeeze(1))  # (N, K)


@register_strategy("igva")
class IGVAStrategy(GuidanceStrategy):
    """Layer -2 ``CAT`` the K layer-group means weighted per instruction -> ``(N, P, d_llm)``."""

    config_class = IGVAConfig
    # A zero head gives exactly uniform weights 1/K: a fresh allocator starts at the stage-1 model.
    zero_init_equivalences = (
        ZeroInitEquivalence(overrides={"zero_init_head": True}, reference_overrides={"use_allocator": False}),
    )
    # The study and its report summarise the weights per eval question type.
    extra_outputs = (
        ExtraOutput("layer_weights", title="layer weights", component="w",
                    description="mean weight per layer group, ';'-separated, all questions"),
    )

    def __init__(self, config: IGVAConfig, dims: CoreDims) -> None:
        super().__init__(config, dims)
        if config.layer_groups is not None:
            self.groups = check_groups(config.layer_groups, "igva layer_groups")
        else:
            self.groups = contiguous_groups(range(1, dims.vision_num_layers + 1), config.num_groups)
        d_v = dims.vision_hidden_size
        self.connector = MLPConnector(2 * d_v, dims.llm_hidden_size, depth=config.connector_depth,
                                      act=config.connector_act)
        self.allocator = None
        if config.use_allocator:
            self.allocator = WeightAllocator(config, self._instruction_dim(), d_v, len(self.groups))

    def _instruction_dim(self) -> int:
        if self.config.instruction_source == "llm_embeddings":
            return self.dims.llm_hidden_size
        if self.dims.text_encoder_hidden_size is None:
            raise ValueError("igva with instruction_source 'text_encoder' needs an instruction text encoder "
                             "(text_encoder_config), or use instruction_source 'llm_embeddings'.")
        return self.dims.text_encoder_hidden_size

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    @property
    def needs(self) -> StrategyNeeds:
        c = self.config
        guided = c.use_allocator
        return StrategyNeeds(
            vision_layers=unique_layers(*self.groups, [c.vision_layer]),
            instruction_text=("pooled",) if guided and c.instruction_source == "text_encoder" else (),
            instruction_span=guided and c.instruction_source == "llm_embeddings",
        )

    @property
    def num_visual_tokens(self) -> int:
        return self.dims.vision_num_patches

    @property
    def visual_token_grids(self) -> tuple[TokenGrid, ...]:
        """Token i is patch i of the fused features: one sqrt(P) x sqrt(P) grid."""
        return patch_grid(self.dims.vision_num_patches)

    # ---- pieces ---------------------------------------------------------------------------------
    def group_features(self, inputs: GuidanceInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """-> ``patch_k (N, K, P, D_v)`` and ``cls_k (N, K, D_v)`` (group means)."""
        vision = inputs.vision
        patches = torch.stack([mean_of_layers(vision.layers, g) for g in self.groups], dim=1)
        if vision.cls:
            cls = torch.stack([mean_of_layers(vision.cls, g) for g in self.groups], dim=1)
        else:
            cls = patches.mean(dim=2)
        return patches, cls

    def instruction_embedding(self, inputs: GuidanceInputs) -> torch.Tensor:
        """-> ``s (N, D_s)``: each image's instruction embedding."""
        if self.config.instruction_source == "text_encoder":
            return inputs.text.pooled
        with torch.no_grad():
            embeds = inputs.llm_embed_tokens(inputs.input_ids)  # (B, T, d_llm)
            mask = inputs.instruction_mask.to(embeds.dtype).unsqueeze(-1)  # (B, T, 1)
            per_sample = (embeds * mask).sum(1) / mask.sum(1).clamp(min=1.0)  # (B, d_llm)
        return per_sample[inputs.image_batch_index]

    def layer_weights(self, inputs: GuidanceInputs, cls: torch.Tensor) -> torch.Tensor:
        """-> ``w (N, K)``, rows summing to 1 (uniform without an allocator)."""
        n, k = cls.shape[:2]
        if self.allocator is None:
            return cls.new_full((n, k), 1.0 / k)
        s = self.instruction_embedding(inputs).to(cls.dtype)
        return self.allocator(s, cls).float().softmax(dim=-1).to(cls.dtype)

    def entropy_loss(self, weights: torch.Tensor) -> torch.Tensor:
        """The regulariser for ``weights (N, K)`` (rows sum to 1), a scalar; lambda = ``entropy_weight``.

        ``double_softmax`` (the authors' code): ``-lambda * mean_n H(softmax(w_n))`` with
        ``H(p) = -sum_k p_k log(p_k + 1e-12)``: the softmax is applied a second time, to weights
        already in [0, 1], so ``softmax(w_n)`` stays close to uniform and the pull toward uniform is
        weaker than on ``w`` itself (minimum ``-lambda log K``, at uniform weights).
        ``kl_uniform``: ``lambda * mean_n KL(w_n || uniform) = lambda * mean_n (log K - H(w_n))``
        (0 at uniform weights).
        """
        w = weights.float()
        if self.config.entropy_form == "double_softmax":
            p = w.softmax(dim=-1)
            entropy = -(p * torch.log(p + 1e-12)).sum(dim=-1)  # (N,)
            return -self.config.entropy_weight * entropy.mean()
        entropy = torch.special.entr(w).sum(dim=-1)  # (N,)
        return self.config.entropy_weight * (math.log(w.shape[-1]) - entropy).mean()

    # ---- forward ----------------------------------------------------------------------------------
    def forward(self, inputs: GuidanceInputs) -> StrategyOutput:
        patches, cls = self.group_features(inputs)  # (N, K, P, D_v), (N, K, D_v)
        weights = self.layer_weights(inputs, cls)  # (N, K)
        fused = (weights[:, :, None, None] * patches).sum(dim=1)  # (N, P, D_v)
        base = inputs.vision.layers[self.config.vision_layer]  # (N, P, D_v)
        pair = [base, fused] if self.config.concat_order == "base_first" else [fused, base]
        tokens = self.connector(torch.cat(pair, dim=-1))  # (N, P, 2 D_v) -> (N, P, d_llm)
        aux = None
        if self.allocator is not None and self.config.entropy_weight > 0:
            aux = self.entropy_loss(weights)
        return StrategyOutput(visual_embeds=tokens, aux_loss=aux, extras={"layer_weights": weights.detach()})
