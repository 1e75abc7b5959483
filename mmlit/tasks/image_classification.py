"""Image-only classification from the backbone's pooled image feature.

Data contract: an image entry and an integer label (``json.labels.n_circles`` by default, the
number of circles in a Sort-of-CLEVR scene; ``cls`` for the usual WebDataset layout).
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from mmlit.data.decode import SampleError, sample_field, sample_image, sample_location
from mmlit.registry import register_task
from mmlit.tasks.base import Shards, Task

__all__ = ["ImageClassification"]


@register_task("image_classification")
class ImageClassification(Task):
    """Predict a class from the image alone."""

    fields = ("image", "json.labels.n_circles")

    def __init__(self, shards: Shards, batch_size: int = 32, label_field: str = "json.labels.n_circles",
                 num_classes: int = 7):
        super().__init__(shards, batch_size)
        self.label_field, self.num_classes = label_field, num_classes
        self.fields = ("image", label_field)

    def build(self, backbone) -> None:
        super().build(backbone)
        self.head = nn.Sequential(nn.LayerNorm(backbone.dim), nn.Linear(backbone.dim, self.num_classes))

    def prepare(self, sample: dict, tokenizer) -> Iterator[dict]:
        label = int(sample_field(sample, self.label_field, self.name))
        if not 0 <= label < self.num_classes:
            raise SampleError(f"{sample_location(sample)}: label {label} is outside "
                              f"[0, {self.num_classes}) (model.tasks.{self.name}.init_args.num_classes)")
        yield {"image": self.image_tensor(sample_image(sample, self.name)), "label": label}

    def forward(self, backbone, batch: dict) -> dict[str, torch.Tensor]:
        logits = self.head(backbone(image=batch["image"]).image_pooled)  # (B, K)
        return {"loss": F.cross_entropy(logits, batch["label"]), "logits": logits}

    def metrics(self) -> MetricCollection:
        return MetricCollection({"acc": MulticlassAccuracy(self.num_classes, average="micro")})

    def update_metrics(self, metrics: MetricCollection, outputs: dict, batch: dict) -> None:
        metrics["acc"].update(outputs["logits"].argmax(-1), batch["label"])
