"""The task contract: a task is an ``nn.Module`` that owns its data contract, head, loss and metrics.

A task class declares the sample fields it reads, turns a decoded sample into examples
(``prepare``, run in DataLoader workers), builds its head from the backbone's sizes (``build``),
returns its loss and outputs for a batch (``forward``) and keeps its torchmetrics. Tasks are
registered with ``@register_task("name")``; adding one edits no core file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Iterator

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import get_worker_info
from torchmetrics import MetricCollection

from mmlit.data.decode import EncodedImage, SampleError, sample_field
from mmlit.data.device_images import EncodedImages
from mmlit.data.transforms import ImageTransform, build_pipelines, predicting, training_sample
from mmlit.text import BOS, EOS, PAD

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from mmlit.models import Backbone

__all__ = ["Shards", "Task", "batch_size_of", "collate_examples", "flatten_items", "names_from", "stack_tensors"]


@dataclass
class Shards:
    """Shard URLs or brace/glob patterns (or an index file) of one task, per split
    (``data/x/train-{000000..000007}.tar``, ``data/x/train.json``); ``predict`` is what ``mmlit predict`` reads
    (default: ``test``)."""

    train: str | None = None
    val: str | None = None
    test: str | None = None
    predict: str | None = None


def names_from(value: str | list[str], key: str) -> list[str]:
    """A list of names (classes, answers) given in the recipe, or read from a JSON file that holds one
    (``classes.json``, ``answers.json``); ``key`` is the recipe key named in errors."""
    if isinstance(value, str):
        path = Path(value)
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise FileNotFoundError(f"{key}: no file '{path}' (give a JSON list of names, or the list itself)") from None
        except ValueError as err:
            raise ValueError(f"{key}: '{path}' is not JSON: {err}") from None
    if not isinstance(value, list) or not value or not all(isinstance(v, (str, int)) for v in value):
        raise ValueError(f"{key}: expected a non-empty list of names, got {str(value)[:100]}")
    names = [str(v) for v in value]
    if len(set(names)) != len(names):
        raise ValueError(f"{key}: names repeat (e.g. {next(n for n in names if names.count(n) > 1)!r})")
    return names


def stack_tensors(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``torch.stack``, made for batches that go from a DataLoader worker to the training process.

    Images made as (C, H, W) views of (H, W, C) pixels (``Task.image_tensor``) are stacked as they lie and viewed as
    (B, C, H, W) in channels-last memory order: 64 images of 224x224 in 3.0 ms instead of 7.2 ms for the strided
    copy into (B, C, H, W) order; normalising and the encoders take either layout. In a worker, a large batch is
    stacked straight into shared memory, which the DataLoader would otherwise copy it into: 7.8 ms instead of
    11.7 ms to stack and send those 64 images. Together ~6% of a loader worker's time (measured on the 2-core
    machine, one thread, ``tools/bench_data.py``)."""
    first = tensors[0]
    if isinstance(first, EncodedImage):  # decoded on the training device (data.decode_images: device)
        return EncodedImages(tensors)
    images = first.dim() == 3 and not first.is_contiguous() and first.permute(1, 2, 0).is_contiguous()
    if images:
        tensors = [t.permute(1, 2, 0) for t in tensors]
        first = tensors[0]
    out = None
    if get_worker_info() is not None and first.numel() * first.element_size() * len(tensors) >= 1 << 16:
        out = torch.empty((len(tensors), *first.shape), dtype=first.dtype).share_memory_()
    batch = torch.stack(tensors, out=out)
    return batch.permute(0, 3, 1, 2) if images else batch


def collate_examples(examples: list[dict]) -> dict[str, Any]:
    """Tensors are stacked, lists of token ids padded with ``PAD``, numbers and bools made tensors."""
    batch: dict[str, Any] = {}
    for key in examples[0]:
        values = [e[key] for e in examples]
        first = values[0]
        if isinstance(first, (torch.Tensor, EncodedImage)):
            batch[key] = stack_tensors(values)
        elif isinstance(first, list):
            ids = torch.full((len(values), max(map(len, values))), PAD, dtype=torch.long)
            for row, seq in enumerate(values):
                ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            batch[key] = ids
        elif isinstance(first, (bool, int, float)):
            batch[key] = torch.tensor(values)
        else:
            batch[key] = values
    return batch


def flatten_items(examples: list[dict], items: str) -> list[dict]:
    """Each example's list ``items`` (of dicts: an image's questions, captions, sequences) over the whole batch, every
    item with the ``image_index`` of its example and the sample ``key``, for ``collate_examples``."""
    return [{**item, "image_index": i, "key": e.get("key")} for i, e in enumerate(examples) for item in e[items]]


def batch_size_of(batch: dict[str, Any]) -> int:
    """Rows of a collated batch: the length of its first tensor (images, for VQA's image-grouped batches)."""
    return next(len(v) for v in batch.values() if isinstance(v, torch.Tensor))


