"""The video encoder: a per-frame image encoder and a temporal transformer over the frames (the factorised encoder of
ViViT, Arnab et al. 2021, model 2).

Each sampled frame goes through a ``TimmImageEncoder`` (any timm model, the image pipelines and pretrained weights as
for images). With ``tokens: frames`` its pooled feature is the frame's token, and a transformer over the frame
tokens, with a learned embedding of each frame's place in time, relates the frames (ViViT's factorised encoder).
With ``tokens: grid`` every grid position of every frame is a token, and the temporal transformer attends over time
at each position (the time attention of TimeSformer's divided space-time attention, Bertasius et al. 2021, after the
frame encoder's spatial processing): a question can then find an object in space and time, as "which object is
closest to the red one at the end?" needs. Spatial then temporal keeps the cost of a clip near ``frames`` images plus
attention over ``frames`` tokens, where joint space-time attention would cost (frames x patches)^2.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from mmlit.models.backbone import Encoded
from mmlit.models.image import TimmImageEncoder

__all__ = ["VideoEncoder"]


class VideoEncoder(nn.Module):
    """Clips (B, frames, 3, S, S) -> a token per frame (B, frames, D), or per frame and grid position (B, frames * N,
    D) (an ``Encoder`` of the video modality).

    Args:
        dim: width of the tokens.
        frames: frames sampled per clip (the video pipeline samples this many).
        frame_encoder: the ``TimmImageEncoder`` arguments of the per-frame encoder (``model_name``,
            ``image_size``, ``pooling``, ``pretrained``, ...); its ``dim`` is this one's.
        depth, heads: the temporal transformer's layers and attention heads.
        tokens: ``frames`` (one per frame, the frame encoder's pooled feature) or ``grid`` (every grid position of
            every frame, attended over time at each position).
    """

    def __init__(self, dim: int = 128, frames: int = 8, frame_encoder: dict | None = None, depth: int = 2,
                 heads: int = 4, tokens: Literal["frames", "grid"] = "frames"):
        super().__init__()
        key = "model.backbone.init_args.encoders.video.init_args"
        if frames < 1:
            raise ValueError(f"{key}.frames must be at least 1, got {frames}")
        if tokens not in ("frames", "grid"):
            raise ValueError(f"{key}.tokens: 'frames' or 'grid', got {tokens!r}")
        if tokens == "grid" and (frame_encoder or {}).get("pooling") == "flatten":
            raise ValueError(f"{key}.frame_encoder.pooling: flatten pools each frame, which tokens: grid does not read "
                             f"(its weights would take no gradient); use mean, or tokens: frames")
        self.dim, self.frames, self.tokens = dim, frames, tokens
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
        """``video`` (B, F, 3, S, S), uint8 pixels or normalised floats -> tokens (B, F, D) (``grid``: (B, F * N, D),
        frame by frame), pooled (B, D)."""
        batch, frames = video.shape[:2]
        if frames != self.frames:
            raise ValueError(f"a clip of {frames} frames reached a video encoder of frames={self.frames}")
        encoded = self.frame_encoder(video.reshape(batch * frames, *video.shape[2:]))
        if self.tokens == "frames":
            tokens = self.norm(self.temporal(encoded.pooled.view(batch, frames, -1) + self.time))  # (B, F, D)
            return Encoded(tokens, tokens.mean(1))
        grid = encoded.tokens.view(batch, frames, -1, self.dim)  # (B, F, N, D)
        places = grid.shape[2]
        over_time = grid.transpose(1, 2).reshape(batch * places, frames, self.dim) + self.time
        tokens = self.norm(self.temporal(over_time)).view(batch, places, frames, self.dim).transpose(1, 2)
        tokens = tokens.reshape(batch, frames * places, self.dim)
        return Encoded(tokens, tokens.mean(1))
