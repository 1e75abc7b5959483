"""The image modality: PNG, JPEG, WebP, ... entries, decoded by the Pillow plugin of the format their name says.

Decoding (``mmlit/data/images.py``) checks the content against the name and the pixel limit before the pixels are
decoded; with ``on_device`` a JPEG is only checked and its bytes go on to the training device. A task's images go
through timm's pipelines (``mmlit/data/transforms.py``: random crops and flips in training, resize and centre crop
in evaluation) at the image encoder's size, as uint8 tensors that the encoder normalises on its device.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from mmlit.data.collate import stack_tensors
from mmlit.data.device_images import EncodedImage
from mmlit.data.images import IMAGE_EXTENSIONS, decode_image
from mmlit.data.transforms import ImageTransform, build_pipelines, training_sample
from mmlit.modalities.base import Modality
from mmlit.registry import register_modality

__all__ = ["ImageModality", "ImagePipeline"]


class ImagePipeline:
    """A task's images -> (3, S, S) uint8 tensors: the training pipeline for a training sample, the evaluation one
    otherwise (``training_sample()``); a JPEG left for the device keeps its bytes and learns its size and crop."""

    def __init__(self, size: int | None, pipelines: dict | None, crop_pct: float = 1.0, interpolation: str = "bilinear"):
        self.size, self.pipelines, self.crop_pct, self.interpolation = size, pipelines, crop_pct, interpolation

    def __call__(self, image: Image.Image | EncodedImage) -> torch.Tensor | EncodedImage:
        if isinstance(image, EncodedImage):
            return EncodedImage(image.data, image.size, self.size, self.crop_pct, self.interpolation)
        if image.mode != "RGB":
            image = image.convert("RGB")
        if self.pipelines is not None:
            return self.pipelines[training_sample()](image)
        if self.size is not None and image.size != (self.size, self.size):
            image = image.resize((self.size, self.size), Image.BILINEAR)
        return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


@register_modality("image")
class ImageModality(Modality):
    """Images (PNG, JPEG, WebP, BMP, PPM, TIFF, GIF) by the format their name says.

    Args:
        max_pixels: an image with more pixels (width x height) is skipped (counted) before its pixels are decoded;
            None: Pillow's limit.
        on_device: JPEGs are checked here and decoded on the training device.
    """

    extensions = IMAGE_EXTENSIONS
    default_encoder = "mmlit.models.TimmImageEncoder"

    def __init__(self, max_pixels: int | None = None, on_device: bool = False):
        self.max_pixels, self.on_device = max_pixels, on_device

    def decode(self, extension: str, data: bytes) -> Any:
        return decode_image(extension, data, self.max_pixels, self.on_device)

    def pipeline(self, encoder: Any, settings: ImageTransform | None, key: str) -> ImagePipeline:
        """timm's pipelines at the encoder's ``image_size``, with its pretrained ``data_config()`` (interpolation,
        crop_pct, mean); without ``settings`` images are only resized."""
        size = getattr(encoder, "image_size", None)
        if settings is None:
            return ImagePipeline(size, None)
        config = encoder.data_config() if hasattr(encoder, "data_config") else {}
        return ImagePipeline(size, build_pipelines(settings, size, config, key),
                             settings.crop_pct or config.get("crop_pct") or 1.0,
                             settings.interpolation or config.get("interpolation", "bilinear"))

    def collate(self, values: list) -> torch.Tensor:
        return stack_tensors(values)
