"""CLIP-style image-text contrastive learning, retrieval evaluation and zero-shot classification.

Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision": image and caption
embeddings are projected to a shared space, L2-normalised, and trained with a symmetric InfoNCE loss at a learnable
temperature. Evaluation reports retrieval recall@1/5/10 in both directions over the whole split, gathered across
ranks, with every caption of an image (the COCO 5k protocol; ``mmlit/metrics/retrieval.py``). With ``zero_shot``, the
model also classifies the images of classification shards by the class whose prompts (``a photo of a {}.``, averaged
over the templates, as CLIP does) its image embedding is closest to: ``zero_shot_top1`` and ``zero_shot_top5``. Those
shards are an evaluation source of the task's data side: their batches come to this head under the task's name.

Data contract: an image entry and its caption(s) at ``caption_field``: a text (``txt``) or a list of texts
(``json.captions``). A training sample takes one caption, drawn anew each epoch (seeded).

Any two modalities pair the same way (``pair``): a clip and its captions (video-text retrieval), an image and its
spoken caption (speech-image retrieval, as DAVEnet, Harwath et al. 2018): the first modality is the sample's entry of
it, the second its captions at ``caption_field`` (texts), or, for another modality, the entry ``caption_field`` names
(``flac``). The projections keep their names: ``image_proj`` for the first, ``text_proj`` for the second.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric, MetricCollection

from mmlit.data import Shards, TaskData
from mmlit.data.collate import collate_examples, flatten_items
from mmlit.data.decode import sample_field
from mmlit.data.fields import captions_of, class_index, names_from
from mmlit.data.transforms import ImageTransform, text_safe, training_sample
from mmlit.metrics.retrieval import RetrievalRecall
from mmlit.modalities.audio import AudioTransform
from mmlit.registry import get_modality, register_task
from mmlit.tasks.base import Task
from mmlit.text import UNK

__all__ = ["Contrastive", "ContrastiveData", "ZeroShot", "ZeroShotData"]


@dataclass
class ZeroShot:
    """Zero-shot classification of a contrastive model on classification shards.

    Args:
        shards: the classification shards per split (``val``, ``test``), e.g. those of ``mmlit data convert folder``.
        classes: the class names, or the path of their JSON list (``classes.json``).
        templates: prompts with ``{}`` for the class name; a class's text embedding is the mean over them.
        label_field: the entry holding each sample's label (an index or a class name).
        batch_size: images per batch.
    """

    shards: Shards
    classes: str | list[str]
    templates: list[str] = field(default_factory=lambda: ["a photo of a {}."])
    label_field: str = "cls"
    batch_size: int = 64


class ZeroShotData(TaskData):
    """The zero-shot shards of a contrastive task (an evaluation source): images, prepared as the task's evaluation
    images, and their labels."""

    reads = ("image",)

    def __init__(self, owner: ContrastiveData, settings: ZeroShot, classes: list[str]):
        super().__init__(settings.shards, settings.batch_size, owner.transforms)
        self.name, self.inputs, self.classes, self.label_field = owner.name, owner.inputs, classes, settings.label_field
        self.fields = ("image", settings.label_field)
        self._index = {c: i for i, c in enumerate(classes)}

    @property
    def key(self) -> str:
        return f"model.tasks.{self.name}.init_args.zero_shot.shards"

    def prepare(self, sample: dict, tokenizer) -> Iterator[dict]:
        label = class_index(sample_field(sample, self.label_field, self.name), self.classes, self._index, sample,
                            f"model.tasks.{self.name}.init_args.zero_shot.classes")
        yield {"image": self.image(sample), "zero_shot_label": label}


class ContrastiveData(TaskData):
    """Images (or the first modality of ``pair``) and their captions (the arguments are ``Contrastive``'s)."""

    def __init__(self, shards: Shards, batch_size: int, caption_field: str, transform: ImageTransform,
                 zero_shot: ZeroShot | None, classes: list[str], pair: tuple[str, str] = ("image", "text"),
                 audio_transform: AudioTransform | None = None):
        super().__init__(shards, batch_size, {pair[0]: transform, "audio": audio_transform})
        self.caption_field, self.zero_shot, self.classes = caption_field, zero_shot, classes
        self.item, self.said, self.reads, self.fields = pair[0], pair[1], tuple(pair), (pair[0], caption_field)

    def evaluation_sources(self) -> list[TaskData]:
        return [ZeroShotData(self, self.zero_shot, self.classes)] if self.zero_shot is not None else []

    def prepare(self, sample: dict, tokenizer) -> Iterator[dict]:
        if self.said == "text":
            captions = [self.token_ids(tokenizer, c) for c in captions_of(sample, self.caption_field, self.name)]
            chosen = [random.choice(captions)] if training_sample() else captions or [[UNK]]  # (UNK: none, predicting)
        else:
            captions = chosen = [self.entry(sample, self.caption_field, self.said)]
        yield {self.item: self.input(sample, self.item), "captioned": bool(captions),
               "captions": [{"caption": c} for c in chosen]}

    def collate(self, examples: list[dict]) -> dict[str, Any]:
        """image (B, 3, H, W) (or the first modality's batch, under its name), captioned (B,); captions flattened over
        images: caption (C, T) (or the second modality's batch), image_index (C,), key (C) (C = B in training: one
        caption each)."""
        flat = flatten_items(examples, "captions")
        return {self.item: self.collate_input(self.item, [e[self.item] for e in examples]),
                "captioned": torch.tensor([e["captioned"] for e in examples]),
                "caption": self.collate_input(self.said, [c["caption"] for c in flat]),
                **collate_examples([{k: v for k, v in c.items() if k != "caption"} for c in flat])}


@register_task("contrastive")
class Contrastive(Task):
    """Align images and their captions, or any two modalities (symmetric InfoNCE, learnable temperature; retrieval
    and zero-shot evaluation).

    Args:
        caption_field: the entry (or ``json.path``) holding the caption, or a list of captions.
        embed_dim: width of the shared embedding space.
        init_temperature: the softmax temperature at the start (CLIP: 0.07); learned, capped at 1/100.
        zero_shot: classification shards to classify zero-shot on evaluation.
        transform: the image pipeline (crops without flips or colour changes by default, as the other tasks that read
            text: tasks on one source with one pipeline share each image's pass); each frame's, for a video.
        pair: the two modalities aligned: the sample's entry of the first (``image``, ``video``, ``audio``) with the
            captions of the second (``text``; or ``audio``: the entry ``caption_field`` names, a spoken caption).
        audio_transform: the augmentation of audio in training.
    """

    def __init__(self, shards: Shards, batch_size: int = 32, caption_field: str = "txt", embed_dim: int = 128,
                 init_temperature: float = 0.07, zero_shot: ZeroShot | None = None,
                 transform: ImageTransform | None = None, pair: tuple[str, str] = ("image", "text"),
                 audio_transform: AudioTransform | None = None):
        name = getattr(self, "task_name", "contrastive")
        if len(pair) != 2 or pair[0] == pair[1]:
            raise ValueError(f"model.tasks.{name}.init_args.pair: two different modalities, got {list(pair)}")
        if pair[1] != "text" and caption_field.rsplit(".", 1)[-1] not in get_modality(pair[1]).extensions:
            raise ValueError(f"model.tasks.{name}.init_args.caption_field: the {pair[1]} captions are an entry of that "
                             f"modality ({', '.join(sorted(get_modality(pair[1]).extensions))}: flac, caption.flac), "
                             f"got {caption_field!r}")
        if zero_shot is not None and tuple(pair) != ("image", "text"):
            raise ValueError(f"model.tasks.{name}.init_args.zero_shot: zero-shot classification pairs images with "
                             f"class prompts; pair is {list(pair)}")
        classes = names_from(zero_shot.classes, f"model.tasks.{name}.init_args.zero_shot.classes") if zero_shot else []
        data = ContrastiveData(shards, batch_size, caption_field, transform or text_safe(), zero_shot, classes,
                               tuple(pair), audio_transform or AudioTransform())
        super().__init__(data)
        self.modalities = self.data.reads
        self.embed_dim, self.zero_shot, self.classes = embed_dim, zero_shot, classes
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / init_temperature)))
        self._class_embeddings: torch.Tensor | None = None  # (K, E), made once per evaluation
        self._prompt_ids: torch.Tensor | None = None  # (K * templates, T), made by setup()

    def build(self, backbone) -> None:
        super().build(backbone)
        self.image_proj = nn.Linear(backbone.dim, self.embed_dim, bias=False)
        self.text_proj = nn.Linear(backbone.dim, self.embed_dim, bias=False)

    def setup(self, tokenizer) -> None:
        if self.zero_shot is not None:  # every class's prompts, (K * templates, T) token ids
            prompts = [self.data.token_ids(tokenizer, t.format(c)) for c in self.classes for t in self.zero_shot.templates]
            # (a plain tensor, not a buffer: DDP would broadcast a buffer before every training step)
            self._prompt_ids = collate_examples([{"ids": p} for p in prompts])["ids"]

    def train(self, mode: bool = True) -> Contrastive:
        self._class_embeddings = None  # the weights change between evaluations (or a checkpoint is loaded)
        return super().train(mode)

    def _scale(self) -> torch.Tensor:
        return self.logit_scale.clamp(max=math.log(100.0)).exp()  # CLIP caps the scale at 100

    def forward(self, backbone, batch: dict) -> dict[str, torch.Tensor]:
        if "zero_shot_label" in batch:
            return self._zero_shot(backbone, batch)
        item, said = self.data.item, self.data.said
        features = backbone(**{item: batch[item], said: batch["caption"]}, fuse=False)
        image = F.normalize(self.image_proj(features[item].pooled), dim=-1)  # (B, E)
        text = F.normalize(self.text_proj(features[said].pooled), dim=-1)  # (C, E)
        first = torch.ones_like(batch["image_index"], dtype=torch.bool)
        first[1:] = batch["image_index"][1:] != batch["image_index"][:-1]  # each image's first caption
        logits = self._scale() * image @ text[first].T  # (B, B)
        target = torch.arange(len(logits), device=logits.device)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        return {"loss": loss, "image_embed": image, "text_embed": text, "temperature": 1.0 / self._scale()}

    @torch.no_grad()
    def _zero_shot(self, backbone, batch: dict) -> dict[str, torch.Tensor]:
        if self._class_embeddings is None:  # in blocks: 1,000 classes x 80 templates are 80,000 prompts
            prompts = self._prompt_ids.to(batch["image"].device)
            text = torch.cat([F.normalize(self.text_proj(backbone(text=ids)["text"].pooled), dim=-1)
                              for ids in prompts.split(1024)])
            per_class = text.view(len(self.classes), -1, text.shape[-1]).mean(1)  # mean over the templates
            self._class_embeddings = F.normalize(per_class, dim=-1)  # (K, E)
        image = F.normalize(self.image_proj(backbone(image=batch["image"])["image"].pooled), dim=-1)
        return {"zero_shot_logits": image @ self._class_embeddings.T}  # (B, K)

    def metrics(self) -> MetricCollection:
        metrics = {"retrieval": RetrievalRecall(self.embed_dim, (1, 5, 10))}
        if self.zero_shot is not None:
            metrics.update(zero_shot_top1=MeanMetric(), zero_shot_top5=MeanMetric())
        return MetricCollection(metrics)

    def update_metrics(self, metrics: MetricCollection, outputs: dict, batch: dict) -> None:
        if "zero_shot_logits" in outputs:
            top = outputs["zero_shot_logits"].topk(min(5, len(self.classes)), dim=-1).indices
            hit = top == batch["zero_shot_label"][:, None]
            metrics["zero_shot_top1"].update(hit[:, 0].float())
            metrics["zero_shot_top5"].update(hit.any(1).float())
            return
        metrics["retrieval"].update(outputs["image_embed"], outputs["text_embed"], batch["image_index"])

    def predict(self, outputs: dict, batch: dict, tokenizer) -> list[dict]:
        """Per image: its embedding, and the cosine with its best-matching caption (CLIP score: a filter of data; none
        for an image without a caption)."""
        if "zero_shot_logits" in outputs:
            score, label = outputs["zero_shot_logits"].max(-1)
            return [{"key": k, "prediction": self.classes[i], "score": round(s, 6)}
                    for k, i, s in zip(batch["key"], label.tolist(), score.tolist())]
        image, text, owner = outputs["image_embed"].float(), outputs["text_embed"].float(), batch["image_index"]
        cosine = (image[owner] * text).sum(-1)
        best = torch.full((len(image),), -1.0, device=image.device).scatter_reduce(0, owner, cosine, "amax")
        keys = dict(zip(owner.tolist(), batch["key"]))  # (the keys come per caption)
        return [{"key": keys[i], "prediction": [round(v, 5) for v in e], "score": round(s, 6) if captioned else None}
                for i, (e, s, captioned) in enumerate(zip(image.tolist(), best.tolist(), batch["captioned"].tolist()))]
