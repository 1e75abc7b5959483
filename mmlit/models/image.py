"""Image encoders: any timm model by name, read out as a grid of tokens.

The encoder takes one feature map of the timm model (``features_only``; by default the last),
projects it to the backbone width and adds a learned position embedding, so that the fusion and
the heads see *where* things are. Weights come only from a local file, through timm's own
``pretrained_cfg_overlay=dict(file=...)`` loader; nothing is fetched from a hub.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import nn

__all__ = ["TimmImageEncoder"]


class TimmImageEncoder(nn.Module):
    """A timm model's feature map as image tokens.

    Args:
        model_name: any name from ``timm.list_models()`` that supports ``features_only``.
        dim: width of the tokens it returns.
        image_size: height and width of the input images (fixes the number of tokens).
        feature_index: which of the model's feature maps to read (``-1``: the deepest). A shallower
            map keeps more spatial detail and skips the deeper stages' compute.
        pretrained: a local ``.safetensors`` or ``.pth`` file of timm weights for ``model_name``.
        model_kwargs: extra arguments for ``timm.create_model`` (e.g. ``{"patch_size": 8}``).
    """

    def __init__(self, model_name: str = "resnet10t", dim: int = 128, image_size: int = 75, feature_index: int = -1,
                 pretrained: str | None = None, model_kwargs: dict | None = None):
        super().__init__()
        kwargs = dict(model_kwargs or {})
        if pretrained is not None:
            if not Path(pretrained).is_file():
                raise FileNotFoundError(f"model.backbone.init_args.image_encoder.init_args.pretrained: no file '{pretrained}'")
            kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(pretrained)})
        try:
            self.model = timm.create_model(model_name, features_only=True, out_indices=(feature_index,), **kwargs)
        except RuntimeError as err:
            if "Unknown model" in str(err):
                raise ValueError(f"model.backbone.init_args.image_encoder.init_args.model_name: timm has no model "
                                 f"{model_name!r}") from err
            raise
        with torch.no_grad():
            _, channels, height, width = self.model(torch.zeros(1, 3, image_size, image_size))[0].shape
        self.dim, self.image_size, self.grid = dim, image_size, (height, width)
        self.proj = nn.Linear(channels, dim)
        self.pos = nn.Parameter(torch.randn(1, height * width, dim) * 0.02)
        self.norm = nn.LayerNorm(dim)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``image`` (B, 3, H, W) -> tokens (B, N, D) and pooled (B, D)."""
        fmap = self.model(image)[0]  # (B, C, h, w)
        tokens = self.norm(self.proj(fmap.flatten(2).transpose(1, 2)) + self.pos)  # (B, N, D)
        return tokens, tokens.mean(dim=1)
