"""A hung rank stops the job: ``Heartbeat``, the callback that finds a rank whose loop has gone silent (a deadlock, a
read that never returns, a collective that a peer never joins), has every rank write its Python stacks to
``{trainer.default_root_dir}/hung/rank{N}.txt`` and exit with status 1 together, minutes after the hang instead of
at the process group's timeout (30 minutes by default, every GPU of the job idle meanwhile).

Every rank's loop beats at the end of each batch (a time kept in memory: no store call, no device sync), and a thread
per rank checks once a second how long its own loop has been silent. No rank reads another's beats: in data-parallel
training every step ends in a collective, so a rank that hangs leaves the others waiting in their next one, silent
too, and each finds the hang from its own silence. The first to find it writes it into the process group's store
(the one ``mmlit/distributed.py`` watches for errors); every rank looks there once a second, so all stop within
about a second of each other, whichever phase each was in: one store lookup per rank per second, however many ranks.

A rank's own thread can dump its stacks while its main thread waits in C (a collective, a read: they release the
GIL) or sleeps in Python. Where even that thread cannot run (C code that holds the GIL), faulthandler's own timer
thread, re-armed at each beat, writes the stacks to stderr and exits 30 s later. torch's
``elastic.timer`` does the like only under torchrun, killing a rank without its stacks; torch's NCCL monitor acts
only once a collective has reached the process group's timeout.
"""

from __future__ import annotations

import faulthandler
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import lightning.pytorch as pl
import torch.distributed as dist
from lightning.pytorch.trainer.states import TrainerStatus

from mmlit.compat.torch import default_store

__all__ = ["Heartbeat"]

_KEY = "mmlit/hung"
_POLL_S = 1.0
_LINGER_S = 2 * _POLL_S  # a stopping rank waits this long: the store (in rank 0) must outlive every rank's next look
_BACKSTOP_S = 30.0  # after a rank's allowance, faulthandler's timer ends a rank whose Python threads cannot run


class Heartbeat(pl.Callback):
    """Stop every rank, each with its Python stacks in ``{trainer.default_root_dir}/hung/rank{N}.txt``, when one
    rank's loop has been silent for longer than ``limit_s`` (``grace_s`` in the phases that are slow without being
    hung); exit status 1, so a requeued job resumes with ``--ckpt_path auto``. ``mmlit`` adds it to every run
    (``heartbeat`` in a recipe); a single process is watched the same way.

    A beat comes at the end of every training, validation, test and prediction batch: ``limit_s`` bounds a step and
    the wait for its batch. ``grace_s`` bounds the time from the callbacks' setup (checkpoint loading, DDP's first
    broadcast) and from the start of every epoch and validation (DataLoader workers start; ``torch.compile`` compiles
    the first step) to the first batch's end, the end of an epoch or a validation (epoch metrics, the checkpoint,
    the loggers) and a checkpoint write. The data module's own setup comes before it and is not watched.

    Args:
        limit_s: the longest a rank's loop may go from one batch's end to the next; null: no watch (e.g. to stop
            in a debugger).
        grace_s: the longest it may be silent in the slow phases above.
        requeue: under SLURM (``SLURM_JOB_ID``), the rank that found the hang requeues the job (``scontrol
            requeue``) before it exits. A hang that comes back at every start is requeued again each time.
    """

    def __init__(self, limit_s: float | None = 300.0, grace_s: float = 900.0, requeue: bool = True):
        if limit_s is not None and not limit_s > 0:
            raise ValueError(f"heartbeat.limit_s must be more than 0 seconds (null: no watch), got {limit_s}")
        if limit_s is not None and grace_s < limit_s:
            raise ValueError(f"heartbeat.grace_s ({grace_s} s) must be at least heartbeat.limit_s ({limit_s} s)")
        self.limit_s, self.grace_s, self.requeue = limit_s, grace_s, requeue
        self._watch: _Watch | None = None

    def _beat(self, trainer: pl.Trainer, phase: str, grace: bool = False) -> None:
        if self._watch is not None:
            self._watch.last = (time.monotonic(), grace, phase, trainer.global_step)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.limit_s is not None:
            self._stop()  # (a trainer used again)
            self._watch = _Watch(trainer, self.limit_s, self.grace_s, self.requeue)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._stop()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._stop()  # the error stops the ranks (mmlit/distributed.py); the exit may take a while

    def _stop(self) -> None:
        if self._watch is not None:
            self._watch.stop.set()
            self._watch.thread.join()
            self._watch = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._beat(trainer, "the start of an epoch", grace=True)

    def on_train_batch_end(self, trainer: pl.Trainer, *args) -> None:
        self._beat(trainer, "a training batch")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._beat(trainer, "the end of an epoch", grace=True)  # (also until the end of the fit)

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._beat(trainer, "the start of validation", grace=True)

    def on_validation_batch_end(self, trainer: pl.Trainer, *args) -> None:
        self._beat(trainer, "a validation batch")

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._beat(trainer, "the end of validation", grace=True)  # (also through the checkpoint that follows)

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._beat(trainer, "the start of testing", grace=True)

    def on_test_batch_end(self, trainer: pl.Trainer, *args) -> None:
        self._beat(trainer, "a test batch")

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._beat(trainer, "the end of testing", grace=True)

    def on_predict_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._beat(trainer, "the start of prediction", grace=True)

    def on_predict_batch_end(self, trainer: pl.Trainer, *args) -> None:
        self._beat(trainer, "a prediction batch")

    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._beat(trainer, "the end of prediction", grace=True)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        self._beat(trainer, "a checkpoint", grace=True)  # (every rank, before rank 0 writes it)


