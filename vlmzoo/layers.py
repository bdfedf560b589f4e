"""Building blocks strategies share. Every parameter lives in a module with ``reset_parameters``
so that ``from_pretrained`` can initialise modules missing from a checkpoint correctly."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN


class LearnedTokens(nn.Module):
    """A bank of learnable tokens ``(num_tokens, dim)``, initialised N(0, std)."""

    def __init__(self, num_tokens: int, dim: int, std: float = 0.02) -> None:
        super().__init__()
        self.std = std
        self.weight = nn.Parameter(torch.empty(num_tokens, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.std)

    def forward(self, batch_size: int) -> torch.Tensor:
        """-> ``(batch_size, num_tokens, dim)`` (a broadcast view; no copy)."""
        return self.weight.unsqueeze(0).expand(batch_size, -1, -1)


class ZeroLinear(nn.Linear):
    """A linear layer initialised to zero (weights and bias), so its branch starts as a no-op."""

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class NormalLinear(nn.Linear):
    """A linear layer initialised N(0, std) with zero bias (BERT's init; ``initializer_range`` 0.02)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, std: float = 0.02) -> None:
        self.std = std  # read by reset_parameters, which nn.Linear.__init__ calls
        super().__init__(in_features, out_features, bias=bias)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=self.std)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class RegionMarker(nn.Module):
    """Marks given tokens with one learned vector: mask ``(N, S)`` -> ``mask[..., None] * v``
    ``(N, S, D)``, added to features by the caller. ``v`` ``(D,)`` starts at zero (a no-op until it
    trains; dL/dv is the sum of dL/d(output) over the marked tokens, not 0). Controls use it to hand
    a model the location of the object a question names (the query's ``region_mask``)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.v = nn.Parameter(torch.zeros(dim))

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.v)

    def forward(self, mask: torch.Tensor) -> torch.Tensor:
        return mask.to(self.v.dtype)[..., None] * self.v  # (N, S, D)


class MLPConnector(nn.Module):
    """LLaVA's ``mlp{depth}x_{act}`` projector: Linear(in, out), then (act, Linear(out, out)) x (depth-1).

    ``(..., in_features)`` -> ``(..., out_features)``. Depth 1 is LLaVA-1's linear projector.
    """

    def __init__(self, in_features: int, out_features: int, depth: int = 2, act: str = "gelu", bias: bool = True):
        super().__init__()
        if depth < 1:
            raise ValueError(f"MLPConnector depth must be >= 1, got {depth}.")
        layers: list[nn.Module] = [nn.Linear(in_features, out_features, bias=bias)]
        for _ in range(depth - 1):
            layers += [ACT2FN[act], nn.Linear(out_features, out_features, bias=bias)]
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``(..., D)`` -> ``(..., D)``: ``cat(-x[D/2:], x[:D/2])`` (rotary embeddings' pairing of channels)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding: ``x (N, H, L, D)`` with ``cos, sin (N or 1, L, D)`` -> ``(N, H, L, D)``."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


class MultiHeadAttention(nn.Module):
    """Multi-head attention with optional grouped key/value heads (GQA).

    ``x (N, Q, query_dim)`` attends to ``context (N, S, kv_dim)`` -> ``(N, Q, query_dim)``.
    Projections: q ``query_dim -> num_heads * head_dim``, k and v ``kv_dim -> num_kv_heads * head_dim``,
    out ``num_heads * head_dim -> query_dim``; each query head group shares one key/value head.

    Args:
        head_dim: defaults to ``query_dim // num_heads``.
        kv_dim: defaults to ``query_dim``.
        num_kv_heads: defaults to ``num_heads`` (plain multi-head attention); must divide it.
        bias: bias on the q, k and v projections (and on the output one unless ``out_bias`` says).
        out_bias: bias on the output projection (default: ``bias``; Qwen2 has q/k/v bias only).
        dropout: dropout on the attention probabilities (training only).
        scale: logit scale (default ``head_dim ** -0.5``; Gemma-2 uses ``query_pre_attn_scalar ** -0.5``).
        softcap: if set, logits become ``softcap * tanh(logits / softcap)`` (Gemma-2's soft-capping).
        init_std: if set, the four projections are initialised N(0, init_std) with zero bias
            (:class:`NormalLinear`, BERT-style); else PyTorch's ``nn.Linear`` default.
    """

    def __init__(self, query_dim: int, num_heads: int, head_dim: int | None = None, kv_dim: int | None = None,
                 num_kv_heads: int | None = None, bias: bool = True, dropout: float = 0.0,
                 out_bias: bool | None = None, scale: float | None = None, softcap: float | None = None,
                 init_std: float | None = None) -> None:
        super().__init__()
        head_dim = head_dim or query_dim // num_heads
        num_kv_heads = num_kv_heads or num_heads
        if head_dim < 1 or num_heads % num_kv_heads:
            raise ValueError(
                f"MultiHeadAttention needs head_dim >= 1 and num_kv_heads dividing num_heads; got {num_heads} heads "
                f"of {head_dim} channels and {num_kv_heads} key/value heads."
            )
        kv_dim = kv_dim or query_dim
        self.num_heads, self.num_kv_heads, self.head_dim, self.dropout = num_heads, num_kv_heads, head_dim, dropout
        self.scale, self.softcap = scale, softcap
        linear = nn.Linear if init_std is None else partial(NormalLinear, std=init_std)
        self.q_proj = linear(query_dim, num_heads * head_dim, bias=bias)
        self.k_proj = linear(kv_dim, num_kv_heads * head_dim, bias=bias)
        self.v_proj = linear(kv_dim, num_kv_heads * head_dim, bias=bias)
        self.o_proj = linear(num_heads * head_dim, query_dim, bias=bias if out_bias is None else out_bias)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        context_mask: torch.Tensor | None = None,
        query_rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
        key_rotary: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """``context_mask (N, S)``: 1/True = attend, 0/False = padding (ignored).

        ``query_rotary`` / ``key_rotary``: ``(cos, sin)``, each ``(N or 1, Q or S, head_dim)``: rotary
        position embeddings applied to the projected queries / keys (as a RoPE decoder layer does).
        """
        n, q_len, _ = x.shape
        s_len = context.shape[1]
        q = self.q_proj(x).view(n, q_len, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(context).view(n, s_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(context).view(n, s_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if query_rotary is not None:
            q = apply_rotary(q, *query_rotary)
        if key_rotary is not None:
            k = apply_rotary(k, *key_rotary)
        mask = None if context_mask is None else context_mask.bool()[:, None, None, :]
        dropout = self.dropout if self.training else 0.0
        grouped = self.num_kv_heads != self.num_heads
        if self.softcap is None:  # SDPA shares each key/value head with its query group itself
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, scale=self.scale, enable_gqa=grouped
            )
        else:  # soft-capped logits: SDPA cannot express them
            if grouped:
                k = k.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)
                v = v.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)
            logits = (q @ k.transpose(-1, -2)) * (self.scale or self.head_dim**-0.5)  # (N, H, Q, S)
            logits = self.softcap * torch.tanh(logits / self.softcap)
            if mask is not None:
                logits = logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
            probs = F.dropout(logits.softmax(-1, dtype=torch.float32).to(q.dtype), p=dropout, training=self.training)
            out = probs @ v
        return self.o_proj(out.transpose(1, 2).reshape(n, q_len, self.num_heads * self.head_dim))


class SwiGLU(nn.Module):
    """``x -> (SiLU(x W1) * x W2) W3`` with bias-free ``W1, W2: dim -> hidden``, ``W3: hidden -> dim``
    (LLaMA's MLP: W1 = gate, W2 = up, W3 = down).

    ``(..., dim)`` -> ``(..., dim)``; no skip (the caller's block adds its residual).
    """

    def __init__(self, dim: int, hidden: int, bias: bool = False) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=bias)
        self.w2 = nn.Linear(dim, hidden, bias=bias)
        self.w3 = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w3(F.silu(self.w1(x)) * self.w2(x))
