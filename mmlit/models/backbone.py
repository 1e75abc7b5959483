"""The shared backbone: an image encoder, a text encoder and a fusion module of one width.

The text encoder and the fusion are optional: a CLIP-style dual encoder has no fusion, an image
captioner or a classifier of images alone needs no text encoder, and a part that no task uses would
otherwise hold parameters without gradients (which plain DDP rejects).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from mmlit.models.image import TimmImageEncoder

__all__ = ["Backbone", "Features"]


@dataclass
class Features:
    """What the backbone returns; a field is None when its input was not given.

    Shapes: ``image_tokens`` (B, N, D), ``image_pooled`` (B, D), ``text_tokens`` (B, T, D),
    ``text_pooled`` (B, D), ``text_mask`` (B, T), ``fused_tokens`` (B, T, D), ``fused_pooled`` (B, D).
    Fusions of pooled features only (late fusion, the relation network) return no ``fused_tokens``.
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
        text_encoder: e.g. ``TransformerTextEncoder``, ``LSTMTextEncoder``, ``CausalTextDecoder``; none
            for recipes whose tasks read no text.
        fusion: e.g. ``CrossAttentionFusion``, ``EarlyFusion``, ``LateFusion``, ``HybridFusion``,
            ``RelationNetworkFusion``; none for recipes whose tasks need no fused features.
        vocab_size: the vocabulary of task decoders (captioning) when there is no text encoder; with
            one, its ``vocab_size`` is used.
        max_length: the longest text of task decoders when there is no text encoder.
    """

    def __init__(self, image_encoder: TimmImageEncoder, text_encoder: nn.Module | None = None,
                 fusion: nn.Module | None = None, vocab_size: int = 2000, max_length: int = 64):
        super().__init__()
        parts = {"image_encoder": image_encoder, "text_encoder": text_encoder, "fusion": fusion}
        widths = {k: v.dim for k, v in parts.items() if v is not None}
        if len(set(widths.values())) != 1:
            raise ValueError("model.backbone: image_encoder, text_encoder and fusion must have one dim, got "
                             + ", ".join(f"{k}.init_args.dim={v}" for k, v in widths.items()))
        if fusion is not None and text_encoder is None:
            raise ValueError("model.backbone.init_args.fusion: a fusion needs a text_encoder")
        self.image_encoder, self.text_encoder, self.fusion = image_encoder, text_encoder, fusion
        self.dim = image_encoder.dim
        self.vocab_size = text_encoder.vocab_size if text_encoder is not None else vocab_size
        self.max_length = text_encoder.max_length if text_encoder is not None else max_length
        self._passes: dict | None = None  # image tensor id -> (tensor, encoder output), inside shared_pass()

    @contextlib.contextmanager
    def shared_pass(self) -> Iterator[None]:
        """Within it, an image batch given again (the same tensor: tasks that read one source in a step get one, see
        ``SourceStream``) is encoded once, and each task's head reads that pass. Its graph is shared: a loss-based
        objective back-propagates through it once, a gradient-based one once per task (with ``retain_graph``)."""
        self._passes = {}
        try:
            yield
        finally:
            self._passes = None

    def _encode_image(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        passes = self._passes
        if passes is None:
            return self.image_encoder(image)
        done = passes.get(id(image))
        if done is None or done[0] is not image:  # (the tensor is kept, so its id is not reused within the step)
            done = passes[id(image)] = (image, self.image_encoder(image))
        return done[1]

    def require(self, part: str, task: str) -> nn.Module:
        """The part ``text_encoder`` or ``fusion``, or a clear error that task ``task`` needs it."""
        module = getattr(self, part)
        if module is None:
            raise ValueError(f"model.tasks.{task}: the task needs model.backbone.init_args.{part}, and the recipe has none")
        return module

    def forward(self, image: torch.Tensor | None = None, text: torch.Tensor | None = None, fuse: bool = True,
                image_index: torch.Tensor | None = None) -> Features:
        """``image`` (B, 3, H, W) and/or ``text`` ids (Q, T); both and ``fuse`` -> fused features too.

        ``image_index`` (Q,) pairs text ``i`` with image ``image_index[i]``, so an image asked several
        questions is encoded once; without it, text ``i`` goes with image ``i`` (Q == B).
        """
        out = Features()
        if image is not None:
            out.image_tokens, out.image_pooled = self._encode_image(image)
        if text is not None:
            if self.text_encoder is None:
                raise ValueError("model.backbone: a task passed text, but the backbone has no text_encoder")
            out.text_tokens, out.text_pooled, out.text_mask = self.text_encoder(text)
        if fuse and image is not None and text is not None:
            if self.fusion is None:
                raise ValueError("model.backbone: a task asked for fused features, but the backbone has no fusion")
            tokens, pooled, pairs = out.image_tokens, out.image_pooled, {}
            if getattr(self.fusion, "indexes_images", False):  # it reads each image once for all its texts
                pairs = {"image_index": image_index}
            elif image_index is not None:
                tokens, pooled = tokens[image_index], pooled[image_index]
            out.fused_tokens, out.fused_pooled = self.fusion(tokens, pooled, out.text_tokens, out.text_pooled,
                                                             out.text_mask, **pairs)
        return out
