"""CLIP-style image-text contrastive learning.

Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision":
image and caption embeddings are projected to a shared space, L2-normalised, and trained with a
symmetric InfoNCE loss at a learnable temperature. Validation reports image-to-text and
text-to-image recall@1 over the whole split (gathered across ranks).

Data contract: an image entry and a caption (``json.caption`` by default, or ``txt``).
"""

from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.utilities import dim_zero_cat

from mmlit.data.decode import sample_field, sample_image
from mmlit.registry import register_task
from mmlit.tasks.base import Shards, Task

__all__ = ["Contrastive", "RetrievalRecallAt1"]


class RetrievalRecallAt1(Metric):
    """Recall@1 of retrieving the paired item among every item of the split, in one direction."""

    full_state_update = False

    def __init__(self, direction: str):
        super().__init__()
        self.direction = direction
        self.add_state("image", default=[], dist_reduce_fx="cat")
        self.add_state("text", default=[], dist_reduce_fx="cat")

    def update(self, image: torch.Tensor, text: torch.Tensor) -> None:
        self.image.append(F.normalize(image.float(), dim=-1))
        self.text.append(F.normalize(text.float(), dim=-1))

    def compute(self) -> torch.Tensor:
        image, text = dim_zero_cat(self.image), dim_zero_cat(self.text)
        sim = image @ text.T if self.direction == "i2t" else text @ image.T  # (N, N), queries on rows
        return (sim.argmax(-1) == torch.arange(len(sim), device=sim.device)).float().mean()


@register_task("contrastive")
class Contrastive(Task):
    """Align images and their captions (symmetric InfoNCE, learnable temperature)."""

    fields = ("image", "json.caption")
    needs = ("text_encoder",)

    def __init__(self, shards: Shards, batch_size: int = 32, caption_field: str = "json.caption",
                 embed_dim: int = 128, init_temperature: float = 0.07):
        super().__init__(shards, batch_size)
        self.caption_field, self.embed_dim = caption_field, embed_dim
        self.fields = ("image", caption_field)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))

    def build(self, backbone) -> None:
        super().build(backbone)
        self.image_proj = nn.Linear(backbone.dim, self.embed_dim, bias=False)
        self.text_proj = nn.Linear(backbone.dim, self.embed_dim, bias=False)

    def prepare(self, sample: dict, tokenizer) -> Iterator[dict]:
        yield {"image": self.image_tensor(sample_image(sample, self.name)),
               "caption": self.token_ids(tokenizer, sample_field(sample, self.caption_field, self.name))}

    def forward(self, backbone, batch: dict) -> dict[str, torch.Tensor]:
        features = backbone(image=batch["image"], text=batch["caption"], fuse=False)
        image = F.normalize(self.image_proj(features.image_pooled), dim=-1)  # (B, E)
        text = F.normalize(self.text_proj(features.text_pooled), dim=-1)  # (B, E)
        scale = self.logit_scale.clamp(max=math.log(100.0)).exp()  # CLIP caps the scale at 100
        logits = scale * image @ text.T  # (B, B)
        target = torch.arange(len(logits), device=logits.device)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        return {"loss": loss, "image_embed": image, "text_embed": text, "temperature": 1.0 / scale}

    def metrics(self) -> MetricCollection:
        return MetricCollection({"r@1_i2t": RetrievalRecallAt1("i2t"), "r@1_t2i": RetrievalRecallAt1("t2i")})

    def update_metrics(self, metrics: MetricCollection, outputs: dict, batch: dict) -> None:
        for metric in metrics.values():
            metric.update(outputs["image_embed"], outputs["text_embed"])
