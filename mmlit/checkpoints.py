"""Checkpoints that survive a kill: written atomically, and found again after a crash.

``AtomicCheckpointIO`` (the CLI installs it) writes a checkpoint to a temporary file beside its target, flushes and
fsyncs it, and renames it over the target, then fsyncs the folder: a process killed while it writes leaves the
previous checkpoint whole and, at most, a ``.*.partial`` file. Lightning's own writer builds the whole checkpoint in
memory first (twice its size) and, depending on the fsspec version, writes the target in place.

A sharded checkpoint (``mmlit.fsdp.FSDP2Strategy``) is a folder: every rank's shards of the weights and optimizer
states (``torch.distributed.checkpoint``) and ``meta.pt`` with the rest (loops, data position, callbacks), as
Lightning lays it out. ``save_sharded`` builds it beside its target and renames it into place once whole, so a kill
leaves the previous one; it is read without running code (its index without pickle, its values with
``weights_only=True``); ``read_sharded`` gathers it into one Lightning checkpoint in one process (``AtomicCheckpointIO``
loads a folder that way, so ``validate``, ``test``, ``predict`` and ``model.pretrained`` take one under any strategy),
and ``consolidate`` writes that to one file.

``resolve_checkpoint`` turns ``--ckpt_path last`` into the newest checkpoint of the run that can be loaded (a
checkpoint whose zip directory cannot be read, a file cut short, a folder with a shard missing, is passed over with a
warning naming it) and ``--ckpt_path auto`` into the same, or into no checkpoint at all when the run has none: a
requeued job resumes where it was preempted, and its first start starts fresh, with one command.
"""

from __future__ import annotations

import io
import os
import pickle
import shutil
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed.checkpoint as dcp
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from mmlit.compat.torch import DCP_INDEX, SafeFileSystemReader, read_dcp_index
from mmlit.data.shards import _is_remote

__all__ = ["SHARDED_META", "AtomicCheckpointIO", "checkpoint_file", "consolidate", "is_sharded", "load_sharded",
           "read_sharded", "resolve_checkpoint", "save_sharded", "unloadable"]

SHARDED_META = "meta.pt"  # a sharded checkpoint's non-tensor state (Lightning's name for it: its loaders know it)


def _fsync_folder(folder: Path) -> None:
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:  # (a platform without directory descriptors)
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO``, writing local checkpoints through a temporary file, fsync and rename
    (remote ones as Lightning does: an object store replaces an object whole)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if _is_remote(str(path)):
            return super().save_checkpoint(checkpoint, path, storage_options)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
        try:
            with open(partial, "wb") as f:
                self._write(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(partial, path)
            _fsync_folder(path.parent)
        finally:
            partial.unlink(missing_ok=True)

    def _write(self, checkpoint: dict[str, Any], file) -> None:
        torch.save(checkpoint, file)

    def load_checkpoint(self, path, map_location: Any = lambda storage, loc: storage,
                        weights_only: bool | None = None) -> dict[str, Any]:
        """Lightning's, and a sharded checkpoint folder gathered into one checkpoint (``read_sharded``)."""
        if not _is_remote(str(path)) and is_sharded(path):
            return read_sharded(path)
        return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)


def is_sharded(path: str | Path) -> bool:
    """Whether ``path`` is a sharded checkpoint folder (it has ``meta.pt``)."""
    return Path(path).is_dir() and (Path(path) / SHARDED_META).is_file()


def checkpoint_file(path: str | Path) -> Path:
    """The file of a checkpoint that holds its non-tensor entries (the W&B run id, the step): the checkpoint itself,
    or a sharded folder's ``meta.pt``."""
    return Path(path) / SHARDED_META if is_sharded(path) else Path(path)


