"""Visual question answering as classification over a fixed answer vocabulary.

Data contract: an image entry and a JSON entry with ``questions``: a list of
``{"question": str, "answer": str, "relational": bool}`` (the Sort-of-CLEVR layout of Santoro et
al. 2017). An example is one image with its questions, so the image is encoded once however many
questions it has; ``batch_size`` counts images. The head reads the fused (text-attends-to-image)
pooled feature. Accuracy is reported overall and separately for relational and non-relational
questions.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from mmlit.data.decode import SampleError, sample_field, sample_image, sample_location
from mmlit.data.sort_of_clevr import ANSWERS
from mmlit.registry import register_task
from mmlit.tasks.base import Shards, Task, collate_examples, stack_tensors

__all__ = ["VQA"]


@register_task("vqa")
class VQA(Task):
    """Answer questions about an image (image + question -> answer class).

    Args:
        answers: the answer vocabulary, one class each.
        hidden: width of the answer MLP.
    """

    fields = ("image", "json.questions")
    needs = ("text_encoder", "fusion")

    def __init__(self, shards: Shards, batch_size: int = 8, answers: list[str] = list(ANSWERS),
                 hidden: int = 256):
        super().__init__(shards, batch_size)
        self.answers, self.hidden = list(answers), hidden
        self._answer_index = {a: i for i, a in enumerate(self.answers)}

    def build(self, backbone) -> None:
        super().build(backbone)
        self.head = nn.Sequential(nn.Linear(backbone.dim, self.hidden), nn.GELU(), nn.Linear(self.hidden, len(self.answers)))

    def prepare(self, sample: dict, tokenizer) -> Iterator[dict]:
        questions = sample_field(sample, "json.questions", self.name)
        for q in questions:
            if q["answer"] not in self._answer_index:
                raise SampleError(f"{sample_location(sample)}: answer {q['answer']!r} is "
                                  f"not in the task's answers (model.tasks.{self.name}.init_args.answers)")
        if questions:
            yield {"image": self.image_tensor(sample_image(sample, self.name)),
                   "question": [self.token_ids(tokenizer, q["question"]) for q in questions],
                   "answer": [self._answer_index[q["answer"]] for q in questions],
                   "relational": [bool(q.get("relational", False)) for q in questions]}

    def collate(self, examples: list[dict]) -> dict[str, Any]:
        """Images (B, 3, H, W); questions flattened over images: question (Q, T), answer, relational and
        image_index (Q,)."""
        flat = [{"question": q, "answer": a, "relational": r, "image_index": i}
                for i, e in enumerate(examples) for q, a, r in zip(e["question"], e["answer"], e["relational"])]
        return {"image": stack_tensors([e["image"] for e in examples]), **collate_examples(flat)}

    def forward(self, backbone, batch: dict) -> dict[str, torch.Tensor]:
        features = backbone(image=batch["image"], text=batch["question"], image_index=batch["image_index"])
        logits = self.head(features.fused_pooled)  # (Q, A)
        return {"loss": F.cross_entropy(logits, batch["answer"]), "logits": logits}

    def metrics(self) -> MetricCollection:
        n = len(self.answers)
        return MetricCollection({name: MulticlassAccuracy(n, average="micro") for name in ("acc", "acc_rel", "acc_nonrel")})

    def update_metrics(self, metrics: MetricCollection, outputs: dict, batch: dict) -> None:
        pred, target, rel = outputs["logits"].argmax(-1), batch["answer"], batch["relational"]
        metrics["acc"].update(pred, target)
        for key, subset in (("acc_rel", rel), ("acc_nonrel", ~rel)):
            if subset.any():  # torchmetrics cannot take an empty update
                metrics[key].update(pred[subset], target[subset])
