"""Experiment loggers: Weights & Biases by default, offline when it cannot reach the service."""

from __future__ import annotations

import logging
import netrc
import os
import socket
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger

from mmlit.compat.lightning import wandb_continue, wandb_run, wandb_without_unset_settings

__all__ = ["WandbContinuity", "WandbLogger", "wandb_run_of", "wandb_should_run_offline"]

log = logging.getLogger(__name__)
_RUN_ID_FILE = "wandb-run-id"  # in the run folder: the W&B run a resumed run continues


def _service() -> tuple[str, int, str]:
    """Host, port and scheme of the W&B server: ``WANDB_BASE_URL`` (a self-hosted server) or the public service."""
    url = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    return url.hostname or "api.wandb.ai", url.port or (443 if url.scheme == "https" else 80), url.scheme or "https"


def _has_api_key(host: str) -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def _reachable(host: str, port: int, scheme: str, timeout: float = 2.0) -> bool:
    """Whether a connection to the server can be opened: through the proxy that ``HTTPS_PROXY`` / ``HTTP_PROXY``
    name for it (unless ``NO_PROXY`` exempts the host), or directly."""
    proxy = urllib.request.getproxies().get(scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        parsed = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        host, port = parsed.hostname or host, parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wandb_should_run_offline() -> bool:
    """Offline when ``WANDB_MODE`` says so, when no API key is set up for the server, or when the server (or the
    proxy to it) is unreachable. The server is ``WANDB_BASE_URL``'s, or W&B's."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "disabled", "dryrun"):
        return True
    if mode == "online":
        return False
    host, port, scheme = _service()
    return not _has_api_key(host) or not _reachable(host, port, scheme)


class WandbLogger(_LightningWandbLogger):
    """Lightning's ``WandbLogger`` that picks offline mode by itself (``offline: null``).

    An offline run lands in ``{save_dir}/wandb/offline-run-*``; ``wandb sync <that folder>`` uploads it later.

    Args:
        project: W&B project.
        name: run name shown in the dashboard.
        save_dir: folder of the local run files.
        offline: force offline (true) or online (false); null decides from key and network.
        log_model: upload checkpoints as W&B artifacts (only online).
        tags: run tags.
        group: run group.
    """

    def __init__(self, project: str = "mmlit", name: str | None = None, save_dir: str = "runs",
                 offline: bool | None = None, log_model: bool = False, tags: list[str] | None = None,
                 group: str | None = None):
        offline = wandb_should_run_offline() if offline is None else offline
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        super().__init__(project=project, name=name, save_dir=save_dir, offline=offline,
                         log_model=log_model and not offline, tags=tags, group=group)
        wandb_without_unset_settings(self)
        self.is_offline = offline

    def finalize(self, status: str) -> None:
        """Close the W&B run (marked failed when training failed), so the next run in this process starts clean."""
        super().finalize(status)
        if wandb_run(self) is not None and status != "success":
            wandb_run(self).finish(exit_code=1)

    def continue_run(self, run_id: str) -> None:
        """Log into the W&B run ``run_id`` (a resumed training run's own), online or offline; before the first log."""
        if wandb_run(self) is not None:
            raise RuntimeError("WandbLogger.continue_run: the W&B run has started already")
        wandb_continue(self, run_id)

    def run_folder(self) -> Path | None:
        """The local folder of this run (what ``wandb sync`` takes), once the run has started."""
        run = wandb_run(self)
        if run is None or not getattr(run, "dir", None):
            return None
        return Path(run.dir).parent


class WandbContinuity(pl.Callback):
    """Keeps the W&B run id in the run folder (``wandb-run-id``) and in every checkpoint (``mmlit_wandb_run_id``), so
    that a run resumed from a checkpoint logs into the same W&B run (``mmlit`` passes it to ``continue_run``)."""

    @staticmethod
    def _run_id(trainer: pl.Trainer) -> str | None:
        return next((logger.version for logger in trainer.loggers if isinstance(logger, WandbLogger)), None)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        run_id = self._run_id(trainer) if trainer.is_global_zero else None
        if run_id:
            folder = Path(trainer.default_root_dir)
            folder.mkdir(parents=True, exist_ok=True)
            (folder / _RUN_ID_FILE).write_text(run_id + "\n")

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        run_id = self._run_id(trainer)
        if run_id:
            checkpoint["mmlit_wandb_run_id"] = run_id


def wandb_run_of(checkpoint: str, run_folder: str | None) -> str | None:
    """The W&B run a checkpoint was logged to: from the checkpoint (read without its tensors: memory-mapped), else
    from the run folder's ``wandb-run-id``."""
    try:
        run_id = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True).get("mmlit_wandb_run_id")
    except (OSError, RuntimeError, ValueError):
        run_id = None
    if run_id is None and run_folder is not None and (Path(run_folder) / _RUN_ID_FILE).is_file():
        run_id = (Path(run_folder) / _RUN_ID_FILE).read_text().strip() or None
    return run_id
