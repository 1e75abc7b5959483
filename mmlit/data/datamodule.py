"""The DataModule: one loader per task and split, the task mixture, fault counting and the resume position."""

from __future__ import annotations

import os
import warnings
from typing import Literal, get_args

import lightning.pytorch as pl
import torch.distributed as dist
from torch.utils.data import DataLoader

from mmlit.data.faults import DataBudgetError, FaultLog
from mmlit.data.mixing import AllTasks, TaskSampler
from mmlit.data.shards import ShardIndex, resolve_shards, scan_shards
from mmlit.data.stream import Mixture, Sequential, TaskStream
from mmlit.data.workers import StartMethod, start_fork_server, task_loader
from mmlit.text import load_tokenizer

__all__ = ["MultiTaskDataModule"]

# Tokenizers' own thread pool does not survive fork; DataLoader workers tokenize one sample each anyway.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",)}


class MultiTaskDataModule(pl.LightningDataModule):
    """Streams every task's shards.

    Args:
        tokenizer: path to the ``tokenizer.json`` made by ``mmlit data tokenizer``.
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
        shuffle_buffer: raw samples held for shuffling in each training reader.
        seed: base seed of the shard order, resampling, shuffling and the mixture.
        error_budget: the share of a task's training samples that may be skipped (unreadable, missing
            a field) before the run stops; counted over at least one task epoch.
        allow_pipe: accept ``pipe:`` shard URLs, which run a shell command.
    """

    def __init__(self, tokenizer: str, tasks: dict | None = None, mode: Literal["epoch", "resampled"] = "epoch",
                 samples_per_epoch: dict[str, int] | None = None, mixture: TaskSampler | None = None,
                 steps_per_epoch: int | None = None, num_workers: int = 2,
                 multiprocessing_context: StartMethod = "forkserver", shuffle_buffer: int = 1000, seed: int = 0,
                 error_budget: float = 0.01, allow_pipe: bool = False):
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
        self.tokenizer_path, self.tasks, self.mode = tokenizer, tasks or {}, mode
        self.samples_per_epoch, self.sampler = dict(samples_per_epoch or {}), mixture or AllTasks()
        self.steps_per_epoch, self.num_workers, self.start_method = steps_per_epoch, num_workers, multiprocessing_context
        self.shuffle_buffer, self.seed, self.error_budget, self.allow_pipe = shuffle_buffer, seed, error_budget, allow_pipe
        self.tokenizer = None
        self.rank, self.world_size = 0, 1
        self.faults = FaultLog()
        self.indexes: dict[str, dict[str, ShardIndex]] = {}
        self.mixture: Mixture | None = None
        self._resume: dict | None = None

    @property
    def readers(self) -> int:
        return self.world_size * max(self.num_workers, 1)

    def setup(self, stage: str) -> None:
        if not self.tasks:
            raise ValueError("model.tasks: the recipe declares no task")
        unknown = sorted(set(self.samples_per_epoch) - set(self.tasks))
        if unknown:
            raise ValueError(f"data.samples_per_epoch: no task named {', '.join(unknown)}; the tasks are {', '.join(self.tasks)}")
        self.tokenizer = load_tokenizer(self.tokenizer_path, key="data.tokenizer")
        if dist.is_available() and dist.is_initialized():
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.faults.rank = self.rank
        if self.trainer is not None:
            self.faults.attach(self.trainer.default_root_dir)
        for name, task in self.tasks.items():
            if task.shards.train is None and stage == "fit":
                raise ValueError(f"model.tasks.{name}.init_args.shards.train: task '{name}' has no training shards")
        wanted = [(name, split) for name in self.tasks for split in _SPLITS.get(stage, ())
                  if split not in self.indexes.get(name, {}) and getattr(self.tasks[name].shards, split) is not None]
        # Rank 0 scans and every rank uses its result (or raises its error), so that all ranks plan the same
        # epochs even when a remote shard fails for one of them; it also reads remote shards only once.
        scans = [self._scan(name, split) if self.rank == 0 else None for name, split in wanted]
        if self.world_size > 1:
            dist.broadcast_object_list(scans, src=0)
        for (name, split), scan in zip(wanted, scans):
            if isinstance(scan, Exception):
                raise scan
            self._index(name, split, scan)
        if stage == "fit":
            self._check_fit()
        if self.num_workers:
            start_fork_server(self.start_method, self._task_modules)

    def _scan(self, name: str, split: str) -> ShardIndex | Exception:
        key = f"model.tasks.{name}.init_args.shards.{split}"
        try:
            return scan_shards(resolve_shards(getattr(self.tasks[name].shards, split), key, allow_pipe=self.allow_pipe), key,
                               allow_pipe=self.allow_pipe)
        except (OSError, ValueError) as err:  # a missing or empty shard: raised on every rank
            return err

    def _index(self, name: str, split: str, index: ShardIndex) -> None:
        key = f"model.tasks.{name}.init_args.shards.{split}"
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
        self.indexes.setdefault(name, {})[split] = index

    def _check_fit(self) -> None:
        self.sampler.bind(self.epoch_samples, self.seed)
        # Whether DDP needs find_unused_parameters for a sampled mixture depends on the objective: the module checks.

    def _samples_per_epoch(self, name: str, index: ShardIndex) -> int:
        """Training samples in one task epoch: the shards' samples, or the recipe's number in resampled mode."""
        return self.samples_per_epoch.get(name, index.total) if self.mode == "resampled" else index.total

    def _stream(self, name: str, split: str) -> TaskStream:
        task = self.tasks[name]
        train = split == "train"
        samples = self._samples_per_epoch(name, self.indexes[name]["train"]) if train and self.mode == "resampled" else None
        return TaskStream(task, self.indexes[name][split], self.tokenizer, batch_size=task.batch_size, train=train,
                          samples_per_epoch=samples, seed=self.seed, shuffle_buffer=self.shuffle_buffer,
                          rank=self.rank, world_size=self.world_size, allow_pipe=self.allow_pipe)

    @property
    def _task_modules(self) -> set[str]:
        return {type(task).__module__ for task in self.tasks.values()}

    def _loader(self, stream: TaskStream) -> DataLoader:
        return task_loader(stream, workers=self.num_workers, start_method=self.start_method, persistent=stream.train,
                           preload=self._task_modules)

    @property
    def batches_per_epoch(self) -> dict[str, int]:
        """Batches of each task per rank in one task epoch."""
        return {name: self._stream(name, "train").reader_batches(self.num_workers) * max(self.num_workers, 1)
                for name in self.tasks}

    @property
    def epoch_samples(self) -> dict[str, int]:
        return {name: self._samples_per_epoch(name, self.indexes[name]["train"]) for name in self.tasks}

    def _default_steps(self) -> int:
        batches = self.batches_per_epoch
        if isinstance(self.sampler, AllTasks):
            return max(batches.values())
        return sum(batches.values())

    def train_dataloader(self) -> Mixture:
        streams = {name: self._stream(name, "train") for name in self.tasks}
        step, start = 0, {}
        if self._resume:
            step, start = self._resume_position()
        self.mixture = Mixture({name: self._loader(s) for name, s in streams.items()}, self.sampler,
                               self.steps_per_epoch or self._default_steps(), self.faults, step=step, start=start)
        return self.mixture

    def _eval_loaders(self, split: str) -> Sequential:
        loaders = [self._loader(self._stream(name, split)) for name in self.tasks if split in self.indexes.get(name, {})]
        return Sequential(loaders, self.faults, split)

    def val_dataloader(self) -> Sequential:
        return self._eval_loaders("val")

    def test_dataloader(self) -> Sequential:
        return self._eval_loaders("test")

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
