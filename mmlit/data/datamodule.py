"""The DataModule: one DataLoader per task and split, built from the tasks the model declares."""

from __future__ import annotations

import os

import lightning.pytorch as pl
import torch.distributed as dist
from torch.utils.data import DataLoader

from mmlit.data.stream import Mixture, Sequential, TaskStream, resolve_shards
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
        steps_per_epoch: optimizer steps in a training epoch, the same on every rank.
        num_workers: DataLoader worker processes per task loader.
        shuffle_buffer: examples held for shuffling in each training stream.
        seed: base seed of shard and example shuffling.
        allow_pipe: accept ``pipe:`` shard URLs, which run a shell command.
    """

    def __init__(self, tokenizer: str, tasks: dict | None = None, steps_per_epoch: int = 100, num_workers: int = 2,
                 shuffle_buffer: int = 1000, seed: int = 0, allow_pipe: bool = False):
        super().__init__()
        if steps_per_epoch < 1:
            raise ValueError(f"data.steps_per_epoch must be at least 1, got {steps_per_epoch}")
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be 0 or more, got {num_workers}")
        self.tokenizer_path, self.tasks = tokenizer, tasks or {}
        self.steps_per_epoch, self.num_workers = steps_per_epoch, num_workers
        self.shuffle_buffer, self.seed, self.allow_pipe = shuffle_buffer, seed, allow_pipe
        self.tokenizer = None
        self.urls: dict[str, dict[str, list[str]]] = {}

    def setup(self, stage: str) -> None:
        if not self.tasks:
            raise ValueError("model.tasks: the recipe declares no task")
        self.tokenizer = load_tokenizer(self.tokenizer_path, key="data.tokenizer")
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)
        self.rank, self.world_size = rank, world
        for name, task in self.tasks.items():
            for split in _SPLITS.get(stage, ()):
                spec = getattr(task.shards, split)
                key = f"model.tasks.{name}.init_args.shards.{split}"
                if spec is None:
                    if split == "train":
                        raise ValueError(f"{key}: task '{name}' has no training shards")
                    continue
                urls = resolve_shards(spec, key, allow_pipe=self.allow_pipe)
                readers = world * max(self.num_workers, 1)
                if split == "train" and len(urls) < readers:
                    raise ValueError(
                        f"{key}: {len(urls)} shard(s) for {world} rank(s) x {max(self.num_workers, 1)} worker(s); "
                        f"training needs at least one shard per reader (split the data into more shards "
                        f"or lower data.num_workers)")
                self.urls.setdefault(name, {})[split] = urls

    def _loader(self, name: str, split: str) -> DataLoader:
        task = self.tasks[name]
        train = split == "train"
        stream = TaskStream(task, self.urls[name][split], self.tokenizer, batch_size=task.batch_size, train=train,
                            seed=self.seed, shuffle_buffer=self.shuffle_buffer, rank=self.rank,
                            world_size=self.world_size)
        workers = self.num_workers
        return DataLoader(stream, batch_size=None, num_workers=workers, persistent_workers=train and workers > 0,
                          prefetch_factor=4 if workers else None)

    def _eval_loaders(self, split: str) -> Sequential:
        return Sequential([self._loader(name, split) for name in self.tasks if split in self.urls.get(name, {})])

    def train_dataloader(self) -> Mixture:
        return Mixture({name: self._loader(name, "train") for name in self.tasks}, self.steps_per_epoch)

    def val_dataloader(self) -> Sequential:
        return self._eval_loaders("val")

    def test_dataloader(self) -> Sequential:
        return self._eval_loaders("test")
