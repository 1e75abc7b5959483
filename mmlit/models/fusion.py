"""Fusion modules: combine image tokens and text tokens into fused tokens.

``CrossAttentionFusion``: text tokens attend to themselves and to the image tokens in every
layer (the cross-attention design of ViLBERT/LXMERT-style co-attention, one-directional, as in
the fusion layers of ALBEF and BLIP).
"""

from __future__ import annotations

import torch
from torch import nn

from mmlit.models.text import masked_mean

__all__ = ["CrossAttentionFusion"]


class CrossAttentionFusion(nn.Module):
    """Pre-norm transformer decoder layers without a causal mask: text queries, image keys/values.

    Args:
        dim: token width (the same as the encoders').
        depth: fusion layers.
        heads: attention heads.
        dropout: dropout inside the layers.
    """

    def __init__(self, dim: int = 128, depth: int = 2, heads: int = 4, dropout: float = 0.0):
        super().__init__()
        self.dim = dim
        layer = nn.TransformerDecoderLayer(dim, heads, 4 * dim, dropout, batch_first=True, norm_first=True)
        self.layers = nn.TransformerDecoder(layer, depth, norm=nn.LayerNorm(dim))

    def forward(self, image_tokens: torch.Tensor, text_tokens: torch.Tensor,
                text_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """image (B, N, D), text (B, T, D), mask (B, T) -> fused tokens (B, T, D) and pooled (B, D)."""
        fused = self.layers(text_tokens, image_tokens, tgt_key_padding_mask=~text_mask)
        return fused, masked_mean(fused, text_mask)
