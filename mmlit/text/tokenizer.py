"""Tokenizers from the HF ``tokenizers`` library: trained on the shards' own text by a tool,
saved as ``tokenizer.json``, loaded by path. Nothing is downloaded.

mmlit fixes the ids of four special tokens so that model code can rely on them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import WordPiece
from tokenizers.trainers import WordPieceTrainer

__all__ = ["PAD", "UNK", "BOS", "EOS", "SPECIAL_TOKENS", "train_tokenizer", "load_tokenizer"]

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[BOS]", "[EOS]")
PAD, UNK, BOS, EOS = range(len(SPECIAL_TOKENS))


def train_tokenizer(texts: Iterable[str], path: str | Path, vocab_size: int = 2000) -> Tokenizer:
    """Train a lower-casing WordPiece tokenizer on ``texts`` and save it to ``path``."""
    tokenizer = Tokenizer(WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = WordPieceTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS))
    tokenizer.train_from_iterator(texts, trainer=trainer)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path))
    return tokenizer


def load_tokenizer(path: str | Path, key: str = "data.tokenizer") -> Tokenizer:
    """Load ``tokenizer.json``; ``key`` is the recipe key named in errors."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{key}: no tokenizer at '{path}'. Train one with "
            f"`mmlit data tokenizer --shards '<train shards>' --out {path}`."
        )
    tokenizer = Tokenizer.from_file(str(path))
    for token_id, token in enumerate(SPECIAL_TOKENS):
        if tokenizer.token_to_id(token) != token_id:
            raise ValueError(
                f"{key}: '{path}' must give {token} the id {token_id} (mmlit's special tokens are "
                f"{', '.join(SPECIAL_TOKENS)} in this order); retrain it with `mmlit data tokenizer`."
            )
    return tokenizer
