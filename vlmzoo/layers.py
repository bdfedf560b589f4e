"""Building blocks strategies share. Every parameter lives in a module with ``reset_parameters``
so that ``from_pretrained`` can initialise modules missing from a checkpoint correctly."""

from __future__ import annotations

import torch
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
