"""A tiny Llama-shaped causal LM with a byte-level BPE tokenizer and a ChatML chat template, pretrained for a few hundred
steps on the shards' own text (next-token prediction on each text), saved as a Hugging Face folder: what
``recipes/vlm.yaml`` runs on where no pretrained LM can be downloaded. It knows the words and how questions read, not
the images: that is what a vision-language model's stages add.
The folder has the layout of a downloaded SmolLM or Qwen chat model, so pointing the recipe at one of those changes
no code path."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch

__all__ = ["CHAT_TEMPLATE", "save_tiny_lm"]

# ChatML, as SmolLM2 and Qwen2 write it
CHAT_TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def save_tiny_lm(out: str | Path, texts: Iterable[str], vocab_size: int = 512, hidden: int = 64, layers: int = 2,
                 heads: int = 4, seed: int = 0, steps: int = 200, max_texts: int = 20000) -> Path:
    """Train the tokenizer on ``texts`` (at most ``max_texts``), make a ``LlamaForCausalLM`` of that vocabulary,
    pretrain it for ``steps`` steps on the texts and save both to ``out``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    texts = [t for t, _ in zip(texts, range(max_texts))]
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", unk_token=None, chat_template=CHAT_TEMPLATE)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(heads // 2, 1),
                         max_position_embeddings=256, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    _pretrain(model, [tokenizer(t, add_special_tokens=False)["input_ids"][:31] + [tokenizer.eos_token_id]
                      for t in texts], steps, tokenizer.pad_token_id)
    out = Path(out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def _pretrain(model, rows: list[list[int]], steps: int, pad: int, batch_size: int = 32) -> None:
    """Next-token prediction on random batches of ``rows`` (AdamW, a constant rate)."""
    if not rows:
        raise ValueError("tiny-lm: the shards have no text to pretrain on")
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        batch = [rows[i] for i in torch.randint(len(rows), (batch_size,), generator=generator).tolist()]
        width = max(map(len, batch))
        ids = torch.tensor([r + [pad] * (width - len(r)) for r in batch])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in batch])
        loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
