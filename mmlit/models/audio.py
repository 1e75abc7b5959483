"""The audio encoder: a spectrogram transformer (AST, Gong et al. 2021) made from a timm Vision Transformer.

A timm ViT reads the log-mel spectrogram (``mmlit/modalities/audio.py``) as a one-channel image of ``n_mels`` rows and
one column per frame, in patches of ``patch_size`` (mel bins x frames). The default patch spans every mel bin and 4
frames (40 ms), so the tokens form a sequence in time, one per 40 ms (the frame patches of SSAST, Gong et al. 2022):
what an alignment of speech to words (DTW) and attention over a spoken question read. Square patches (16 x 16, AST's)
give a grid instead. Clips in a batch differ in length: the padded frames' tokens are masked out of attention and
pooling, and a clip's tokens take the first columns of the position embedding of ``max_frames`` frames, so a clip's
features do not depend on the clips beside it.

Weights come from a local file through timm's loader (``pretrained_cfg_overlay=dict(file=...)``), as for images: an
ImageNet ViT's patch embedding is summed over its three channels and resized to the patch, and its position embedding
resampled to the grid (timm's ``checkpoint_filter_fn``), which is how AST starts from a ViT.
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from torch import nn

from mmlit.data.collate import Padded
from mmlit.models.backbone import Encoded

__all__ = ["SpectrogramTransformer"]


class SpectrogramTransformer(nn.Module):
    """Log-mel spectrograms -> a sequence of audio tokens, through a timm ViT (an ``Encoder`` of the audio modality).

    Args:
        model_name: a timm Vision Transformer (``vit_*``, ``deit_*``); ``model_kwargs`` sets its size.
        dim: width of the tokens it returns.
        sample_rate, n_mels, n_fft, hop_length: the frontend: what the audio pipeline computes for it.
        max_frames: the longest spectrogram (frames of ``hop_length``); longer clips keep their start.
        patch_size: patch height (mel bins) and width (frames); default: all ``n_mels`` bins x 4 frames.
        pretrained: a local ``.safetensors`` or ``.pth`` file of timm weights for ``model_name``.
        model_kwargs: extra arguments for ``timm.create_model`` (``{depth: 4, embed_dim: 192, num_heads: 3}``).
    """

    def __init__(self, model_name: str = "vit_tiny_patch16_224", dim: int = 128, sample_rate: int = 16000,
                 n_mels: int = 64, n_fft: int = 400, hop_length: int = 160, max_frames: int = 1024,
                 patch_size: tuple[int, int] | None = None, pretrained: str | None = None,
                 model_kwargs: dict | None = None):
        super().__init__()
        key = "model.backbone.init_args.encoders.audio.init_args"
        patch = tuple(patch_size) if patch_size is not None else (n_mels, 4)
        if n_mels % patch[0] or max_frames % patch[1]:
            raise ValueError(f"{key}.patch_size: its height {patch[0]} must divide n_mels={n_mels} and its width "
                             f"{patch[1]} max_frames={max_frames}")
        kwargs = dict(model_kwargs or {})
        if pretrained is not None:
            if not Path(pretrained).is_file():
                raise FileNotFoundError(f"{key}.pretrained: no file '{pretrained}'")
            kwargs.update(pretrained=True, pretrained_cfg_overlay={"file": str(pretrained)})
        if not timm.is_model(model_name):
            raise ValueError(f"{key}.model_name: timm has no model {model_name!r}")
        try:
            self.model = timm.create_model(model_name, num_classes=0, global_pool="", in_chans=1,
                                           img_size=(n_mels, max_frames), patch_size=patch, dynamic_img_size=True,
                                           dynamic_img_pad=True, **kwargs)
        except TypeError as err:
            raise ValueError(f"{key}.model_name: {model_name!r} is not a timm Vision Transformer ({err})") from None
        self.dim, self.sample_rate, self.n_mels = dim, sample_rate, n_mels
        self.n_fft, self.hop_length = n_fft, hop_length
        self.max_frames, self.patch = max_frames, patch
        self.prefix = getattr(self.model, "num_prefix_tokens", 0)
        self.proj = nn.Linear(self.model.num_features, dim)
        self.norm = nn.LayerNorm(dim)

    def no_weight_decay(self) -> set[str]:
        """The ViT's position embedding and class token, by their names here (``model.pos_embed``)."""
        return {f"model.{name}" for name in self.model.no_weight_decay()}

    def forward(self, audio: Padded | torch.Tensor) -> Encoded:
        """``audio``: a ``Padded`` batch of (B, n_mels, T) spectrograms and their lengths (or a tensor of full ones)
        -> tokens (B, N, D) over time (and frequency, for patches shorter than ``n_mels``), pooled (B, D) the mean of
        the real tokens, and mask (B, N)."""
        values, lengths = audio if isinstance(audio, Padded) else (audio, None)
        batch, _, frames = values.shape
        if lengths is None:
            lengths = torch.full((batch,), frames, device=values.device)
        grid = self.model.patch_embed(values[:, None].float())  # (B, rows, columns, C): the ViT's NHWC patches
        rows, columns = grid.shape[1:3]
        real = torch.arange(columns, device=values.device)[None] * self.patch[1] < lengths[:, None]  # (B, columns)
        mask = real[:, None, :].expand(batch, rows, columns).reshape(batch, -1)  # patches in row-major order
        keys = torch.cat([mask.new_ones(batch, self.prefix), mask], 1)[:, None, None, :]
        x = self.model.norm_pre(self.model.patch_drop(self._positions(grid)))
        for block in self.model.blocks:
            x = block(x, attn_mask=keys)
        tokens = self.norm(self.proj(self.model.norm(x)[:, self.prefix:]))
        weights = mask[..., None].to(tokens.dtype)
        pooled = (tokens * weights).sum(1) / weights.sum(1).clamp(min=1)
        return Encoded(tokens, pooled, mask)

    def _positions(self, grid: torch.Tensor) -> torch.Tensor:
        """The prefix tokens and the patches with their position embedding: the first ``columns`` of the embedding of
        ``max_frames`` (timm's ``_pos_embed`` would interpolate it to the batch's length, so a clip's positions, and
        its features, would depend on the longest clip beside it)."""
        vit, (batch, rows, columns, width) = self.model, grid.shape
        if columns > vit.patch_embed.grid_size[1]:
            raise ValueError(f"a spectrogram of {columns * self.patch[1]} frames reached an audio encoder of "
                             f"max_frames={self.max_frames}")
        offset = 0 if vit.no_embed_class else self.prefix
        full = vit.pos_embed[:, offset:].view(1, rows, vit.patch_embed.grid_size[1], width)
        x = (grid + full[:, :, :columns]).reshape(batch, rows * columns, width)
        prefix = [t.expand(batch, -1, -1) for t in (vit.cls_token, getattr(vit, "reg_token", None)) if t is not None]
        if prefix:
            prefix = torch.cat(prefix, 1)
            prefix = prefix if vit.no_embed_class else prefix + vit.pos_embed[:, :offset]
            x = torch.cat([prefix, x], 1)
        return vit.pos_drop(x)
