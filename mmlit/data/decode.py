"""Safe decoding of WebDataset samples.

``webdataset``'s ``.decode()`` always appends its basic handlers, which unpickle ``.pyd`` and
``.pickle`` entries and ``torch.load`` ``.pth`` entries: a shard could run code. mmlit decodes
with its own allow-list instead: images, text, JSON, class ids and numpy arrays (without pickle).
Entries in formats that can run code are refused; entries of unknown formats stay raw bytes.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["IMAGE_EXTENSIONS", "UNSAFE_EXTENSIONS", "UnsafeSampleError", "SampleError", "decode_sample", "sample_field", "sample_image",
           "sample_location"]

IMAGE_EXTENSIONS = frozenset({"png", "jpg", "jpeg", "webp", "bmp", "ppm", "pgm", "pbm", "pnm", "tif", "tiff", "gif"})
TEXT_EXTENSIONS = frozenset({"txt", "text", "caption"})
INT_EXTENSIONS = frozenset({"cls", "cls2", "index", "label"})
# Formats whose loaders execute code (pickle and everything built on it).
UNSAFE_EXTENSIONS = frozenset({"pyd", "pickle", "pkl", "pth", "pt", "ckpt", "bin", "joblib", "dill", "mp", "msgpack"})


class SampleError(ValueError):
    """A sample that a task cannot use; the message names the shard and the sample key."""


class UnsafeSampleError(SampleError):
    """A sample entry in a format whose loader could run code."""


def sample_location(sample: dict) -> str:
    """``shard: sample 'key'``, the prefix of every error about one sample."""
    return f"{sample.get('__url__', '<unknown shard>')}: sample {sample.get('__key__', '<no key>')!r}"


def _entries(sample: dict) -> list[str]:
    return sorted(k for k in sample if not k.startswith("__"))


def _decode_entry(ext: str, data: bytes) -> Any:
    if ext in IMAGE_EXTENSIONS:
        image = Image.open(io.BytesIO(data))
        image.load()  # fail here, on the bad sample, rather than later in a transform
        return image
    if ext in TEXT_EXTENSIONS:
        return data.decode("utf-8")
    if ext == "json":
        return json.loads(data)
    if ext in INT_EXTENSIONS:
        return int(data)
    if ext == "npy":
        return np.load(io.BytesIO(data), allow_pickle=False)
    return data


def decode_sample(sample: dict) -> dict:
    """Decode every entry of a raw sample by its extension (the part of the name after the key)."""
    decoded = {}
    for name, value in sample.items():
        if name.startswith("__"):
            decoded[name] = value
            continue
        ext = name.rsplit(".", 1)[-1].lower()
        if ext in UNSAFE_EXTENSIONS:
            raise UnsafeSampleError(f"{sample_location(sample)}: refusing entry '{name}': .{ext} files can run code when loaded")
        try:
            decoded[name] = _decode_entry(ext, value)
        except Exception as err:
            raise SampleError(f"{sample_location(sample)}: cannot decode entry '{name}': {err}") from err
    return decoded


def sample_image(sample: dict, task: str) -> Image.Image:
    """The sample's image, whatever its extension, as RGB."""
    for name, value in sample.items():
        if isinstance(value, Image.Image):
            return value.convert("RGB")
    raise SampleError(f"{sample_location(sample)}: task '{task}' needs an image entry (one of .png, .jpg, ...); "
                      f"the sample has {_entries(sample)}")


def sample_field(sample: dict, field: str, task: str) -> Any:
    """A value from the sample, with ``json.a.b`` reaching into the decoded JSON entry."""
    head, *path = field.split(".")
    if head not in sample:
        raise SampleError(f"{sample_location(sample)}: task '{task}' needs the entry '.{head}'; "
                          f"the sample has {_entries(sample)}")
    value = sample[head]
    for i, part in enumerate(path):
        if not isinstance(value, dict) or part not in value:
            raise SampleError(f"{sample_location(sample)}: task '{task}' needs '{'.'.join([head, *path[:i + 1]])}', which is missing")
        value = value[part]
    return value
