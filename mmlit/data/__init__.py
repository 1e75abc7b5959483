"""Data: Sort-of-CLEVR shards, safe decoding, shard reading, per-task streams, task mixing and the DataModule."""

from mmlit.data.datamodule import MultiTaskDataModule
from mmlit.data.decode import (
    SampleError, UnsafeSampleError, decode_sample, sample_field, sample_image, sample_location,
)
from mmlit.data.faults import DataBudgetError, DataMonitor, FaultLog
from mmlit.data.mixing import AllTasks, FixedWeights, Proportional, RoundRobin, TaskSampler, Temperature
from mmlit.data.shards import ShardError, ShardIndex, iter_samples, resolve_shards, scan_shards
from mmlit.data.stream import Mixture, Sequential, TaskStream

__all__ = [
    "AllTasks", "DataBudgetError", "DataMonitor", "FaultLog", "FixedWeights", "Mixture", "MultiTaskDataModule",
    "Proportional", "RoundRobin", "SampleError", "Sequential", "ShardError", "ShardIndex", "TaskSampler", "TaskStream",
    "Temperature", "UnsafeSampleError", "decode_sample", "iter_samples", "resolve_shards", "sample_field",
    "sample_image", "sample_location", "scan_shards",
]
