"""Lightning callbacks that mmlit adds to every run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from fnmatch import fnmatchcase
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, ThroughputMonitor, TQDMProgressBar
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info

from mmlit.data.collate import batch_size_of
from mmlit.distributed import rank_flags
from mmlit.utilisation import Rates, StepFlops, text_tokens

__all__ = ["Freeze", "PredictionWriter", "Preemption", "Progress", "Throughput", "parameter_counts", "peak_memory_mib"]


class Progress(TQDMProgressBar):
    """Lightning's progress bar on a terminal; one line per epoch otherwise (a log file, a CI job, a batch system),
    where a bar would write thousands of carriage returns or nothing at all.

    A line gives the epoch, the step, the minutes since the start, the training loss and every validation value
    (``val/...``) logged at the end of the epoch. ``mmlit`` adds it to every run with ``trainer.enable_progress_bar``
    (the default) that lists no progress bar of its own.

    The bar shows the training loss of the last logging step (``trainer.log_every_n_steps``): Lightning reads every
    value logged with ``prog_bar`` from the device after each batch, which makes the host wait for the device at
    every step, so mmlit logs none that way and the bar reads the loss itself, at logging steps only.

    Args:
        lines: one line per epoch (true), the bar (false), or the bar only on a terminal (null).
    """

    def __init__(self, refresh_rate: int = 1, lines: bool | None = None):
        super().__init__(refresh_rate=refresh_rate)
        self.lines = not sys.stdout.isatty() if lines is None else lines
        self._start = time.perf_counter()
        self._loss: float | None = None  # train/loss at the last logging step
        if self.lines:
            self.disable()

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict:
        items = super().get_metrics(trainer, pl_module)
        return {**items, "train/loss": f"{self._loss:.4g}"} if self._loss is not None else items

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch,
                           batch_idx: int) -> None:
        every = trainer.log_every_n_steps
        if not self.is_disabled and every > 0 and trainer.global_step % every == 0:
            loss = trainer.callback_metrics.get("train/loss")
            self._loss = float(loss) if loss is not None else self._loss
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def _line(self, trainer: pl.Trainer, head: str, prefixes: tuple[str, ...]) -> None:
        if not self.lines or not trainer.is_global_zero:
            return
        values = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(prefixes) and v.numel() == 1}
        shown = "  ".join(f"{k} {v:.4g}" for k, v in sorted(values.items()))
        print(f"{head}  {(time.perf_counter() - self._start) / 60:.1f} min  {shown}", flush=True)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        epochs = f"/{trainer.max_epochs}" if trainer.max_epochs and trainer.max_epochs > 0 else ""
        self._line(trainer, f"epoch {trainer.current_epoch}{epochs}  step {trainer.global_step}", ("train/loss", "val/"))

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if trainer.state.fn == TrainerFn.VALIDATING:  # (mmlit validate; in a fit, the epoch's line says it)
            self._line(trainer, "validation", ("val/",))

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_test_end(trainer, pl_module)
        self._line(trainer, "test", ("test/",))


class PredictionWriter(BasePredictionWriter):
    """Writes what ``mmlit predict`` predicts: one JSON line per example (the sample key, the prediction, its score)
    to ``{folder}/{task}.rank{r}.jsonl``, batch by batch, from every rank.

    Args:
        folder: where the files go; default ``{trainer.default_root_dir}/predictions``.
    """

    def __init__(self, folder: str | None = None):
        super().__init__(write_interval="batch")
        self.folder = folder
        self._files: dict = {}

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.path = Path(self.folder or Path(trainer.default_root_dir) / "predictions")
        self.path.mkdir(parents=True, exist_ok=True)
        for stale in self.path.glob(f"*.rank{trainer.global_rank}.jsonl"):  # an earlier run's, of any task
            stale.unlink()
        self._files, self._rows = {}, {}

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx) -> None:
        for task, rows in prediction.items():
            if task not in self._files:  # a file per task and rank
                self._files[task] = open(self.path / f"{task}.rank{trainer.global_rank}.jsonl", "w", encoding="utf-8")
            self._files[task].writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
            self._rows[task] = self._rows.get(task, 0) + len(rows)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for handle in self._files.values():
            handle.close()
        counts = ", ".join(f"{task} {n}" for task, n in self._rows.items())
        print(f"predictions (rank {trainer.global_rank}: {counts or 'none'}) written to {self.path}", flush=True)


def _examples(batch: dict) -> int:
    """A training step's examples: of every task in it."""
    return sum(batch_size_of(task_batch) for task_batch in batch.values())


