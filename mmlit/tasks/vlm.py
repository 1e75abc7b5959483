"""A vision-language model: image tokens, through a projector, spliced into a pretrained causal LM's prompt
(LLaVA, Liu et al. 2023; prismatic-vlms, Karamcheti et al. 2024; nanoVLM).

The backbone's image encoder reads the image; the ``Projector`` maps its tokens to the LM's embeddings; they take the
place of the ``<image>`` placeholder of the prompt, which is the tokenizer's chat template around the question (or the
recipe's ``template``). The loss is the LM's next-token loss on the answer tokens only (and the EOS that ends them).
Training goes in stages (``stage``): ``align`` trains the projector alone (the image encoder and the LM frozen),
``finetune`` the projector and the LM (its LoRA adapters when it has them), ``full`` everything. Evaluation generates
with the LM's KV cache (``generate``: greedy or beam search) and scores exact answers (VQA by generation) or the
caption metrics of ``captioning``.

The backbone's text encoder is an ``HFCausalLM`` (its tokenizer is read from the model folder); its image encoder's
``dim`` is the LM's hidden size, like every part of a backbone.

Data contract: an image entry and its questions at ``questions_field`` (each with ``question`` and ``answer``), or a
caption at ``caption_field``.
"""

from __future__ import annotations

import functools
import random
from pathlib import Path
from typing import Any, Iterator, Literal

import torch
from torch import nn
from torchmetrics import MetricCollection

from mmlit.data import Shards, TaskData
from mmlit.data.collate import collate_examples, flatten_items, pad, pad_references
from mmlit.data.decode import SampleError
from mmlit.data.fields import captions_of, questions_of
from mmlit.data.transforms import ImageTransform, text_safe, training_sample
from mmlit.metrics.caption import update_caption_metrics
from mmlit.metrics.vqa import generated_answer_metrics, update_generated_answers
from mmlit.models.projector import Projector
from mmlit.registry import register_task
from mmlit.tasks.base import Task
from mmlit.text import EOS

__all__ = ["VLM", "VLMData"]

IMAGE = "<image>"
IGNORE = -100  # transformers' label of positions without loss


