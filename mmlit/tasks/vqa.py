"""Visual question answering as classification over an answer vocabulary (Antol et al. 2015; the soft targets of
Teney et al. 2018).

Data contract: an image entry and its questions at ``questions_field`` (``json.questions``): a list of questions
(many per image, the ``mmlit data convert vqa`` and Sort-of-CLEVR layout) or one question (a JSON object: one per
sample, as a table row would be). A question is ``{"question": str, "answers": [human answers], "answer": str,
"answer_type": str, "relational": bool}``; ``answers`` (VQAv2's ten) or ``answer`` is needed for training.

An example is one image with its questions, so the image is encoded once however many it has; ``batch_size``
counts images. The head reads the fused pooled feature. The target of a question is each answer's VQA accuracy
(``min(#humans who gave it / 3, 1)`` over the 10 subsets of 9) over the answer vocabulary, normalised: cross-entropy
with it is cross-entropy with the answer when there is one answer. Questions whose answers are all outside the
vocabulary take no part in the loss and score 0 in ``acc``.

``acc`` is the official VQA accuracy (``vqaEval.py``): the predicted answer (a vocabulary entry, normalised) is
compared with the human answers as written when all of them agree, and after normalising them (``normalize_answer``)
when they do not, so a prediction "2" scores 0 against ten "two"s, as it does in the official evaluation. A question
with one answer (Sort-of-CLEVR, most users' data) is scored by exact match after normalising, where the official
leave-one-out formula would give every answer 0. With ``normalize: false`` answers are compared as written
throughout. With ``answer_types`` also ``acc_{type}`` per
answer type, with ``relational`` the Sort-of-CLEVR split ``acc_rel`` / ``acc_nonrel``.
"""

from __future__ import annotations

import re
from typing import Any, Iterator, Literal

import torch
from torch import nn
from torchmetrics import MeanMetric, MetricCollection

from mmlit.data import Shards, TaskData
from mmlit.data.collate import collate_examples, flatten_items, pad
from mmlit.data.decode import SampleError, sample_field, sample_location
from mmlit.data.fields import names_from
from mmlit.data.transforms import ImageTransform, text_safe, training_sample
from mmlit.metrics.vqa import normalize_answer, soft_accuracy, soft_scores, update_subsets
from mmlit.modalities.audio import AudioTransform
from mmlit.registry import register_task
from mmlit.tasks.base import Task

__all__ = ["VQA", "VQAData"]

_NO_ANSWER = -2  # padding of a question's human answers (-1: an answer outside the vocabulary)


def _written(answer: str) -> str:
    """An answer as the official evaluation reads it before any normalisation."""
    return answer.replace("\n", " ").replace("\t", " ").strip()


def _type_key(answer_type: str) -> str:
    """The metric name of an answer type's accuracy: ``yes/no`` -> ``acc_yes_no``."""
    return "acc_" + re.sub(r"\W+", "_", answer_type).strip("_")


