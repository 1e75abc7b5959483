"""Fusion modules: combine image tokens and text tokens into fused tokens.

``CrossAttentionFusion``: in every layer the text tokens attend to themselves and to the image
tokens (the fusion layers of ALBEF, Li et al. 2021, and BLIP). Its pooled output adds a low-rank
bilinear (Hadamard product) term of the pooled text and pooled image features (Kim et al. 2017,
"Hadamard Product for Low-rank Bilinear Pooling"). Trained from scratch, the attention path sits
on a plateau until text-to-image attention becomes sharp (thousands of steps on Sort-of-CLEVR);
the product term lets the question select image features from the first step, so the model
learns while the attention sharpens.
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
        bilinear: add the Hadamard-product term of pooled text and image to the pooled output.
        dropout: dropout inside the layers.
    """

    def __init__(self, dim: int = 128, depth: int = 2, heads: int = 4, bilinear: bool = True, dropout: float = 0.0):
        super().__init__()
        self.dim = dim
        layer = nn.TransformerDecoderLayer(dim, heads, 4 * dim, dropout, batch_first=True, norm_first=True)
        self.layers = nn.TransformerDecoder(layer, depth, norm=nn.LayerNorm(dim))
        self.text_gate = nn.Linear(dim, dim) if bilinear else None
        self.image_gate = nn.Linear(dim, dim) if bilinear else None

    def forward(self, image_tokens: torch.Tensor, image_pooled: torch.Tensor, text_tokens: torch.Tensor,
                text_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """image tokens (B, N, D) and pooled (B, D), text (B, T, D), mask (B, T) -> fused text tokens
        (B, T, D) and pooled (B, D)."""
        fused = self.layers(text_tokens, image_tokens, tgt_key_padding_mask=~text_mask)
        pooled = masked_mean(fused, text_mask)
        if self.text_gate is not None:
            product = torch.tanh(self.text_gate(masked_mean(text_tokens, text_mask))) * torch.tanh(
                self.image_gate(image_pooled))
            pooled = pooled + product
        return fused, pooled
