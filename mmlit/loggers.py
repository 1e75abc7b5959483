"""Experiment loggers: Weights & Biases by default, offline when it cannot reach the service."""

from __future__ import annotations

import logging
import netrc
import os
import socket
from pathlib import Path

from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger

__all__ = ["WandbLogger", "wandb_should_run_offline"]

log = logging.getLogger(__name__)
_WANDB_HOST = "api.wandb.ai"


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators(_WANDB_HOST) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False


def _reachable(host: str, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def wandb_should_run_offline() -> bool:
    """Offline when ``WANDB_MODE`` says so, when no API key is set up, or when the service is unreachable."""
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode in ("offline", "disabled", "dryrun"):
        return True
    if mode == "online":
        return False
    return not _has_api_key() or not _reachable(_WANDB_HOST)


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
        self.is_offline = offline

    def finalize(self, status: str) -> None:
        """Close the W&B run (marked failed when training failed), so the next run in this process starts clean."""
        super().finalize(status)
        if self._experiment is not None and status != "success":
            self._experiment.finish(exit_code=1)

    def run_folder(self) -> Path | None:
        """The local folder of this run (what ``wandb sync`` takes), once the run has started."""
        if self._experiment is None or not getattr(self._experiment, "dir", None):
            return None
        return Path(self._experiment.dir).parent
