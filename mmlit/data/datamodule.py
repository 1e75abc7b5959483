"""The DataModule: one loader per task and split, the task mixture, fault counting and the resume position."""

from __future__ import annotations

import os
import warnings
from typing import Literal, get_args

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning_utilities.core.apply_func import apply_to_collection
from torch.utils.data import DataLoader

from mmlit.data.device_images import decode_batch_images
from mmlit.data.faults import DataBudgetError, FaultLog
from mmlit.data.mixing import AllTasks, TaskSampler
from mmlit.data.index import ShardIndex, plan_shards
from mmlit.data.sources import Source, get_source
from mmlit.data.stream import Mixture, Sequential, SourceStream
from mmlit.data.workers import StartMethod, start_fork_server, task_loader
from mmlit.distributed import report_failure, watch_peers
from mmlit.tasks.base import Task
from mmlit.text import load_tokenizer

__all__ = ["MultiTaskDataModule"]

# Tokenizers' own thread pool does not survive fork; DataLoader workers tokenize one sample each anyway.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}


class MultiTaskDataModule(pl.LightningDataModule):
    """Streams every task's shards.

    Args:
        tokenizer: path to the ``tokenizer.json`` made by ``mmlit data tokenizer``; none for recipes whose tasks read no
            text (image classification).
        tasks: the model's tasks (linked from ``model.tasks`` by the CLI; not a recipe key).
        mode: ``epoch``: every training sample once per task epoch; ``resampled``: shards drawn with
            replacement, ``samples_per_epoch`` samples per task epoch.
        samples_per_epoch: resampled mode: samples per task epoch over all ranks (task name -> number;
            a task not named uses its number of samples).
        mixture: which tasks take part in each step (default: all of them).
        steps_per_epoch: steps in a training epoch, the same on every rank. Default: the steps in
            which every task's stream passes through one task epoch (the largest task's, for the
            all-task mixture).
        num_workers: DataLoader worker processes per task loader.
        multiprocessing_context: how the workers start. ``forkserver``: forked from a server process with one
            thread, which has imported torch and the tasks' modules; ``spawn``: a fresh interpreter each; ``fork``:
            forked from the training process, whose threads (DDP's, the other loaders') can leave a worker
            deadlocked (see ``mmlit/data/workers.py``).
        shuffle_buffer: the least samples of a shuffle window (whole shards, permuted together) per training reader.
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
    """

    def __init__(self, tokenizer: str | None = None, tasks: dict | None = None, mode: Literal["epoch", "resampled"] = "epoch",
                 samples_per_epoch: dict[str, int] | None = None, mixture: TaskSampler | None = None,
                 steps_per_epoch: int | None = None, num_workers: int = 2,
                 multiprocessing_context: StartMethod = "forkserver", shuffle_buffer: int = 1000, seed: int = 0,
                 error_budget: float = 0.01, allow_pipe: bool = False, shard_format: str = "tar",
                 storage_options: dict | None = None, scan_remote: bool = False, max_image_pixels: int | None = None,
                 decode_images: Literal["worker", "device"] = "worker", share_reads: bool = True):
        super().__init__()
        if steps_per_epoch is not None and steps_per_epoch < 1:
            raise ValueError(f"data.steps_per_epoch must be at least 1, got {steps_per_epoch}")
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be 0 or more, got {num_workers}")
        if multiprocessing_context not in get_args(StartMethod):
            raise ValueError(f"data.multiprocessing_context is one of {', '.join(get_args(StartMethod))}, "
                             f"got {multiprocessing_context!r}")
        if not 0 <= error_budget <= 1:
            raise ValueError(f"data.error_budget is a share of samples between 0 and 1, got {error_budget}")
        if samples_per_epoch and mode != "resampled":
            raise ValueError("data.samples_per_epoch applies to data.mode: resampled only")
        if max_image_pixels is not None and max_image_pixels < 1:
            raise ValueError(f"data.max_image_pixels must be at least 1, got {max_image_pixels}")
        self.source_class = get_source(shard_format)
        self.storage_options, self.scan_remote, self.max_image_pixels = storage_options, scan_remote, max_image_pixels
        self.share_reads, self.decode_images = share_reads, decode_images
        self.tokenizer_path, self.tasks, self.mode = tokenizer, tasks or {}, mode
        self.samples_per_epoch, self.sampler = dict(samples_per_epoch or {}), mixture or AllTasks()
        self.steps_per_epoch, self.num_workers, self.start_method = steps_per_epoch, num_workers, multiprocessing_context
        self.shuffle_buffer, self.seed, self.error_budget, self.allow_pipe = shuffle_buffer, seed, error_budget, allow_pipe
        self.tokenizer = None
        self.rank, self.world_size = 0, 1
        self.faults = FaultLog()
        self.indexes: dict[str, dict[str, ShardIndex]] = {}  # reader (a task, or its evaluation source) -> split -> index
        self._sources: dict[str, list] = {}  # task -> its evaluation sources (Task.evaluation_sources)
        self.mixture: Mixture | None = None
        self._resume: dict | None = None

    @property
    def readers(self) -> int:
        return self.world_size * max(self.num_workers, 1)

    def setup(self, stage: str) -> None:
        watch_peers()  # from here on, a rank that fails stops the others (mmlit/distributed.py)
        if not self.tasks:
            raise ValueError("model.tasks: the recipe declares no task")
        unknown = sorted(set(self.samples_per_epoch) - set(self.tasks))
        if unknown:
            raise ValueError(f"data.samples_per_epoch: no task named {', '.join(unknown)}; the tasks are {', '.join(self.tasks)}")
        self.tokenizer = load_tokenizer(self.tokenizer_path, key="data.tokenizer") if self.tokenizer_path else None
        if dist.is_available() and dist.is_initialized():
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.faults.rank = self.rank
        if self.trainer is not None:
            self.faults.attach(self.trainer.default_root_dir)
        for name, task in self.tasks.items():
            if task.shards.train is None and stage == "fit":
                raise ValueError(f"model.tasks.{name}.init_args.shards.train: task '{name}' has no training shards")
        if self.decode_images == "device" and stage == "fit":
            augmented = [n for n, t in self.tasks.items() if t.transform is not None and t.transform.augment]
            if augmented:
                raise ValueError(f"data.decode_images: device decodes and resizes JPEGs on the device, without the "
                                 f"training augmentation of task(s) {', '.join(augmented)}; set their "
                                 f"init_args.transform.augment: false, or data.decode_images: worker")
        wanted = [(reader, split) for split in _SPLITS.get(stage, ()) for reader in self._readers(split)
                  if split not in self.indexes.get(reader, {}) and self._spec(reader, split)[0] is not None]
        specs = list(dict(reversed([self._spec(reader, split) for reader, split in wanted])).items())  # tasks may share shards
        # Rank 0 plans and every rank uses its result (or raises its error), so that all ranks plan the same
        # epochs even when a remote store fails for one of them; it also reads remote files only once.
        plans = [self._plan(spec, key) if self.rank == 0 else None for spec, key in specs]
        if self.world_size > 1:
            dist.broadcast_object_list(plans, src=0)
        planned = {}
        for (spec, key), plan in zip(specs, plans):
            if isinstance(plan, Exception):
                raise plan
            planned[spec] = plan
        for reader, split in wanted:
            self._index(reader, split, planned[self._spec(reader, split)[0]])
        if stage == "fit":
            self._check_fit()
        if self.num_workers:
            start_fork_server(self.start_method, self._task_modules)

    def on_exception(self, exception: BaseException) -> None:
        report_failure(exception)  # every other rank stops now, with this error, instead of at its next collective

    def _readers(self, split: str) -> dict[str, tuple[str, Task]]:
        """What reads ``split``: reader -> (the task its batches go to, the task that prepares them). A task reads its
        own shards; on the val and test splits its evaluation sources (``Task.evaluation_sources``) read theirs too,
        as readers ``{task}/1``, ``{task}/2``, ..."""
        readers = {name: (name, task) for name, task in self.tasks.items()}
        if split in ("val", "test"):  # (mmlit predict writes what the task predicts on its own shards)
            for name, task in self.tasks.items():
                if name not in self._sources:
                    self._sources[name] = task.evaluation_sources()
                readers.update({f"{name}/{i}": (name, source) for i, source in enumerate(self._sources[name], 1)})
        return readers

    def _spec(self, reader: str, split: str) -> tuple[str | None, str]:
        """A reader's shards for ``split`` and their recipe key (``predict`` falls back to ``test``)."""
        name, task = self._readers(split)[reader]
        key = getattr(task, "shards_key", f"model.tasks.{name}.init_args.shards")
        if split == "predict" and task.shards.predict is None:
            split = "test"
        return getattr(task.shards, split), f"{key}.{split}"

    @property
    def source(self) -> Source:
        return self.source_class(allow_pipe=self.allow_pipe, storage_options=self.storage_options)

    def _plan(self, spec: str, key: str) -> ShardIndex | Exception:
        try:
            return plan_shards(spec, key, source=self.source, scan_remote=self.scan_remote)
        except (OSError, ValueError) as err:  # a missing or empty shard, no index for remote shards: raised on every rank
            return err
        except Exception as err:  # (a missing fsspec protocol package ...): every rank must hear of it, picklable
            return RuntimeError(f"{key}: {type(err).__name__}: {err}")

    def _index(self, reader: str, split: str, index: ShardIndex) -> None:
        name, key = self._readers(split)[reader][0], self._spec(reader, split)[1]
        if self.rank == 0:
            self.faults.add_bad_shards(name, split, index.bad)
        shards = len(index.urls) + sum(1 for e in index.bad if e.url not in index.urls)
        if len(index.bad) > self.error_budget * shards:
            raise DataBudgetError(
                f"{key}: {len(index.bad)} of {shards} shard(s) cannot be read to the end, more than data.error_budget "
                f"({self.error_budget:g}) of the shards; their readable samples would be used, the rest is lost: "
                + "; ".join(str(e) for e in index.bad[:5]))
        samples = self._samples_per_epoch(name, index) if split == "train" else index.total
        if samples < self.readers:
            raise ValueError(f"{key}: {samples} sample(s) for {self.world_size} rank(s) x {max(self.num_workers, 1)} "
                             f"worker(s); every reader needs at least one (add data or lower data.num_workers)")
        if split == "train" and self.mode == "epoch" and len(index.urls) < self.readers:
            warnings.warn(f"{key}: {len(index.urls)} shard(s) for {self.readers} readers (ranks x workers): readers share "
                          f"shards and skip to their own samples, which reads some bytes more than once; more shards "
                          f"than readers read every byte once", stacklevel=2)
        self.indexes.setdefault(reader, {})[split] = index

    def _check_fit(self) -> None:
        self.sampler.bind(self.epoch_samples, self.seed)
        for names in self.groups("train").values():
            pipelines = {repr(self.tasks[name].transform) for name in names if self.tasks[name].transform is not None}
            if len(pipelines) > 1:
                warnings.warn(f"data: tasks {', '.join(names)} read one source with different image pipelines "
                              f"(init_args.transform), so each image is encoded once per pipeline in training; give "
                              f"them one transform to encode it once for all", stacklevel=2)
        # Whether DDP needs find_unused_parameters for a sampled mixture depends on the objective: the module checks.

    def _samples_per_epoch(self, name: str, index: ShardIndex) -> int:
        """Training samples in one task epoch: the shards' samples, or the recipe's number in resampled mode."""
        return self.samples_per_epoch.get(name, index.total) if self.mode == "resampled" else index.total

    def groups(self, split: str) -> dict[str, list[str]]:
        """The readers (tasks, and on evaluation splits their evaluation sources) of each source of ``split``, keyed by
        the first one's name: tasks with the same shards and batch size (and, in training, samples per epoch) read
        together when ``share_reads`` and every task is in every step; otherwise each reads on its own."""
        share = self.share_reads and (split != "train" or isinstance(self.sampler, AllTasks))
        groups: dict[tuple, list[str]] = {}
        for reader, (name, task) in self._readers(split).items():
            if split not in self.indexes.get(reader, {}):
                continue
            samples = self.samples_per_epoch.get(name) if split == "train" else None
            own = reader != name  # an evaluation source's batches go to its task: never in one stream with it
            key = (self._spec(reader, split)[0], task.batch_size, samples) if share and not own else (reader,)
            groups.setdefault(key, []).append(reader)
        return {readers[0]: readers for readers in groups.values()}

    def _stream(self, readers: list[str], split: str) -> SourceStream:
        tasks = dict(self._readers(split)[reader] for reader in readers)  # task name -> what prepares its batches
        first = next(iter(tasks.values()))
        train = split == "train"
        resampled = train and self.mode == "resampled"
        samples = self._samples_per_epoch(readers[0], self.indexes[readers[0]]["train"]) if resampled else None
        return SourceStream(tasks, self.indexes[readers[0]][split], self.tokenizer,
                            batch_size=first.batch_size, train=train, samples_per_epoch=samples, seed=self.seed,
                            shuffle_buffer=self.shuffle_buffer, rank=self.rank, world_size=self.world_size,
                            source=self.source, max_image_pixels=self.max_image_pixels, predict=split == "predict",
                            decode_images=self.decode_images)

    @property
    def _task_modules(self) -> set[str]:
        return {type(task).__module__ for task in self.tasks.values()}

    def _loader(self, stream: SourceStream) -> DataLoader:
        return task_loader(stream, workers=self.num_workers, start_method=self.start_method, persistent=stream.train,
                           preload=self._task_modules)

    @property
    def batches_per_epoch(self) -> dict[str, int]:
        """Batches of each task per rank in one task epoch."""
        batches = {}
        for names in self.groups("train").values():
            per_rank = self._stream(names, "train").reader_batches(self.num_workers) * max(self.num_workers, 1)
            batches.update(dict.fromkeys(names, per_rank))
        return {name: batches[name] for name in self.tasks}

    @property
    def epoch_samples(self) -> dict[str, int]:
        return {name: self._samples_per_epoch(name, self.indexes[name]["train"]) for name in self.tasks}

    def _default_steps(self) -> int:
        batches = self.batches_per_epoch
        if isinstance(self.sampler, AllTasks):
            return max(batches.values())
        return sum(batches.values())

    def train_dataloader(self) -> Mixture:
        groups = self.groups("train")
        step, start = 0, {}
        if self._resume:
            step, start = self._resume_position()
            for names in groups.values():  # the tasks of a source read the same batches
                known = sorted({start[name] for name in names if name in start})
                if len(known) > 1:
                    warnings.warn(f"data: tasks {', '.join(names)} read one source but were saved at different batches "
                                  f"({known}); they continue from batch {known[0]}", stacklevel=2)
                if known:  # (a task new in this run joins where the others are)
                    start.update(dict.fromkeys(names, known[0]))
        loaders = {group: self._loader(self._stream(names, "train")) for group, names in groups.items()}
        self.mixture = Mixture(loaders, self.sampler, self.steps_per_epoch or self._default_steps(), self.faults,
                               groups=groups, step=step, start=start)
        return self.mixture

    def _eval_loaders(self, split: str) -> Sequential:
        return Sequential([self._loader(self._stream(names, split)) for names in self.groups(split).values()],
                          self.faults, split)

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
        moved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def move(tensor: torch.Tensor) -> torch.Tensor:
            if id(tensor) not in moved:
                moved[id(tensor)] = (tensor, move_data_to_device(tensor, device))
            return moved[id(tensor)][1]

        return decode_batch_images(apply_to_collection(batch, torch.Tensor, move), device)

    # Resume: the position is rank-independent (every rank takes the same steps), saved from rank 0.
    def state_dict(self) -> dict:
        if self.mixture is None or self.trainer is None:
            return {}
        step = self.trainer.fit_loop.epoch_loop.batch_progress.total.processed  # steps trained, not prefetched
        position, batches, samples = self.mixture.position(step), self.batches_per_epoch, self.epoch_samples
        return {"step": step, "settings": self._settings(), "tasks": {
            name: {"batch": position[name], "epoch": position[name] // batches[name], "batch_size": self.tasks[name].batch_size,
                   "epoch_samples": samples[name]} for name in self.tasks}}

    def _settings(self) -> dict:
        """What the position of a task's stream depends on, besides the task's batch size and samples."""
        return {"seed": self.seed, "mode": self.mode, "ranks": self.world_size, "workers": max(self.num_workers, 1),
                "shuffle_buffer": self.shuffle_buffer}

    def load_state_dict(self, state_dict: dict) -> None:
        self._resume = state_dict or None

    def _resume_position(self) -> tuple[int, dict[str, int]]:
        state, batches, samples = self._resume, self.batches_per_epoch, self.epoch_samples
        start = {}
        for name, task in self.tasks.items():
            saved = state["tasks"].get(name)
            if saved is None:
                continue  # a task new in this run starts at its beginning
            same = (state["settings"], saved["batch_size"], saved["epoch_samples"]) == (
                self._settings(), task.batch_size, samples[name])
            if same:
                start[name] = saved["batch"]
            else:
                start[name] = saved["epoch"] * batches[name]
                warnings.warn(f"data: task '{name}' resumes with other data settings (seed, mode, ranks, workers, shuffle "
                              f"buffer, batch size or samples) than it was saved with; it restarts its task epoch {saved['epoch']}, so "
                              f"some samples of that epoch are seen twice", stacklevel=2)
        return state["step"], start
