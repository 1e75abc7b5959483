"""The text modality: UTF-8 entries (``.txt``, ``.text``, ``.caption``), turned into token ids and cut to the text
encoder's ``max_length``: by the run's tokenizer (``data.tokenizer``, mmlit's, Hugging Face ``tokenizers``), or by the
text encoder's own when it brings one (a pretrained model's ``tokenizer.json``: ``HFTextEncoder``, ``HFCausalLM``)."""

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
    """Texts -> token ids of at most ``max_length``.

    With the run's tokenizer (mmlit's: ``PAD``, ``UNK``, ``BOS``, ``EOS`` are ids 0-3) the ids are the tokenizer's,
    without special tokens, or with ``bos_eos`` BOS ... EOS (the form decoders learn).

    With ``tokenizer_file`` (the text encoder's own tokenizer) the tokenizer adds its own special tokens ([CLS] ...
    [SEP]), truncation keeps them, and **every id is the tokenizer's id + 1**: batches are padded with 0 (``collate``),
    and in a pretrained vocabulary id 0 may be a real token (RoBERTa's ``<s>``, CLIP's ``!``). The encoder subtracts
    the 1 and masks the zeros (``mmlit.models.hf.model_inputs``). The tokenizer is loaded from the file where it is
    first used (each DataLoader worker loads its own), so the pipeline pickles as a path.

    Args:
        max_length: the longest text in tokens (None: uncut).
        tokenizer_file: the text encoder's ``tokenizer.json``; None reads with the run's tokenizer.
        key: the recipe key of the task that reads the text, named in errors.
    """

    def __init__(self, max_length: int | None, tokenizer_file: str | None = None, key: str = "model.tasks"):
        self.max_length, self.tokenizer_file, self.key = max_length, tokenizer_file, key
        self._own: Tokenizer | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_own": None}  # (workers load the file themselves)

    def __call__(self, text: str, tokenizer: Tokenizer | None, bos_eos: bool = False) -> list[int]:
        if self.tokenizer_file is not None:
            if bos_eos:
                raise ValueError(f"{self.key}: the task writes text between mmlit's [BOS] and [EOS] (a decoder's "
                                 f"targets in data.tokenizer's ids), but the backbone's text encoder reads text with "
                                 f"its own tokenizer ({self.tokenizer_file}); give the task a backbone whose text "
                                 f"encoder is one of mmlit's, or a task that generates with the pretrained model")
            return [i + 1 for i in self.own_tokenizer.encode(text).ids]
        if tokenizer is None:
            raise ValueError(f"{self.key}: the task reads text, which needs data.tokenizer (`mmlit data tokenizer` "
                             f"makes one)")
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        limit = self.max_length or len(ids) + 2
        if bos_eos:
            return [BOS, *ids[: limit - 2], EOS]
        return ids[:limit]

    @property
    def own_tokenizer(self) -> Tokenizer:
        """The text encoder's tokenizer, without the padding or truncation its file may set (a fixed padding to 128,
        in sentence-transformers' files): truncated to ``max_length``, its special tokens kept."""
        if self._own is None:
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_file(self.tokenizer_file)
            tokenizer.no_padding()
            if self.max_length is not None:
                tokenizer.enable_truncation(self.max_length)
            else:
                tokenizer.no_truncation()
            self._own = tokenizer
        return self._own


@register_modality("text")
class TextModality(Modality):
    """UTF-8 text, as token ids of the run's tokenizer (or of the text encoder's own)."""

    extensions = TEXT_EXTENSIONS
    default_encoder = "mmlit.models.TransformerTextEncoder"

    def decode(self, extension: str, data: bytes) -> str:
        return data.decode("utf-8")

    def pipeline(self, encoder: Any, settings: Any, key: str) -> TextPipeline:
        """Token ids cut to the encoder's ``max_length`` (or, for a task that writes text without a text encoder, the
        backbone's: ``encoder`` is then what ``Backbone.spec("text")`` gives), with the encoder's own tokenizer when
        it has one (``tokenizer_file``)."""
        task = key.removesuffix(".transform").removesuffix(".init_args")
        return TextPipeline(getattr(encoder, "max_length", None), getattr(encoder, "tokenizer_file", None), task)

    def collate(self, values: list) -> torch.Tensor:
        return pad(values)
