"""A pretrained causal language model from a local folder, as the text encoder of a backbone (``HFCausalLM``).

Any ``AutoModelForCausalLM`` folder works (GPT-2, Llama, Qwen, SmolLM shapes): the model and its tokenizer are read
from the folder, nothing is downloaded. A vision-language task (``vlm``, LLaVA-style: Liu et al. 2023) feeds it image
tokens through ``embed`` and ``lm``; other tasks can read it as a text encoder (its last hidden states, the state of
the last real token pooled). Freezing by name and LoRA adapters (``peft``) are settings of the encoder; a task's
training stage (``vlm``'s ``stage``) may freeze more.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

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
                 max_length: int | None = None, checkpointing: bool = False,
                 dtype: Literal["float32", "bfloat16", "float16"] = "float32"):
        super().__init__()
        from transformers import AutoModelForCausalLM, GenerationConfig

        self.path = str(folder_of(path, f"{_KEY}.path"))
        model = load_pretrained(AutoModelForCausalLM, path, f"{_KEY}.path", dtype=getattr(torch, dtype))
        # The folder's end-of-turn ids, kept; its generation settings (a repetition penalty, sampling) are replaced by
        # blank ones: transformers applies a model's settings to a generate call that does not set them itself.
        self.eos_ids = _as_list(model.generation_config.eos_token_id if model.generation_config else None)
        model.generation_config = GenerationConfig()
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if freeze:
            freeze_by_name(model, freeze, f"{_KEY}.freeze")
        self.lora = lora
        self.model = apply_lora(model, lora, f"{_KEY}.lora") if lora is not None else model
        config = model.config
        self.dim = config.hidden_size
        self.vocab_size = config.vocab_size + 1  # (the text modality's ids: each of the tokenizer's + 1)
        limit = getattr(config, "max_position_embeddings", None)
        if max_length is not None and limit is not None and max_length > limit:
            raise ValueError(f"{_KEY}.max_length: the model takes at most {limit} positions, got {max_length}")
        self.max_length = max_length or limit or 2048
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
        cache (``generate``) -> new token ids (B, L) (``pad`` after each row's end) and their score (B,): the model's
        log-probability of the tokens up to the first EOS (beam search: the beam's length-normalised score). The
        settings are these alone: a folder's ``generation_config.json`` (a repetition penalty, sampling) is not
        applied (``__init__`` blanks them), so that evaluation is plain greedy or beam search whatever the model
        ships."""
        from transformers import GenerationConfig

        settings = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=beam_size,
                                    eos_token_id=eos, pad_token_id=pad, return_dict_in_generate=True,
                                    output_logits=True)
        out = self.model.generate(inputs_embeds=embeds, attention_mask=mask.long(), generation_config=settings)
        ids = out.sequences
        if beam_size > 1:
            return ids, out.sequences_scores
        logp = torch.stack(out.logits, 1).float().log_softmax(-1).gather(2, ids[..., None])[..., 0]  # (B, L)
        stop = torch.isin(ids, torch.tensor(eos, device=ids.device))
        counted = (stop.long().cumsum(1) - stop.long()) == 0  # up to and with the first EOS
        return ids, logp.masked_fill(~counted, 0.0).sum(1)

    def forward(self, ids: torch.Tensor) -> Encoded:
        """As a text encoder: ids (B, T) as the text modality gives them for a pretrained tokenizer (each id + 1,
        0: padding) -> the last layer's states (B, T, D), the last real token's state (B, D), mask (B, T)."""
        own, mask = model_inputs(ids, self.base.config.pad_token_id or 0)
        tokens = self.base.get_decoder()(input_ids=own, attention_mask=mask.long()).last_hidden_state  # (no LM head)
        last = torch.where(mask, torch.arange(ids.shape[1], device=ids.device), -1).amax(1).clamp_min(0)
        return Encoded(tokens, tokens[torch.arange(len(ids), device=ids.device), last], mask)


def _as_list(ids: int | list[int] | None) -> list[int]:
    return [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