class Task(nn.Module):
    """Base of every task. Subclasses set ``fields`` and implement ``build``, ``prepare``, ``forward``,
    ``metrics`` and ``update_metrics``.

    Args:
        shards: the task's shards per split.
        batch_size: samples (tar entries sharing a key) per batch, per rank. Epochs are planned in
            samples, so a task whose ``prepare`` makes several examples of one sample (the questions of
            an image) puts all of them in that sample's batch.
    """

    task_name: ClassVar[str]  # set by @register_task
    fields: ClassVar[tuple[str, ...]] = ()  # sample entries prepare reads; "image" means any image format
    needs: ClassVar[tuple[str, ...]] = ()  # optional backbone parts the task uses: "text_encoder", "fusion"

    def __init__(self, shards: Shards, batch_size: int = 32):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.shards, self.batch_size = shards, batch_size
        self.name = getattr(self, "task_name", type(self).__name__.lower())
        self.image_size: int | None = None
        self.max_length: int | None = None
        self.transform: ImageTransform | None = None  # set by tasks that read images
        self._pipelines: dict | None = None  # {training: PIL image -> uint8 tensor}, made by build()
        self._device_resize: tuple[float, str] = (1.0, "bilinear")  # crop_pct, interpolation of the device path

    def build(self, backbone: Backbone) -> None:
        """Create the head for ``backbone``; subclasses call ``super().build(backbone)`` first."""
        for part in self.needs:
            backbone.require(part, self.name)
        self.image_size = backbone.image_encoder.image_size
        self.max_length = backbone.max_length
        if self.transform is not None:
            config = backbone.image_encoder.data_config()
            self._pipelines = build_pipelines(self.transform, self.image_size, config,
                                              f"model.tasks.{self.name}.init_args.transform")
            self._device_resize = (self.transform.crop_pct or config.get("crop_pct") or 1.0,
                                   self.transform.interpolation or config.get("interpolation", "bilinear"))

    def prepare(self, sample: dict, tokenizer: Tokenizer) -> Iterator[dict]:
        """Yield the examples of one decoded sample (none to drop it).

        Runs in the DataLoader workers, on a pickled copy of the task without its parameters, buffers and
        submodules (``SourceStream.__getstate__``): it may read the task's plain attributes, not its head. The
        sample holds the entries named in ``fields`` (all entries when ``fields`` is empty) and may be shared with
        other tasks that read the same shards: read it, do not modify it."""
        raise NotImplementedError

    def collate(self, examples: list[dict]) -> dict[str, Any]:
        """One batch of examples (``collate_examples``: images from ``image_tensor`` come as (B, 3, S, S) uint8 in
        channels-last memory order, so reshape them, do not ``.view`` them)."""
        return collate_examples(examples)

    def forward(self, backbone: Backbone, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The loss (key ``loss``) and whatever ``update_metrics`` needs."""
        raise NotImplementedError

    def metrics(self) -> MetricCollection:
        """A fresh collection of this task's metrics (one is made per evaluation stage)."""
        raise NotImplementedError

    def update_metrics(self, metrics: MetricCollection, outputs: dict[str, torch.Tensor], batch: dict[str, Any]) -> None:
        raise NotImplementedError

    def predict(self, outputs: dict[str, torch.Tensor], batch: dict[str, Any], tokenizer: Tokenizer) -> list[dict]:
        """One JSON-able row per example of an evaluation batch (``mmlit predict``): the sample ``key``, the
        ``prediction`` and its ``score``, plus whatever names the example (a question's id)."""
        raise NotImplementedError(f"task '{self.name}' ({type(self).__name__}) does not implement predict()")

    def setup(self, tokenizer: Tokenizer) -> None:
        """Called in the training process once the tokenizer is loaded, before any stage runs (a task that needs
        token ids of its own, such as zero-shot class prompts, makes them here)."""

    def evaluation_sources(self) -> list[Task]:
        """Other sources this task is evaluated on: tasks that read them and prepare their examples, whose batches
        come to this task's ``forward`` and ``update_metrics`` under its name (zero-shot classification shards of a
        contrastive task)."""
        return []

    # Helpers for prepare(), shared by the tasks.
    def image_tensor(self, image: Image.Image | EncodedImage) -> torch.Tensor | EncodedImage:
        """RGB image -> (3, S, S) uint8 tensor at the encoder's size, through the task's ``transform``: augmented for
        a training sample (``training_sample()``), resized and centre-cropped otherwise. Pixels stay uint8 until the
        encoder normalises the whole batch (4x less to copy between processes and to the GPU). A JPEG left for the
        device (``data.decode_images: device``) stays encoded and is resized and cropped there."""
        if isinstance(image, EncodedImage):
            return EncodedImage(image.data, image.size, self.image_size, *self._device_resize)
        if self._pipelines is not None:
            return self._pipelines[training_sample()](image)
        if self.image_size is not None and image.size != (self.image_size, self.image_size):
            image = image.resize((self.image_size, self.image_size), Image.BILINEAR)
        return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)

    def label(self, sample: dict, field: str, placeholder: Any) -> Any:
        """The sample's value at ``field`` (``sample_field``); a sample prepared for ``mmlit predict`` may lack it
        (new, unlabelled data) and gets ``placeholder``."""
        try:
            return sample_field(sample, field, self.name)
        except SampleError:
            if predicting():
                return placeholder
            raise

    def token_ids(self, tokenizer: Tokenizer, text: str, *, bos_eos: bool = False) -> list[int]:
        """Token ids of ``text``, cut to the text encoder's ``max_length``."""
        if tokenizer is None:
            raise ValueError(f"task '{self.name}' reads text, which needs data.tokenizer (`mmlit data tokenizer` makes one)")
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        limit = self.max_length or len(ids) + 2
        if bos_eos:
            return [BOS, *ids[: limit - 2], EOS]
        return ids[:limit]
