"""Text encoders over token ids from an mmlit tokenizer (``PAD`` = 0).

Every encoder (an ``Encoder`` of the text modality) maps ids (B, T) to ``Encoded``: tokens (B, T', D), a pooled vector
(B, D) and a mask (B, T') that is True on real tokens, and exposes ``dim``, ``vocab_size`` and ``max_length``.

- ``TransformerTextEncoder``: a bidirectional transformer; ``pooling="cls"`` prepends a learned
  [CLS] token and pools its output (BERT, Devlin et al. 2019).
- ``LSTMTextEncoder``: a (bidirectional) LSTM whose final states are the pooled vector (the question
  encoder of the early VQA models, Antol et al. 2015, and of the relation network, Santoro et al. 2017).
- ``CausalTextDecoder``: a GPT-style decoder (Radford et al. 2018) that can read a prefix of image
  tokens with full attention before its causal text (a prefix LM, as in SimVLM, Wang et al. 2022).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.utils.checkpoint
from torch import nn

from mmlit.models.backbone import Encoded
from mmlit.text import PAD

__all__ = ["CausalTextDecoder", "LSTMTextEncoder", "TransformerTextEncoder", "masked_mean"]


def _layers(coarse: bool = False) -> dict:
    """Layer ordinals for ``timm.optim.param_groups_layer_decay``: embeddings first, then each transformer or LSTM
    layer; the final norm is the top layer."""
    return {"stem": r"^(?:embed|pos|cls)\b", "blocks": [(r"^layers\.layers\.(\d+)\.", None),
                                                      (r"^lstm\.\w+_l(\d+)(?:_reverse)?$", None)]}


def _check_length(ids: torch.Tensor, max_length: int) -> None:
    if ids.shape[1] > max_length:
        raise ValueError(f"text of {ids.shape[1]} tokens is longer than encoders.text.init_args.max_length={max_length}")


class TransformerTextEncoder(nn.Module):
    """A bidirectional transformer encoder (pre-norm) with learned positions.

    Args:
        vocab_size: embedding rows; at least the tokenizer's vocabulary size.
        dim: token width.
        depth: transformer layers.
        heads: attention heads.
        max_length: longest sequence; longer inputs are cut by the tasks.
        pooling: ``mean`` over real tokens, or ``cls``: a learned [CLS] token is put first and its
            output is the pooled vector (it is also the first of the returned tokens).
        dropout: dropout inside the layers.
        checkpointing: activation checkpointing per layer in training: each layer's activations are recomputed in
            the backward pass instead of kept, for larger batches or longer texts.
    """

    def __init__(self, vocab_size: int = 2000, dim: int = 128, depth: int = 2, heads: int = 4, max_length: int = 64,
                 pooling: Literal["mean", "cls"] = "mean", dropout: float = 0.0, checkpointing: bool = False):
        super().__init__()
        self.dim, self.vocab_size, self.max_length, self.pooling = dim, vocab_size, max_length, pooling
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=PAD)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.02) if pooling == "cls" else None
        self.pos = nn.Parameter(torch.randn(1, max_length + (pooling == "cls"), dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout, batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, depth, norm=nn.LayerNorm(dim), enable_nested_tensor=False)
        self.checkpointing = checkpointing

    group_matcher = staticmethod(_layers)

    def forward(self, ids: torch.Tensor) -> Encoded:
        """``ids`` (B, T) -> tokens (B, T', D), pooled (B, D), mask (B, T') with True on real tokens;
        T' = T + 1 with a [CLS] token."""
        _check_length(ids, self.max_length)
        mask = ids != PAD
        x = self.embed(ids)
        if self.cls is not None:
            x = torch.cat([self.cls.expand(len(ids), -1, -1), x], dim=1)
            mask = torch.cat([mask.new_ones(len(ids), 1), mask], dim=1)
        x = x + self.pos[:, : x.shape[1]]
        if self.checkpointing and self.training and torch.is_grad_enabled():
            for layer in self.layers.layers:  # (what nn.TransformerEncoder does in training, a layer at a time)
                x = torch.utils.checkpoint.checkpoint(layer, x, src_key_padding_mask=~mask, use_reentrant=False)
            tokens = self.layers.norm(x)
        else:
            tokens = self.layers(x, src_key_padding_mask=~mask)
        return Encoded(tokens, tokens[:, 0] if self.cls is not None else masked_mean(tokens, mask), mask)


