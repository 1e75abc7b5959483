"""Safe decoding of WebDataset samples.

``webdataset``'s ``.decode()`` always appends its basic handlers, which unpickle ``.pyd`` and
``.pickle`` entries and ``torch.load`` ``.pth`` entries: a shard could run code. mmlit decodes
with its own allow-list instead: the entries of the registered modalities (images, text, ...), JSON, class ids and
numpy arrays (without pickle). Entries in formats that can run code are refused; entries of unknown formats stay raw
bytes. Only the entries a task reads are decoded. A task field named like a modality (``image``) reads the entries
that modality decodes, with the modality's own checks (an image is parsed only by the Pillow plugin of the format its
name says, so a shard cannot reach the rest of Pillow's older, less fuzzed plugins); ``sample_input`` finds the
value of a modality in a decoded sample.
"""

from __future__ import annotations

import io
import json
from typing import Any, Mapping

import numpy as np
from PIL import Image

from mmlit.data.device_images import EncodedImage
from mmlit.data.images import IMAGE_EXTENSIONS, decode_image
from mmlit.registry import get_modality, is_modality, list_modalities

__all__ = ["EncodedImage", "IMAGE_EXTENSIONS", "UNSAFE_EXTENSIONS", "UnsafeSampleError", "SampleError", "decode_sample",
           "extension_modality",
           "sample_field", "sample_image", "sample_input", "sample_location"]

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


def _extension(name: str) -> str:
    return name.rsplit(".", 1)[-1].lower()


def _names(field: str, name: str) -> bool:
    """Whether ``field`` is entry ``name`` or a path into it (``json.a.b`` into ``json``; ``seg.png`` is ``seg.png``)."""
    return field == name or field.startswith(name + ".")


def _decode_entry(ext: str, data: bytes, max_pixels: int | None, jpeg_on_device: bool = False,
                  modalities: Mapping[str, Any] | None = None) -> Any:
    """An entry read by a field that names no modality, by its extension (``modalities``: the run's modality objects,
    for an entry of a modality that the field names by its entry name, ``caption.flac``)."""
    modalities = modalities or {}
    if ext in IMAGE_EXTENSIONS:
        return decode_image(ext, data, max_pixels, jpeg_on_device)
    if ext in TEXT_EXTENSIONS:
        return data.decode("utf-8")
    if ext == "json":
        return json.loads(data)
    if ext in INT_EXTENSIONS:
        return int(data)
    if ext == "npy":
        return np.load(io.BytesIO(data), allow_pickle=False)
    owner = extension_modality(ext)
    if owner is not None:  # (a named entry of another modality: a spoken question ``question0.flac``)
        return (modalities.get(owner) or get_modality(owner)()).decode(ext, data)
    return data


def extension_modality(ext: str) -> str | None:
    """The registered modality that decodes entries with extension ``ext`` (``flac``: ``audio``), if any."""
    return next((name for name in list_modalities() if ext in get_modality(name).extensions), None)


def decode_sample(sample: dict, fields: tuple[str, ...] | None = None, *, modalities: Mapping[str, Any] | None = None,
                  max_image_pixels: int | None = None, jpeg_on_device: bool = False) -> dict:
    """Decode the entries of a raw sample that ``fields`` read, by extension (the part of the name after the key).

    Args:
        sample: raw entries by name, plus ``__key__``-style entries, which pass through.
        fields: a task's ``TaskData.fields``; the entries none of them reads are dropped undecoded (an unused
            ``.pth`` too). A field named like a modality reads the entries that modality decodes. None or empty:
            every entry is decoded.
        modalities: the run's modality objects by name (with the recipe's limits); one not given is made with its
            defaults (the image modality with ``max_image_pixels`` and ``jpeg_on_device``).
        max_image_pixels: an image with more pixels (width x height) is a ``SampleError``; None: Pillow's limit.
        jpeg_on_device: JPEG entries are checked (format, size) but not decoded: ``EncodedImage``, for the device.
    """
    readers = _modality_readers(fields, modalities, max_image_pixels, jpeg_on_device)
    decoded: dict[str, Any] = {}
    for name, value in sample.items():
        if name.startswith("__"):
            decoded[name] = value
            continue
        ext = _extension(name)
        modality = next((m for m in readers if ext in m.extensions), None)
        if modality is not None:
            decoded[name] = _checked(sample, name, lambda: modality.decode(ext, value))
        elif not fields or any(_names(field, name) for field in fields):
            decoded[name] = _checked(sample, name, lambda: _decode_entry(ext, value, max_image_pixels, jpeg_on_device,
                                                                          modalities))
    return decoded


def _modality_readers(fields, modalities, max_image_pixels, jpeg_on_device) -> list:
    """The modality objects that fields name; without fields, every one given (entries of no given modality are
    decoded by extension, as the built-in modalities do with their defaults)."""
    given = dict(modalities or {})
    if not fields:
        return list(given.values())
    names = [f for f in fields if is_modality(f)]
    readers = []
    for name in names:
        if name not in given:
            options = {"max_pixels": max_image_pixels, "on_device": jpeg_on_device} if name == "image" else {}
            given[name] = get_modality(name)(**options)
        readers.append(given[name])
    return readers


def _checked(sample: dict, name: str, decode) -> Any:
    ext = _extension(name)
    if ext in UNSAFE_EXTENSIONS:
        raise UnsafeSampleError(f"{sample_location(sample)}: refusing entry '{name}': .{ext} files can run code when loaded")
    try:
        return decode()
    except Exception as err:
        raise SampleError(f"{sample_location(sample)}: cannot decode entry '{name}': {err}") from err


def sample_input(sample: dict, modality: str, task: str) -> Any:
    """The value of the sample's entry of ``modality`` (an image, a waveform, ...): its entry named by an extension
    alone (``flac`` before ``question0.flac``), else its first entry with one of the modality's extensions, as decoded
    for a field that names the modality."""
    extensions = get_modality(modality).extensions
    named = [name for name in sample if not name.startswith("__") and _extension(name) in extensions]
    if named:
        return sample[min(named, key=lambda name: "." in name)]
    raise SampleError(f"{sample_location(sample)}: task '{task}' needs an entry of modality '{modality}' (one of "
                      f".{', .'.join(sorted(extensions))}); the sample has {_entries(sample)}")


def sample_image(sample: dict, task: str) -> Image.Image | EncodedImage:
    """The sample's image, whatever its extension, as RGB (or a JPEG left for the device, ``EncodedImage``)."""
    return sample_input(sample, "image", task).convert("RGB")


def sample_field(sample: dict, field: str, task: str) -> Any:
    """A value from the sample, with ``json.a.b`` reaching into the decoded JSON entry (``json.objects.0.shape``: a
    number indexes a list) and ``seg.png`` naming the entry ``seg.png`` (the longest entry name the field starts
    with)."""
    names = [name for name in sample if not name.startswith("__") and _names(field, name)]
    if not names:
        raise SampleError(f"{sample_location(sample)}: task '{task}' needs the entry '.{field.split('.')[0]}'; "
                          f"the sample has {_entries(sample)}")
    head = max(names, key=len)
    path = field[len(head) + 1:].split(".") if field != head else []
    value = sample[head]
    for i, part in enumerate(path):
        if isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
            continue
        if not isinstance(value, dict) or part not in value:
            raise SampleError(f"{sample_location(sample)}: task '{task}' needs '{'.'.join([head, *path[:i + 1]])}', which is missing")
        value = value[part]
    return value
