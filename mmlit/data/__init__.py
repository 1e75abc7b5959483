"""Data: Sort-of-CLEVR shards, safe decoding, shard reading, the tasks' data sides, per-task streams, task mixing and
the DataModule. Nothing here imports a model or a task."""

from mmlit.data.datamodule import MultiTaskDataModule
from mmlit.data.decode import (
    SampleError, UnsafeSampleError, decode_sample, sample_field, sample_image, sample_location,
)
from mmlit.data.faults import DataBudgetError, DataMonitor, FaultLog
from mmlit.data.mixing import AllTasks, FixedWeights, Proportional, RoundRobin, TaskSampler, Temperature
from mmlit.data.index import ShardIndex, StaleIndexError, load_index, plan_shards, scan_shards, write_index
from mmlit.data.shards import ShardError, iter_samples, resolve_shards
from mmlit.data.sources import Source, TarSource, get_source, list_sources, register_source
from mmlit.data.stream import Mixture, Sequential, SourceStream, TaskStream
from mmlit.data.task_data import Shards, TaskData

__all__ = [
    "AllTasks", "DataBudgetError", "DataMonitor", "FaultLog", "FixedWeights", "Mixture", "MultiTaskDataModule",
    "Proportional", "RoundRobin", "SampleError", "Sequential", "ShardError", "ShardIndex", "Shards", "Source",
    "SourceStream", "StaleIndexError", "TarSource", "TaskData", "TaskSampler", "TaskStream", "Temperature", "UnsafeSampleError", "decode_sample",
    "get_source", "iter_samples", "list_sources", "load_index", "plan_shards", "register_source", "resolve_shards",
    "sample_field", "sample_image", "sample_location", "scan_shards", "write_index",
]
