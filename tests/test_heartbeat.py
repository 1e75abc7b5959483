"""``mmlit.heartbeat.Heartbeat`` on 2 gloo ranks started as a launcher starts them (one process per rank): when rank 1
sleeps in a training step, every rank writes its stacks (rank 1's name the sleeping frame) and exits with status 1
seconds after ``heartbeat.limit_s``, not at the process group's 30 minutes; a healthy run whose first step and
checkpoint take longer than the limit (within ``grace_s``) ends normally. A single process stuck in a step is found
too (in this process, its exit replaced)."""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
from lightning.pytorch.demos.boring_classes import BoringModel

from mmlit.heartbeat import Heartbeat

from ._processes import cli_env, run_together
from .conftest import tiny_recipe, write_recipe

LIMIT_S = 4.0  # heartbeat.limit_s of these runs
TIMEOUT = 120  # seconds per run; a hang that is not found would be killed here, not at the process group's timeout


class Sleep(pl.Callback):
    """Sleeps ``seconds`` at the start of optimizer step ``step``'s batch, on rank ``rank`` (every rank: null), after
    writing the time to ``marker``."""

    def __init__(self, seconds: float, step: int, rank: int | None = None, marker: str | None = None):
        self.seconds, self.step, self.rank, self.marker = seconds, step, rank, marker

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step and self.rank in (None, trainer.global_rank):
            if self.marker:
                Path(self.marker).write_text(str(time.time()))
            self.sleep_in_step()

    def sleep_in_step(self) -> None:
        time.sleep(self.seconds)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_ranks(recipe: dict, path: Path) -> list:
    """Both ranks of a 2-process job, each started as Lightning's launcher starts a rank (``LOCAL_RANK`` set), so
    that each one's exit status is seen."""
    env = dict(cli_env(ddp=True), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_port()), NODE_RANK="0", WORLD_SIZE="2")
    return run_together([["env", f"LOCAL_RANK={rank}", sys.executable, "-m", "mmlit.cli", "fit", "--config",
                          str(write_recipe(recipe, path))] for rank in range(2)], timeout=TIMEOUT, env=env)


def _recipe(soc, root: Path, callbacks: list[dict], **trainer) -> dict:
    recipe = tiny_recipe(soc, root, tasks=["vqa"], strategy="ddp", devices=2, logger=False,
                         num_sanity_val_steps=0, **trainer)
    recipe["trainer"]["callbacks"] = callbacks
    recipe["heartbeat"] = {"limit_s": LIMIT_S}
    return recipe


def test_settings_are_checked():
    with pytest.raises(ValueError, match="heartbeat.limit_s"):
        Heartbeat(limit_s=0)
    with pytest.raises(ValueError, match="heartbeat.grace_s"):
        Heartbeat(limit_s=60, grace_s=30)
    Heartbeat(limit_s=None, grace_s=0)  # (no watch)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # (its SystemExit)
def test_a_stuck_single_process_writes_its_stacks_and_exits(tmp_path, monkeypatch):
    exits = []

    def exit_thread(status: int):  # os._exit, but only the watching thread ends: the fit goes on after the sleep
        exits.append(status)
        raise SystemExit(status)

    monkeypatch.setattr(os, "_exit", exit_thread)
    trainer = pl.Trainer(default_root_dir=tmp_path, max_steps=3, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[Heartbeat(limit_s=1.0), Sleep(seconds=3.0, step=1)])
    trainer.fit(BoringModel())
    assert exits == [1]
    stacks = (tmp_path / "hung" / "rank0.txt").read_text()
    assert "rank 0's loop has been silent" in stacks and "longer than heartbeat.limit_s (1 s)" in stacks
    assert "in sleep_in_step" in stacks, stacks


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(TIMEOUT + 60)
def test_a_hung_rank_stops_every_rank_with_its_stacks(soc, tmp_path):
    root, marker = tmp_path / "run", tmp_path / "slept_at"
    sleep = {"class_path": "tests.test_heartbeat.Sleep",
             "init_args": {"seconds": 600, "step": 2, "rank": 1, "marker": str(marker)}}
    ranks = _two_ranks(_recipe(soc, root, [sleep], max_epochs=1, limit_val_batches=0), tmp_path / "r.yaml")
    assert marker.exists(), f"stopped before rank 1 slept:\n{ranks[0].stderr[-3000:]}"
    took = time.time() - float(marker.read_text())
    print(f"every rank ended {took:.1f} s after rank 1 began to sleep (heartbeat.limit_s {LIMIT_S:g})")  # (-s)
    for rank, result in enumerate(ranks):
        assert result.returncode == 1, f"rank {rank}: {result.returncode}\n{result.stderr[-3000:]}"
        assert "longer than heartbeat.limit_s" in result.stderr, result.stderr[-3000:]
    assert took < LIMIT_S + 20, "every rank stopped seconds after the limit, far from the process group's timeout"
    stacks = [(root / "hung" / f"rank{rank}.txt").read_text() for rank in range(2)]
    assert "in sleep_in_step" in stacks[1] and "test_heartbeat.py" in stacks[1], stacks[1]
    assert "in sleep_in_step" not in stacks[0], stacks[0]  # rank 0 waits for it, in a collective


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(TIMEOUT + 60)
def test_slow_phases_within_the_grace_do_not_stop_a_run(soc, tmp_path):
    root = tmp_path / "run"
    slow_first_step = {"class_path": "tests.test_heartbeat.Sleep", "init_args": {"seconds": LIMIT_S + 1, "step": 0}}
    pace = {"class_path": "tests._ddp_helpers.Pace", "init_args": {"seconds": 1.0}}  # steps outlast the limit
    recipe = _recipe(soc, root, [slow_first_step, pace], max_epochs=1, limit_val_batches=1)
    recipe["data"]["steps_per_epoch"] = 5
    recipe["trainer"]["plugins"] = [{"class_path": "tests._ddp_helpers.SlowCheckpointIO",  # a slow checkpoint write
                                     "init_args": {"marker": str(tmp_path / "writing"), "pause": LIMIT_S + 1}}]
    ranks = _two_ranks(recipe, tmp_path / "r.yaml")
    for rank, result in enumerate(ranks):
        assert result.returncode == 0, f"rank {rank}: {result.returncode}\n{result.stderr[-3000:]}"
    assert (tmp_path / "writing").exists() and (root / "checkpoints" / "last.ckpt").exists()
    assert not (root / "hung").exists()
