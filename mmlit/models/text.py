"""Text encoders over token ids from an mmlit tokenizer (``PAD`` = 0)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from mmlit.text import PAD

__all__ = ["TransformerTextEncoder"]


class TransformerTextEncoder(nn.Module):
    """A bidirectional transformer encoder (pre-norm) with learned positions.

    Args:
        vocab_size: embedding rows; at least the tokenizer's vocabulary size.
        dim: token width.
        depth: transformer layers.
        heads: attention heads.
        max_length: longest sequence; longer inputs are cut by the tasks.
        pooling: ``mean`` over real tokens, or ``first`` (the first token, BERT's CLS position).
        dropout: dropout inside the layers.
    """

    def __init__(self, vocab_size: int = 2000, dim: int = 128, depth: int = 2, heads: int = 4, max_length: int = 64,
                 pooling: Literal["mean", "first"] = "mean", dropout: float = 0.0):
        super().__init__()
        self.dim, self.vocab_size, self.max_length, self.pooling = dim, vocab_size, max_length, pooling
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=PAD)
        self.pos = nn.Parameter(torch.randn(1, max_length, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout, batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, depth, norm=nn.LayerNorm(dim), enable_nested_tensor=False)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``ids`` (B, T) -> tokens (B, T, D), pooled (B, D), mask (B, T) with True on real tokens."""
        if ids.shape[1] > self.max_length:
            raise ValueError(f"text of {ids.shape[1]} tokens is longer than text_encoder.max_length={self.max_length}")
        mask = ids != PAD
        tokens = self.layers(self.embed(ids) + self.pos[:, : ids.shape[1]], src_key_padding_mask=~mask)
        return tokens, masked_mean(tokens, mask) if self.pooling == "mean" else tokens[:, 0], mask


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``tokens`` (B, T, D) over positions where ``mask`` (B, T) is True."""
    weights = mask.unsqueeze(-1).to(tokens.dtype)
    return (tokens * weights).sum(1) / weights.sum(1).clamp_min(1.0)
