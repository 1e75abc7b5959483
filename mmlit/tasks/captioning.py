"""Image captioning with a transformer decoder over the backbone's image tokens.

The encoder-decoder captioner of "Show, Attend and Tell" (Xu et al. 2015) in its transformer form (Vaswani et al.
2017): a causal decoder cross-attends to image tokens and is trained with teacher forcing. Evaluation decodes
greedily, or with beam search (``beam_size``), and scores the caption against every reference of the image: CIDEr-D
(``cider``), BLEU-4 (``bleu4``), exact match with one of them, and token accuracy against the first
(``mmlit/metrics/caption.py``).

Data contract: an image entry and its caption(s) at ``caption_field``: a text (``txt``, the WebDataset convention) or a
list of texts (``json.captions``, what ``mmlit data convert coco`` writes). A training sample takes one of its
captions, drawn anew each epoch (seeded, so a resumed run draws the same).
"""

from __future__ import annotations

import random
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MetricCollection

from mmlit.data import Shards, TaskData
from mmlit.data.collate import collate_examples, pad_references
from mmlit.data.fields import captions_of
from mmlit.data.transforms import ImageTransform, text_safe, training_sample
from mmlit.metrics.caption import caption_metrics, tokens_of, update_caption_metrics
from mmlit.models.generation import generate
from mmlit.registry import register_task
from mmlit.tasks.base import Task
from mmlit.text import BOS, PAD

__all__ = ["Captioning", "CaptioningData"]


class CaptioningData(TaskData):
    """Images and their captions as BOS ... EOS token ids (the arguments are ``Captioning``'s)."""

    reads = ("image", "text")

    def __init__(self, shards: Shards, batch_size: int, caption_field: str, transform: ImageTransform):
        super().__init__(shards, batch_size, {"image": transform})
        self.caption_field, self.fields = caption_field, ("image", caption_field)

    def prepare(self, sample: dict, tokenizer) -> Iterator[dict]:
        captions = captions_of(sample, self.caption_field, self.name) or [""]  # ("": none, predicting)
        ids = [self.token_ids(tokenizer, c, bos_eos=True) for c in captions]
        example = {"image": self.image(sample)}
        if training_sample():
            yield {**example, "caption": random.choice(ids)}  # (seeded by the sample: see mmlit/data/transforms.py)
        else:  # the first caption for the loss, every one as a reference
            yield {**example, "caption": ids[0], "references": [c[1:] for c in ids]}

    def collate(self, examples: list[dict]) -> dict[str, Any]:
        """image (B, 3, H, W), caption (B, T) BOS ... EOS PAD ..., and on evaluation references (B, R, T') without
        BOS."""
        batch = collate_examples([{k: v for k, v in e.items() if k != "references"} for e in examples])
        if "references" in examples[0]:
            batch["references"] = pad_references([e["references"] for e in examples])
        return batch


@register_task("captioning")
class Captioning(Task):
    """Describe an image in words (teacher-forced decoder; greedy or beam-search decoding on evaluation).

    Args:
        caption_field: the entry (or ``json.path``) holding the caption, or a list of captions.
        depth, heads, dropout: the decoder's layers, attention heads and dropout.
        beam_size: hypotheses kept by beam search on evaluation (1: greedy).
        length_penalty: beam search ranks hypotheses by log-probability / length ** length_penalty.
        transform: the image pipeline (crops without flips or colour changes by default: captions name sides and
            colours).
    """

    modalities = ("image",)

    def __init__(self, shards: Shards, batch_size: int = 32, caption_field: str = "txt", depth: int = 2, heads: int = 4,
                 dropout: float = 0.0, beam_size: int = 1, length_penalty: float = 0.0,
                 transform: ImageTransform | None = None):
        super().__init__(CaptioningData(shards, batch_size, caption_field, transform or text_safe()))
        if beam_size < 1:
            raise ValueError(f"model.tasks.{self.name}.init_args.beam_size must be at least 1, got {beam_size}")
        self.depth, self.heads, self.dropout = depth, heads, dropout
        self.beam_size, self.length_penalty = beam_size, length_penalty

    def build(self, backbone) -> None:
        super().build(backbone)
        dim = backbone.dim
        self.embed = nn.Embedding(backbone.vocab_size, dim, padding_idx=PAD)
        self.pos = nn.Parameter(torch.randn(1, backbone.max_length, dim) * 0.02)
        layer = nn.TransformerDecoderLayer(dim, self.heads, 4 * dim, self.dropout, batch_first=True, norm_first=True)
        self.decoder = nn.TransformerDecoder(layer, self.depth, norm=nn.LayerNorm(dim))
        # The whole token grid, flattened in order, is also added to every input (the image vector of
        # Show and Tell, Vinyals et al. 2015): where each object is, is there before attention has learned.
        # The LayerNorm keeps it at the scale of the token embeddings. Without it, AdamW moves each of the
        # Linear's N*D inputs' weights by about the learning rate per step, all in one direction, so this one
        # vector, the same at every position, grows by ~N*D*lr a step and drowns the tokens: the decoder then
        # predicts the captions' unigram distribution (loss 2.4 on 8 fixed captions after 150 steps, 0.12 with the
        # norm) and exact match stays 0.
        grid = backbone.encoders["image"].grid
        self.image_in = nn.Sequential(nn.Flatten(1), nn.Linear(grid[0] * grid[1] * dim, dim), nn.LayerNorm(dim))
        self.out = nn.Linear(dim, backbone.vocab_size)

    def logits(self, memory: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """memory (B, N, D), ids (B, T) -> next-token logits (B, T, V)."""
        length = ids.shape[1]
        causal = nn.Transformer.generate_square_subsequent_mask(length, device=ids.device, dtype=memory.dtype)
        x = self.embed(ids) + self.pos[:, :length] + self.image_in(memory)[:, None]
        return self.out(self.decoder(x, memory, tgt_mask=causal, tgt_is_causal=True))

    def forward(self, backbone, batch: dict) -> dict[str, torch.Tensor]:
        memory = backbone(image=batch["image"])["image"].tokens  # (B, N, D)
        caption = batch["caption"]  # (B, T): BOS ... EOS PAD ...
        logits = self.logits(memory, caption[:, :-1])
        out = {"loss": F.cross_entropy(logits.flatten(0, 1), caption[:, 1:].flatten(), ignore_index=PAD)}
        if not self.training:  # (evaluation batches carry every reference: the longest may pass this caption's length)
            prompt = torch.full((len(memory), 1), BOS, dtype=torch.long, device=memory.device)
            out["generated"], out["score"] = generate(lambda ids, rows: self.logits(memory[rows], ids)[:, -1], prompt,
                                                      self.max_length - 1, beam_size=self.beam_size,
                                                      length_penalty=self.length_penalty)
        return out

    def metrics(self) -> MetricCollection:
        return MetricCollection(caption_metrics())

    def update_metrics(self, metrics: MetricCollection, outputs: dict, batch: dict) -> None:
        update_caption_metrics(metrics, outputs["generated"], batch["references"])

    def predict(self, outputs: dict, batch: dict, tokenizer) -> list[dict]:
        return [{"key": key, "prediction": tokenizer.decode(tokens), "score": round(score, 6)}
                for key, tokens, score in zip(batch["key"], tokens_of(outputs["generated"]), outputs["score"].tolist())]
