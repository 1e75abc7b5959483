"""Projectors from image tokens to a language model's input embeddings (the connector of a vision-language model).

- ``linear``: one linear map per token (LLaVA, Liu et al. 2023);
- ``mlp``: linear, GELU, linear (LLaVA-1.5, Liu et al. 2024; prismatic's default);
- ``pixel_shuffle``: each ``factor`` x ``factor`` patch of the token grid becomes one token of ``factor**2`` times
  the width, then one linear map (nanoVLM; Idefics3): ``factor**2`` times fewer image tokens in the LM's sequence.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import nn

__all__ = ["Projector"]


class Projector(nn.Module):
    """Image tokens (B, N, D_in) -> LM embeddings (B, N', D_out); N' = N / factor**2 for ``pixel_shuffle``.

    Args:
        kind: ``linear``, ``mlp`` or ``pixel_shuffle``.
        in_dim: the image tokens' width.
        out_dim: the LM's hidden size.
        factor: the pixel-shuffle factor (the token grid's side must be a multiple of it).
    """

    def __init__(self, kind: Literal["linear", "mlp", "pixel_shuffle"], in_dim: int, out_dim: int, factor: int = 2):
        super().__init__()
        self.kind, self.factor = kind, factor if kind == "pixel_shuffle" else 1
        width = in_dim * self.factor ** 2
        if kind == "mlp":
            self.proj = nn.Sequential(nn.Linear(width, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
        else:
            self.proj = nn.Linear(width, out_dim)

    def tokens(self, n: int) -> int:
        """How many tokens it makes of ``n`` image tokens."""
        return n // self.factor ** 2

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.factor > 1:
            tokens = self._shuffle(tokens)
        return self.proj(tokens)

    def _shuffle(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, S*S, D) in row-major grid order -> (B, (S/f)*(S/f), D*f*f): each f x f patch concatenated."""
        batch, n, dim = tokens.shape
        side, f = math.isqrt(n), self.factor
        if side * side != n or side % f:
            raise ValueError(f"projector: pixel_shuffle with factor {f} needs a square grid of tokens whose side is a "
                             f"multiple of {f}; the image encoder gives {n} tokens")
        grid = tokens.reshape(batch, side // f, f, side // f, f, dim)  # (B, rows, f, cols, f, D)
        return grid.permute(0, 1, 3, 2, 4, 5).reshape(batch, (side // f) ** 2, f * f * dim)
