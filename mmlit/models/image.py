"""Image encoders: any timm model by name, read out as a grid of tokens (an ``Encoder`` of the image modality).

The encoder reads one intermediate feature map of the timm model (timm's
``forward_intermediates``; by default the last) after ``prune_intermediate_layers`` has removed
every block after it, so no parameter is left without a gradient (which DDP would reject) and no
compute is spent on unused stages. It projects the map to the backbone width and adds a learned position embedding, so that the fusion and
the heads see *where* things are. Weights come only from a local file, through timm's own
``pretrained_cfg_overlay=dict(file=...)`` loader; nothing is fetched from a hub.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import timm
import torch
from torch import nn

from mmlit.models.backbone import Encoded

__all__ = ["TimmImageEncoder"]


class TimmImageEncoder(nn.Module):
    """A timm model's feature map as image tokens.

    Args:
        model_name: any name from ``timm.list_models()`` that supports ``forward_intermediates``.
        dim: width of the tokens it returns.
        image_size: height and width of the input images (fixes the number of tokens).
        feature_index: which of the model's feature maps to read (``-1``: the deepest). A shallower
            map keeps more spatial detail and skips the deeper stages' compute.
        pretrained: a local ``.safetensors`` or ``.pth`` file of timm weights for ``model_name``.
        model_kwargs: extra arguments for ``timm.create_model`` (e.g. ``{"patch_size": 8}``).
        pooling: ``mean`` of the tokens, or ``flatten``: a linear map of all tokens in grid order (the
            CNN+MLP baseline of Santoro et al. 2017), which keeps *where* each feature is, so a
            fact such as "the red object is on the left" is a linear function of the pooled vector.
        channels_last: run the timm model in channels-last memory order (faster convolutions on GPUs with tensor
            cores and on recent CPUs; batches from ``collate_examples`` arrive in that order already).
        checkpointing: activation checkpointing per block of the timm model (timm's ``set_grad_checkpointing``):
            blocks' activations are recomputed in the backward pass instead of kept, for larger batches.
        coordinates: append each cell's (x, y), from -1 to 1, to its features before the projection, as the
            relation network of Santoro et al. 2017 does to its CNN's cells (CoordConv's coordinate channels, Liu et
            al. 2018, given to the projection): where a token is, as two numbers that a linear map reads.
    """

    def __init__(self, model_name: str = "resnet10t", dim: int = 128, image_size: int = 75, feature_index: int = -1,
                 pretrained: str | None = None, model_kwargs: dict | None = None,
                 pooling: Literal["mean", "flatten"] = "mean", channels_last: bool = False, checkpointing: bool = False,
                 coordinates: bool = False):
        super().__init__()
        kwargs = dict(model_kwargs or {})
        if pretrained is not None:
            if not Path(pretrained).is_file():
                raise FileNotFoundError(f"model.backbone.init_args.encoders.image.init_args.pretrained: no file '{pretrained}'")
            kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(pretrained)})
        key = "model.backbone.init_args.encoders.image.init_args"
        if not timm.is_model(model_name):
            raise ValueError(f"{key}.model_name: timm has no model {model_name!r}")
        self.model = timm.create_model(model_name, num_classes=0, **kwargs)
        if not hasattr(self.model, "forward_intermediates"):
            raise ValueError(f"{key}.model_name: timm's {model_name!r} has no forward_intermediates()")
        config = self.model.pretrained_cfg
        self.register_buffer("mean", torch.tensor(config.get("mean", (0.485, 0.456, 0.406))).view(1, 3, 1, 1) * 255,
                             persistent=False)
        self.register_buffer("std", torch.tensor(config.get("std", (0.229, 0.224, 0.225))).view(1, 3, 1, 1) * 255,
                             persistent=False)
        self.channels_last = channels_last
        if channels_last:
            self.model.to(memory_format=torch.channels_last)
        if checkpointing:
            self.model.set_grad_checkpointing(True)
        self.indices = self.model.prune_intermediate_layers(indices=[feature_index], prune_norm=True, prune_head=True)
        try:
            self.model.eval()  # the probe must not move batch-norm statistics (of pretrained weights, say)
            with torch.no_grad():
                probe = torch.zeros(1, 3, image_size, image_size, dtype=torch.uint8)
                _, channels, height, width = self._feature_map(probe).shape
            self.model.train()
        except (AssertionError, RuntimeError, ValueError) as err:
            raise ValueError(f"{key}: timm's {model_name!r} cannot read {image_size}x{image_size} images ({err}); a model "
                             "with a fixed input size takes it in model_kwargs (ViT: {img_size: ..., patch_size: ...})"
                             ) from None
        self.dim, self.image_size, self.grid = dim, image_size, (height, width)
        self.proj = nn.Linear(channels + 2 * coordinates, dim)
        self.coordinates = coordinates
        if coordinates:  # (1, H*W, 2): x, y of each cell's centre, row by row as the tokens come
            ys, xs = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
            self.register_buffer("coords", torch.stack([xs.flatten(), ys.flatten()], dim=1)[None], persistent=False)
        self.norm = nn.LayerNorm(dim)
        # Fixed 2-D sine-cosine positions (as in MAE, He et al. 2022): where a token is, is readable
        # from the first step, which questions like "is the red object on the left?" need.
        self.register_buffer("pos", _sincos_2d(height, width, dim), persistent=False)
        # A per-token MLP over (feature + position) makes conjunctions such as "red AND left" that
        # survive pooling; a plain sum of feature and position would lose them in any average.
        self.mix = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.pooling = pooling
        if pooling == "flatten":
            self.pool = nn.Sequential(nn.Flatten(1), nn.Linear(height * width * dim, dim), nn.LayerNorm(dim))

    def group_matcher(self, coarse: bool = False):
        """Layer ordinals for ``timm.optim.param_groups_layer_decay``: the timm model's own ``group_matcher`` for its
        parameters (``model.*``); the projection, norm and mixing above them are the top layer."""
        from timm.models import group_parameters

        inner = group_parameters(self.model, self.model.group_matcher(coarse=coarse), reverse=True)
        layer = {f"model.{name}": i for name, i in inner.items()}
        return lambda name: layer.get(name, float("inf"))

    def no_weight_decay(self) -> set[str]:
        """The timm model's parameters that take no weight decay (a ViT's ``pos_embed``, ``cls_token``), by their
        names here (``model.pos_embed``): what ``mmlit.optim.parameter_groups`` leaves out of weight decay."""
        names = self.model.no_weight_decay() if hasattr(self.model, "no_weight_decay") else ()
        return {f"model.{name}" for name in names}

    def data_config(self) -> dict:
        """The timm model's preprocessing (``interpolation``, ``crop_pct``, ``mean``, ``std``) from its pretrained
        config: what task image pipelines default to."""
        from timm.data import resolve_data_config

        return resolve_data_config(model=self.model)

    def _feature_map(self, image: torch.Tensor) -> torch.Tensor:
        if image.dtype == torch.uint8:  # the model's own normalisation, on the batch, on the device
            image = (image.float() - self.mean) / self.std
        if self.channels_last:
            image = image.contiguous(memory_format=torch.channels_last)
        return self.model.forward_intermediates(image, indices=self.indices, intermediates_only=True)[-1]

    def forward(self, image: torch.Tensor) -> Encoded:
        """``image`` (B, 3, H, W), uint8 pixels or normalised floats -> tokens (B, N, D) and pooled (B, D)."""
        fmap = self._feature_map(image)  # (B, C, h, w)
        cells = fmap.flatten(2).transpose(1, 2)  # (B, N, C)
        if self.coordinates:
            cells = torch.cat([cells, self.coords.to(cells.dtype).expand(len(cells), -1, -1)], dim=-1)
        tokens = self.norm(self.proj(cells)) + self.pos  # (B, N, D)
        tokens = tokens + self.mix(tokens)
        return Encoded(tokens, self.pool(tokens) if self.pooling == "flatten" else tokens.mean(dim=1))


def _sincos_2d(height: int, width: int, dim: int) -> torch.Tensor:
    """(1, H*W, dim) sine-cosine embedding of (row, column); half the channels each."""
    if dim % 4:
        raise ValueError(f"encoders.image.init_args.dim must be a multiple of 4 for 2-D positions, got {dim}")
    freqs = 1.0 / (10000 ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4)))
    rows, cols = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32),
                                indexing="ij")
    parts = [fn(axis.flatten()[:, None] * freqs) for axis in (rows, cols) for fn in (torch.sin, torch.cos)]
    return torch.cat(parts, dim=1)[None]
