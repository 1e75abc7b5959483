"""The text modality: UTF-8 entries (``.txt``, ``.text``, ``.caption``), turned into token ids by the run's tokenizer
(``data.tokenizer``, Hugging Face ``tokenizers``) and cut to the text encoder's ``max_length``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from mmlit.data.collate import pad
from mmlit.data.decode import TEXT_EXTENSIONS
from mmlit.modalities.base import Modality
from mmlit.registry import register_modality
from mmlit.text import BOS, EOS

if TYPE_CHECKING:
    from tokenizers import Tokenizer

__all__ = ["TextModality", "TextPipeline"]


class TextPipeline:
    """Texts -> token ids of at most ``max_length`` (with ``bos_eos``: BOS ... EOS, the form decoders learn)."""

    def __init__(self, max_length: int | None):
        self.max_length = max_length

    def __call__(self, text: str, tokenizer: Tokenizer | None, bos_eos: bool = False) -> list[int]:
        if tokenizer is None:
            raise ValueError("a task reads text, which needs data.tokenizer (`mmlit data tokenizer` makes one)")
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        limit = self.max_length or len(ids) + 2
        if bos_eos:
            return [BOS, *ids[: limit - 2], EOS]
        return ids[:limit]


@register_modality("text")
class TextModality(Modality):
    """UTF-8 text, as token ids of the run's tokenizer."""

    extensions = TEXT_EXTENSIONS
    default_encoder = "mmlit.models.TransformerTextEncoder"

    def decode(self, extension: str, data: bytes) -> str:
        return data.decode("utf-8")

    def pipeline(self, encoder: Any, settings: Any, key: str) -> TextPipeline:
        """Token ids cut to the encoder's ``max_length`` (or, for a task that writes text without a text encoder, the
        backbone's: ``encoder`` is then what ``Backbone.spec("text")`` gives)."""
        return TextPipeline(getattr(encoder, "max_length", None))

    def collate(self, values: list) -> torch.Tensor:
        return pad(values)
