"""Image-only classification from the backbone's pooled image feature.

Data contract: an image entry and a label (``cls`` by default, the WebDataset layout that ``mmlit data convert
folder`` and ``table`` write): a class index, or a class name looked up in ``classes``. ``classes`` is the list of
class names, or the ``classes.json`` a converter wrote. Reports top-1 accuracy (``acc``) and, with more than five
classes, top-5 (``acc_top5``); ``mmlit predict`` writes the class name and its probability.
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from mmlit.data import Shards, TaskData
from mmlit.data.fields import class_index, names_from
from mmlit.data.transforms import ImageTransform
from mmlit.registry import register_task
from mmlit.tasks.base import Task

__all__ = ["ImageClassification", "ImageClassificationData"]


class ImageClassificationData(TaskData):
    """Images and their class indices (the arguments are ``ImageClassification``'s)."""

    reads = ("image",)

    def __init__(self, shards: Shards, batch_size: int, label_field: str, classes: list[str], transform: ImageTransform):
        super().__init__(shards, batch_size, {"image": transform})
        self.label_field, self.classes, self.fields = label_field, classes, ("image", label_field)
        self._index = {name: i for i, name in enumerate(classes)}

    def prepare(self, sample: dict, tokenizer) -> Iterator[dict]:
        value = self.label(sample, self.label_field, None)
        label = -100 if value is None else class_index(value, self.classes, self._index, sample,
                                                       f"model.tasks.{self.name}.init_args.classes")
        yield {"image": self.image(sample), "label": label}  # (-100: unlabelled)


@register_task("image_classification")
class ImageClassification(Task):
    """Predict a class from the image alone.

    Args:
        label_field: the entry (or ``json.path``) that holds the label: a class index or a class name.
        classes: the class names, or the path of a JSON list of them (``classes.json``).
        num_classes: instead of ``classes``, the number of classes (labels are indices; predictions name indices).
        transform: the image pipeline (RandomResizedCrop, flip, colour jitter by default).
    """

    modalities = ("image",)

    def __init__(self, shards: Shards, batch_size: int = 32, label_field: str = "cls", classes: str | list[str] | None = None,
                 num_classes: int | None = None, transform: ImageTransform | None = None):
        key = f"model.tasks.{getattr(self, 'task_name', 'image_classification')}.init_args"
        if (classes is None) == (num_classes is None):
            raise ValueError(f"{key}: give classes (names, or a classes.json) or num_classes, one of them")
        names = names_from(classes, f"{key}.classes") if classes is not None else [str(i) for i in range(num_classes)]
        if len(names) < 2:
            raise ValueError(f"{key}: a classifier needs at least 2 classes, got {len(names)}")
        super().__init__(ImageClassificationData(shards, batch_size, label_field, names, transform or ImageTransform()))
        self.classes = names

    def build(self, backbone) -> None:
        super().build(backbone)
        self.head = nn.Sequential(nn.LayerNorm(backbone.dim), nn.Linear(backbone.dim, len(self.classes)))

    def forward(self, backbone, batch: dict) -> dict[str, torch.Tensor]:
        logits = self.head(backbone(image=batch["image"])["image"].pooled)  # (B, K)
        return {"loss": F.cross_entropy(logits, batch["label"]), "logits": logits}

    def metrics(self) -> MetricCollection:
        n = len(self.classes)
        metrics = {"acc": MulticlassAccuracy(n, average="micro")}
        if n > 5:
            metrics["acc_top5"] = MulticlassAccuracy(n, top_k=5, average="micro")
        return MetricCollection(metrics)

    def update_metrics(self, metrics: MetricCollection, outputs: dict, batch: dict) -> None:
        for metric in metrics.values():
            metric.update(outputs["logits"], batch["label"])

    def predict(self, outputs: dict, batch: dict, tokenizer) -> list[dict]:
        score, label = outputs["logits"].float().softmax(-1).max(-1)
        return [{"key": k, "prediction": self.classes[i], "score": round(p, 6)}
                for k, i, p in zip(batch["key"], label.tolist(), score.tolist())]
