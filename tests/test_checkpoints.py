"""Checkpoints written atomically and found again after a crash; a preemption signal that checkpoints, stops and
requeues; the SLURM example; the W&B run a resumed run continues, and the probe that decides whether W&B runs online
(its server, its proxy)."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import yaml

from mmlit.callbacks import Preemption
from mmlit.checkpoints import AtomicCheckpointIO, resolve_checkpoint, unloadable
from mmlit.loggers import wandb_run_of, wandb_should_run_offline


def _checkpoint(step: int) -> dict:
    return {"global_step": step, "state_dict": {"w": torch.full((64, 64), float(step))}}


def test_a_write_that_fails_midway_leaves_the_previous_checkpoint_whole(tmp_path):
    io = AtomicCheckpointIO()
    target = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint(_checkpoint(1), target)

    class Broken(AtomicCheckpointIO):
        def _write(self, checkpoint, file):
            file.write(b"PK\x03\x04 half of a checkpoint")
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        Broken().save_checkpoint(_checkpoint(2), target)
    assert torch.load(target, weights_only=True)["global_step"] == 1
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"], "no partial file is left"


def test_last_falls_back_to_the_newest_checkpoint_that_loads(tmp_path):
    io = AtomicCheckpointIO()
    io.save_checkpoint(_checkpoint(4), tmp_path / "epoch=0-step=4.ckpt")
    time.sleep(0.01)
    io.save_checkpoint(_checkpoint(6), tmp_path / "last.ckpt")
    (tmp_path / ".last.ckpt.123.partial").write_bytes(b"a write that a kill cut short")
    data = (tmp_path / "last.ckpt").read_bytes()
    (tmp_path / "last.ckpt").write_bytes(data[: len(data) // 2])  # cut short, as an in-place write killed midway
    assert "BadZipFile" in unloadable(tmp_path / "last.ckpt")
    with pytest.warns(UserWarning, match=r"last.ckpt cannot be loaded \(BadZipFile.*resuming from .*step=4.ckpt"):
        chosen = resolve_checkpoint("last", tmp_path)
    assert torch.load(chosen, weights_only=True)["global_step"] == 4
    assert not (tmp_path / ".last.ckpt.123.partial").exists(), "stale partial writes are removed"
    assert resolve_checkpoint("some/path.ckpt", tmp_path) == "some/path.ckpt"


def test_auto_starts_fresh_without_a_checkpoint_and_last_says_there_is_none(tmp_path):
    assert resolve_checkpoint("auto", tmp_path / "not-yet") is None
    (tmp_path / "broken.ckpt").write_bytes(b"nothing")
    with pytest.warns(UserWarning, match="starting fresh"):
        assert resolve_checkpoint("auto", tmp_path) is None
    with pytest.raises(FileNotFoundError, match=r"--ckpt_path last: no checkpoint that loads .* --ckpt_path auto starts"):
        resolve_checkpoint("last", tmp_path)


def test_the_wandb_run_of_a_checkpoint_comes_from_it_or_from_the_run_folder(tmp_path):
    AtomicCheckpointIO().save_checkpoint({**_checkpoint(1), "mmlit_wandb_run_id": "abc123"}, tmp_path / "a.ckpt")
    AtomicCheckpointIO().save_checkpoint(_checkpoint(1), tmp_path / "b.ckpt")
    (tmp_path / "wandb-run-id").write_text("fromfolder\n")
    assert wandb_run_of(str(tmp_path / "a.ckpt"), str(tmp_path)) == "abc123"
    assert wandb_run_of(str(tmp_path / "b.ckpt"), str(tmp_path)) == "fromfolder"
    assert wandb_run_of(str(tmp_path / "b.ckpt"), str(tmp_path / "elsewhere")) is None


@pytest.fixture
def listening():
    """A TCP socket accepting connections on loopback (a W&B server, or a proxy)."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                server.accept()[0].close()
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    server.close()


def test_the_offline_probe_asks_the_configured_server_and_its_proxy(monkeypatch, listening):
    for name in ("WANDB_MODE", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{listening}")  # a self-hosted server on loopback
    assert not wandb_should_run_offline()
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{closed}")
    assert wandb_should_run_offline()
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.invalid")  # only reachable through the proxy
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{listening}")
    assert not wandb_should_run_offline()
    monkeypatch.setenv("NO_PROXY", "wandb.example.invalid")  # ... unless the host bypasses it
    assert wandb_should_run_offline()
    monkeypatch.delenv("WANDB_API_KEY")
    monkeypatch.delenv("NO_PROXY")
    monkeypatch.setenv("NETRC", os.devnull)
    assert wandb_should_run_offline(), "no API key: offline"


class _Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(64, 4)), batch_size=4)


class _SignalAt(pl.Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 3:
            os.kill(os.getpid(), signal.SIGUSR1)


def test_preemption_checkpoints_the_step_stops_and_requeues_the_slurm_job(tmp_path, monkeypatch):
    """SIGUSR1 during step 3: the step ends, ``preempted.ckpt`` holds it, the fit stops and ``scontrol requeue JOB``
    runs (a stand-in ``scontrol`` on PATH records its arguments: SLURM itself does not run here)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" > {tmp_path / "scontrol.args"}\n')
    (bin_dir / "scontrol").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    before = signal.getsignal(signal.SIGUSR1)
    preemption = Preemption()
    trainer = pl.Trainer(max_epochs=3, default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[preemption, _SignalAt()],
                         plugins=[AtomicCheckpointIO()])
    trainer.fit(_Tiny())
    assert trainer.global_step == 4, "the fit stopped after the signalled step"
    saved = torch.load(tmp_path / "checkpoints" / "preempted.ckpt", weights_only=True)
    assert saved["global_step"] == 4
    assert (tmp_path / "scontrol.args").read_text().split() == ["requeue", "4242"]
    assert signal.getsignal(signal.SIGUSR1) == before, "the previous handler is back after the fit"


def test_preemption_names_an_unknown_signal():
    with pytest.raises(ValueError, match="SIGFOO is not a signal name"):
        Preemption(signals=["SIGFOO"])


def test_the_slurm_example_adds_its_settings_to_a_recipe(capsys, monkeypatch):
    """``tools/slurm/mmlit.sbatch`` stacks ``slurm.yaml`` on a recipe: the result parses, with Lightning's SLURM
    environment that leaves SIGUSR1 to mmlit and with the preemption settings."""
    from mmlit.cli import main

    repo = Path(__file__).parents[1]
    script = (repo / "tools" / "slurm" / "mmlit.sbatch").read_text()
    assert "#SBATCH --signal=USR1@" in script and "--ckpt_path auto" in script
    monkeypatch.chdir(repo)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "recipes/quickstart.yaml", "--config", "tools/slurm/slurm.yaml", "--print_config"])
    assert exit_info.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    plugin = printed["trainer"]["plugins"][0]
    assert plugin["class_path"].endswith("SLURMEnvironment") and plugin["init_args"]["auto_requeue"] is False
    assert printed["preemption"] == {"signals": ["SIGUSR1"], "requeue": True}
