"""Image decoding for shard entries: the Pillow plugin of the format the entry's name says, after a check that the
content is that format (TIFF bytes under ``.png`` are refused before any plugin parses them) and, before the pixels
are decoded, that the image is within the pixel limit. With ``jpeg_on_device`` a JPEG is only checked here and its
bytes go on to the training device (``mmlit/data/device_images.py``)."""

from __future__ import annotations

import io
import logging
from typing import Any

from PIL import Image, UnidentifiedImageError

from mmlit.data.device_images import EncodedImage

__all__ = ["IMAGE_EXTENSIONS", "IMAGE_FORMATS", "decode_image"]

# The Pillow format each image extension names (as ``PIL.Image.registered_extensions()`` maps them).
IMAGE_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP", "bmp": "BMP", "ppm": "PPM", "pgm": "PPM",
                 "pbm": "PPM", "pnm": "PPM", "tif": "TIFF", "tiff": "TIFF", "gif": "GIF"}
IMAGE_EXTENSIONS = frozenset(IMAGE_FORMATS)

_log = logging.getLogger(__name__)


def _allow_pillow(pixels: int) -> None:
    """Let Pillow open images of up to ``pixels`` pixels, so that the recipe's limit is the one that refuses.

    Pillow has no per-call limit: it compares the process-wide ``Image.MAX_IMAGE_PIXELS`` in ``open`` and again
    while GIF frames grow and TIFF tiles load, warning above it and raising above twice it. Swapping the global
    around each ``open`` would miss those later checks and race with other threads, so where the recipe allows
    more than Pillow does, Pillow's limit is raised to the recipe's, once, in the process that decodes (usually a
    DataLoader worker). It is never lowered: where the recipe's limit is the smaller, mmlit's check refuses first.
    """
    if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < pixels:
        _log.info("data.max_image_pixels: raising PIL.Image.MAX_IMAGE_PIXELS from %d to %d", Image.MAX_IMAGE_PIXELS, pixels)
        Image.MAX_IMAGE_PIXELS = pixels


def _format_of(data: bytes) -> str | None:
    """The format whose signature ``data`` starts with, as Pillow's plugins tell it; None if none does.

    Only the plugins' signature checks run, on the first 16 bytes (what ``Image.open`` gives them): no plugin
    parses the data, which is the point of opening an image with its own format only."""
    Image.init()
    for name in Image.ID:
        accept = Image.OPEN[name][1]
        try:
            found = accept is not None and accept(data[:16])
        except Exception:  # a signature check that does not expect so few bytes: not that format
            continue
        if found and not isinstance(found, str):  # a str is Pillow's "maybe, but unsupported" note
            return name
    return None


def decode_image(ext: str, data: bytes, max_pixels: int | None = None, jpeg_on_device: bool = False) -> Any:
    """A PIL image (or an ``EncodedImage`` for the device) from an entry named ``.{ext}``; ``ValueError`` for data of
    another format than the name says, a header that cannot be read, or more pixels than ``max_pixels``."""
    if max_pixels is not None:
        _allow_pillow(max_pixels)
    expected = IMAGE_FORMATS[ext]
    try:
        image = Image.open(io.BytesIO(data), formats=[expected])
    except Image.DecompressionBombError as err:  # above twice Pillow's limit, which is above the recipe's
        if max_pixels is None:
            raise
        raise ValueError(f"more pixels than data.max_image_pixels ({max_pixels}) allows ({err})") from None
    except UnidentifiedImageError:
        found = _format_of(data)
        if found == expected:
            raise ValueError(f"its {expected} header cannot be read") from None
        held = f"{found} data" if found else "data of a format Pillow cannot tell"
        raise ValueError(f"it holds {held}, not the {expected} its .{ext} name says; re-encode it or rename the "
                         f"entry") from None
    width, height = image.size
    if max_pixels is not None and width * height > max_pixels:  # before load(): the pixels are never decoded
        raise ValueError(f"{width}x{height} = {width * height} pixels, more than data.max_image_pixels ({max_pixels}) "
                         f"allows; raise it to train on images this large")
    if jpeg_on_device and expected == "JPEG":
        return EncodedImage(data, image.size)
    image.load()  # fail here, on the bad sample, rather than later in a transform
    return image