def _save_file(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _swap_in(new: Path, target: Path) -> None:
    """Rename the whole folder ``new`` to ``target``; a folder already there is first renamed aside
    (``.{name}.replaced``, where ``_recover`` finds it if a kill comes between the two renames), then removed."""
    replaced = target.with_name(f".{target.name}.replaced")
    shutil.rmtree(replaced, ignore_errors=True)
    if target.is_dir():
        os.replace(target, replaced)
    elif target.exists():  # a one-file checkpoint of that name
        target.unlink()
    os.replace(new, target)
    _fsync_folder(target.parent)
    shutil.rmtree(replaced, ignore_errors=True)


def save_sharded(checkpoint: dict[str, Any], path: str | Path, rank: int, barrier: Callable[[], None]) -> None:
    """Write Lightning's ``checkpoint`` (``state_dict`` and ``optimizer_states`` of sharded tensors) as the folder
    ``path``, called on every rank: each writes its shards (``torch.distributed.checkpoint``, each file fsynced, the
    index last) and rank 0 the rest as ``meta.pt``, into ``.{name}.partial`` beside ``path``, which rank 0 then
    renames to ``path``. ``path`` must be on a file system that every rank sees."""
    path = Path(path)
    if _is_remote(str(path)):
        raise ValueError(f"checkpoint.dirpath: sharded checkpoints are written to a folder every rank sees (a local or "
                         f"mounted file system), not to '{path}'")
    partial = path.with_name(f".{path.name}.partial")
    if rank == 0:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    barrier()
    tensors = {"state_dict": checkpoint["state_dict"],
               **{f"optimizer_{i}": state for i, state in enumerate(checkpoint.get("optimizer_states", []))}}
    dcp.save(tensors, storage_writer=dcp.FileSystemWriter(partial, sync_files=True))
    if rank == 0:
        _save_file({k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")},
                   partial / SHARDED_META)
        _fsync_folder(partial)
        _swap_in(partial, path)
    barrier()


class _SafeLoadPlanner(dcp.DefaultLoadPlanner):
    """torch's load planner, with the non-tensor entries (an optimizer's ``lr``, ``betas``) read with
    ``weights_only=True``: torch's own unpickles them whole, so they reach it as a copy written from the safe
    reading."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        copy = io.BytesIO()
        torch.save(torch.load(value, map_location="cpu", weights_only=True), copy)
        copy.seek(0)
        super().load_bytes(read_item, copy)


def load_sharded(state: dict[str, Any], path: str | Path, strict: bool = True, no_dist: bool = False) -> None:
    """Fill ``state`` (``{"state_dict": ..., "optimizer_0": ...}``, each a state dict of the tensors to fill, sharded
    or whole) from the sharded checkpoint folder ``path``, without running code from it. Called on every rank, or
    in one process alone with ``no_dist``."""
    dcp.load(state, storage_reader=SafeFileSystemReader(path), planner=_SafeLoadPlanner(allow_partial_load=not strict),
             no_dist=no_dist)


def read_sharded(path: str | Path) -> dict[str, Any]:
    """The sharded checkpoint folder ``path`` as one Lightning checkpoint in this process: ``meta.pt``'s entries and
    the whole ``state_dict``. The optimizer states stay in the folder (a fit resumes from the folder itself)."""
    path = Path(path)
    checkpoint = torch.load(path / SHARDED_META, map_location="cpu", weights_only=True)
    weights = {key[len("state_dict."):]: torch.empty(entry.size, dtype=entry.properties.dtype)
               for key, entry in read_dcp_index(path).state_dict_metadata.items()
               if key.startswith("state_dict.") and isinstance(entry, TensorStorageMetadata)}
    state = {"state_dict": weights}
    with warnings.catch_warnings():  # (torch warns that it reads in one process, as asked)
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        load_sharded(state, path, no_dist=True)
    checkpoint["state_dict"] = state["state_dict"]
    return checkpoint


def consolidate(folder: str | Path, out: str | Path) -> Path:
    """Write the sharded checkpoint ``folder`` as the one file ``out`` (``read_sharded``: Lightning's layout,
    loadable with ``weights_only=True``; for evaluation, export and ``model.pretrained``)."""
    if not is_sharded(folder):
        raise ValueError(f"'{folder}' is not a sharded checkpoint folder (it has no {SHARDED_META})")
    AtomicCheckpointIO().save_checkpoint(read_sharded(folder), out)
    return Path(out)


def _unloadable_folder(path: Path) -> str | None:
    if not (path / SHARDED_META).is_file():
        return f"a folder without {SHARDED_META} (not a sharded checkpoint)"
    reason = unloadable(path / SHARDED_META)
    if reason is not None:
        return f"{SHARDED_META}: {reason}"
    try:
        index = read_dcp_index(path)
    except (OSError, EOFError, pickle.UnpicklingError) as err:
        return f"{DCP_INDEX}: {type(err).__name__}: {err}"
    sizes = {p.name: p.stat().st_size for p in path.iterdir()}
    short = sorted({info.relative_path for info in index.storage_data.values()
                    if sizes.get(info.relative_path, -1) < info.offset + info.length})
    return f"shard file(s) missing or cut short: {', '.join(short[:3])}" if short else None


def unloadable(path: str | Path) -> str | None:
    """Why a checkpoint cannot be loaded (None if it can): ``torch.save`` writes a zip file whose directory comes
    last, so one cut short has none; a sharded folder needs ``meta.pt``, its index and every shard file the index
    names, at its full length. Reads directories and the index only, not the tensors."""
    if Path(path).is_dir():
        return _unloadable_folder(Path(path))
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile) as err:
        return f"{type(err).__name__}: {err}"
    if not any(name.endswith("data.pkl") for name in names):
        return "not a torch.save archive (no data.pkl)"
    return None


def _recover(folder: Path) -> None:
    """Undo what a kill left in the checkpoint folder ``folder``: a sharded checkpoint renamed aside for its
    successor that never took its place goes back; partial writes (files or folders) go."""
    for replaced in folder.glob(".*.replaced"):
        target = folder / replaced.name[1:-len(".replaced")]
        try:
            if target.exists():
                shutil.rmtree(replaced)
            else:
                os.replace(replaced, target)
        except OSError:  # (another rank of the job did it first)
            pass
    for stale in folder.glob(".*.partial"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def resolve_checkpoint(ckpt_path: str | None, folder: str | Path | None) -> str | None:
    """``last``: the newest loadable ``*.ckpt`` in ``folder`` (an error if there is none); ``auto``: the same, or
    None when there is none; any other value unchanged. Broken checkpoints passed over are named in a warning."""
    if ckpt_path not in ("last", "auto"):
        return ckpt_path
    folder = Path(folder) if folder is not None else None
    if folder is not None and folder.is_dir():
        _recover(folder)
        candidates = sorted(folder.glob("*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)
    else:
        candidates = []
    broken = []
    for candidate in candidates:
        reason = unloadable(candidate)
        if reason is None:
            if broken:
                warnings.warn(f"--ckpt_path {ckpt_path}: {'; '.join(broken)}; resuming from {candidate} instead",
                              stacklevel=2)
            return str(candidate)
        broken.append(f"{candidate} cannot be loaded ({reason})")
    if ckpt_path == "auto":
        if broken:
            warnings.warn(f"--ckpt_path auto: {'; '.join(broken)}; starting fresh", stacklevel=2)
        return None
    raise FileNotFoundError(f"--ckpt_path last: no checkpoint that loads in {folder}"
                            + (f" ({'; '.join(broken)})" if broken else "")
                            + "; --ckpt_path auto starts fresh when there is none")
