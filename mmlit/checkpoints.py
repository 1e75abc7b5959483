"""Checkpoints that survive a kill: written atomically, and found again after a crash.

``AtomicCheckpointIO`` (the CLI installs it) writes a checkpoint to a temporary file beside its target, flushes and
fsyncs it, and renames it over the target, then fsyncs the folder: a process killed while it writes leaves the
previous checkpoint whole and, at most, a ``.*.partial`` file. Lightning's own writer builds the whole checkpoint in
memory first (twice its size) and, depending on the fsspec version, writes the target in place.

``resolve_checkpoint`` turns ``--ckpt_path last`` into the newest checkpoint of the run that can be loaded (a
checkpoint whose zip directory cannot be read, a file cut short, is passed over with a warning naming it) and
``--ckpt_path auto`` into the same, or into no checkpoint at all when the run has none: a requeued job resumes
where it was preempted, and its first start starts fresh, with one command.
"""

from __future__ import annotations

import os
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from mmlit.data.shards import _is_remote

__all__ = ["AtomicCheckpointIO", "resolve_checkpoint", "unloadable"]


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


def unloadable(path: str | Path) -> str | None:
    """Why a checkpoint cannot be loaded (None if it can): ``torch.save`` writes a zip file whose directory comes
    last, so one cut short has none. Reads the directory only, not the tensors."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile) as err:
        return f"{type(err).__name__}: {err}"
    if not any(name.endswith("data.pkl") for name in names):
        return "not a torch.save archive (no data.pkl)"
    return None


def resolve_checkpoint(ckpt_path: str | None, folder: str | Path | None) -> str | None:
    """``last``: the newest loadable ``*.ckpt`` in ``folder`` (an error if there is none); ``auto``: the same, or
    None when there is none; any other value unchanged. Broken checkpoints passed over are named in a warning."""
    if ckpt_path not in ("last", "auto"):
        return ckpt_path
    folder = Path(folder) if folder is not None else None
    if folder is not None and folder.is_dir():
        for stale in folder.glob(".*.partial"):  # a write that a kill cut short
            stale.unlink(missing_ok=True)
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
