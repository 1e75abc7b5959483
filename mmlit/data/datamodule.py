"""The DataModule: one worker pool per rank for the training steps of every task (and one per evaluation), the task
mixture, fault counting and the resume position."""

from __future__ import annotations

import functools
import os
import warnings
from typing import Literal, get_args

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from mmlit.compat.lightning import steps_processed
from mmlit.data.device_images import move_batch
from mmlit.data.decode import extension_modality
from mmlit.data.faults import DataBudgetError, FaultLog
from mmlit.data.index import ShardIndex, plan_shards
from mmlit.data.mixing import AllTasks, TaskSampler
from mmlit.data.planning import SplitPlans
from mmlit.data.position import resumed_position, saved_position
from mmlit.data.sources import Source, get_source
from mmlit.data.reading import Position
from mmlit.data.stream import EvalStream, Mixture, Sequential, SourceStream, StepStream
from mmlit.data.task_data import data_side
from mmlit.data.workers import StartMethod, start_fork_server, task_loader
from mmlit.distributed import report_failure, watch_peers
from mmlit.registry import get_modality, is_modality
from mmlit.text import load_tokenizer

__all__ = ["MultiTaskDataModule"]

# Tokenizers' own thread pool does not survive fork; DataLoader workers tokenize one sample each anyway.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}


def _check_settings(steps_per_epoch, num_workers, start_method, error_budget, samples_per_epoch, mode,
                    max_image_pixels) -> None:
    if steps_per_epoch is not None and steps_per_epoch < 1:
        raise ValueError(f"data.steps_per_epoch must be at least 1, got {steps_per_epoch}")
    if num_workers < 0:
        raise ValueError(f"data.num_workers must be 0 or more, got {num_workers}")
    if start_method not in get_args(StartMethod):
        raise ValueError(f"data.multiprocessing_context is one of {', '.join(get_args(StartMethod))}, got {start_method!r}")
    if not 0 <= error_budget <= 1:
        raise ValueError(f"data.error_budget is a share of samples between 0 and 1, got {error_budget}")
    if samples_per_epoch and mode != "resampled":
        raise ValueError("data.samples_per_epoch applies to data.mode: resampled only")
    if max_image_pixels is not None and max_image_pixels < 1:
        raise ValueError(f"data.max_image_pixels must be at least 1, got {max_image_pixels}")


def _check_stage(tasks: dict, stage: str, samples_per_epoch: dict, decode_images: str) -> None:
    if not tasks:
        raise ValueError("model.tasks: the recipe declares no task")
    unknown = sorted(set(samples_per_epoch) - set(tasks))
    if unknown:
        raise ValueError(f"data.samples_per_epoch: no task named {', '.join(unknown)}; the tasks are {', '.join(tasks)}")
    for name, task in tasks.items():
        if task.shards.train is None and stage == "fit":
            raise ValueError(f"model.tasks.{name}.init_args.shards.train: task '{name}' has no training shards")
    if decode_images == "device" and stage == "fit":
        augmented = [n for n, t in tasks.items() if getattr(t.transforms.get("image"), "augment", False)]
        if augmented:
            raise ValueError(f"data.decode_images: device decodes and resizes JPEGs on the device, without the training "
                             f"augmentation of task(s) {', '.join(augmented)}; set their init_args.transform.augment: "
                             f"false, or data.decode_images: worker")


def _modalities(tasks: dict, max_image_pixels: int | None, decode_images: str, settings: dict | None) -> dict:
    """The modality objects the tasks' fields name (by the modality's name, ``audio``, or by an entry of its,
    ``caption.flac``), with the recipe's settings (``data.modalities``: ``{audio: {sample_rate: 16000}}``; the image
    modality's pixel limit and decoding place)."""
    names = {f for task in tasks.values() for f in task.fields if is_modality(f)}
    names |= {m for task in tasks.values() for f in task.fields if (m := extension_modality(f.rsplit(".", 1)[-1]))}
    options = {"image": {"max_pixels": max_image_pixels, "on_device": decode_images == "device"}}
    for name, values in (settings or {}).items():
        if name == "image":
            raise ValueError("data.modalities.image: set data.max_image_pixels and data.decode_images")
        if not is_modality(name):
            raise ValueError(f"data.modalities.{name}: no modality of that name (`mmlit modalities` lists them)")
        if not isinstance(values, dict):
            raise ValueError(f"data.modalities.{name}: the modality's arguments, e.g. {{sample_rate: 16000}}; "
                             f"got {values!r}")
        options[name] = values
    made = {}
    for name in sorted(names):
        try:
            made[name] = get_modality(name)(**options.get(name, {}))
        except TypeError as err:
            raise ValueError(f"data.modalities.{name}: {err}") from None
    return made


