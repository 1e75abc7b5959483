"""Fusion of pooled features, and hybrids of several fusions.

``LateFusion`` combines the pooled image vector and the pooled text vector only:

- ``concat``: a linear map of ``[image; text]`` (the LSTM + CNN classifiers of early VQA, Antol et
  al. 2015; Santoro et al. 2017's CNN+MLP baseline);
- ``sum``: a learned convex combination of the two (softmax weights);
- ``gated``: the Gated Multimodal Unit (Arevalo et al. 2017): ``z * tanh(W_i i) + (1 - z) * tanh(W_t t)``
  with ``z = sigmoid(W_z [i; t])`` per feature.

``HybridFusion`` runs several fusion modules on the same features and sums their pooled outputs, so
that the modalities meet at several depths: inside token-level layers (early or cross-attention
fusion) and again at the pooled features (late fusion), the hybrid fusion of Atrey et al. 2010
("Multimodal fusion for multimedia analysis: a survey").
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

__all__ = ["HybridFusion", "LateFusion"]


class LateFusion(nn.Module):
    """Combine pooled image and text features; returns no fused tokens.

    Args:
        dim: feature width (the same as the encoders').
        mode: ``concat``, ``sum`` (weighted) or ``gated``.
    """

    def __init__(self, dim: int = 128, mode: Literal["concat", "sum", "gated"] = "concat"):
        super().__init__()
        self.dim, self.mode = dim, mode
        if mode == "concat":
            self.proj = nn.Sequential(nn.Linear(2 * dim, dim), nn.GELU())
        elif mode == "sum":
            self.logits = nn.Parameter(torch.zeros(2))
        elif mode == "gated":
            self.image_proj, self.text_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)
            self.gate = nn.Linear(2 * dim, dim)
        else:
            raise ValueError(f"fusion.mode must be concat, sum or gated, got {mode!r}")

    def forward(self, image_tokens: torch.Tensor, image_pooled: torch.Tensor, text_tokens: torch.Tensor,
                text_pooled: torch.Tensor, text_mask: torch.Tensor) -> tuple[None, torch.Tensor]:
        """-> (None, pooled (B, D)) from image_pooled (B, D) and text_pooled (B, D)."""
        if self.mode == "concat":
            return None, self.proj(torch.cat([image_pooled, text_pooled], dim=-1))
        if self.mode == "sum":
            weights = self.logits.softmax(0)
            return None, weights[0] * image_pooled + weights[1] * text_pooled
        z = torch.sigmoid(self.gate(torch.cat([image_pooled, text_pooled], dim=-1)))
        return None, z * torch.tanh(self.image_proj(image_pooled)) + (1 - z) * torch.tanh(self.text_proj(text_pooled))


class HybridFusion(nn.Module):
    """Several fusion modules side by side: their pooled outputs are summed; the fused tokens are the
    first module's that returns any.

    Args:
        fusions: built fusion modules of one width (e.g. ``EarlyFusion`` and ``LateFusion``).
    """

    def __init__(self, fusions: list[nn.Module]):
        super().__init__()
        if len(fusions) < 2:
            raise ValueError("fusion.init_args.fusions: a hybrid needs at least two fusion modules")
        widths = {f.dim for f in fusions}
        if len(widths) != 1:
            raise ValueError(f"fusion.init_args.fusions: every module needs the same dim, got {sorted(widths)}")
        self.dim = widths.pop()
        self.fusions = nn.ModuleList(fusions)

    def forward(self, image_tokens: torch.Tensor, image_pooled: torch.Tensor, text_tokens: torch.Tensor,
                text_pooled: torch.Tensor, text_mask: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        tokens, pooled = None, 0
        for fusion in self.fusions:
            fused, part = fusion(image_tokens, image_pooled, text_tokens, text_pooled, text_mask)
            tokens = fused if tokens is None else tokens
            pooled = pooled + part
        return tokens, pooled
