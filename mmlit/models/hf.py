"""Hugging Face models from local folders: loading, freezing by name, and LoRA (Hu et al. 2021) through ``peft``.

A pretrained model is a folder as ``save_pretrained`` writes it (``config.json``, ``model.safetensors``,
``tokenizer.json``): downloaded once by the user (``huggingface-cli download``), or saved by a test. Nothing here
downloads: every load is ``local_files_only``. The encoders that wrap such models (``HFTextEncoder``, ``HFCausalLM``)
share these helpers.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["LoRA", "apply_lora", "folder_of", "freeze", "load_pretrained", "model_inputs",
           "read_json"]


def folder_of(path: str | Path, key: str) -> Path:
    """``path`` as a model folder (it holds ``config.json``), or an error that names the recipe ``key`` and how to get
    one."""
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{key}: '{path}' is not a Hugging Face model folder (no config.json). Download one beforehand "
            f"(`huggingface-cli download <model> --local-dir {path}`) or save one with `save_pretrained`; mmlit "
            f"downloads nothing at run time")
    return folder


def read_json(folder: Path, name: str) -> dict:
    """A JSON file of the model folder (``tokenizer_config.json``), or {} when it has none."""
    path = folder / name
    return json.loads(path.read_text()) if path.is_file() else {}


def load_pretrained(auto_class: Any, path: str | Path, key: str, **kwargs: Any) -> nn.Module:
    """``auto_class.from_pretrained(path)`` (``AutoModel``, ``AutoModelForCausalLM``) from the local folder only."""
    from transformers.utils import logging

    logging.disable_progress_bar()  # (a bar per load of a local folder: nothing a run's log needs)
    return auto_class.from_pretrained(str(folder_of(path, key)), local_files_only=True, **kwargs)


def model_inputs(ids: torch.Tensor, pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The text modality's ids for a pretrained tokenizer (each of the tokenizer's ids + 1, 0: padding; see
    ``mmlit.modalities.text.TextPipeline``) (B, T) -> the model's own ids (B, T), with ``pad_id`` (its config's
    ``pad_token_id``) on padding, as its own tokenizer pads (RoBERTa numbers positions by the ids that are not
    ``pad_id``), and the attention mask (B, T), True on real tokens."""
    mask = ids > 0
    return (ids - 1).masked_fill(~mask, pad_id), mask


def freeze(module: nn.Module, patterns: list[str], key: str) -> int:
    """Stop the gradient of every parameter whose name matches one of the fnmatch ``patterns`` (``*``: all;
    ``embeddings.*``; ``encoder.layer.[0-3].*``); a pattern that matches nothing is an error (a typo would otherwise
    train what it meant to freeze). Returns how many parameters were frozen."""
    names = [name for name, _ in module.named_parameters()]
    frozen = 0
    for pattern in patterns:
        matched = [name for name in names if fnmatch.fnmatchcase(name, pattern)]
        if not matched:
            raise ValueError(f"{key}: {pattern!r} matches no parameter (they are named like {names[0]!r}, "
                             f"{names[-1]!r})")
        for name in matched:
            module.get_parameter(name).requires_grad_(False)
            frozen += 1
    return frozen


@dataclass
class LoRA:
    """Low-rank adapters on the named linear layers (``peft``'s ``LoraConfig``): each adapted weight W trains as
    W + (alpha / r) B A, with W frozen.

    Args:
        r: the rank of A (r x in) and B (out x r).
        alpha: the scale numerator.
        dropout: dropout on the adapter's input.
        target_modules: the module names adapted (a name's last part, as peft matches it: ``q_proj``, ``v_proj``).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])


def apply_lora(model: nn.Module, lora: LoRA, key: str) -> nn.Module:
    """``model`` wrapped by ``peft.get_peft_model``: its weights frozen, adapters on ``lora.target_modules``. Saving
    the adapters is the wrapper's ``save_pretrained``; merging them is its ``merge_and_unload``."""
    from peft import LoraConfig, get_peft_model

    if lora.r < 1:
        raise ValueError(f"{key}.r must be at least 1, got {lora.r}")
    from transformers.pytorch_utils import Conv1D  # (GPT-2's linear layers)

    kinds = (nn.Linear, Conv1D, nn.Embedding, nn.Conv2d)  # what peft's LoRA adapts
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, kinds)}
    missing = sorted(set(lora.target_modules) - names)
    if missing:
        raise ValueError(f"{key}.target_modules: the model has no linear layer named {', '.join(missing)} (it has "
                         f"{', '.join(sorted(names))})")
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                        target_modules=list(lora.target_modules))
    return get_peft_model(model, config)
