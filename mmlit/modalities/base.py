"""The modality interface: what one kind of input (image, text, audio, a sensor's vectors) is to mmlit.

A modality is one registered class (``@register_modality("audio")``, or the entry-point group ``mmlit.modalities``):

- ``extensions``: the shard entries it decodes, an allow-list (``{key}.flac``, ``{key}.wav``, ...);
- ``decode(extension, data)``: an entry's bytes -> a value, checked by content first (an image is parsed only by the
  decoder of the format its name says), within the modality's own size limits (its constructor's arguments, set by
  the data module from the recipe);
- ``pipeline(encoder, settings, key)``: the worker-side transform a task applies to a decoded value, made in the
  training process from what the modality's encoder needs (an image size, a maximum length) and the task's settings
  (an ``ImageTransform``). It runs inside ``sample_context``, whose generators are seeded by (seed, epoch, shard,
  key), so a resumed run draws the same augmentation. It is pickled to the DataLoader workers with the task's data
  side: keep it a plain object;
- ``collate(values)``: one batch of transformed values;
- ``default_encoder``: the class path of the encoder a backbone builds for it when the recipe gives none
  (``encoders: {audio: null}``).

A task field named like a modality (``image``) reads any entry that modality decodes. Modalities are data: nothing
here imports a model.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar

import torch

__all__ = ["Modality"]


class Modality:
    """One kind of input: its shard entries, decoding, worker-side pipeline, collate and default encoder."""

    modality_name: ClassVar[str]  # set by @register_modality
    extensions: ClassVar[frozenset[str]] = frozenset()
    default_encoder: ClassVar[str | None] = None

    def decode(self, extension: str, data: bytes) -> Any:
        """An entry's bytes -> its value; raise ``ValueError`` (the sample is skipped and counted) for bad data."""
        raise NotImplementedError(f"modality {self.modality_name!r} decodes no entries")

    def pipeline(self, encoder: Any, settings: Any, key: str) -> Callable[[Any], Any]:
        """The transform of a decoded value for ``encoder`` (the backbone's encoder of this modality, or None when
        the task reads the modality without one), with the task's ``settings``; ``key`` names the recipe key in
        errors. Default: values pass as they are."""
        return _identity

    def collate(self, values: list) -> torch.Tensor:
        """A batch of transformed values (default: stacked tensors)."""
        return torch.stack([torch.as_tensor(v) for v in values])

    def __repr__(self) -> str:
        options = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({options})"


def _identity(value: Any) -> Any:
    return value
