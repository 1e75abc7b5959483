"""Fusion of pooled features, and hybrids of several fusions.

``LateFusion`` combines the pooled vectors of its modalities only:

- ``concat``: a linear map of ``[image; text]`` (the LSTM + CNN classifiers of early VQA, Antol et
  al. 2015; Santoro et al. 2017's CNN+MLP baseline);
- ``sum``: a learned convex combination (softmax weights);
- ``gated``: the Gated Multimodal Unit (Arevalo et al. 2017): ``sum_m z_m * tanh(W_m x_m)`` with gates ``z``
  (softmax over the modalities, per feature) computed from all of them; with two modalities, the paper's
  ``z * tanh(W_i i) + (1 - z) * tanh(W_t t)``.

``HybridFusion`` runs several fusion modules on the same features and sums their pooled outputs, so
that the modalities meet at several depths: inside token-level layers (early or cross-attention
fusion) and again at the pooled features (late fusion), the hybrid fusion of Atrey et al. 2010
("Multimodal fusion for multimedia analysis: a survey").
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from mmlit.models.backbone import Encoded
from mmlit.models.fusion import Fusion, rows
from mmlit.registry import register_fusion

__all__ = ["HybridFusion", "LateFusion"]


@register_fusion("late")
class LateFusion(Fusion):
    """Combine pooled features; returns no fused tokens.

    Args:
        dim: feature width (the same as the encoders').
        mode: ``concat``, ``sum`` (weighted) or ``gated``.
        modalities: the modalities combined.
    """

    def __init__(self, dim: int = 128, mode: Literal["concat", "sum", "gated"] = "concat",
                 modalities: tuple[str, ...] = ("image", "text")):
        super().__init__()
        n = len(modalities)
        if n < 2:
            raise ValueError(f"fusion.init_args.modalities: late fusion combines two or more, got {list(modalities)}")
        self.dim, self.mode, self.modalities = dim, mode, tuple(modalities)
        if mode == "concat":
            self.proj = nn.Sequential(nn.Linear(n * dim, dim), nn.GELU())
        elif mode == "sum":
            self.logits = nn.Parameter(torch.zeros(n))
        elif mode == "gated":
            self.projs = nn.ModuleList(nn.Linear(dim, dim) for _ in range(n))
            self.gate = nn.Linear(n * dim, n * dim)
        else:
            raise ValueError(f"fusion.mode must be concat, sum or gated, got {mode!r}")

    def forward(self, encoded: dict[str, Encoded], index: dict[str, torch.Tensor]) -> Encoded:
        """-> pooled (Q, D) from each modality's pooled (Q, D); no tokens."""
        pooled = [rows(encoded[m], index.get(m)).pooled for m in self.modalities]
        if self.mode == "concat":
            return Encoded(None, self.proj(torch.cat(pooled, dim=-1)))
        if self.mode == "sum":
            return Encoded(None, sum(w * p for w, p in zip(self.logits.softmax(0), pooled)))
        gates = self.gate(torch.cat(pooled, dim=-1)).unflatten(-1, (len(pooled), -1)).softmax(-2)  # (Q, n, D)
        return Encoded(None, sum(gates[:, i] * torch.tanh(proj(p)) for i, (proj, p) in enumerate(zip(self.projs, pooled))))


@register_fusion("hybrid")
class HybridFusion(Fusion):
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
        self.modalities = tuple(dict.fromkeys(m for f in fusions for m in f.modalities))
        self.fusions = nn.ModuleList(fusions)

    def forward(self, encoded: dict[str, Encoded], index: dict[str, torch.Tensor]) -> Encoded:
        tokens, mask, pooled = None, None, 0
        for fusion in self.fusions:
            part = fusion(encoded, index)
            if tokens is None and part.tokens is not None:
                tokens, mask = part.tokens, part.mask
            pooled = pooled + part.pooled
        return Encoded(tokens, pooled, mask)