class _Watch:
    """One rank's watching thread: it stops this rank when its loop is silent too long or when the store says that
    another rank's was, and stops by itself with the stage (``stop``) or once the trainer no longer runs."""

    def __init__(self, trainer: pl.Trainer, limit_s: float, grace_s: float, requeue: bool):
        self.trainer, self.limit_s, self.grace_s, self.requeue = trainer, limit_s, grace_s, requeue
        self.rank, self.folder = trainer.global_rank, Path(trainer.default_root_dir) / "hung"
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        self.store = default_store() if distributed else None
        self.last = (time.monotonic(), True, "setup", trainer.global_step)  # (when, grace, phase, step): the beat
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="mmlit-heartbeat", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        armed = None
        try:
            while not self.stop.wait(_POLL_S) and self.trainer.state.status == TrainerStatus.RUNNING:
                beat = self.last
                when, grace, phase, step = beat
                allowed, silent = self.grace_s if grace else self.limit_s, time.monotonic() - when
                if silent > allowed:
                    self._stop_job(f"rank {self.rank}'s loop has been silent for {silent:.1f} s since {phase} (global "
                                   f"step {step}), longer than heartbeat.{'grace_s' if grace else 'limit_s'} "
                                   f"({allowed:g} s)", found=True)
                told = self._told()
                if told is not None:
                    self._stop_job(told, found=False)
                if beat is not armed:  # faulthandler's timer is process-wide: a timer of the run's own is replaced
                    faulthandler.dump_traceback_later(allowed - silent + _BACKSTOP_S, exit=True, file=2)
                    armed = beat
        finally:
            faulthandler.cancel_dump_traceback_later()

    def _told(self) -> str | None:
        """What another rank wrote into the store about a hang, if it has."""
        try:
            return self.store.get(_KEY).decode(errors="replace") if self.store and self.store.check([_KEY]) else None
        except Exception:  # the store is gone (its rank has stopped): this rank's own silence still counts
            return None

    def _stop_job(self, message: str, found: bool) -> None:
        """Tell the other ranks (``found`` here first), write this rank's stacks, exit with status 1."""
        faulthandler.cancel_dump_traceback_later()
        first = found
        if found and self.store is not None:
            try:  # set only if no rank has written it before (atomic); the first one written is returned
                told = self.store.compare_set(_KEY, "", message).decode(errors="replace")
                first, message = told == message, told
            except Exception:  # the store is unreachable: every rank is left to its own silence
                pass
        message += f": every rank writes its Python stacks to {self.folder}/rank{{N}}.txt and stops"
        path = self.folder / f"rank{self.rank}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a", encoding="utf-8") as file:  # (appended: a requeued job that hangs again keeps both)
            file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} rank {self.rank}: {message}\n")
            file.flush()
            faulthandler.dump_traceback(file, all_threads=True)
            file.write("\n")
        print(f"mmlit: {message}. Rank {self.rank}'s stacks: {path}", file=sys.stderr, flush=True)
        if self.store is not None:
            time.sleep(_LINGER_S)
        job = os.environ.get("SLURM_JOB_ID")
        if first and self.requeue and job:
            _requeue(job)
        os._exit(1)  # the main thread is stuck: no way to raise there


def _requeue(job: str) -> None:
    try:
        result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
        said = f"requeued SLURM job {job}" if result.returncode == 0 else \
            f"scontrol requeue {job} failed ({result.returncode}): {result.stderr.strip()}"
    except (OSError, subprocess.TimeoutExpired) as err:
        said = f"scontrol requeue {job} failed: {err}"
    print(f"mmlit: {said}", file=sys.stderr, flush=True)
