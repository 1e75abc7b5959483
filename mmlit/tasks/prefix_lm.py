"""A small multimodal language model: a GPT-style decoder reads image tokens as a prefix and answers
questions or writes captions by generation.

The image tokens pass through a mapping network (ClipCap, Mokady et al. 2021) and prefix the text of a
``CausalTextDecoder`` (the backbone's text encoder), which attends to the whole prefix and causally
to the text (a prefix LM, SimVLM, Wang et al. 2022). Training is next-token prediction on the
target only: ``question [BOS] answer [EOS]`` (``target: answer``) or ``[BOS] caption [EOS]``
(``target: caption``). Evaluation decodes after ``[BOS]`` (greedily, or with beam search: ``beam_size``; the helper
of ``mmlit/models/generation.py`` that captioning uses too) and scores the whole generated sequence: answer accuracy
(exact match; with ``relational``, also on relational and non-relational questions), or the caption metrics of
``captioning`` against the caption.

Data contract: an image entry and its questions at ``questions_field`` (the ``vqa`` layout: each with ``question``
and ``answer``), or a caption at ``caption_field`` (``txt`` by default).
"""

from __future__ import annotations

import random
from typing import Any, Iterator, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MetricCollection

from mmlit.data import Shards, TaskData
from mmlit.data.collate import collate_examples, flatten_items, pad, pad_references
from mmlit.data.fields import captions_of, questions_of
from mmlit.data.transforms import ImageTransform, text_safe, training_sample
from mmlit.metrics.caption import sequence_match, tokens_of, update_caption_metrics
from mmlit.metrics.vqa import generated_answer_metrics, update_generated_answers
from mmlit.models.generation import generate
from mmlit.models.text import CausalTextDecoder
from mmlit.registry import register_task
from mmlit.tasks.base import Task
from mmlit.text import BOS, EOS, PAD

__all__ = ["PrefixLM", "PrefixLMData"]