class VLMData(TaskData):
    """Images with prompt + answer sequences in the LM's own tokens (the arguments are ``VLM``'s)."""

    reads = ("image",)

    def __init__(self, shards: Shards, batch_size: int, target: str, caption_field: str, questions_field: str,
                 caption_prompt: str, template: str | None, transform: ImageTransform):
        super().__init__(shards, batch_size, {"image": transform})
        self.target, self.caption_field, self.questions_field = target, caption_field, questions_field
        self.caption_prompt, self.template = caption_prompt, template
        self.fields = ("image", questions_field if target == "answer" else caption_field)
        self.folder: str | None = None  # the LM's folder, set when the model is built
        self.max_length, self.image_tokens = 2048, 1  # the LM's, and the image's tokens in it (set by the head)
        self._tokenizer = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokenizer": None}  # workers load it from the folder

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            if self.folder is None:
                raise ValueError(f"model.tasks.{self.name}: the data side has no LM tokenizer before the model is built")
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(self.folder, local_files_only=True)
        return self._tokenizer

    def ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prompt(self, question: str) -> tuple[list[int], int]:
        """The prompt's ids with one slot where the image tokens go, and the slot's position."""
        if self.template is not None:
            if "{question}" not in self.template:
                raise ValueError(f"model.tasks.{self.name}.init_args.template: give {{question}} where the question "
                                 f"goes, got {self.template!r}")
            text = self.template.format(question=question)
        elif self.tokenizer.chat_template is not None:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": IMAGE + question}], tokenize=False,
                                                      add_generation_prompt=True)
        else:
            raise ValueError(f"model.tasks.{self.name}.init_args.template: the LM's tokenizer has no chat template; "
                             f"give a template with {IMAGE} and {{question}}")
        if text.count(IMAGE) != 1:
            raise ValueError(f"model.tasks.{self.name}.init_args.template: the prompt must hold {IMAGE} once, got "
                             f"{text!r}")
        before, after = text.split(IMAGE)
        before_ids = self.ids(before)
        return [*before_ids, self.pad_id, *self.ids(after)], len(before_ids)

    @property
    def pad_id(self) -> int:
        tokenizer = self.tokenizer
        return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def sequence(self, question: str, answer: str) -> dict:
        prompt, slot = self.prompt(question)
        room = self.max_length - len(prompt) - (self.image_tokens - 1) - 1  # (the slot becomes the image's tokens)
        if room < 1:
            raise SampleError(f"model.tasks.{self.name}: a prompt of {len(prompt)} tokens and {self.image_tokens} "
                              f"image tokens leave no room for an answer within the LM's {self.max_length}")
        target = [*self.ids(answer)[:room], self.tokenizer.eos_token_id]
        return {"input": prompt + target, "labels": [IGNORE] * len(prompt) + target, "slot": slot,
                "prompt": prompt, "target": target}

    def prepare(self, sample: dict, tokenizer) -> Iterator[dict]:
        image = self.image(sample)
        if self.target == "caption":
            captions = captions_of(sample, self.caption_field, self.name) or [""]
            chosen = random.choice(captions) if training_sample() else captions[0]
            eos = {self.tokenizer.eos_token_id}
            yield {"image": image, "sequences": [self.sequence(self.caption_prompt, chosen)],
                   "references": [caption_ids(self.ids(c), eos) for c in captions]}
            return
        sequences = [{**self.sequence(question, answer), "relational": bool(q.get("relational", False))}
                     for question, answer, q in questions_of(sample, self.questions_field, self.name)]
        if sequences:
            yield {"image": image, "sequences": sequences}

    def collate(self, examples: list[dict]) -> dict[str, Any]:
        """image (B, 3, H, W); sequences flattened over images (Q rows): input (Q, T) padded on the right, with
        ``mask`` (Q, T), labels (Q, T) (-100 off the answer) and slot (Q,); prompt (Q, P) padded on the left
        (generation appends to every row at once), with prompt_mask and prompt_slot; target (Q, A): the answer's ids
        and EOS, -100 after; image_index (Q,); for captions, references (B, R, T) in caption-metric ids."""
        flat = flatten_items(examples, "sequences")
        inputs, labels, prompts, targets = ([row.pop(k) for row in flat] for k in ("input", "labels", "prompt", "target"))
        batch = collate_examples(flat)
        width = max(map(len, prompts))
        batch.update(input=pad(inputs, value=self.pad_id), mask=_mask(inputs), labels=pad(labels, value=IGNORE),
                     prompt=pad(prompts, value=self.pad_id, left=True), prompt_mask=_mask(prompts, left=True),
                     prompt_slot=batch["slot"] + torch.tensor([width - len(p) for p in prompts]),
                     target=pad(targets, value=IGNORE))
        if "references" in examples[0]:
            batch["references"] = pad_references([e["references"] for e in examples])
        return {"image": self.collate_input("image", [e["image"] for e in examples]), **batch}


def _mask(rows: list[list[int]], left: bool = False) -> torch.Tensor:
    return pad([[1] * len(r) for r in rows], value=0, left=left).bool()


def caption_ids(ids: list[int], eos: set[int]) -> list[int]:
    """The LM's ids as the caption metrics read them (mmlit's ids: 0-3 are PAD, UNK, BOS, EOS): each id + 4, cut at
    the first EOS, which becomes mmlit's."""
    out = []
    for i in ids:
        if i in eos:
            break
        out.append(i + 4)
    return [*out, EOS]


