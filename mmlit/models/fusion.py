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
        grid: the context tokens' (height, width) when they are a grid, row by row (an image encoder's cells). From the
            second layer on, each head then adds to a cell's attention score its distance (in cells) from where each
            head of the layer before attended (that head's attention-weighted mean cell), times a scale that the query
            token sets (a learned linear map of it, per pair of heads). "The object nearest to the red one" is then one
            attention: the red object's place from the layer before, and a negative scale. The scales' maps start at
            zero, so the layers start as without them.
    """

    def __init__(self, dim: int = 128, depth: int = 2, heads: int = 4, bilinear: bool = True, dropout: float = 0.0,
                 query: str = "text", context: str = "image", grid: tuple[int, int] | None = None):
        super().__init__()
        if query == context:
            raise ValueError(f"fusion: query and context are one modality ({query!r}); use EarlyFusion for one stream")
        self.dim, self.query, self.context, self.modalities = dim, query, context, (context, query)
        layer = nn.TransformerDecoderLayer(dim, heads, 4 * dim, dropout, batch_first=True, norm_first=True)
        self.layers = nn.TransformerDecoder(layer, depth, norm=nn.LayerNorm(dim))
        self.text_gate = nn.Linear(dim, dim) if bilinear else None
        self.image_gate = nn.Linear(dim, dim) if bilinear else None
        self.grid, self.scales = None if grid is None else tuple(grid), None
        if grid is not None:
            if depth < 2:
                raise ValueError(f"fusion.init_args.grid: biases the layers after the first, so it needs depth >= 2, "
                                 f"got {depth}")
            height, width = self.grid
            ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
            self.register_buffer("cells", torch.stack([ys.flatten(), xs.flatten()], 1).float(), persistent=False)
            # (layer, head, head before, dim); zeros, not nn.Linear, so that adding them draws nothing from the random
            # generator: the other modules' initialisation stays as without ``grid``.
            self.scales = nn.Parameter(torch.zeros(depth - 1, heads, heads, dim))

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
        if self.grid is not None and context_pad is not None:  # float, as the distance bias is: one kind of mask
            context_pad = context.tokens.new_zeros(context_pad.shape).masked_fill(context_pad, float("-inf"))
        x, pad = query.tokens, ~_mask(query)
        if self.grid is not None and context.tokens.shape[1] != len(self.cells):
            raise ValueError(f"fusion.init_args.grid: {self.grid} is {len(self.cells)} cells, but the {self.context} "
                             f"encoder gives {context.tokens.shape[1]} tokens")
        focus = None  # (B, heads, M * T, N): where each head attended in the layer before (with ``grid``)
        for i, layer in enumerate(self.layers.layers):
            h = layer.norm1(x)
            x = x + layer.dropout1(layer.self_attn(h, h, h, key_padding_mask=pad, need_weights=False)[0])
            h = layer.norm2(x)
            t, d = h.shape[1:]
            h = h.new_zeros(len(context.pooled) * per_context, t, d).index_copy(0, slot, h)
            h = h.view(len(context.pooled), per_context * t, d)
            bias = None if focus is None else self._distance_bias(h, focus, i - 1)
            h, focus = layer.multihead_attn(h, context.tokens, context.tokens, key_padding_mask=context_pad,
                                            attn_mask=bias, need_weights=self.grid is not None,
                                            average_attn_weights=False)  # (B, M * T, D)
            x = x + layer.dropout2(h.reshape(-1, t, d)[slot])
            x = x + layer.dropout3(layer.linear2(layer.dropout(layer.activation(layer.linear1(layer.norm3(x))))))
        fused = self.layers.norm(x)
        pooled = masked_mean(fused, ~pad)
        if self.text_gate is not None:
            pooled = pooled + torch.tanh(self.text_gate(query.pooled)) * torch.tanh(self.image_gate(context.pooled[owner]))
        return Encoded(fused, pooled, ~pad)

    def _distance_bias(self, h: torch.Tensor, focus: torch.Tensor, layer: int) -> torch.Tensor:
        """Normed query tokens (B, L, D) and the layer before's attention (B, heads, L, N) -> each head's score bias
        (B * heads, L, N): the sum over the heads before of (the cell's distance from that head's mean cell) x (a scale
        linear in the query token)."""
        cells = self.cells.to(h.dtype)
        if self.training and self.layers.layers[layer].multihead_attn.dropout > 0:  # dropped weights: rows sum != 1
            focus = focus / focus.sum(-1, keepdim=True).clamp_min(torch.finfo(focus.dtype).tiny)
        centre = torch.matmul(focus, cells)  # (B, heads before, L, 2)
        gap = centre[:, :, :, None, :] - cells  # (B, heads before, L, N, 2)
        distance = gap.square().sum(-1).add(1e-6).sqrt()  # eps: a finite gradient where the centre is on a cell
        scale = torch.einsum("bld,hgd->bhgl", h, self.scales[layer].to(h.dtype))  # (B, heads, heads before, L)
        return torch.einsum("bhgl,bgln->bhln", scale, distance).flatten(0, 1)


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
