"""Fusion modules: the interface, and the token-level ones (named modalities meet inside transformer layers).

A fusion is a registered ``Fusion`` (``@register_fusion("name")``, entry-point group ``mmlit.fusions``; ``mmlit
fusions`` lists them) that names the modalities it reads (``modalities``) and is called as
``fusion(encoded, index)``: ``encoded`` maps each modality to its ``Encoded`` (tokens (B_m, N_m, D), pooled (B_m, D),
mask), ``index`` maps a modality to the row of its batch that each output row reads (Q,); a modality without an index
has one row per output row. It returns an ``Encoded`` of Q rows (tokens None for fusions of pooled features).
``mmlit/models/late_fusion.py`` and ``mmlit/models/relation.py`` hold the others.

``EarlyFusion``: one transformer over the tokens of every modality together, each with a learned modality embedding
(single-stream fusion, as in VisualBERT, Li et al. 2019, and ViLT, Kim et al. 2021).

``CrossAttentionFusion``: in every layer the query modality's tokens (text) attend to themselves and to the context
modality's tokens (image) (the fusion layers of ALBEF, Li et al. 2021, and BLIP). Its pooled output adds a low-rank
bilinear (Hadamard product) term of the pooled query and pooled context features (Kim et al. 2017, "Hadamard Product
for Low-rank Bilinear Pooling"). Trained from scratch, the attention path sits on a plateau until query-to-context
attention becomes sharp (thousands of steps on Sort-of-CLEVR); the product term lets the question select image
features from the first step, so the model learns while the attention sharpens.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from mmlit.models.backbone import Encoded
from mmlit.models.text import masked_mean
from mmlit.registry import register_fusion

__all__ = ["CrossAttentionFusion", "EarlyFusion", "Fusion", "rows"]


class Fusion(nn.Module):
    """Combine named modalities: ``forward(encoded, index) -> Encoded`` (see the module docstring). Subclasses set
    ``dim`` and ``modalities`` (the modalities they read, which the backbone checks against its encoders)."""

    fusion_name: ClassVar[str]  # set by @register_fusion
    dim: int
    modalities: tuple[str, ...]

    def forward(self, encoded: dict[str, Encoded], index: dict[str, torch.Tensor]) -> Encoded:
        raise NotImplementedError


def rows(encoded: Encoded, index: torch.Tensor | None) -> Encoded:
    """``encoded`` with one row per output row: its rows ``index`` (Q,), or as it is without an index."""
    if index is None:
        return encoded
    pick = (lambda t: None if t is None else t[index])  # noqa: E731
    return Encoded(pick(encoded.tokens), encoded.pooled[index], pick(encoded.mask))


def _mask(encoded: Encoded) -> torch.Tensor:
    """The mask of ``encoded``, all True where it has none (B, N)."""
    if encoded.mask is not None:
        return encoded.mask
    return torch.ones(encoded.tokens.shape[:2], dtype=torch.bool, device=encoded.tokens.device)


@register_fusion("cross_attention")
class CrossAttentionFusion(Fusion):
    """Pre-norm transformer decoder layers without a causal mask: ``query`` tokens attend to ``context`` tokens.

    Args:
        dim: token width (the same as the encoders').
        depth: fusion layers.
        heads: attention heads.
        bilinear: add the Hadamard-product term of pooled query and context to the pooled output.
        dropout: dropout inside the layers.
        query: the modality whose tokens ask (and whose rows the output has): ``text``.
        context: the modality they read: ``image``.
    """

    def __init__(self, dim: int = 128, depth: int = 2, heads: int = 4, bilinear: bool = True, dropout: float = 0.0,
                 query: str = "text", context: str = "image"):
        super().__init__()
        if query == context:
            raise ValueError(f"fusion: query and context are one modality ({query!r}); use EarlyFusion for one stream")
        self.dim, self.query, self.context, self.modalities = dim, query, context, (context, query)
        layer = nn.TransformerDecoderLayer(dim, heads, 4 * dim, dropout, batch_first=True, norm_first=True)
        self.layers = nn.TransformerDecoder(layer, depth, norm=nn.LayerNorm(dim))
        self.text_gate = nn.Linear(dim, dim) if bilinear else None
        self.image_gate = nn.Linear(dim, dim) if bilinear else None

    def forward(self, encoded: dict[str, Encoded], index: dict[str, torch.Tensor]) -> Encoded:
        """Query tokens (Q, T, D), pooled (Q, D), mask (Q, T); context tokens (B, N, D) and pooled (B, D), with
        ``index[context]`` (Q,) pairing query ``i`` with context row ``index[context][i]`` (none: Q == B) -> fused
        query tokens (Q, T, D) and pooled (Q, D).

        The layers' own modules run in ``nn.TransformerDecoderLayer``'s pre-norm order (a test holds the two equal),
        but the cross-attention reads each context row once for all its queries: the queries of one image are its
        queries together. Asked 20 questions (Sort-of-CLEVR), an image's keys and values are projected once instead of
        20 times: a training step of recipes/sort_of_clevr_fast.yaml's model (16 images, 10x10 grid) took 0.87 s
        instead of 1.46 s on one CPU thread.
        """
        query, context = rows(encoded[self.query], index.get(self.query)), encoded[self.context]
        owner = index.get(self.context)
        if owner is None:
            owner = torch.arange(len(query.pooled), device=query.pooled.device)
        slot, per_context = _slots(owner, len(context.pooled))
        context_pad = None if context.mask is None else ~context.mask
        x, pad = query.tokens, ~_mask(query)
        for layer in self.layers.layers:
            h = layer.norm1(x)
            x = x + layer.dropout1(layer.self_attn(h, h, h, key_padding_mask=pad, need_weights=False)[0])
            h = layer.norm2(x)
            t, d = h.shape[1:]
            h = h.new_zeros(len(context.pooled) * per_context, t, d).index_copy(0, slot, h)
            h = layer.multihead_attn(h.view(len(context.pooled), per_context * t, d), context.tokens, context.tokens,
                                     key_padding_mask=context_pad, need_weights=False)[0]  # (B, M * T, D)
            x = x + layer.dropout2(h.reshape(-1, t, d)[slot])
            x = x + layer.dropout3(layer.linear2(layer.dropout(layer.activation(layer.linear1(layer.norm3(x))))))
        fused = self.layers.norm(x)
        pooled = masked_mean(fused, ~pad)
        if self.text_gate is not None:
            pooled = pooled + torch.tanh(self.text_gate(query.pooled)) * torch.tanh(self.image_gate(context.pooled[owner]))
        return Encoded(fused, pooled, ~pad)


def _slots(owner: torch.Tensor, contexts: int) -> tuple[torch.Tensor, int]:
    """Each query's row in a (B * M, ...) grid of M rows per context row (M: the most queries of one), and M."""
    counts = torch.bincount(owner, minlength=contexts)
    per_context = int(counts.max()) if len(owner) else 1
    order = torch.argsort(owner, stable=True)
    rank = torch.empty_like(owner)
    first = counts.cumsum(0) - counts  # (B,) each context row's first place in sorted order
    rank[order] = torch.arange(len(owner), device=owner.device) - first[owner[order]]
    return owner * per_context + rank, per_context


@register_fusion("early")
class EarlyFusion(Fusion):
    """Pre-norm transformer encoder layers over the tokens of every modality together (one stream).

    Args:
        dim: token width (the same as the encoders').
        depth: joint layers.
        heads: attention heads.
        dropout: dropout inside the layers.
        modalities: the modalities joined, in order; the output tokens are the last one's positions.
    """

    def __init__(self, dim: int = 128, depth: int = 2, heads: int = 4, dropout: float = 0.0,
                 modalities: tuple[str, ...] = ("image", "text")):
        super().__init__()
        if len(modalities) < 2:
            raise ValueError(f"fusion.init_args.modalities: early fusion joins two or more, got {list(modalities)}")
        self.dim, self.modalities = dim, tuple(modalities)
        self.modality = nn.Parameter(torch.randn(len(modalities), dim) * 0.02)  # a learned embedding per modality
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout, batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, depth, norm=nn.LayerNorm(dim), enable_nested_tensor=False)

    def forward(self, encoded: dict[str, Encoded], index: dict[str, torch.Tensor]) -> Encoded:
        """-> the last modality's positions of the joint output (Q, T, D), and the mean over every real token."""
        parts = [rows(encoded[m], index.get(m)) for m in self.modalities]
        x = torch.cat([p.tokens + self.modality[i] for i, p in enumerate(parts)], dim=1)  # (Q, sum N, D)
        mask = torch.cat([_mask(p) for p in parts], dim=1)
        joint = self.layers(x, src_key_padding_mask=~mask)
        last = parts[-1].tokens.shape[1]
        return Encoded(joint[:, -last:], masked_mean(joint, mask), mask[:, -last:])
