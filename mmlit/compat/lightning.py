"""Lightning internals (checked against lightning 2.6.6)."""

from __future__ import annotations

from typing import Any

__all__ = ["ddp_finds_unused_parameters", "grad_scaler", "one_data_parallel_dimension", "steps_processed",
           "wandb_continue", "wandb_run", "wandb_without_unset_settings"]


def ddp_finds_unused_parameters(strategy: Any) -> bool:
    """Whether a DDP strategy was made with ``find_unused_parameters`` (``ddp_find_unused_parameters_true``). Before
    the model is wrapped, only the strategy's private ``_ddp_kwargs`` holds it."""
    return bool(getattr(strategy, "_ddp_kwargs", {}).get("find_unused_parameters"))


def one_data_parallel_dimension(strategy: Any, ranks: int) -> None:
    """Make a ``ModelParallelStrategy`` build one data-parallel mesh dimension over all ``ranks`` (no tensor-parallel
    one), before its ``setup_environment``: the sizes its ``data_parallel_size`` and ``tensor_parallel_size`` arguments
    set, which it keeps privately."""
    strategy._data_parallel_size, strategy._tensor_parallel_size = ranks, 1


def grad_scaler(trainer: Any):
    """The fp16 ``GradScaler`` of the trainer's precision plugin (``MixedPrecision.scaler``), when it is enabled."""
    scaler = getattr(trainer.precision_plugin, "scaler", None)
    return scaler if scaler is not None and scaler.is_enabled() else None


def steps_processed(trainer: Any) -> int:
    """Training batches the fit has processed (trained on), not those its loaders prefetched: the loop's private
    progress counter (``fit_loop.epoch_loop.batch_progress``)."""
    return trainer.fit_loop.epoch_loop.batch_progress.total.processed


def wandb_run(logger: Any):
    """The W&B run of Lightning's ``WandbLogger`` if it has started (its ``experiment`` property would start one)."""
    return logger._experiment


def wandb_without_unset_settings(logger: Any) -> None:
    """Leave out of a ``WandbLogger``'s ``wandb.init`` arguments the ``anonymous`` setting that Lightning passes even
    when unset (None): wandb 0.31 warns that the setting "has no effect and will be removed" whenever it is given."""
    if logger._wandb_init.get("anonymous", False) is None:
        del logger._wandb_init["anonymous"]


def wandb_continue(logger: Any, run_id: str) -> None:
    """Make a ``WandbLogger`` that has not started yet log into the W&B run ``run_id`` (``resume="allow"``)."""
    logger._wandb_init.update(id=run_id, resume="allow")
    logger._id = run_id
