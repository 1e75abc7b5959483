"""A pretrained causal language model from a local folder, as the text encoder of a backbone (``HFCausalLM``).

Any ``AutoModelForCausalLM`` folder works (GPT-2, Llama, Qwen, SmolLM shapes): the model and its tokenizer are read
from the folder, nothing is downloaded. A vision-language task (``vlm``, LLaVA-style: Liu et al. 2023) feeds it image
tokens through ``embed`` and ``lm``; other tasks can read it as a text encoder (its last hidden states, the state of
the last real token pooled). Freezing by name and LoRA adapters (``peft``) are settings of the encoder; a task's
training stage (``vlm``'s ``stage``) may freeze more.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmlit.models.backbone import Encoded
from mmlit.models.hf import LoRA, apply_lora, folder_of, freeze as freeze_by_name, load_pretrained, model_inputs

__all__ = ["HFCausalLM"]

_KEY = "model.backbone.init_args.encoders.text.init_args"


class HFCausalLM(nn.Module):
    """A Hugging Face causal LM (and its tokenizer) from a local folder.

    Args:
        path: the model folder (``config.json``, weights, ``tokenizer.json``, and for chat models
            ``tokenizer_config.json`` with its ``chat_template``).
        freeze: fnmatch patterns of parameter names to freeze (``*``: all; ``model.embed_tokens.*``).
        lora: LoRA adapters (rank, alpha, dropout, target modules): the model's own weights freeze, the adapters
            train; ``mmlit export`` merges them into the weights.
        max_length: the longest sequence given to the model, image tokens included (default: the model's
            ``max_position_embeddings``).
        checkpointing: activation checkpointing per decoder layer (``gradient_checkpointing_enable``).
        dtype: the dtype the weights are loaded in (``float32``; ``bfloat16`` halves their memory).
    """

    def __init__(self, path: str, freeze: list[str] | None = None, lora: LoRA | None = None,
                 max_length: int | None = None, checkpointing: bool = False, dtype: str = "float32"):
        super().__init__()
        from transformers import AutoModelForCausalLM

        self.path = str(folder_of(path, f"{_KEY}.path"))
        model = load_pretrained(AutoModelForCausalLM, path, f"{_KEY}.path", dtype=getattr(torch, dtype))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if freeze:
            freeze_by_name(model, freeze, f"{_KEY}.freeze")
        self.lora = lora
        self.model = apply_lora(model, lora, f"{_KEY}.lora") if lora is not None else model
        config = model.config
        self.dim, self.vocab_size = config.hidden_size, config.vocab_size
        limit = getattr(config, "max_position_embeddings", None) or max_length or 2048
        self.max_length = min(limit, max_length or limit)
        self.train()  # (from_pretrained leaves the model in eval mode)

    def train(self, mode: bool = True) -> HFCausalLM:
        """A wholly frozen LM stays in eval mode (no dropout): it is a fixed function of its input."""
        return super().train(mode and any(p.requires_grad for p in self.parameters()))

    @property
    def tokenizer_file(self) -> str:
        """The folder's ``tokenizer.json`` (the text modality reads texts for this encoder with it)."""
        return str(Path(self.path) / "tokenizer.json")

    @property
    def base(self) -> nn.Module:
        """The transformers model itself (inside the LoRA wrapper when there is one)."""
        return self.model.get_base_model() if self.lora is not None else self.model

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B, T) of the model's own vocabulary -> input embeddings (B, T, D)."""
        return self.base.get_input_embeddings()(ids)

    def lm(self, embeds: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor | None = None) -> Any:
        """The model on input embeddings (B, T, D) with the attention mask (B, T) (True on real tokens): its output
        (``logits``, and with ``labels`` (B, T), -100 where no loss is taken, the mean next-token ``loss``)."""
        return self.model(inputs_embeds=embeds, attention_mask=mask.long(), labels=labels)

    def generate(self, embeds: torch.Tensor, mask: torch.Tensor, max_new_tokens: int, eos: list[int], pad: int,
                 beam_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Continue left-padded prompts given as embeddings (B, P, D) by greedy or beam search with the model's KV
        cache (``generate``) -> new token ids (B, L) (``pad`` after each row's end) and their score (B,): the
        log-probability of the tokens up to the first EOS (beam search: the beam's length-normalised score)."""
        out = self.model.generate(inputs_embeds=embeds, attention_mask=mask.long(), max_new_tokens=max_new_tokens,
                                  do_sample=False, num_beams=beam_size, eos_token_id=eos, pad_token_id=pad,
                                  return_dict_in_generate=True, output_scores=True)
        ids = out.sequences
        if beam_size > 1:
            return ids, out.sequences_scores
        steps = self.base.compute_transition_scores(ids, out.scores, normalize_logits=True)  # (B, L)
        ended = torch.isin(ids, torch.tensor(eos, device=ids.device)).long().cumsum(1)
        counted = (ended == 0) | ((ended == 1) & torch.isin(ids, torch.tensor(eos, device=ids.device)))
        return ids, steps.masked_fill(~counted, 0.0).sum(1)

    def forward(self, ids: torch.Tensor) -> Encoded:
        """As a text encoder: ids (B, T) as the text modality gives them for a pretrained tokenizer (each id + 1,
        0: padding) -> the last layer's states (B, T, D), the last real token's state (B, D), mask (B, T)."""
        own, mask = model_inputs(ids, self.base.config.pad_token_id or 0)
        out = self.model(input_ids=own, attention_mask=mask.long(), output_hidden_states=True)
        tokens = out.hidden_states[-1]
        last = torch.where(mask, torch.arange(ids.shape[1], device=ids.device), -1).amax(1).clamp_min(0)
        return Encoded(tokens, tokens[torch.arange(len(ids), device=ids.device), last], mask)
