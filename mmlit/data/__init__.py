"""Data: Sort-of-CLEVR shards, safe decoding, shard reading, the tasks' data sides, per-task streams, task mixing and
the DataModule. Nothing here imports a model or a task.

The names below are imported on first use (PEP 562), so that a DataLoader worker, which unpickles a stream from
``mmlit.data.stream``, does not import the DataModule and with it Lightning, torchmetrics and transformers: the fork
server's imports took 1.4 s of CPU instead of 4.9-5.3 s for a script that does not import Lightning itself
(``tools/bench_loader.py --startup``, docs/benchmarks.md)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "datamodule": ["MultiTaskDataModule"],
    "decode": ["SampleError", "UnsafeSampleError", "decode_sample", "sample_field", "sample_image", "sample_location"],
    "faults": ["DataBudgetError", "DataMonitor", "FaultLog"],
    "mixing": ["AllTasks", "FixedWeights", "Proportional", "RoundRobin", "TaskSampler", "Temperature"],
    "index": ["ShardIndex", "StaleIndexError", "load_index", "plan_shards", "scan_shards", "write_index"],
    "shards": ["ShardError", "iter_samples", "resolve_shards"],
    "sources": ["Source", "TarSource", "get_source", "list_sources", "register_source"],
    "stream": ["Mixture", "Sequential", "SourceStream", "TaskStream"],
    "task_data": ["Shards", "TaskData"],
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # (looked up once)
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:  # (for type checkers and IDEs: the same names, imported eagerly)
    from mmlit.data.datamodule import MultiTaskDataModule
    from mmlit.data.decode import (
        SampleError, UnsafeSampleError, decode_sample, sample_field, sample_image, sample_location,
    )
    from mmlit.data.faults import DataBudgetError, DataMonitor, FaultLog
    from mmlit.data.index import ShardIndex, StaleIndexError, load_index, plan_shards, scan_shards, write_index
    from mmlit.data.mixing import AllTasks, FixedWeights, Proportional, RoundRobin, TaskSampler, Temperature
    from mmlit.data.shards import ShardError, iter_samples, resolve_shards
    from mmlit.data.sources import Source, TarSource, get_source, list_sources, register_source
    from mmlit.data.stream import Mixture, Sequential, SourceStream, TaskStream
    from mmlit.data.task_data import Shards, TaskData
