"""PyTorch internals (checked against torch 2.14.1)."""

from __future__ import annotations

import pathlib
import pickle
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint import FileSystemReader, metadata as dcp_metadata
from torch.nn.parallel import DistributedDataParallel

__all__ = ["DCP_INDEX", "SafeFileSystemReader", "allow_retained_compiled_backward", "default_store",
           "read_dcp_index", "reduce_gradients_manually"]


def default_store() -> dist.Store:
    """The default process group's key-value store (no public accessor; there since torch 1.8)."""
    return dist.distributed_c10d._get_default_store()


def reduce_gradients_manually(wrapper: nn.Module) -> None:
    """Turn DDP's gradient reducer off for the next backward passes (as ``no_sync`` does, through the same flag) while
    it still broadcasts buffers before each forward: mmlit reduces per-task gradients itself."""
    if isinstance(wrapper, DistributedDataParallel):
        wrapper.require_backward_grad_sync = False
        wrapper.require_forward_param_sync = True


def allow_retained_compiled_backward() -> None:
    """A compiled backward donates its saved buffers by default, which forbids ``retain_graph``; mmlit back-propagates
    one graph several times (one pass per task for gradient-based objectives, and the gradient statistics), and
    torch's error names this switch as the way out. It costs the donation's memory saving."""
    import torch._functorch.config

    torch._functorch.config.donated_buffer = False


# The index torch.distributed.checkpoint writes last into a checkpoint folder (its filesystem._metadata_fn)
DCP_INDEX = ".metadata"


class _IndexUnpickler(pickle.Unpickler):
    """Unpickles a ``torch.distributed.checkpoint`` index with only the names torch writes into one: the dataclasses
    of ``torch.distributed.checkpoint.metadata``, the file offsets (``filesystem._StorageInfo``), ``torch.Size``,
    dtypes, layouts (``serialization._get_layout``) and the folder's path. Anything else (a pickle that would run
    code) is refused."""

    def find_class(self, module: str, name: str):
        found = None
        cls = getattr(dcp_metadata, name, None)
        if module == dcp_metadata.__name__ and isinstance(cls, type) and cls.__module__ == module:  # (defined there)
            found = cls
        elif (module, name) == ("torch.distributed.checkpoint.filesystem", "_StorageInfo"):
            found = super().find_class(module, name)
        elif (module, name) in (("torch.serialization", "_get_layout"), ("torch", "Size")):
            found = super().find_class(module, name)
        elif module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                          torch.memory_format)):
            found = getattr(torch, name)
        elif module == "pathlib" and name in ("PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"):
            found = getattr(pathlib, name)
        if found is None:
            raise pickle.UnpicklingError(f"{module}.{name} is not something torch writes into a checkpoint index")
        return found


def read_dcp_index(path: str | Path) -> dcp_metadata.Metadata:
    """The index (``.metadata``) of the ``torch.distributed.checkpoint`` folder ``path``, read without running code
    (torch's own ``FileSystemReader`` unpickles it whole)."""
    with open(Path(path) / DCP_INDEX, "rb") as f:
        index = _IndexUnpickler(f).load()
    if not isinstance(index, dcp_metadata.Metadata):
        raise pickle.UnpicklingError(f"{Path(path) / DCP_INDEX} holds a {type(index).__name__}, not a checkpoint index")
    return index


class SafeFileSystemReader(FileSystemReader):
    """``torch.distributed.checkpoint.FileSystemReader`` that reads the folder's index with ``read_dcp_index``, as
    torch's ``read_metadata`` does otherwise (the tensors it reads with ``weights_only=True`` already)."""

    def read_metadata(self, *args, **kwargs) -> dcp_metadata.Metadata:
        index = read_dcp_index(self.path)
        if getattr(index, "storage_meta", None) is None:
            index.storage_meta = dcp_metadata.StorageMeta()
        index.storage_meta.load_id = self.load_id
        return index
