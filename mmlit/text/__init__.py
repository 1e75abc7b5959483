"""Text: tokenizers trained locally with HF ``tokenizers``."""

from mmlit.text.tokenizer import BOS, EOS, PAD, SPECIAL_TOKENS, UNK, load_tokenizer, train_tokenizer

__all__ = ["BOS", "EOS", "PAD", "SPECIAL_TOKENS", "UNK", "load_tokenizer", "train_tokenizer"]