def _plan(spec: str, key: str, source: Source, scan_remote: bool) -> ShardIndex | Exception:
    """The index of ``spec``, or the error to raise on every rank (picklable: it is broadcast)."""
    try:
        return plan_shards(spec, key, source=source, scan_remote=scan_remote)
    except (OSError, ValueError) as err:  # a missing or empty shard, no index for remote shards
        return err
    except Exception as err:  # (a missing fsspec protocol package ...)
        return RuntimeError(f"{key}: {type(err).__name__}: {err}")


def _check_index(index: ShardIndex, key: str, samples: int, ranks: int, workers: int, error_budget: float) -> None:
    """A planned index against the error budget (unreadable shards) and its readers: the ranks in training, ranks x
    workers in an evaluation (each reads its own slice)."""
    shards, readers = len(index.urls) + sum(1 for e in index.bad if e.url not in index.urls), ranks * workers
    if len(index.bad) > error_budget * shards:
        raise DataBudgetError(
            f"{key}: {len(index.bad)} of {shards} shard(s) cannot be read to the end, more than data.error_budget "
            f"({error_budget:g}) of the shards; their readable samples would be used, the rest is lost: "
            + "; ".join(str(e) for e in index.bad[:5]))
    if samples < readers:
        raise ValueError(f"{key}: {samples} sample(s) for {ranks} rank(s) x {workers} worker(s); every reader needs at "
                         f"least one (add data or lower data.num_workers)")


def _warn_pipelines(tasks: dict, groups: dict[str, list[str]]) -> None:
    """Tasks on one source with different image pipelines encode each image once per pipeline: say so."""
    for names in groups.values():
        pipelines = {repr(tasks[name].transforms["image"]) for name in names if "image" in tasks[name].transforms}
        if len(pipelines) > 1:
            warnings.warn(f"data: tasks {', '.join(names)} read one source with different image pipelines "
                          f"(init_args.transform), so each image is encoded once per pipeline in training; give "
                          f"them one transform to encode it once for all", stacklevel=4)