def parameter_counts(module: torch.nn.Module) -> dict[str, int]:
    """Trainable and frozen parameter counts (elements; a parameter shared by two modules counts once)."""
    counts = {"trainable": 0, "frozen": 0}
    for p in module.parameters():
        counts["trainable" if p.requires_grad else "frozen"] += p.numel()
    return counts


def peak_memory_mib(device: torch.device) -> float:
    """The process's peak memory so far: on a CUDA device the most its tensors held (``max_memory_allocated``), on
    the CPU the peak resident set of the process (tensors, libraries, data workers not included)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # (kilobytes on Linux)


class Throughput(ThroughputMonitor):
    """Lightning's ``ThroughputMonitor`` counting a step's examples of every task: ``train/device/samples_per_sec``
    (per rank; ``train/samples_per_sec`` for all ranks, under DDP) and ``train/device/batches_per_sec``, over a
    sliding window of steps (data loading included); plus ``train/perf/minutes``, the wall minutes since the fit
    started (validation included), for curves against time, ``train/perf/peak_memory_mib`` (``peak_memory_mib``) and,
    once, ``train/perf/params_trainable`` and ``train/perf/params_frozen``. ``ThroughputMonitor`` also logs the rates of
    validation and testing (``validate/...``, ``test/...``) and, on a CUDA device, calls ``torch.cuda.synchronize()``
    after every batch so that its times are the device's: a wait that costs little beside a large step and more
    beside a small one.

    Utilisation, per device over the same window: ``train/perf/tflops`` (the model's FLOPs per second, in TFLOP/s),
    ``train/perf/mfu`` (those over the device's peak, where it is known) and, with ``token_keys``,
    ``train/device/tokens_per_sec``. A step's FLOPs are counted once per kind of step (the set of tasks in it), on
    the first real step of that kind, on every rank (``mmlit.utilisation.StepFlops``), leaving out the logging steps
    where ``GradientStatistics`` adds a backward pass per task (unless every step logs). The peak is ``peak_tflops``,
    else Lightning's table for the device and the precision's compute dtype (``get_available_flops``: bf16-mixed
    reads bfloat16, 32-true float32, or TF32 under ``model.matmul_precision: high``); on a CPU, or a GPU the table
    does not know, and without ``peak_tflops``: no MFU.

    Args:
        window_size: the steps the rates are averaged over (the first rates come after that many steps).
        peak_tflops: the device's peak TFLOP/s at the run's precision (a GPU that Lightning's table does not know, or
            one capped below its rated clocks); None: Lightning's table.
        token_keys: for each task whose batch holds text, the key of its token ids (``PAD`` not counted) or of a bool
            mask of its real tokens, e.g. ``{vqa: question}``; tokens/s is logged when it names any.
    """

    def __init__(self, window_size: int = 10, peak_tflops: float | None = None,
                 token_keys: dict[str, str] | None = None):
        super().__init__(batch_size_fn=_examples, window_size=window_size)
        if peak_tflops is not None and not peak_tflops > 0:
            raise ValueError(f"throughput.peak_tflops: the device's peak TFLOP/s, a positive number; got {peak_tflops}")
        self.peak_tflops, self.token_keys = peak_tflops, dict(token_keys or {})
        self.flops = StepFlops()
        self.peak_flops: float | None = None  # FLOP/s, set by setup
        self._rates = Rates(window_size)
        self._fit_start = time.perf_counter()

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)  # (available_flops: Lightning's table; None where it has no entry)
        self.peak_flops = self.peak_tflops * 1e12 if self.peak_tflops is not None else self.available_flops

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._fit_start = time.perf_counter()
        self.flops = StepFlops()
        unknown = set(self.token_keys) - set(pl_module.tasks) if self.token_keys else set()
        if unknown:
            raise ValueError(f"throughput.token_keys: no task named {', '.join(map(repr, sorted(unknown)))}")
        if trainer.is_global_zero and trainer.log_every_n_steps > 0:  # (0: no step logs)
            counts = {f"train/perf/params_{k}": float(v) for k, v in parameter_counts(pl_module).items()}
            for logger in trainer.loggers:
                logger.log_metrics(counts, step=trainer.global_step)

    def on_train_start(self, trainer: pl.Trainer, *args) -> None:
        super().on_train_start(trainer, *args)
        self._rates.restart()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        every = trainer.log_every_n_steps  # GradientStatistics measures where (global_step + 1) % every == 0
        if not (every > 1 and (trainer.global_step + 1) % every == 0):
            self.flops.start(batch)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, *args) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, *args)  # (a CUDA sync on rank 0, which logs)
        flops, counted = self.flops.stop(batch, _examples(batch))
        if flops is None or counted:
            self._rates.restart()
        else:
            self._rates.add(flops, text_tokens(batch, self.token_keys) if self.token_keys else 0)
        every = trainer.log_every_n_steps  # 0: no logging on step boundaries
        if every > 0 and trainer.global_step % every == 0:
            pl_module.log("train/perf/minutes", (time.perf_counter() - self._fit_start) / 60, rank_zero_only=True)
            pl_module.log("train/perf/peak_memory_mib", peak_memory_mib(pl_module.device), rank_zero_only=True)
            self._log_utilisation(pl_module)

    def _log_utilisation(self, pl_module: pl.LightningModule) -> None:
        rates = self._rates.per_second()
        if rates is None:  # (the window is not full yet)
            return
        flops_per_sec, tokens_per_sec = rates
        pl_module.log("train/perf/tflops", flops_per_sec / 1e12, rank_zero_only=True)
        if self.peak_flops:
            pl_module.log("train/perf/mfu", flops_per_sec / self.peak_flops, rank_zero_only=True)
        if self.token_keys:
            pl_module.log("train/device/tokens_per_sec", tokens_per_sec, rank_zero_only=True)

    def on_validation_end(self, trainer: pl.Trainer, *args) -> None:
        super().on_validation_end(trainer, *args)
        self._rates.restart()  # (validation is no step's time)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.flops.close()  # (a step that raised while it was counted)


class Freeze(pl.Callback):
    """Keep the parameters whose names match ``patterns`` unchanged for the whole run, or until ``until_step``.

    Add it to a recipe under ``trainer.callbacks`` (e.g. patterns ``[backbone.encoders.image.*]`` to train new
    heads on a pretrained image encoder first). A frozen parameter's gradient is dropped just before each
    optimizer step, after DDP has reduced it and after a gradient objective has combined it, so the optimizer
    skips it (no update, no weight decay, no momentum) and it is left out of gradient clipping. Its gradient
    is still computed: ``requires_grad`` is left alone because DDP fixes the set of parameters it reduces when
    it wraps the model, so a parameter unfrozen later would train differently on every rank. Batch-norm
    statistics of a frozen part keep updating in training mode. Under a gradient objective (PCGrad, GradNorm,
    ...) the frozen parameters' task gradients still enter the combination (their norms and conflicts), only
    their update is dropped.

    Args:
        patterns: ``fnmatch`` patterns on ``MultiTaskModule.named_parameters()`` names.
        until_step: the optimizer step (``trainer.global_step``) from which they train; None: never.
    """

    def __init__(self, patterns: list[str], until_step: int | None = None):
        if not patterns:
            raise ValueError("Freeze.patterns: give at least one parameter name pattern")
        self.patterns, self.until_step = list(patterns), until_step
        self._params: list = []

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        names = [name for name, _ in pl_module.named_parameters()]
        for pattern in self.patterns:
            if not any(fnmatchcase(name, pattern) for name in names):
                raise ValueError(f"Freeze.patterns: {pattern!r} matches no parameter (names look like {names[0]!r})")
        self._params = [p for name, p in pl_module.named_parameters()
                        if any(fnmatchcase(name, pattern) for pattern in self.patterns)]
        until = "the whole run" if self.until_step is None else f"until step {self.until_step}"
        rank_zero_info(f"Freeze: {len(self._params)} parameter tensors matching {self.patterns} frozen for {until}")

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        if self.until_step is None or trainer.global_step < self.until_step:
            for param in self._params:
                param.grad = None


class Preemption(pl.Callback):
    """Stop for a preemption without losing a step: on ``signals`` (SIGUSR1 by default: what SLURM sends before the
    time limit with ``#SBATCH --signal=USR1@90``, and what a user can send with ``kill -USR1``), every rank saves
    ``{checkpoint dir}/preempted.ckpt`` at the end of the same step and the fit ends; under SLURM (``SLURM_JOB_ID``)
    rank 0 then requeues the job (``scontrol requeue``), whose next start resumes with ``--ckpt_path auto``.

    Under several ranks the signal may reach one rank only, or the ranks at different steps: the flag travels in the
    trainer's ``RankFlags`` (``mmlit.distributed``: one small all-reduce per step, read a step later without waiting
    for the device), so every rank saves at the end of the step after the one it was raised at, together. One process
    alone saves at the end of the step it was signalled in.

    Args:
        signals: the signals that mean "preempted".
        requeue: under SLURM, requeue the job after the checkpoint.
    """

    def __init__(self, signals: list[str] = ["SIGUSR1"], requeue: bool = True):  # noqa: B006 (a recipe value)
        unknown = [name for name in signals if not isinstance(getattr(signal, name, None), signal.Signals)]
        if unknown:
            raise ValueError(f"preemption.signals: {', '.join(unknown)} is not a signal name (SIGUSR1, SIGTERM, ...)")
        self.signals, self.requeue = list(signals), requeue
        self._signalled, self._previous, self.path = False, {}, None

    def _handle(self, signum, frame) -> None:
        self._signalled = True  # acted on at the end of the step: a handler may run in the middle of anything

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.world_size > 1:
            rank_flags(trainer).register("preempted")
        if stage == "fit" and threading.current_thread() is threading.main_thread():
            for name in self.signals:
                self._previous[name] = signal.signal(getattr(signal, name), self._handle)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for name, handler in self._previous.items():
            signal.signal(getattr(signal, name), handler)
        self._previous = {}

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int) -> None:
        signalled = self._signalled
        if trainer.world_size > 1:  # (one process alone needs no tensor and no collective)
            flags = rank_flags(trainer)
            flags.raise_flag("preempted", signalled)
            signalled = "preempted" in flags.exchange(trainer.fit_loop.total_batch_idx)
        if not signalled:
            return
        folder = Path(trainer.checkpoint_callback.dirpath if trainer.checkpoint_callback else trainer.default_root_dir)
        self.path = folder / "preempted.ckpt"
        trainer.save_checkpoint(self.path)  # (every rank calls it; rank 0 writes)
        trainer.should_stop = True
        rank_zero_info(f"preempted: checkpoint {self.path} at step {trainer.global_step}; resume with --ckpt_path auto")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        job = os.environ.get("SLURM_JOB_ID")
        if self.path is not None and self.requeue and job and trainer.is_global_zero:
            result = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            rank_zero_info(f"requeued SLURM job {job}" if result.returncode == 0 else
                           f"scontrol requeue {job} failed ({result.returncode}): {result.stderr.strip()}")
