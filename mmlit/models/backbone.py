"""The shared backbone: an image encoder, a text encoder and a fusion module of one width."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mmlit.models.fusion import CrossAttentionFusion
from mmlit.models.image import TimmImageEncoder
from mmlit.models.text import TransformerTextEncoder

__all__ = ["Backbone", "Features"]


@dataclass
class Features:
    """What the backbone returns; a field is None when its input was not given.

    Shapes: ``image_tokens`` (B, N, D), ``image_pooled`` (B, D), ``text_tokens`` (B, T, D),
    ``text_pooled`` (B, D), ``text_mask`` (B, T), ``fused_tokens`` (B, T, D), ``fused_pooled`` (B, D).
    """

    image_tokens: torch.Tensor | None = None
    image_pooled: torch.Tensor | None = None
    text_tokens: torch.Tensor | None = None
    text_pooled: torch.Tensor | None = None
    text_mask: torch.Tensor | None = None
    fused_tokens: torch.Tensor | None = None
    fused_pooled: torch.Tensor | None = None


class Backbone(nn.Module):
    """Encode an image, a text, or both (and fuse them).

    Args:
        image_encoder: e.g. ``TimmImageEncoder``.
        text_encoder: e.g. ``TransformerTextEncoder``.
        fusion: e.g. ``CrossAttentionFusion``.
    """

    def __init__(self, image_encoder: TimmImageEncoder, text_encoder: TransformerTextEncoder,
                 fusion: CrossAttentionFusion):
        super().__init__()
        widths = {"image_encoder": image_encoder.dim, "text_encoder": text_encoder.dim, "fusion": fusion.dim}
        if len(set(widths.values())) != 1:
            raise ValueError("model.backbone: image_encoder, text_encoder and fusion must have one dim, got "
                             + ", ".join(f"{k}.init_args.dim={v}" for k, v in widths.items()))
        self.image_encoder, self.text_encoder, self.fusion = image_encoder, text_encoder, fusion
        self.dim = image_encoder.dim
        self.vocab_size = text_encoder.vocab_size
        self.max_length = text_encoder.max_length

    def forward(self, image: torch.Tensor | None = None, text: torch.Tensor | None = None, fuse: bool = True,
                image_index: torch.Tensor | None = None) -> Features:
        """``image`` (B, 3, H, W) and/or ``text`` ids (Q, T); both and ``fuse`` -> fused features too.

        ``image_index`` (Q,) pairs text ``i`` with image ``image_index[i]``, so an image asked several
        questions is encoded once; without it, text ``i`` goes with image ``i`` (Q == B).
        """
        out = Features()
        if image is not None:
            out.image_tokens, out.image_pooled = self.image_encoder(image)
        if text is not None:
            out.text_tokens, out.text_pooled, out.text_mask = self.text_encoder(text)
        if fuse and image is not None and text is not None:
            tokens, pooled = out.image_tokens, out.image_pooled
            if image_index is not None:
                tokens, pooled = tokens[image_index], pooled[image_index]
            out.fused_tokens, out.fused_pooled = self.fusion(tokens, pooled, out.text_tokens, out.text_mask)
        return out