def splice(embeds: torch.Tensor, mask: torch.Tensor, slot: torch.Tensor, image: torch.Tensor,
           labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Put the N image tokens (Q, N, D) where each row's slot is (slot (Q,), one position of embeds (Q, T, D)):
    -> embeddings (Q, T+N-1, D), mask (Q, T+N-1) (True on the image tokens) and labels (-100 on them)."""
    length, n = embeds.shape[1] + image.shape[1] - 1, image.shape[1]
    j = torch.arange(length, device=embeds.device)[None]  # (1, L)
    start = slot[:, None]
    on_image = (j >= start) & (j < start + n)  # (Q, L)
    text = torch.where(j < start, j, j - n + 1).clamp(0, embeds.shape[1] - 1)
    picture = (j - start).clamp(0, n - 1)
    out = torch.where(on_image[..., None], image.gather(1, picture[..., None].expand(-1, -1, image.shape[2])),
                      embeds.gather(1, text[..., None].expand(-1, -1, embeds.shape[2])))
    spliced_mask = on_image | mask.gather(1, text)
    if labels is not None:
        labels = torch.where(on_image, IGNORE, labels.gather(1, text))
    return out, spliced_mask, labels


@register_task("vlm")
class VLM(Task):
    """Answer questions about images or caption them with a pretrained causal LM that reads projected image tokens.

    Args:
        target: ``answer`` the image's questions, or write its ``caption``.
        stage: what trains: ``align`` the projector; ``finetune`` the projector and the LM (or the LM's LoRA
            adapters); ``full`` the image encoder too.
        projector: ``linear``, ``mlp`` or ``pixel_shuffle`` (``mmlit/models/projector.py``).
        shuffle_factor: the pixel-shuffle factor (``factor**2`` times fewer image tokens).
        template: the prompt, with ``<image>`` and ``{question}`` (default: the tokenizer's chat template around
            ``<image>{question}``).
        caption_prompt: the question asked for a caption (``target: caption``).
        caption_field: the entry holding the caption(s).
        questions_field: the entry holding the questions.
        relational: report accuracy on relational and non-relational questions (Sort-of-CLEVR).
        beam_size: beams of ``generate`` on evaluation (1: greedy).
        max_new_tokens: the longest generated answer or caption.
        tokenizer: a model folder whose tokenizer (and chat template) makes the prompts (default: the LM's own; lets
            the data side run before a model is built).
        projector_from: an mmlit checkpoint of an earlier stage whose projector this task starts from (its
            ``tasks.<name>.projector.*`` weights; the task's name must be the same).
        transform: the image pipeline (crops without flips or colour changes by default).
    """

    reads_backbone_outputs = False  # (it runs the text encoder's layers itself)

    modalities = ("image", "text")

    def __init__(self, shards: Shards, batch_size: int = 8, target: Literal["answer", "caption"] = "answer",
                 stage: Literal["align", "finetune", "full"] = "align",
                 projector: Literal["linear", "mlp", "pixel_shuffle"] = "mlp", shuffle_factor: int = 2,
                 template: str | None = None, caption_prompt: str = "Describe the image.", caption_field: str = "txt",
                 questions_field: str = "json.questions", relational: bool = False, beam_size: int = 1,
                 max_new_tokens: int = 16, tokenizer: str | None = None, projector_from: str | None = None,
                 transform: ImageTransform | None = None):
        super().__init__(VLMData(shards, batch_size, target, caption_field, questions_field, caption_prompt, template,
                                 transform or text_safe()))
        self.target, self.stage, self.projector_kind, self.shuffle_factor = target, stage, projector, shuffle_factor
        self.relational, self.beam_size, self.max_new_tokens = relational, beam_size, max_new_tokens
        self.projector_from = projector_from
        self.data.folder = tokenizer

    def build(self, backbone) -> None:
        super().build(backbone)
        lm = backbone.encoders["text"]
        if not hasattr(lm, "generate") or not hasattr(lm, "embed"):
            raise ValueError(f"model.tasks.{self.name}: vlm needs model.backbone.init_args.encoders.text to be "
                             f"mmlit.models.HFCausalLM, got {type(lm).__name__}")
        self.data.folder, self.data.max_length = self.data.folder or lm.path, lm.max_length
        self.projector = Projector(self.projector_kind, backbone.dim, lm.dim, self.shuffle_factor)
        if self.projector_from is not None:
            self._load_projector(self.projector_from)
        self._freeze_for_stage(backbone)
        tokenizer = self.data.tokenizer
        if tokenizer.eos_token_id is None:
            raise ValueError(f"model.tasks.{self.name}: the LM's tokenizer ({self.data.folder}) has no eos_token, which "
                             f"ends every answer; set it in its tokenizer_config.json")
        self.eos = sorted({*lm.eos_ids, tokenizer.eos_token_id})  # (the folder's end-of-turn ids end an answer too)
        self.data.image_tokens = self._count_image_tokens(backbone)

    def _freeze_for_stage(self, backbone) -> None:
        """``align`` freezes the LM and the image encoder's pretrained model (timm's, its ``model``; the encoder's own
        layers on top, new like the projector, train with it); ``finetune`` the image encoder's model. A frozen part
        runs in eval mode (BatchNorm statistics and dropout fixed): a pre-hook sets it at each forward, after
        Lightning's ``train()``."""
        image, text = backbone.encoders["image"], backbone.encoders["text"]
        frozen = [(image, getattr(image, "model", image))] if self.stage != "full" else []
        if self.stage == "align":
            frozen.append((text, text))
        for encoder, part in frozen:  # (the hook is the encoder's: timm's model runs by forward_intermediates)
            part.requires_grad_(False)
            encoder.register_forward_pre_hook(functools.partial(_eval_mode, part))

    @torch.no_grad()
    def _count_image_tokens(self, backbone) -> int:
        """Image tokens per image in the LM's sequence: the encoder's tokens for one blank image, after the projector."""
        size = self.data.pipeline("image").size
        image = backbone.encoders["image"]
        mode = image.training
        tokens = image.eval()(torch.zeros(1, 3, size, size, device=next(image.parameters()).device)).tokens
        image.train(mode)
        return self.projector.tokens(tokens.shape[1])

    def _load_projector(self, path: str) -> None:
        from mmlit.checkpoints import AtomicCheckpointIO

        key, prefix = f"model.tasks.{self.name}.init_args.projector_from", f"tasks.{self.name}.projector."
        if not Path(path).exists():
            raise FileNotFoundError(f"{key}: no checkpoint '{path}'")
        state = AtomicCheckpointIO().load_checkpoint(path, map_location="cpu", weights_only=True).get("state_dict", {})
        own = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if not own:
            raise ValueError(f"{key}: '{path}' has no {prefix}* weights (a checkpoint of a vlm task named {self.name})")
        try:
            self.projector.load_state_dict(own)
        except RuntimeError as err:
            raise ValueError(f"{key}: the projector in '{path}' is not this recipe's (projector, shuffle_factor, the "
                             f"image encoder's dim or the LM's width differ): {err}") from err

    def _image(self, backbone, batch: dict) -> torch.Tensor:
        return self.projector(backbone(image=batch["image"])["image"].tokens)[batch["image_index"]]  # (Q, N', D)

    def forward(self, backbone, batch: dict) -> dict[str, torch.Tensor]:
        lm, image = backbone.encoders["text"], self._image(backbone, batch)
        embeds = lm.embed(batch["input"])
        image = image.to(embeds.dtype)  # (an LM loaded in bfloat16 under 32-true precision)
        embeds, mask, labels = splice(embeds, batch["mask"], batch["slot"], image, batch["labels"])
        out = {"loss": lm.lm(embeds, mask, labels).loss}
        if not self.training:
            prompt, prompt_mask, _ = splice(lm.embed(batch["prompt"]), batch["prompt_mask"], batch["prompt_slot"], image)
            out["generated"], out["score"] = lm.generate(prompt, prompt_mask, self.max_new_tokens, self.eos,
                                                         self.data.pad_id, self.beam_size)
        return out

    def _ended(self, generated: torch.Tensor) -> list[list[int]]:
        """Generated rows cut after their first EOS (EOS kept)."""
        rows = []
        for row in generated.tolist():
            end = next((i for i, t in enumerate(row) if t in self.eos), None)
            rows.append(row if end is None else row[: end + 1])
        return rows

    def metrics(self) -> MetricCollection:
        return generated_answer_metrics(self.target, self.relational)

    def update_metrics(self, metrics: MetricCollection, outputs: dict, batch: dict) -> None:
        generated = self._ended(outputs["generated"])
        if self.target == "caption":
            ids = pad([caption_ids(row, set(self.eos)) for row in generated]).to(batch["references"].device)
            update_caption_metrics(metrics, ids, batch["references"])
            return
        target, eos = batch["target"].tolist(), set(self.eos)
        exact = torch.tensor([[t for t in row if t not in eos] == [t for t in answer if t != IGNORE and t not in eos]
                              for row, answer in zip(generated, target)],  # (any of the LM's EOS ends an answer)
                             dtype=torch.float, device=batch["target"].device)
        update_generated_answers(metrics, exact, batch["relational"])

    def predict(self, outputs: dict, batch: dict, tokenizer) -> list[dict]:
        rows, number = [], {}
        for key, ids, score in zip(batch["key"], self._ended(outputs["generated"]), outputs["score"].tolist()):
            row = {"key": key, "prediction": self.data.tokenizer.decode(ids, skip_special_tokens=True).strip(),
                   "score": round(score, 6)}
            if self.target == "answer":
                row["question_index"] = number[key] = number.get(key, -1) + 1
            rows.append(row)
        return rows


def _eval_mode(part: nn.Module, encoder: nn.Module, args) -> None:
    if part.training:
        part.eval()
