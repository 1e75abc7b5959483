"""Safe decoding of WebDataset samples.

``webdataset``'s ``.decode()`` always appends its basic handlers, which unpickle ``.pyd`` and
``.pickle`` entries and ``torch.load`` ``.pth`` entries: a shard could run code. mmlit decodes
with its own allow-list instead: images, text, JSON, class ids and numpy arrays (without pickle).
Entries in formats that can run code are refused; entries of unknown formats stay raw bytes.
Only the entries a task reads are decoded, and an image is parsed only by the Pillow plugin of the
format its name says, so a shard cannot reach the rest of Pillow's (older, less fuzzed) plugins.
"""

from __future__ import annotations

import io
import json
import logging
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = ["EncodedImage", "IMAGE_EXTENSIONS", "UNSAFE_EXTENSIONS", "UnsafeSampleError", "SampleError", "decode_sample", "sample_field", "sample_image",
           "sample_location"]

# The Pillow format each image extension names (as ``PIL.Image.registered_extensions()`` maps them).
_IMAGE_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP", "bmp": "BMP", "ppm": "PPM", "pgm": "PPM",
                  "pbm": "PPM", "pnm": "PPM", "tif": "TIFF", "tiff": "TIFF", "gif": "GIF"}
IMAGE_EXTENSIONS = frozenset(_IMAGE_FORMATS)
TEXT_EXTENSIONS = frozenset({"txt", "text", "caption"})
INT_EXTENSIONS = frozenset({"cls", "cls2", "index", "label"})
# Formats whose loaders execute code (pickle and everything built on it).
UNSAFE_EXTENSIONS = frozenset({"pyd", "pickle", "pkl", "pth", "pt", "ckpt", "bin", "joblib", "dill", "mp", "msgpack"})

_log = logging.getLogger(__name__)


class SampleError(ValueError):
    """A sample that a task cannot use; the message names the shard and the sample key."""


class UnsafeSampleError(SampleError):
    """A sample entry in a format whose loader could run code."""


def sample_location(sample: dict) -> str:
    """``shard: sample 'key'``, the prefix of every error about one sample."""
    return f"{sample.get('__url__', '<unknown shard>')}: sample {sample.get('__key__', '<no key>')!r}"


def _entries(sample: dict) -> list[str]:
    return sorted(k for k in sample if not k.startswith("__"))


def _extension(name: str) -> str:
    return name.rsplit(".", 1)[-1].lower()


def _names(field: str, name: str) -> bool:
    """Whether ``field`` is entry ``name`` or a path into it (``json.a.b`` into ``json``; ``seg.png`` is ``seg.png``)."""
    return field == name or field.startswith(name + ".")


def _reads(field: str, name: str) -> bool:
    """Whether a task field reads entry ``name``; ``image`` reads every image entry."""
    return (field == "image" and _extension(name) in IMAGE_EXTENSIONS) or _names(field, name)


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


class EncodedImage:
    """A JPEG entry whose header was checked in the worker and whose pixels are decoded on the training device
    (``data.decode_images: device``); ``size`` is (width, height), ``target`` the square side a task crops it to
    after resizing its shorter side to ``target / crop_pct`` with ``interpolation`` (``bilinear`` or ``bicubic``)."""

    __slots__ = ("data", "size", "target", "crop_pct", "interpolation")

    def __init__(self, data: bytes, size: tuple[int, int], target: int | None = None, crop_pct: float = 1.0,
                 interpolation: str = "bilinear"):
        self.data, self.size, self.target, self.crop_pct, self.interpolation = data, size, target, crop_pct, interpolation

    def convert(self, mode: str) -> EncodedImage:  # (decode_jpeg's RGB mode converts on the device)
        return self


def _decode_image(ext: str, data: bytes, max_pixels: int | None, jpeg_on_device: bool = False) -> Any:
    expected = _IMAGE_FORMATS[ext]
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


def _decode_entry(ext: str, data: bytes, max_pixels: int | None, jpeg_on_device: bool = False) -> Any:
    if ext in IMAGE_EXTENSIONS:
        return _decode_image(ext, data, max_pixels, jpeg_on_device)
    if ext in TEXT_EXTENSIONS:
        return data.decode("utf-8")
    if ext == "json":
        return json.loads(data)
    if ext in INT_EXTENSIONS:
        return int(data)
    if ext == "npy":
        return np.load(io.BytesIO(data), allow_pickle=False)
    return data


def decode_sample(sample: dict, fields: tuple[str, ...] | None = None, *, max_image_pixels: int | None = None,
                  jpeg_on_device: bool = False) -> dict:
    """Decode the entries of a raw sample that ``fields`` read, by extension (the part of the name after the key).

    Args:
        sample: raw entries by name, plus ``__key__``-style entries, which pass through.
        fields: a task's ``Task.fields``; the entries none of them reads are dropped undecoded (an unused
            ``.pth`` too). None or empty: every entry is decoded.
        max_image_pixels: an image with more pixels (width x height) is a ``SampleError``; None: Pillow's limit.
        jpeg_on_device: JPEG entries are checked (format, size) but not decoded: ``EncodedImage``, for the device.
    """
    if max_image_pixels is not None:
        _allow_pillow(max_image_pixels)
    decoded = {}
    for name, value in sample.items():
        if name.startswith("__"):
            decoded[name] = value
        elif not fields or any(_reads(field, name) for field in fields):
            decoded[name] = _decode_checked(sample, name, value, max_image_pixels, jpeg_on_device)
    return decoded


def _decode_checked(sample: dict, name: str, value: bytes, max_pixels: int | None, jpeg_on_device: bool = False) -> Any:
    ext = _extension(name)
    if ext in UNSAFE_EXTENSIONS:
        raise UnsafeSampleError(f"{sample_location(sample)}: refusing entry '{name}': .{ext} files can run code when loaded")
    try:
        return _decode_entry(ext, value, max_pixels, jpeg_on_device)
    except Exception as err:
        raise SampleError(f"{sample_location(sample)}: cannot decode entry '{name}': {err}") from err


def sample_image(sample: dict, task: str) -> Image.Image | EncodedImage:
    """The sample's image, whatever its extension, as RGB (or a JPEG left for the device, ``EncodedImage``)."""
    for name, value in sample.items():
        if isinstance(value, (Image.Image, EncodedImage)):
            return value.convert("RGB")
    raise SampleError(f"{sample_location(sample)}: task '{task}' needs an image entry (one of .png, .jpg, ...); "
                      f"the sample has {_entries(sample)}")


def sample_field(sample: dict, field: str, task: str) -> Any:
    """A value from the sample, with ``json.a.b`` reaching into the decoded JSON entry (and ``seg.png`` naming the
    entry ``seg.png``: the longest entry name the field starts with)."""
    names = [name for name in sample if not name.startswith("__") and _names(field, name)]
    if not names:
        raise SampleError(f"{sample_location(sample)}: task '{task}' needs the entry '.{field.split('.')[0]}'; "
                          f"the sample has {_entries(sample)}")
    head = max(names, key=len)
    path = field[len(head) + 1:].split(".") if field != head else []
    value = sample[head]
    for i, part in enumerate(path):
        if not isinstance(value, dict) or part not in value:
            raise SampleError(f"{sample_location(sample)}: task '{task}' needs '{'.'.join([head, *path[:i + 1]])}', which is missing")
        value = value[part]
    return value
