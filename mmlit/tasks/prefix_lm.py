"""A small multimodal language model: a GPT-style decoder reads image tokens as a prefix and answers
questions or writes captions by generation.

The image tokens pass through a mapping network (ClipCap, Mokady et al. 2021) and prefix the text of a
``CausalTextDecoder`` (the backbone's text encoder), which attends to the whole prefix and causally
to the text (a prefix LM, SimVLM, Wang et al. 2022). Training is next-token prediction on the
target only: ``question [BOS] answer [EOS]`` (``target: answer``) or ``[BOS] caption [EOS]``
(``target: caption``). Evaluation decodes greedily after ``[BOS]`` and scores the whole generated
sequence: answer accuracy (overall, relational, non-relational, as ``vqa``), or caption exact match
and token accuracy (as ``captioning``).

Data contract: an image entry and ``json.questions`` (the ``vqa`` layout), or a caption
(``json.caption`` by default).
"""

from __future__ import annotations

from typing import Any, Iterator, Literal

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric, MetricCollection

from mmlit.data.decode import sample_field, sample_image
from mmlit.models.text import CausalTextDecoder
from mmlit.registry import register_task
from mmlit.tasks.base import Shards, Task, collate_examples, stack_tensors
from mmlit.tasks.captioning import sequence_match, update_caption_metrics
from mmlit.text import BOS, EOS, PAD

__all__ = ["PrefixLM"]


@register_task("prefix_lm")
class PrefixLM(Task):
    """Answer questions or caption images by generation (image prefix + causal text decoder).

    Args:
        target: ``answer`` the image's questions, or write its ``caption``.
        caption_field: the sample entry that holds the caption (``target: caption``).
    """

    fields = ("image", "json.questions")
    needs = ("text_encoder",)

    def __init__(self, shards: Shards, batch_size: int = 8, target: Literal["answer", "caption"] = "answer",
                 caption_field: str = "json.caption"):
        super().__init__(shards, batch_size)
        self.target, self.caption_field = target, caption_field
        self.fields = ("image", "json.questions" if target == "answer" else caption_field)

    def build(self, backbone) -> None:
        super().build(backbone)
        if not isinstance(backbone.text_encoder, CausalTextDecoder):
            raise ValueError(f"model.tasks.{self.name}: prefix_lm needs model.backbone.init_args.text_encoder to be "
                             f"mmlit.models.CausalTextDecoder, got {type(backbone.text_encoder).__name__}")
        dim = backbone.dim
        self.prefix = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim))  # the mapping network
        self.out = nn.Linear(dim, backbone.vocab_size)

    def _sequence(self, prompt: list[int], target: list[int]) -> dict:
        """prompt [BOS] target -> inputs, labels (next tokens on the target only), and the prompt for generation."""
        target = target[: self.max_length - 1 - min(len(prompt), self.max_length // 2)]  # a long answer keeps a question
        prompt = prompt[: self.max_length - 1 - len(target)]
        return {"input": [*prompt, BOS, *target], "labels": [PAD] * len(prompt) + [*target, EOS],
                "prompt": [*prompt, BOS]}

    def prepare(self, sample: dict, tokenizer) -> Iterator[dict]:
        image = self.image_tensor(sample_image(sample, self.name))
        if self.target == "caption":
            caption = sample_field(sample, self.caption_field, self.name)
            yield {"image": image, "sequences": [self._sequence([], self.token_ids(tokenizer, caption))],
                   "relational": [False]}
            return
        questions = sample_field(sample, "json.questions", self.name)
        if questions:
            yield {"image": image, "relational": [bool(q.get("relational", False)) for q in questions],
                   "sequences": [self._sequence(self.token_ids(tokenizer, q["question"]),
                                                self.token_ids(tokenizer, q["answer"])) for q in questions]}

    def collate(self, examples: list[dict]) -> dict[str, Any]:
        """Images (B, 3, H, W); sequences flattened over images: input and labels (Q, T) padded on the right,
        prompt (Q, P) padded on the left (so that generation appends to every row at once), relational and
        image_index (Q,)."""
        flat = [{**seq, "relational": rel, "image_index": i}
                for i, e in enumerate(examples) for seq, rel in zip(e["sequences"], e["relational"])]
        prompts = [row.pop("prompt") for row in flat]
        batch = collate_examples(flat)
        batch["prompt"] = torch.full((len(prompts), max(map(len, prompts))), PAD, dtype=torch.long)
        for row, prompt in enumerate(prompts):
            batch["prompt"][row, batch["prompt"].shape[1] - len(prompt):] = torch.tensor(prompt)
        return {"image": stack_tensors([e["image"] for e in examples]), **batch}  # images first: batch_size_of counts them

    def forward(self, backbone, batch: dict) -> dict[str, torch.Tensor]:
        prefix = self.prefix(backbone(image=batch["image"]).image_tokens)[batch["image_index"]]  # (Q, N, D)
        tokens, _, _ = backbone.text_encoder(batch["input"], prefix=prefix)  # (Q, T, D)
        logits = self.out(tokens)
        out = {"loss": F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=PAD)}
        if not self.training:
            out["generated"] = self.generate(backbone.text_encoder, prefix, batch["prompt"], batch["labels"].shape[1])
        return out

    @torch.no_grad()
    def generate(self, decoder: CausalTextDecoder, prefix: torch.Tensor, prompt: torch.Tensor, steps: int) -> torch.Tensor:
        """Greedy decoding after left-padded prompts (Q, P) ending in BOS -> ids (Q, steps), PAD after EOS."""
        ids, done = prompt, torch.zeros(len(prompt), dtype=torch.bool, device=prompt.device)
        steps = min(steps, decoder.max_length - prompt.shape[1] + 1)  # the last step reads max_length tokens
        for _ in range(steps):
            step = self.out(decoder(ids, prefix=prefix)[0][:, -1]).argmax(-1)
            step = torch.where(done, torch.full_like(step, PAD), step)
            ids = torch.cat([ids, step[:, None]], dim=1)
            done |= step == EOS
            if done.all():
                break
        return ids[:, prompt.shape[1]:]

    def metrics(self) -> MetricCollection:
        names = ("acc", "acc_rel", "acc_nonrel") if self.target == "answer" else ("exact_match", "token_acc")
        return MetricCollection({name: MeanMetric() for name in names})

    def update_metrics(self, metrics: MetricCollection, outputs: dict, batch: dict) -> None:
        labels = batch["labels"]  # the target left-aligned: move the prompt's PADs behind it
        reference = labels.gather(1, (labels == PAD).int().argsort(dim=1, stable=True))
        if self.target == "caption":
            update_caption_metrics(metrics, outputs["generated"], reference)
            return
        exact, _, _ = sequence_match(outputs["generated"], reference)
        rel = batch["relational"]
        metrics["acc"].update(exact.float())
        for key, subset in (("acc_rel", rel), ("acc_nonrel", ~rel)):
            if subset.any():
                metrics[key].update(exact[subset].float())
