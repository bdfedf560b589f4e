"""TA-LLaVA: an instruction-aware prefix inside the LLM, refined by cross-attention every k layers.

Built from the TA-LLaVA paper and its authors' code (ToviTu/TA-LLaVA, Gemma-2-2b); where the two
differ the code is followed (docs/ta_llava.md, "Faithfulness"). Shapes (N images, B samples,
T tokens, S = P patches, Y = prefix length, L = instruction tokens, d = the LLM's hidden size;
reference: S = 576, D_v = 1024, Y = 32, d = 2304 for Gemma-2-2b)::

    V = projector(tower layer -2 patches (N, S, D_v))       (N, S, d)   memory; never a token
    visual_embeds = prefix (N(0, 1)) x the LLM's embedding scale (Gemma: sqrt(d))
                                                            (N, Y, d)   the sequence's first tokens, before BOS
    after LLM layer i < L - 1, on the prefill pass only:
      i % k == 0:  Y <- text_adapter(q = Y, kv = layer-i states of the instruction tokens (N, L, d))
      i % k == 1:  Y <- vision_adapter(q = Y, kv = V of that image)
    (order "vision_first" swaps the two offsets); the adapters rotate queries at 0..Y-1 and keys
    at 0..L-1 (instruction tokens, in order) or 0..S-1 (patches) with the host's rotary embedding.

Each adapter is one module shared by all of its insertion points, shaped like one decoder layer
of the host LLM (:class:`HostCrossAttentionLayer`). Only the prefix positions change; every other
position keeps the LLM's own hidden state. The instruction is ``GuidanceInputs.instruction_mask``,
whose rule the strategy declares (``StrategyNeeds.instruction_span_rule``; default the reference's:
every text token before the first reply's role name); it never holds response tokens or padding
and is read per row, so left padding is harmless. A sample without instruction tokens gets no text
pooling.

KV-cache safety: the prefix depends only on the image and the instruction, which are both in the
prompt, so the core runs the adapters on the prefill pass only and decode steps read the cache.

Module groups (training stages): ``projector``, ``prefix``, ``text_adapter``, ``vision_adapter``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn
from transformers import AutoModelForCausalLM

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


@dataclass
class TALlavaConfig(StrategyConfig):
    """Every size and choice of TA-LLaVA; the defaults are what the authors' code computes.

    Args:
        vision_layer: tower hidden state that becomes the memory V (-2).
        num_prefix_tokens: prefix length Y (32); also the visual tokens per image.
        period: k; adapters run after layers ``i < L - 1`` with ``i % k`` in the two offsets (4).
        order: ``text_first`` (text pooling at ``i % k == 0``, vision at ``== 1``) or ``vision_first``.
        projector_depth / projector_act: the projector to V (depth 1 = the reference's Linear).
        prefix_init_std: the prefix tokens are initialised N(0, std) (1.0: ``nn.Embedding``'s init,
            the reference's).
        prefix_embed_scale: multiply the prefix by the LLM's input-embedding scale (the
            ``embed_scale`` of Gemma's scaled embedding: sqrt(d); 1 for Llama/Qwen2), as the
            reference scales its whole embedded sequence, prefix included. False: enter as is.
        prefix_first: the prefix opens the sequence (before BOS; each prefix token attends only to
            earlier prefix tokens), as in the reference; False: it stands at the ``<image>`` placeholder.
        adapter_rope: the adapters rotate queries and keys with the host's rotary embedding
            (queries 0..Y-1, keys 0..L-1 / 0..S-1), as the reference's Gemma-2 attention does;
            False: no position information in the adapters.
        instruction_span: which tokens the text adapter reads. ``before_reply_role`` (the
            reference's): every text token before the first reply's role name, BOS and template
            markers included; ``first_user_text``: only the first user message's text (robust to a
            question containing the role word, which ends the reference's span early).
    """

    vision_layer: int = -2
    num_prefix_tokens: int = 32
    period: int = 4
    order: Literal["text_first", "vision_first"] = "text_first"
    projector_depth: int = 1
    projector_act: str = "gelu"
    prefix_init_std: float = 1.0
    prefix_embed_scale: bool = True
    prefix_first: bool = True
    adapter_rope: bool = True
    instruction_span: Literal["before_reply_role", "first_user_text"] = "before_reply_role"


@dataclass
class TALlavaContext:
    """Per-call state handed to :meth:`TALlavaStrategy.adapt` (through the forward call).

    Attributes:
        memory: ``(N, S, d)`` the projected vision features V of each image.
        prefix_index: ``(N, Y)`` flat positions (``row * T + col``) of each image's prefix tokens.
        instruction_index: ``(N, L)`` flat positions of the instruction tokens of each image's
            sample, in order; padded with position 0 where ``instruction_valid`` is False.
        instruction_valid: ``(N, L)`` True at real instruction entries.
    """

    memory: torch.Tensor
    prefix_index: torch.Tensor
    instruction_index: torch.Tensor
    instruction_valid: torch.Tensor


def host_decoder_layer(llm_config: Any) -> nn.Module:
    """One decoder layer of the host LLM, built on the meta device (no memory) to read its parts.

    The layer class is the one transformers lists in the LLM class's ``_no_split_modules``
    (``LlamaDecoderLayer``, ``Qwen2DecoderLayer``, ``Gemma2DecoderLayer``, ...).
    """
    llm_cls = AutoModelForCausalLM._model_mapping[type(llm_config)]
    module = sys.modules[llm_cls.__module__]
    found = [getattr(module, name, None) for name in getattr(llm_cls, "_no_split_modules", None) or []]
    found = [c for c in found if isinstance(c, type) and issubclass(c, nn.Module)]
    if len(found) != 1:
        raise TypeError(
            f"ta_llava cannot find the decoder-layer class of {llm_cls.__name__}: expected one class in its "
            f"_no_split_modules, found {[c.__name__ for c in found]}."
        )
    with torch.device("meta"):
        layer = found[0](llm_config, layer_idx=0)
    missing = [n for n in ("self_attn", "mlp", "input_layernorm") if not hasattr(layer, n)]
    if missing:
        raise TypeError(f"ta_llava: {found[0].__name__} has no {', '.join(missing)}; cannot mirror its layer shape.")
    return layer


def host_rotary_embedding(llm_config: Any) -> nn.Module:
    """The host LLM's rotary embedding (``Gemma2RotaryEmbedding``, ``LlamaRotaryEmbedding``, ...),
    built from its config on the CPU: ``(x, position_ids (B, L)) -> cos, sin (B, L, head_dim)``."""
    llm_cls = AutoModelForCausalLM._model_mapping[type(llm_config)]
    module = sys.modules[llm_cls.__module__]
    found = [c for name, c in vars(module).items()
             if name.endswith("RotaryEmbedding") and isinstance(c, type) and issubclass(c, nn.Module)]
    if len(found) != 1:
        raise TypeError(
            f"ta_llava adapter_rope needs the rotary embedding of {llm_cls.__name__}: expected one *RotaryEmbedding "
            f"class in {module.__name__}, found {[c.__name__ for c in found]}. Set adapter_rope: false."
        )
    with torch.device("cpu"):  # real buffers even when the model is built on the meta device
        return found[0](llm_config)


class HostCrossAttentionLayer(nn.Module):
    """A decoder layer of the host LLM with its self-attention made cross-attention.

    ``x (N, Q, d)`` attends to ``context (N, S, d)`` (``context_mask (N, S)``, True = attend)::

        h   = x + post_attn_norm(attn(q = attn_norm(x), kv = attn_norm(context)))
        out = h + post_mlp_norm(mlp(mlp_norm(h)))

    With ``rope`` the projected queries and keys are rotated by the host's rotary embedding, the
    queries at positions ``0..Q-1`` and the keys at ``0..S-1`` (as the reference's Gemma-2
    cross-attention does); the embedding holds no parameters and no saved buffers.

    ``post_*_norm`` exist only for hosts with Gemma-2's sandwich norms (``pre_feedforward_layernorm``
    / ``post_feedforward_layernorm``); a Llama/Qwen2 layer maps to ``attn_norm`` = its
    ``input_layernorm`` and ``mlp_norm`` = its ``post_attention_layernorm``. The norms are the host's
    RMSNorm class and eps (Gemma-2: ``x * (1 + w)``); the attention has the host's heads, key/value
    heads, head_dim, biases, logit scale and soft-capping; the MLP is the host's MLP class built from
    the host config. So the parameter count equals one host decoder layer's.
    """

    def __init__(self, llm_config: Any, rope: bool = False) -> None:
        super().__init__()
        host = host_decoder_layer(llm_config)
        # Kept out of the module tree: its inv_freq is a function of the config, and a buffer would
        # be wiped by to_empty() on the meta-device build path (from_components).
        self.__dict__["_rotary"] = host_rotary_embedding(llm_config) if rope else None
        attn = host.self_attn
        d = llm_config.hidden_size
        head_dim = attn.head_dim
        self._norm_cls, self._dim, self._eps = type(host.input_layernorm), d, llm_config.rms_norm_eps
        sandwich = hasattr(host, "pre_feedforward_layernorm") and hasattr(host, "post_feedforward_layernorm")
        self.attn_norm = self._new_norm()
        self.attn = MultiHeadAttention(
            d,
            attn.q_proj.out_features // head_dim,
            head_dim=head_dim,
            num_kv_heads=attn.k_proj.out_features // head_dim,
            bias=attn.q_proj.bias is not None,
            out_bias=attn.o_proj.bias is not None,
            dropout=float(getattr(attn, "attention_dropout", 0.0) or 0.0),
            scale=getattr(attn, "scaling", None),
            softcap=getattr(attn, "attn_logit_softcapping", None),
        )
        self.post_attn_norm = self._new_norm() if sandwich else None
        self.mlp_norm = self._new_norm()
        self.mlp = type(host.mlp)(llm_config)
        self.post_mlp_norm = self._new_norm() if sandwich else None

    def _new_norm(self) -> nn.Module:
        return self._norm_cls(self._dim, eps=self._eps)

    def reset_parameters(self) -> None:
        """Norms back to their class's own init (the host norm classes have no ``reset_parameters``)."""
        for norm in (self.attn_norm, self.post_attn_norm, self.mlp_norm, self.post_mlp_norm):
            if norm is None:
                continue
            with torch.no_grad():
                with torch.device(norm.weight.device):
                    fresh = self._new_norm()
                for p, q in zip(norm.parameters(), fresh.parameters()):
                    p.copy_(q)

    @property
    def rope(self) -> bool:
        return self._rotary is not None

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None = None) -> torch.Tensor:
        query_rotary = key_rotary = None
        if self._rotary is not None:
            query_rotary = self._rotary(x, torch.arange(x.shape[1], device=x.device)[None])  # (1, Q, head_dim) x2
            key_rotary = self._rotary(x, torch.arange(context.shape[1], device=x.device)[None])  # (1, S, head_dim) x2
        h = self.attn(self.attn_norm(x), self.attn_norm(context), context_mask, query_rotary, key_rotary)  # (N, Q, d)
        if self.post_attn_norm is not None:
            h = self.post_attn_norm(h)
        h = x + h
        m = self.mlp(self.mlp_norm(h))
        if self.post_mlp_norm is not None:
            m = self.post_mlp_norm(m)
        return h + m


@register_strategy("ta_llava")
class TALlavaStrategy(GuidanceStrategy):
    """``(N, S, D_v)`` + instruction span -> Y prefix tokens ``(N, Y, d)`` refined inside the LLM."""

    config_class = TALlavaConfig

    def __init__(self, config: TALlavaConfig, dims: CoreDims) -> None:
        super().__init__(config, dims)
        if config.period < 2:
            raise ValueError(f"ta_llava period must be >= 2 (text and vision offsets differ), got {config.period}.")
        if config.num_prefix_tokens < 1:
            raise ValueError(f"ta_llava num_prefix_tokens must be >= 1, got {config.num_prefix_tokens}.")
        d = dims.llm_hidden_size
        self.projector = MLPConnector(dims.vision_hidden_size, d, depth=config.projector_depth, act=config.projector_act)
        self.prefix = LearnedTokens(config.num_prefix_tokens, d, std=config.prefix_init_std)
        self.text_adapter = HostCrossAttentionLayer(dims.llm_config, rope=config.adapter_rope)
        self.vision_adapter = HostCrossAttentionLayer(dims.llm_config, rope=config.adapter_rope)
        text_offset = 0 if config.order == "text_first" else 1
        num_layers = dims.llm_config.num_hidden_layers
        self.text_layers = tuple(i for i in range(num_layers - 1) if i % config.period == text_offset)
        self.vision_layers = tuple(i for i in range(num_layers - 1) if i % config.period == 1 - text_offset)

    @property
    def needs(self) -> StrategyNeeds:
        c = self.config
        return StrategyNeeds(
            vision_layers=(c.vision_layer,),
            instruction_span=True,
            instruction_span_rule=c.instruction_span,
            visual_tokens_first=c.prefix_first,
        )

    @property
    def num_visual_tokens(self) -> int:
        return self.config.num_prefix_tokens

    @property
    def adapter_layers(self) -> tuple[int, ...]:
        return tuple(sorted(self.text_layers + self.vision_layers))

    def forward(self, inputs: GuidanceInputs) -> StrategyOutput:
        memory = self.projector(inputs.vision.layers[self.config.vision_layer])  # (N, S, d)
        n, t = memory.shape[0], inputs.input_ids.shape[1]
        # Placeholder runs in row-major order = image order (as the core scatters visual_embeds).
        rows, cols = inputs.image_token_mask.nonzero(as_tuple=True)
        prefix_index = (rows * t + cols).view(n, self.config.num_prefix_tokens)  # (N, Y)
        index, valid = _instruction_positions(inputs.instruction_mask, t)  # (B, L) each
        per_image = inputs.image_batch_index.to(index.device)
        context = TALlavaContext(
            memory=memory,
            prefix_index=prefix_index,
            instruction_index=index[per_image],
            instruction_valid=valid[per_image],
        )
        prefix = self.prefix(n)  # (N, Y, d)
        if self.config.prefix_embed_scale:
            prefix = prefix * _embedding_scale(inputs.llm_embed_tokens, prefix.dtype)
        return StrategyOutput(visual_embeds=prefix, llm_context=context)

    def adapt(self, layer_idx: int, hidden_states: torch.Tensor, context: TALlavaContext) -> torch.Tensor:
        """``hidden_states (B, T, d)`` after LLM layer ``layer_idx`` -> the same with the prefix updated."""
        b, t, d = hidden_states.shape
        device = hidden_states.device
        flat = hidden_states.reshape(b * t, d)
        prefix_index = context.prefix_index.to(device)
        y = flat[prefix_index]  # (N, Y, d)
        if layer_idx in self.text_layers:
            if context.instruction_index.shape[1] == 0:  # no instruction anywhere in the batch
                return hidden_states
            # (N, L, d) in sequence order: the adapter's keys sit at 0..L-1, which under the
            # reference's span (it starts at BOS, the text's first token) are their text positions.
            keys = flat[context.instruction_index.to(device)]
            valid = context.instruction_valid.to(device)
            has_text = valid.any(dim=1)  # (N,)
            # A sample without instruction tokens attends to its placeholder entries and keeps its Y:
            # an all-masked softmax would be NaN, and NaN * 0 still poisons the gradient.
            safe = valid | ~has_text[:, None]
            new = self.text_adapter(y, keys, safe)
            y = torch.where(has_text[:, None, None], new, y)
        else:
            y = self.vision_adapter(y, context.memory.to(device=device, dtype=y.dtype))
        return flat.index_copy(0, prefix_index.reshape(-1), y.reshape(-1, d).to(flat.dtype)).view(b, t, d)


def _embedding_scale(embed_tokens: nn.Module | None, dtype: torch.dtype) -> torch.Tensor | float:
    """The factor the LLM's input embedding multiplies its rows by: the ``embed_scale`` of a scaled
    word embedding (Gemma: sqrt(d)), else 1."""
    if embed_tokens is None:
        raise ValueError("ta_llava prefix_embed_scale needs GuidanceInputs.llm_embed_tokens (the LLM's input embedding).")
    scale = getattr(embed_tokens, "embed_scale", None)
    if scale is None:
        return 1.0
    return scale.to(dtype) if isinstance(scale, torch.Tensor) else float(scale)


def _instruction_positions(instruction_mask: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, T)`` bool -> flat positions ``(B, L)`` of each row's instruction tokens (in order, L =
    the longest row's count, padded with position 0) and their validity ``(B, L)``."""
    mask = instruction_mask.bool()
    b = mask.shape[0]
    counts = mask.sum(dim=1)  # (B,)
    width = int(counts.max()) if b else 0
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :width]  # instruction positions first
    valid = torch.arange(width, device=mask.device)[None, :] < counts[:, None]
    rows = torch.arange(b, device=mask.device)[:, None] * seq_len
    return torch.where(valid, order + rows, torch.zeros_like(order)), valid