class VQAData(TaskData):
    """Images (or clips) with their questions (texts or spoken), answer ids and soft targets (the arguments are
    ``VQA``'s)."""

    def __init__(self, shards: Shards, answers: list[str], batch_size: int, questions_field: str,
                 answer_types: list[str], normalize: bool, transform: ImageTransform, visual: str = "image",
                 spoken: bool = False, audio_transform: AudioTransform | None = None, type_key: str = "answer_type"):
        super().__init__(shards, batch_size, {visual: transform, "audio": audio_transform})
        self.visual, self.asked = visual, "audio" if spoken else "text"  # the modalities of the scene and question
        self.reads = (visual, self.asked)
        self.normalize, self.questions_field, self.type_key = normalize, questions_field, type_key
        self.fields = (visual, questions_field, *(("audio",) if spoken else ()))
        self.answers = [normalize_answer(a) if normalize else a for a in answers]
        self._answer_index = {a: i for i, a in enumerate(self.answers)}
        # how the official evaluation finds a prediction among the human answers: as written (stripped) when they
        # agree, normalised when they do not
        self._written_index = {_written(a): i for i, a in reversed(list(enumerate(self.answers)))}
        self._normalized_index = {normalize_answer(a): i for i, a in reversed(list(enumerate(self.answers)))}
        self._type_index = {t: i for i, t in enumerate(answer_types)}

    def _scored_ids(self, written: list[str]) -> list[int]:
        """The vocabulary entry that each human answer matches in the official evaluation (-1: none), so that
        ``soft_accuracy`` on ids gives its score."""
        if not self.normalize:
            return [self._answer_index.get(a, -1) for a in written]
        stripped = [_written(a) for a in written]
        if len(stripped) > 1 and len(set(stripped)) == 1:
            return [self._written_index.get(a, -1) for a in stripped]
        return [self._normalized_index.get(normalize_answer(a), -1) for a in stripped]

    def _question(self, q: Any, sample: dict, number: int, tokenizer) -> dict:
        if not isinstance(q, dict) or not isinstance(q.get("question"), str):
            raise SampleError(f"{sample_location(sample)}: question {number} of '{self.questions_field}' needs a "
                              f"\"question\" text")
        written = q.get("answers") if isinstance(q.get("answers"), list) else [q["answer"]] if "answer" in q else []
        written = [str(a) for a in written]
        human = [normalize_answer(a) if self.normalize else a for a in written]
        target = [(self._answer_index[a], score) for a, score in soft_scores(human).items() if a in self._answer_index]
        if self.asked == "audio" and not isinstance(q.get("audio"), str):
            raise SampleError(f"{sample_location(sample)}: spoken question {number} of '{self.questions_field}' needs "
                              f"\"audio\", the name of its entry (question0.flac)")
        asked = self.entry(sample, q["audio"], "audio") if self.asked == "audio" \
            else self.token_ids(tokenizer, q["question"])
        return {"question": asked,
                "answers": self._scored_ids(written) or [_NO_ANSWER],
                "target_index": [i for i, _ in target] or [-1], "target_score": [s for _, s in target] or [0.0],
                "question_id": q["question_id"] if isinstance(q.get("question_id"), int) else number,
                "answer_type": self._type_index.get(q.get(self.type_key), -1),
                "relational": bool(q.get("relational", False))}

    def prepare(self, sample: dict, tokenizer) -> Iterator[dict]:
        questions = sample_field(sample, self.questions_field, self.name)
        questions = [questions] if isinstance(questions, dict) else questions
        if not isinstance(questions, list):
            raise SampleError(f"{sample_location(sample)}: '{self.questions_field}' must be a question or a list of them")
        items = [self._question(q, sample, i, tokenizer) for i, q in enumerate(questions)]
        if training_sample() and not any(i["target_score"][0] > 0 for i in items):
            return  # nothing to learn from this image: no answer in the vocabulary
        if items:
            yield {self.visual: self.input(sample, self.visual), "questions": items}

    def collate(self, examples: list[dict]) -> dict[str, Any]:
        """Images (B, 3, H, W) (or clips, under ``video``); questions flattened over images: question (Q, T) token ids
        (or spoken: a ``Padded`` batch of spectrograms), answers (Q, K) human answer ids, target_index / target_score
        (Q, J) the soft target, question_id, answer_type, relational, image_index (Q,), key (Q).

        Written questions come once each: ``question`` holds the batch's distinct questions (U, T) and
        ``question_index`` (Q,) each question's row in it, so a question asked of several images (Sort-of-CLEVR asks 36
        distinct questions in all: a batch of 16 images and 320 questions has at most 36) goes through the text encoder
        once, as an image asked several questions does through the image encoder. (Another task reading the same
        shards with the same batch size no longer shares its question tensor with this one: each encodes its own.)"""
        flat = flatten_items(examples, "questions")
        padded = {"answers": (_NO_ANSWER, torch.long), "target_index": (-1, torch.long), "target_score": (0.0, torch.float)}
        batch = collate_examples([{k: v for k, v in q.items() if k not in padded and k != "question"} for q in flat])
        for name, (value, dtype) in padded.items():
            batch[name] = pad([q[name] for q in flat], value, dtype)
        questions = [q["question"] for q in flat]
        if self.asked == "text":
            distinct: dict[tuple[int, ...], int] = {}
            batch["question_index"] = torch.tensor([distinct.setdefault(tuple(q), len(distinct)) for q in questions],
                                                   dtype=torch.long)
            questions = [list(q) for q in distinct]
        batch["question"] = self.collate_input(self.asked, questions)
        return {self.visual: self.collate_input(self.visual, [e[self.visual] for e in examples]), **batch}


