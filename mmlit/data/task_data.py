"""A task's data side: the plain, picklable object that DataLoader workers run for a task.

A task (``mmlit/tasks/``) is two objects: its head, an ``nn.Module`` that lives in the training process (head, loss,
metrics, predictions), and its data side, a ``TaskData``, which the head makes from the recipe's arguments and which
workers receive pickled as it is. The data side declares the sample entries it reads (``fields``; a field named like
a modality, ``image``, reads any entry of that modality) and the modalities whose values it prepares (``reads``),
turns a decoded sample into examples (``prepare``) and collates them (``collate``). When the model is built, the head
binds it to the backbone's encoders: each modality's ``pipeline`` (an image size and timm transforms, a text length)
lands in ``inputs``. Nothing here imports a model or a task.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator

from mmlit.data.collate import collate_examples
from mmlit.data.decode import SampleError, extension_modality, sample_field, sample_input, sample_location
from mmlit.data.transforms import predicting
from mmlit.registry import get_modality

if TYPE_CHECKING:
    from tokenizers import Tokenizer

__all__ = ["Shards", "TaskData", "data_side"]


@dataclass
class Shards:
    """Shard URLs or brace/glob patterns (or an index file) of one task, per split
    (``data/x/train-{000000..000007}.tar``, ``data/x/train.json``); ``predict`` is what ``mmlit predict`` reads
    (default: ``test``)."""

    train: str | None = None
    val: str | None = None
    test: str | None = None
    predict: str | None = None


class TaskData:
    """What a task does with samples, in the DataLoader workers.

    Args:
        shards: the task's shards per split.
        batch_size: samples (tar entries sharing a key) per batch, per rank. Epochs are planned in samples, so a task
            whose ``prepare`` makes several examples of one sample (the questions of an image) puts all of them in
            that sample's batch.
        transforms: settings of each modality's pipeline (``{"image": ImageTransform(...)}``).
    """

    fields: tuple[str, ...] = ()  # sample entries prepare reads; "image" (a modality's name) reads any image entry
    reads: ClassVar[tuple[str, ...]] = ()  # modalities whose values prepare makes (their pipelines: ``inputs``)

    def __init__(self, shards: Shards, batch_size: int = 32, transforms: dict[str, Any] | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.shards, self.batch_size, self.transforms = shards, batch_size, dict(transforms or {})
        self.name = "task"  # the recipe's name of the task, set when the model is built
        self.inputs: dict[str, Callable] = {}  # modality -> pipeline, set by bind()

    @property
    def key(self) -> str:
        """The recipe key of these shards (named in the data module's errors)."""
        return f"model.tasks.{self.name}.init_args.shards"

    def bind(self, inputs: dict[str, Callable]) -> None:
        """The pipelines of the modalities in ``reads``, made for the backbone's encoders (see ``Modality.pipeline``).
        ``inputs`` is updated in place: a data side that shares it (a task's evaluation sources) sees the binding."""
        self.inputs.clear()
        self.inputs.update(inputs)

    def prepare(self, sample: dict, tokenizer: Tokenizer | None) -> Iterator[dict]:
        """Yield the examples of one decoded sample (none to drop it). The sample holds the entries named in
        ``fields`` (all entries when ``fields`` is empty) and may be shared with other tasks that read the same
        shards: read it, do not modify it. Random draws (``random``, NumPy, torch) are seeded per sample."""
        raise NotImplementedError

    def collate(self, examples: list[dict]) -> dict[str, Any]:
        """One batch of examples: a value keyed by the name of a modality in ``reads`` (``image``) by that modality's
        ``collate`` (``collate_input``), the others by ``collate_examples``. Images come as (B, 3, S, S) uint8 in
        channels-last memory order, so reshape them, do not ``.view`` them."""
        own = [key for key in examples[0] if key in self.reads]
        batch = collate_examples([{k: v for k, v in e.items() if k not in own} for e in examples])
        return {**{key: self.collate_input(key, [e[key] for e in examples]) for key in own}, **batch}

    @staticmethod
    def collate_input(modality: str, values: list) -> Any:
        """A batch of one modality's prepared values, by that modality's ``collate``."""
        return _modality(modality).collate(values)

    def evaluation_sources(self) -> list[TaskData]:
        """Other sources this task is evaluated on (zero-shot classification shards of a contrastive task): data sides
        whose batches go to this task's head under its name on the val and test splits."""
        return []

    # Helpers for prepare().
    def image(self, sample: dict) -> Any:
        """The sample's image through the image pipeline: augmented for a training sample, resized and centre-cropped
        otherwise (uint8 (3, S, S); a JPEG left for the device stays encoded)."""
        return self.input(sample, "image")

    def input(self, sample: dict, modality: str) -> Any:
        """The sample's entry of ``modality`` through that modality's pipeline."""
        return self.pipeline(modality)(sample_input(sample, modality, self.name))

    def entry(self, sample: dict, name: str, modality: str) -> Any:
        """The sample's entry ``name`` (``question0.flac``: one of several of a modality) through the pipeline of
        ``modality``; an entry of another modality is a ``SampleError``."""
        if extension_modality(name.rsplit(".", 1)[-1].lower()) != modality:
            raise SampleError(f"{sample_location(sample)}: task '{self.name}' reads the entry {name!r} as {modality}, "
                              f"which it is not")
        return self.pipeline(modality)(sample_field(sample, name, self.name))

    def pipeline(self, modality: str) -> Callable:
        """The bound pipeline of ``modality``; before ``bind`` (a data side used without a model), the modality's
        pipeline for no encoder and no settings (images at their own size, texts uncut)."""
        if modality not in self.inputs:
            self.inputs[modality] = get_modality(modality)().pipeline(None, None, f"model.tasks.{self.name}.init_args")
        return self.inputs[modality]

    def token_ids(self, tokenizer: Tokenizer | None, text: str, *, bos_eos: bool = False) -> list[int]:
        """Token ids of ``text``, cut to the text encoder's ``max_length`` (BOS ... EOS with ``bos_eos``)."""
        return self.pipeline("text")(text, tokenizer, bos_eos)

    def label(self, sample: dict, field: str, placeholder: Any) -> Any:
        """The sample's value at ``field`` (``sample_field``); a sample prepared for ``mmlit predict`` may lack it
        (new, unlabelled data) and gets ``placeholder``."""
        try:
            return sample_field(sample, field, self.name)
        except SampleError:
            if predicting():
                return placeholder
            raise


@functools.cache
def _modality(name: str) -> Any:
    """The registered modality ``name`` with its defaults: its ``collate`` needs none of the recipe's limits."""
    return get_modality(name)()


def data_side(task: Any) -> TaskData:
    """A task's data side: given itself, or through a task's head (its ``data``)."""
    data = getattr(task, "data", task)
    return data if isinstance(data, TaskData) else task