class MultiTaskDataModule(pl.LightningDataModule):
    """Streams every task's shards.

    Args:
        tokenizer: path to the ``tokenizer.json`` made by ``mmlit data tokenizer``; none for recipes whose tasks read no
            text (image classification).
        tasks: the data sides of the model's tasks (linked from ``model.tasks`` by the CLI; not a recipe key).
        mode: ``epoch``: every training sample once per task epoch; ``resampled``: shards drawn with
            replacement, ``samples_per_epoch`` samples per task epoch.
        samples_per_epoch: resampled mode: samples per task epoch over all ranks (task name -> number;
            a task not named uses its number of samples).
        mixture: which tasks take part in each step (default: all of them).
        steps_per_epoch: steps in a training epoch, the same on every rank. Default: the steps in
            which every task's stream passes through one task epoch (the largest task's, for the
            all-task mixture).
        num_workers: DataLoader worker processes per rank: one pool makes the training steps of every task (and one
            the batches of an evaluation); 0 reads in the training process.
        multiprocessing_context: how the workers start. ``forkserver``: forked from a server process with one
            thread, which has imported torch and the tasks' modules; ``spawn``: a fresh interpreter each; ``fork``:
            forked from the training process, whose threads (DDP's, the other loaders') can leave a worker
            deadlocked (see ``mmlit/data/workers.py``).
        shuffle_buffer: the samples of a shuffle window: the epoch's sequence of samples is permuted window by window
            (``mmlit/data/reading.py``); a batch reads only its own samples, so memory does not grow with it.
        seed: base seed of the shard order, resampling, shuffling and the mixture.
        error_budget: the share of a task's training samples that may be skipped (unreadable, missing
            a field) before the run stops; counted over at least one task epoch.
        allow_pipe: accept ``pipe:`` shard URLs, which run a shell command.
        shard_format: the format of the shards (a registered ``mmlit.data.sources.Source``).
        storage_options: options for fsspec, for remote shards (``endpoint_url``, ``anon``, credentials, ...).
        scan_remote: remote shards without an index (or img2dataset stats) are read in full at setup to count their
            samples, instead of an error.
        max_image_pixels: images with more pixels than this are skipped (counted); default Pillow's limit.
        decode_images: ``worker`` (the DataLoader workers decode images) or ``device``: the workers check each JPEG's
            header and the training process decodes a batch of them on its device (nvJPEG on a GPU) and resizes it
            there (``mmlit/data/device_images.py``); other formats are decoded in the workers either way.
        share_reads: tasks whose shards (and batch size) are the same read and decode each sample once, and each
            prepares its examples from it (with the all-task mixture; a sampled mixture reads per task).
        modalities: each modality's settings (its class's arguments: ``{audio: {sample_rate: 16000, max_seconds: 20},
            video: {max_frames: 300}}``; ``mmlit modalities`` lists them).
    """

    def __init__(self, tokenizer: str | None = None, tasks: dict | None = None, mode: Literal["epoch", "resampled"] = "epoch",
                 samples_per_epoch: dict[str, int] | None = None, mixture: TaskSampler | None = None,
                 steps_per_epoch: int | None = None, num_workers: int = 2,
                 multiprocessing_context: StartMethod = "forkserver", shuffle_buffer: int = 1000, seed: int = 0,
                 error_budget: float = 0.01, allow_pipe: bool = False, shard_format: str = "tar",
                 storage_options: dict | None = None, scan_remote: bool = False, max_image_pixels: int | None = None,
                 decode_images: Literal["worker", "device"] = "worker", share_reads: bool = True,
                 modalities: dict[str, dict] | None = None):
        super().__init__()
        _check_settings(steps_per_epoch, num_workers, multiprocessing_context, error_budget, samples_per_epoch, mode,
                        max_image_pixels)
        self.source_class = get_source(shard_format)
        self.storage_options, self.scan_remote, self.max_image_pixels = storage_options, scan_remote, max_image_pixels
        self.share_reads, self.decode_images = share_reads, decode_images
        self.tokenizer_path, self.mode = tokenizer, mode
        self.tasks = {name: data_side(task) for name, task in (tasks or {}).items()}
        self.modalities = _modalities(self.tasks, max_image_pixels, decode_images, modalities)  # decode the fields
        self.samples_per_epoch, self.sampler = dict(samples_per_epoch or {}), mixture or AllTasks()
        self.steps_per_epoch, self.num_workers, self.start_method = steps_per_epoch, num_workers, multiprocessing_context
        self.shuffle_buffer, self.seed, self.error_budget, self.allow_pipe = shuffle_buffer, seed, error_budget, allow_pipe
        self.tokenizer = None
        self.rank, self.world_size = 0, 1
        self.faults = FaultLog()
        self.plans = SplitPlans(self.tasks)  # what reads each split, and the shard indexes
        self.mixture: Mixture | None = None
        self._train_streams: dict[str, SourceStream] = {}  # by source, what train_dataloader made
        self._resume: dict | None = None

    def setup(self, stage: str) -> None:
        watch_peers()  # from here on, a rank that fails stops the others (mmlit/distributed.py)
        _check_stage(self.tasks, stage, self.samples_per_epoch, self.decode_images)
        self.tokenizer = load_tokenizer(self.tokenizer_path, key="data.tokenizer") if self.tokenizer_path else None
        if dist.is_available() and dist.is_initialized():
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.faults.rank = self.rank
        if self.trainer is not None:
            self.faults.attach(self.trainer.default_root_dir)
        plan = functools.partial(_plan, source=self.source, scan_remote=self.scan_remote)
        self.plans.plan(_SPLITS.get(stage, ()), self.rank, self.world_size, plan, self._accept)
        if stage == "fit":
            self._check_fit()
        if self.num_workers:
            start_fork_server(self.start_method, self._task_modules)

    def on_exception(self, exception: BaseException) -> None:
        report_failure(exception)  # every other rank stops now, with this error, instead of at its next collective

    @property
    def source(self) -> Source:
        return self.source_class(allow_pipe=self.allow_pipe, storage_options=self.storage_options)

    def _accept(self, reader: str, split: str, name: str, key: str, index: ShardIndex) -> None:
        if self.rank == 0:
            self.faults.add_bad_shards(name, split, index.bad)
        samples = self._samples_per_epoch(name, index) if split == "train" else index.total
        _check_index(index, key, samples, self.world_size, 1 if split == "train" else max(self.num_workers, 1),
                     self.error_budget)

    def _check_fit(self) -> None:
        self.sampler.bind(self.epoch_samples, self.seed)
        _warn_pipelines(self.tasks, self.groups("train"))
        # Whether DDP needs find_unused_parameters for a sampled mixture depends on the objective: the module checks.

    def _samples_per_epoch(self, name: str, index: ShardIndex) -> int:
        """Training samples in one task epoch: the shards' samples, or the recipe's number in resampled mode."""
        return self.samples_per_epoch.get(name, index.total) if self.mode == "resampled" else index.total

    def groups(self, split: str) -> dict[str, list[str]]:
        """The readers of each source of ``split`` (``SplitPlans.groups``): tasks on the same shards read together
        when ``share_reads`` and, in training, every task is in every step."""
        share = self.share_reads and (split != "train" or isinstance(self.sampler, AllTasks))
        return self.plans.groups(split, share, self.samples_per_epoch)

    def _stream(self, readers: list[str], split: str, start: Position = (0, 0)) -> SourceStream:
        tasks = dict(self.plans.readers(split)[reader] for reader in readers)  # task name -> what prepares its batches
        first = next(iter(tasks.values()))
        train = split == "train"
        resampled = train and self.mode == "resampled"
        samples = self._samples_per_epoch(readers[0], self.plans.indexes[readers[0]]["train"]) if resampled else None
        return SourceStream(tasks, self.plans.indexes[readers[0]][split], self.tokenizer,
                            batch_size=first.batch_size, train=train, samples_per_epoch=samples, seed=self.seed,
                            shuffle_buffer=self.shuffle_buffer, rank=self.rank, world_size=self.world_size,
                            source=self.source, max_image_pixels=self.max_image_pixels, predict=split == "predict",
                            decode_images=self.decode_images, modalities=self.modalities, start=start)

    @property
    def _task_modules(self) -> set[str]:
        return {type(task).__module__ for task in self.tasks.values()}

    def _loader(self, stream: StepStream | EvalStream) -> DataLoader:
        return task_loader(stream, workers=self.num_workers, start_method=self.start_method,
                           persistent=isinstance(stream, StepStream), preload=self._task_modules)

    @property
    def batches_per_epoch(self) -> dict[str, int]:
        """Batches of each task per rank in one task epoch."""
        batches = {}
        for names in self.groups("train").values():
            batches.update(dict.fromkeys(names, self._stream(names, "train").batches_per_epoch))
        return {name: batches[name] for name in self.tasks}

    @property
    def epoch_samples(self) -> dict[str, int]:
        return {name: self._samples_per_epoch(name, self.plans.indexes[name]["train"]) for name in self.tasks}

    def _default_steps(self) -> int:
        batches = self.batches_per_epoch
        if isinstance(self.sampler, AllTasks):
            return max(batches.values())
        return sum(batches.values())

    def train_dataloader(self) -> Mixture:
        groups = self.groups("train")
        step, start = 0, {}
        if self._resume:
            step, start = resumed_position(self._resume, self.epoch_samples, self._settings(), self._layout(), groups)
        self._train_streams = {group: self._stream(names, "train", start.get(names[0], (0, 0)))
                               for group, names in groups.items()}
        loader = self._loader(StepStream(self._train_streams, groups, self.sampler, step))
        self.mixture = Mixture(loader, self.sampler, self.steps_per_epoch or self._default_steps(), self.faults,
                               groups=groups, step=step)
        return self.mixture

    def _positions(self, taken: dict[str, int]) -> dict[str, tuple[int, int]]:
        """Each task's position (epoch, samples of it consumed) after ``taken`` batches of its stream."""
        return {name: self._train_streams[group].plan.advance(taken[name])
                for group, names in self.mixture.groups.items() for name in names}

    def task_epoch(self, name: str) -> float:
        """The task epoch a task's stream is in, with the share of it done (from the batches pulled so far)."""
        epoch, sample = self._positions(self.mixture.pulled)[name]
        return epoch + sample / self.epoch_samples[name]

    def _eval_loaders(self, split: str) -> Sequential:
        streams = [self._stream(names, split) for names in self.groups(split).values()]
        return Sequential(self._loader(EvalStream(streams)), self.faults, split)

    def val_dataloader(self) -> Sequential:
        return self._eval_loaders("val")

    def test_dataloader(self) -> Sequential:
        return self._eval_loaders("test")

    def predict_dataloader(self) -> Sequential:
        return self._eval_loaders("predict")

    def transfer_batch_to_device(self, batch, device: torch.device, dataloader_idx: int):
        """Lightning's move, but a tensor that several task batches hold (the images of tasks that read one source)
        is moved once and stays one tensor, which the backbone's shared pass encodes once; JPEGs left for the device
        (``decode_images: device``) are decoded there."""
        return move_batch(batch, device)

    # Resume: the position is rank-independent (every rank takes the same steps), saved from rank 0.
    def state_dict(self) -> dict:
        if self.mixture is None or self.trainer is None:
            return {}
        step = steps_processed(self.trainer)  # steps trained, not prefetched
        return saved_position(step, self._positions(self.mixture.taken(step)), self.epoch_samples, self._settings(),
                              self._layout())

    def _settings(self) -> dict:
        """What the epoch order of a task's stream depends on, besides its samples."""
        return {"seed": self.seed, "mode": self.mode, "shuffle_buffer": self.shuffle_buffer}

    def _layout(self) -> dict[str, dict]:
        """Per task, how its epochs are read, which a resumed run may change (ranks, workers, batch size)."""
        return {name: {"ranks": self.world_size, "workers": self.num_workers, "batch_size": task.batch_size}
                for name, task in self.tasks.items()}

    def load_state_dict(self, state_dict: dict) -> None:
        self._resume = state_dict or None
