"""Image captioning with a transformer decoder over the backbone's image tokens.

The encoder-decoder captioner of "Show, Attend and Tell" (Xu et al. 2015) in its transformer
form (Vaswani et al. 2017): a causal decoder cross-attends to image tokens and is trained with
teacher forcing. Validation decodes greedily and reports exact match of the whole caption and
token accuracy (position by position over the reference, EOS included).

Data contract: an image entry and a caption (``json.caption`` by default).
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric, MetricCollection

from mmlit.data.decode import sample_field, sample_image
from mmlit.registry import register_task
from mmlit.tasks.base import Shards, Task
from mmlit.text import BOS, EOS, PAD

__all__ = ["Captioning", "sequence_match", "update_caption_metrics"]


@register_task("captioning")
class Captioning(Task):
    """Describe an image in words (teacher-forced decoder; greedy decoding on evaluation)."""

    fields = ("image", "json.caption")

    def __init__(self, shards: Shards, batch_size: int = 32, caption_field: str = "json.caption", depth: int = 2,
                 heads: int = 4, dropout: float = 0.0):
        super().__init__(shards, batch_size)
        self.caption_field, self.depth, self.heads, self.dropout = caption_field, depth, heads, dropout
        self.fields = ("image", caption_field)

    def build(self, backbone) -> None:
        super().build(backbone)
        dim = backbone.dim
        self.embed = nn.Embedding(backbone.vocab_size, dim, padding_idx=PAD)
        self.pos = nn.Parameter(torch.randn(1, backbone.max_length, dim) * 0.02)
        layer = nn.TransformerDecoderLayer(dim, self.heads, 4 * dim, self.dropout, batch_first=True, norm_first=True)
        self.decoder = nn.TransformerDecoder(layer, self.depth, norm=nn.LayerNorm(dim))
        # The whole token grid, flattened in order, is also added to every input (the image vector of
        # Show and Tell, Vinyals et al. 2015): where each object is, is there before attention has learned.
        grid = backbone.image_encoder.grid
        self.image_in = nn.Sequential(nn.Flatten(1), nn.Linear(grid[0] * grid[1] * dim, dim))
        self.out = nn.Linear(dim, backbone.vocab_size)

    def prepare(self, sample: dict, tokenizer) -> Iterator[dict]:
        caption = sample_field(sample, self.caption_field, self.name)
        yield {"image": self.image_tensor(sample_image(sample, self.name)),
               "caption": self.token_ids(tokenizer, caption, bos_eos=True)}

    def logits(self, memory: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """memory (B, N, D), ids (B, T) -> next-token logits (B, T, V)."""
        length = ids.shape[1]
        causal = nn.Transformer.generate_square_subsequent_mask(length, device=ids.device, dtype=memory.dtype)
        x = self.embed(ids) + self.pos[:, :length] + self.image_in(memory)[:, None]
        return self.out(self.decoder(x, memory, tgt_mask=causal, tgt_is_causal=True))

    @torch.no_grad()
    def generate(self, memory: torch.Tensor, max_length: int) -> torch.Tensor:
        """Greedy decoding -> ids (B, L) starting after BOS, PAD after the first EOS."""
        ids = torch.full((len(memory), 1), BOS, dtype=torch.long, device=memory.device)
        done = torch.zeros(len(memory), dtype=torch.bool, device=memory.device)
        for _ in range(max_length - 1):
            step = self.logits(memory, ids)[:, -1].argmax(-1)
            step = torch.where(done, torch.full_like(step, PAD), step)
            ids = torch.cat([ids, step[:, None]], dim=1)
            done |= step == EOS
            if done.all():
                break
        return ids[:, 1:]

    def forward(self, backbone, batch: dict) -> dict[str, torch.Tensor]:
        memory = backbone(image=batch["image"]).image_tokens  # (B, N, D)
        caption = batch["caption"]  # (B, T): BOS ... EOS PAD ...
        logits = self.logits(memory, caption[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1), caption[:, 1:].flatten(), ignore_index=PAD)
        out = {"loss": loss}
        if not self.training:
            out["generated"] = self.generate(memory, caption.shape[1])
        return out

    def metrics(self) -> MetricCollection:
        return MetricCollection({"exact_match": MeanMetric(), "token_acc": MeanMetric()})

    def update_metrics(self, metrics: MetricCollection, outputs: dict, batch: dict) -> None:
        update_caption_metrics(metrics, outputs["generated"], batch["caption"][:, 1:])


def update_caption_metrics(metrics: MetricCollection, generated: torch.Tensor, target: torch.Tensor) -> None:
    """``exact_match`` and ``token_acc`` of generated ids (B, L) against reference ids (B, T) (see ``sequence_match``)."""
    exact, correct, real = sequence_match(generated, target)
    metrics["exact_match"].update(exact.float())
    metrics["token_acc"].update(correct.sum() / real.sum(), weight=real.sum())


def sequence_match(generated: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Generated ids (B, L) against reference ids (B, T), both left-aligned and PAD-padded (EOS included)
    -> whole-sequence match (B,), correct reference positions (B,) and reference length (B,)."""
    pred = torch.full_like(target, PAD)
    width = min(generated.shape[1], target.shape[1])
    pred[:, :width] = generated[:, :width]
    real = target != PAD
    return ((pred == target) | ~real).all(dim=1), ((pred == target) & real).sum(1), real.sum(1)
