"""What reads each split, and the shard index of each reader, planned once (on rank 0) and given to every rank.

A task reads its own shards; on the val and test splits its evaluation sources (``TaskData.evaluation_sources``)
read theirs too, as readers ``{task}/1``, ``{task}/2``, ... whose batches go to the task. Readers of one shard spec
share its plan. Rank 0 plans and every rank uses its result (or raises its error), so that all ranks plan the same
epochs even when a remote store fails for one of them; it also reads remote files only once.
"""

from __future__ import annotations

from typing import Callable

import torch.distributed as dist

from mmlit.data.index import ShardIndex
from mmlit.data.task_data import TaskData

__all__ = ["SplitPlans"]


class SplitPlans:
    """The readers of each split and their shard indexes.

    Args:
        tasks: the tasks' data sides by name.
    """

    def __init__(self, tasks: dict[str, TaskData]):
        self.tasks = tasks
        self.indexes: dict[str, dict[str, ShardIndex]] = {}  # reader (a task, or its evaluation source) -> split -> index
        self._sources: dict[str, list] = {}  # task -> its evaluation sources

    def readers(self, split: str) -> dict[str, tuple[str, TaskData]]:
        """Reader -> (the task its batches go to, the data side that prepares them)."""
        readers = {name: (name, task) for name, task in self.tasks.items()}
        if split in ("val", "test"):  # (mmlit predict writes what the task predicts on its own shards)
            for name, task in self.tasks.items():
                if name not in self._sources:
                    self._sources[name] = task.evaluation_sources()
                readers.update({f"{name}/{i}": (name, source) for i, source in enumerate(self._sources[name], 1)})
        return readers

    def plan(self, splits: tuple[str, ...], rank: int, world_size: int,
             plan_one: Callable[[str, str], ShardIndex | Exception],
             accept: Callable[[str, str, str, str, ShardIndex], None]) -> None:
        """Plan every reader of ``splits`` not planned yet: ``plan_one(spec, key)`` on rank 0 (an index, or the error
        every rank raises), then ``accept(reader, split, task, key, index)`` on every rank, which checks it."""
        wanted = [(reader, split, name, _spec(task, split)) for split in splits
                  for reader, (name, task) in self.readers(split).items() if split not in self.indexes.get(reader, {})]
        wanted = [item for item in wanted if item[3][0] is not None]
        specs = list(dict(reversed([spec for *_, spec in wanted])).items())  # readers of one spec share its plan
        plans = [plan_one(spec, key) if rank == 0 else None for spec, key in specs]
        if world_size > 1:
            dist.broadcast_object_list(plans, src=0)
        planned = {}
        for (spec, _), plan in zip(specs, plans):
            if isinstance(plan, Exception):
                raise plan
            planned[spec] = plan
        for reader, split, name, (spec, key) in wanted:
            accept(reader, split, name, key, planned[spec])
            self.indexes.setdefault(reader, {})[split] = planned[spec]

    def groups(self, split: str, share: bool, samples_per_epoch: dict[str, int]) -> dict[str, list[str]]:
        """The readers of each source of ``split``, keyed by the first one's name: tasks with the same shards and
        batch size (and, in training, samples per epoch) read together when ``share``; otherwise each on its own."""
        groups: dict[tuple, list[str]] = {}
        for reader, (name, task) in self.readers(split).items():
            if split not in self.indexes.get(reader, {}):
                continue
            samples = samples_per_epoch.get(name) if split == "train" else None
            own = reader != name  # an evaluation source's batches go to its task: never in one stream with it
            key = (_spec(task, split)[0], task.batch_size, samples) if share and not own else (reader,)
            groups.setdefault(key, []).append(reader)
        return {readers[0]: readers for readers in groups.values()}


def _spec(task: TaskData, split: str) -> tuple[str | None, str]:
    """A data side's shards for ``split`` and their recipe key (``predict`` falls back to ``test``)."""
    if split == "predict" and task.shards.predict is None:
        split = "test"
    return getattr(task.shards, split), f"{task.key}.{split}"