class LSTMTextEncoder(nn.Module):
    """An LSTM over word embeddings; the pooled vector is its last layer's final state (both directions).

    Args:
        vocab_size: embedding rows; at least the tokenizer's vocabulary size.
        dim: token and pooled width (each direction has ``dim // 2`` units when bidirectional).
        layers: stacked LSTM layers.
        bidirectional: read the text both ways.
        max_length: longest sequence.
        dropout: dropout between LSTM layers.
    """

    def __init__(self, vocab_size: int = 2000, dim: int = 128, layers: int = 1, bidirectional: bool = True,
                 max_length: int = 64, dropout: float = 0.0):
        super().__init__()
        if bidirectional and dim % 2:
            raise ValueError(f"encoders.text.init_args.dim must be even for a bidirectional LSTM, got {dim}")
        self.dim, self.vocab_size, self.max_length = dim, vocab_size, max_length
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=PAD)
        self.lstm = nn.LSTM(dim, dim // 2 if bidirectional else dim, layers, batch_first=True,
                            bidirectional=bidirectional, dropout=dropout if layers > 1 else 0.0)

    group_matcher = staticmethod(_layers)

    def forward(self, ids: torch.Tensor) -> Encoded:
        """``ids`` (B, T) -> tokens (B, T, D), pooled (B, D), mask (B, T)."""
        _check_length(ids, self.max_length)
        mask = ids != PAD
        lengths = mask.sum(1).clamp_min(1).cpu()  # an empty text reads one PAD
        packed = nn.utils.rnn.pack_padded_sequence(self.embed(ids), lengths, batch_first=True, enforce_sorted=False)
        out, (hidden, _) = self.lstm(packed)
        tokens, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=ids.shape[1])
        directions = 2 if self.lstm.bidirectional else 1
        pooled = hidden[-directions:].transpose(0, 1).flatten(1)  # (B, D): the last layer's final states
        return Encoded(tokens, pooled, mask)


class CausalTextDecoder(nn.Module):
    """A GPT-style decoder: pre-norm transformer layers under a causal mask, learned positions.

    Each text token sees the tokens before it and, when ``prefix`` is given, every prefix token (the
    prefix itself attends bidirectionally). Positions count real tokens, so texts may be padded on
    the left (batched generation) or on the right (training).

    Args:
        vocab_size: embedding rows; at least the tokenizer's vocabulary size.
        dim: token width.
        depth: transformer layers.
        heads: attention heads.
        max_length: longest text (the prefix does not count).
        dropout: dropout inside the layers.
    """

    def __init__(self, vocab_size: int = 2000, dim: int = 128, depth: int = 2, heads: int = 4, max_length: int = 64,
                 dropout: float = 0.0):
        super().__init__()
        self.dim, self.vocab_size, self.max_length, self.heads = dim, vocab_size, max_length, heads
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=PAD)
        self.pos = nn.Embedding(max_length, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout, batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, depth, norm=nn.LayerNorm(dim), enable_nested_tensor=False)

    group_matcher = staticmethod(_layers)

    def forward(self, ids: torch.Tensor, prefix: torch.Tensor | None = None) -> Encoded:
        """``ids`` (B, T), ``prefix`` (B, P, D) -> text tokens (B, T, D), pooled (B, D): the state of the
        last real token (the one that has read the whole text), mask (B, T)."""
        _check_length(ids, self.max_length)
        mask = ids != PAD
        positions = (mask.cumsum(1) - 1).clamp_min(0)
        x = self.embed(ids) + self.pos(positions)
        n_prefix = 0 if prefix is None else prefix.shape[1]
        if prefix is not None:
            x = torch.cat([prefix, x], dim=1)
        tokens = self.layers(x, mask=self._attention_mask(mask, n_prefix, x.dtype))[:, n_prefix:]
        last = torch.where(mask, torch.arange(ids.shape[1], device=ids.device), -1).amax(1).clamp_min(0)
        return Encoded(tokens, tokens[torch.arange(len(ids), device=ids.device), last], mask)

    def _attention_mask(self, mask: torch.Tensor, n_prefix: int, dtype: torch.dtype) -> torch.Tensor:
        """(B * heads, L, L) additive mask: prefix keys always, real text keys at or before the query,
        and each query itself (so that a padding query never sees an empty row)."""
        batch, length = mask.shape
        total = n_prefix + length
        keys = torch.cat([mask.new_ones(batch, n_prefix), mask], dim=1)  # (B, L)
        causal = torch.ones(total, total, dtype=torch.bool, device=mask.device).tril()
        causal[:, :n_prefix] = True
        causal[:n_prefix, n_prefix:] = False
        allowed = (causal[None] & keys[:, None, :]) | torch.eye(total, dtype=torch.bool, device=mask.device)
        additive = torch.zeros(allowed.shape, dtype=dtype, device=mask.device).masked_fill(~allowed, float("-inf"))
        return additive.repeat_interleave(self.heads, dim=0)


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``tokens`` (B, T, D) over positions where ``mask`` (B, T) is True."""
    weights = mask.unsqueeze(-1).to(tokens.dtype)
    return (tokens * weights).sum(1) / weights.sum(1).clamp_min(1.0)
