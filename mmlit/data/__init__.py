"""Data: Sort-of-CLEVR shards, safe decoding, per-task streams and the DataModule."""

from mmlit.data.datamodule import MultiTaskDataModule
from mmlit.data.decode import (
    SampleError, UnsafeSampleError, decode_sample, sample_field, sample_image, sample_location,
)
from mmlit.data.stream import Mixture, Sequential, TaskStream, resolve_shards

__all__ = [
    "Mixture", "MultiTaskDataModule", "SampleError", "Sequential", "TaskStream", "UnsafeSampleError",
    "decode_sample", "resolve_shards", "sample_field", "sample_image", "sample_location",
]
