"""The video encoder: a per-frame image encoder and a temporal transformer over the frames (the factorised encoder of
ViViT, Arnab et al. 2021, model 2).

Each sampled frame goes through a ``TimmImageEncoder`` (any timm model, the image pipelines and pretrained weights as
for images); its pooled feature is the frame's token. A transformer over the frame tokens, with a learned embedding
of each frame's place in time, then relates the frames: how things move. Spatial then temporal keeps the cost of a
clip near ``frames`` images plus a small transformer over ``frames`` tokens, where joint space-time attention would
cost (frames x patches)^2.
"""

from __future__ import annotations

import torch
from torch import nn

from mmlit.models.backbone import Encoded
from mmlit.models.image import TimmImageEncoder

__all__ = ["VideoEncoder"]


class VideoEncoder(nn.Module):
    """Clips (B, frames, 3, S, S) -> one token per frame (B, frames, D) (an ``Encoder`` of the video modality).

    Args:
        dim: width of the tokens.
        frames: frames sampled per clip (the video pipeline samples this many).
        frame_encoder: the ``TimmImageEncoder`` arguments of the per-frame encoder (``model_name``,
            ``image_size``, ``pooling``, ``pretrained``, ...); its ``dim`` is this one's.
        depth, heads: the temporal transformer's layers and attention heads.
    """

    def __init__(self, dim: int = 128, frames: int = 8, frame_encoder: dict | None = None, depth: int = 2,
                 heads: int = 4):
        super().__init__()
        if frames < 1:
            raise ValueError(f"model.backbone.init_args.encoders.video.init_args.frames must be at least 1, got {frames}")
        self.dim, self.frames = dim, frames
        self.frame_encoder = TimmImageEncoder(**{**(frame_encoder or {}), "dim": dim})
        self.image_size = self.frame_encoder.image_size
        self.time = nn.Parameter(torch.zeros(1, frames, dim))
        nn.init.trunc_normal_(self.time, std=0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.temporal = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def no_weight_decay(self) -> set[str]:
        """The time embedding, and the frame encoder's own (``frame_encoder.model.pos_embed``)."""
        return {"time", *(f"frame_encoder.{n}" for n in self.frame_encoder.no_weight_decay())}

    def forward(self, video: torch.Tensor) -> Encoded:
        """``video`` (B, F, 3, S, S), uint8 pixels or normalised floats -> tokens (B, F, D), pooled (B, D)."""
        batch, frames = video.shape[:2]
        if frames != self.frames:
            raise ValueError(f"a clip of {frames} frames reached a video encoder of frames={self.frames}")
        pooled = self.frame_encoder(video.reshape(batch * frames, *video.shape[2:])).pooled  # (B*F, D)
        tokens = self.norm(self.temporal(pooled.view(batch, frames, -1) + self.time))
        return Encoded(tokens, tokens.mean(1))