@register_task("vqa")
class VQA(Task):
    """Answer questions about an image or a clip, written or spoken (image + question -> answer class).

    Args:
        answers: the answer vocabulary, or the path of a JSON list of it (``mmlit data answers`` writes one).
        questions_field: the entry (or ``json.path``) holding a sample's question(s).
        answer_types: report accuracy per answer type (``acc_{type}``) for these types (VQAv2: yes/no, number, other).
        type_key: the key of a question's type (VQAv2's ``answer_type``; ``type``: per question type, as MUSIC-AVQA
            reports, e.g. Sort-of-CLEVR's motion questions' direction, fastest, closest_end).
        relational: report accuracy on relational and non-relational questions (``relational`` in each question;
            Sort-of-CLEVR).
        normalize: normalise answers for the vocabulary and targets (lower case, no punctuation or articles, number
            words as digits) and score them as the official VQA evaluation does; off for vocabularies whose answers
            must stay as written.
        hidden: width of the answer MLP.
        transform: the image pipeline (crops without flips or colour changes by default: questions ask about
            left, right and colours), of each frame for ``visual: video``.
        visual: what questions are asked about: ``image`` or ``video`` (a clip: video question answering).
        spoken: the questions are spoken: each question names its audio entry (``"audio": "question0.flac"``),
            which the audio encoder reads instead of the text (``question`` is then only its transcript).
        audio_transform: the augmentation of spoken questions in training (SpecAugment masks, gain, time shift).
        relational_after: a curriculum: for this many optimizer steps only the non-relational questions
            (``relational: false``; a question without the key is one) take part in the training loss, so that a
            question first learns to find the object it names; relational questions join after it. They are still
            encoded and scored meanwhile. What it did on Sort-of-CLEVR: ``docs/results.md#seeds``.
    """

    fuses = True

    def __init__(self, shards: Shards, answers: str | list[str], batch_size: int = 8,
                 questions_field: str = "json.questions", answer_types: list[str] | None = None, relational: bool = False,
                 normalize: bool = True, hidden: int = 256, transform: ImageTransform | None = None,
                 visual: Literal["image", "video"] = "image", spoken: bool = False,
                 audio_transform: AudioTransform | None = None, type_key: str = "answer_type", relational_after: int = 0):
        vocabulary = names_from(answers, f"model.tasks.{getattr(self, 'task_name', 'vqa')}.init_args.answers")
        super().__init__(VQAData(shards, vocabulary, batch_size, questions_field, list(answer_types or []), normalize,
                                 transform or text_safe(), visual, spoken, audio_transform or AudioTransform(),
                                 type_key))
        self.modalities = self.data.reads
        self.answer_types, self.relational, self.hidden = list(answer_types or []), relational, hidden
        if relational_after < 0:
            raise ValueError(f"model.tasks.{self.name}.init_args.relational_after must be >= 0, got {relational_after}")
        self.relational_after = relational_after

    def build(self, backbone) -> None:
        super().build(backbone)
        self.head = nn.Sequential(nn.Linear(backbone.dim, self.hidden), nn.GELU(),
                                  nn.Linear(self.hidden, len(self.data.answers)))

    def forward(self, backbone, batch: dict) -> dict[str, torch.Tensor]:
        visual, asked = self.data.visual, self.data.asked
        rows = {visual: batch["image_index"]}
        if "question_index" in batch:  # (written questions: each distinct one once)
            rows[asked] = batch["question_index"]
        features = backbone(**{visual: batch[visual], asked: batch["question"]}, index=rows)
        logits = self.head(features.fused.pooled)  # (Q, A)
        index = batch["target_index"]  # (Q, J): each question's answers in the vocabulary and their scores
        target = logits.new_zeros(logits.shape, dtype=torch.float32).scatter_add_(
            1, index.clamp(min=0), batch["target_score"].float() * (index >= 0))
        mass = target.sum(1, keepdim=True)
        learn = (mass[:, 0] > 0).float()  # questions with a known answer; a mask, not an index: no host read
        if self.training and self.global_step < self.relational_after:
            learn = learn * ~batch["relational"]  # the curriculum's first steps: non-relational questions only
        per_question = -(target / mass.clamp(min=1e-12) * logits.float().log_softmax(-1)).sum(-1)
        loss = (per_question * learn).sum() / learn.sum().clamp(min=1.0)  # (none: 0, every head parameter in the graph)
        return {"loss": loss, "logits": logits}

    def metrics(self) -> MetricCollection:
        names = ["acc", *map(_type_key, self.answer_types)]
        if self.relational:
            names += ["acc_rel", "acc_nonrel"]
        return MetricCollection({name: MeanMetric() for name in names})

    def update_metrics(self, metrics: MetricCollection, outputs: dict, batch: dict) -> None:
        accuracy = soft_accuracy(outputs["logits"].argmax(-1), batch["answers"], _NO_ANSWER)
        rel = batch["relational"]
        subsets = {"acc": torch.ones_like(rel), **{_type_key(t): batch["answer_type"] == i for i, t in enumerate(self.answer_types)},
                   **({"acc_rel": rel, "acc_nonrel": ~rel} if self.relational else {})}
        update_subsets(metrics, accuracy, subsets)

    def predict(self, outputs: dict, batch: dict, tokenizer) -> list[dict]:
        score, answer = outputs["logits"].float().softmax(-1).max(-1)
        return [{"key": k, "question_id": q, "prediction": self.data.answers[a], "score": round(p, 6)}
                for k, q, a, p in zip(batch["key"], batch["question_id"].tolist(), answer.tolist(), score.tolist())]