class PrefixLMData(TaskData):
    """Images with prompt [BOS] target sequences (the arguments are ``PrefixLM``'s)."""

    reads = ("image", "text")

    def __init__(self, shards: Shards, batch_size: int, target: str, caption_field: str, questions_field: str,
                 transform: ImageTransform):
        super().__init__(shards, batch_size, {"image": transform})
        self.target, self.caption_field, self.questions_field = target, caption_field, questions_field
        self.fields = ("image", questions_field if target == "answer" else caption_field)

    def _sequence(self, prompt: list[int], target: list[int]) -> dict:
        """prompt [BOS] target -> inputs, labels (next tokens on the target only), and the prompt for generation;
        cut to the decoder's ``max_length`` once bound to a model (uncut before)."""
        length = self.pipeline("text").max_length
        if length is not None:
            target = target[: length - 1 - min(len(prompt), length // 2)]  # a long answer keeps a question
            prompt = prompt[: length - 1 - len(target)]
        return {"input": [*prompt, BOS, *target], "labels": [PAD] * len(prompt) + [*target, EOS],
                "prompt": [*prompt, BOS]}

    def prepare(self, sample: dict, tokenizer) -> Iterator[dict]:
        image = self.image(sample)
        if self.target == "caption":
            captions = [self.token_ids(tokenizer, c) for c in captions_of(sample, self.caption_field, self.name) or [""]]
            if training_sample():
                yield {"image": image, "sequences": [self._sequence([], random.choice(captions))]}
            else:  # the first caption for the loss, every one as a reference
                yield {"image": image, "sequences": [self._sequence([], captions[0])],
                       "references": [[*c, EOS] for c in captions]}
            return
        sequences = [{**self._sequence(self.token_ids(tokenizer, question), self.token_ids(tokenizer, answer)),
                      "relational": bool(q.get("relational", False))}
                     for question, answer, q in questions_of(sample, self.questions_field, self.name)]
        if sequences:
            yield {"image": image, "sequences": sequences}

    def collate(self, examples: list[dict]) -> dict[str, Any]:
        """Images (B, 3, H, W); sequences flattened over images: input and labels (Q, T) padded on the right,
        prompt (Q, P) padded on the left (so that generation appends to every row at once), relational and
        image_index (Q,); for captions on evaluation, references (B, R, T) (every caption, EOS-ended)."""
        flat = flatten_items(examples, "sequences")
        prompts = [row.pop("prompt") for row in flat]
        batch = collate_examples(flat)
        batch["prompt"] = pad(prompts, left=True)
        if "references" in examples[0]:
            batch["references"] = pad_references([e["references"] for e in examples])
        return {"image": self.collate_input("image", [e["image"] for e in examples]), **batch}  # images first: batch_size_of counts them


@register_task("prefix_lm")
class PrefixLM(Task):
    """Answer questions or caption images by generation (image prefix + causal text decoder).

    Args:
        target: ``answer`` the image's questions, or write its ``caption``.
        caption_field: the entry holding the caption (``target: caption``).
        questions_field: the entry holding the questions (``target: answer``).
        relational: report accuracy on relational and non-relational questions (Sort-of-CLEVR).
        beam_size: hypotheses kept by beam search on evaluation (1: greedy).
        length_penalty: beam search ranks hypotheses by log-probability / length ** length_penalty.
        transform: the image pipeline (crops without flips or colour changes by default).
    """

    reads_backbone_outputs = False  # (it runs the text encoder's layers itself)

    modalities = ("image", "text")

    def __init__(self, shards: Shards, batch_size: int = 8, target: Literal["answer", "caption"] = "answer",
                 caption_field: str = "txt", questions_field: str = "json.questions", relational: bool = False,
                 beam_size: int = 1, length_penalty: float = 0.0, transform: ImageTransform | None = None):
        super().__init__(PrefixLMData(shards, batch_size, target, caption_field, questions_field,
                                      transform or text_safe()))
        if beam_size < 1:
            raise ValueError(f"model.tasks.{self.name}.init_args.beam_size must be at least 1, got {beam_size}")
        self.target, self.relational, self.beam_size, self.length_penalty = target, relational, beam_size, length_penalty

    def build(self, backbone) -> None:
        super().build(backbone)
        if not isinstance(backbone.encoders["text"], CausalTextDecoder):
            raise ValueError(f"model.tasks.{self.name}: prefix_lm needs model.backbone.init_args.encoders.text to be "
                             f"mmlit.models.CausalTextDecoder, got {type(backbone.encoders['text']).__name__}")
        dim = backbone.dim
        self.prefix = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim))  # the mapping network
        self.out = nn.Linear(dim, backbone.vocab_size)

    def forward(self, backbone, batch: dict) -> dict[str, torch.Tensor]:
        prefix = self.prefix(backbone(image=batch["image"])["image"].tokens)[batch["image_index"]]  # (Q, N, D)
        tokens, _, _ = backbone.encoders["text"](batch["input"], prefix=prefix)  # (Q, T, D)
        logits = self.out(tokens)
        out = {"loss": F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=PAD)}
        if not self.training:
            decoder, prompt = backbone.encoders["text"], batch["prompt"]
            room = decoder.max_length - prompt.shape[1] + 1  # the last step reads max_length tokens
            steps = room if "references" in batch else min(batch["labels"].shape[1], room)
            out["generated"], out["score"] = generate(
                lambda ids, rows: self.out(decoder(ids, prefix=prefix[rows])[0][:, -1]), prompt, steps,
                beam_size=self.beam_size, length_penalty=self.length_penalty)
        return out

    def metrics(self) -> MetricCollection:
        return generated_answer_metrics(self.target, self.relational)

    def update_metrics(self, metrics: MetricCollection, outputs: dict, batch: dict) -> None:
        if self.target == "caption":
            update_caption_metrics(metrics, outputs["generated"], batch["references"])
            return
        labels = batch["labels"]  # the answer left-aligned: move the prompt's PADs behind it
        reference = labels.gather(1, (labels == PAD).int().argsort(dim=1, stable=True))
        exact = sequence_match(outputs["generated"], reference)[0].float()
        update_generated_answers(metrics, exact, batch["relational"])

    def predict(self, outputs: dict, batch: dict, tokenizer) -> list[dict]:
        rows, number = [], {}
        for key, tokens, score in zip(batch["key"], tokens_of(outputs["generated"]), outputs["score"].tolist()):
            row = {"key": key, "prediction": tokenizer.decode(tokens), "score": round(score, 6)}
            if self.target == "answer":
                row["question_index"] = number[key] = number.get(key, -1) + 1
            rows.append(row)
        return rows
