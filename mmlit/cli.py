"""The ``mmlit`` command: ``fit|validate|test|predict --config recipe.yaml`` (LightningCLI); the registered ``tasks``,
``objectives``, ``modalities``, ``fusions`` and ``sources``; ``data``, ``plot``, ``export``, ``export-backbone``,
``consolidate``."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.plugins.io import CheckpointIO

from mmlit.callbacks import PredictionWriter, Preemption, Progress, Throughput, parameter_counts, peak_memory_mib
from mmlit.checkpoints import AtomicCheckpointIO, checkpoint_file, resolve_checkpoint
from mmlit.compat.notices import quiet_library_notices
from mmlit.data import DataMonitor, MultiTaskDataModule
from mmlit.heartbeat import Heartbeat
from mmlit.loggers import WandbContinuity, WandbLogger, wandb_run_of
from mmlit.module import MultiTaskModule

__all__ = ["MMLitCLI", "main"]

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _tasks_of(model: MultiTaskModule) -> dict:
    """The data side of each task: all that the data module sees of the model."""
    return {name: task.data for name, task in model.tasks.items()}


def _as_list(value) -> list:
    return [] if value is None else list(value) if isinstance(value, list) else [value]


def _checkpoint_dir(root: str | None) -> str:
    return str(Path(root or ".") / "checkpoints")


class _SaveConfigToLoggers(SaveConfigCallback):
    """Saves the resolved recipe in the run folder and sends it to every logger.

    ``fit`` writes ``config.yaml``, ``test`` ``config.test.yaml`` (and so on); a name already taken gets
    a number (``config.1.yaml``), so a resumed or evaluated run never overwrites a recipe on disk.
    """

    def setup(self, trainer, pl_module, stage: str) -> None:
        folder = Path(trainer.log_dir or trainer.default_root_dir)
        stage = getattr(stage, "value", stage)  # Lightning passes a TrainerFn enum
        stem = "config" if stage == "fit" else f"config.{stage}"
        name, n = f"{stem}.yaml", 0
        while (folder / name).exists():
            n += 1
            name = f"{stem}.{n}.yaml"
        self.config_filename = name
        super().setup(trainer, pl_module, stage)

    def save_config(self, trainer, pl_module, stage: str) -> None:
        config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))  # plain types only
        for logger in trainer.loggers:
            logger.log_hyperparams(config)


class MMLitCLI(LightningCLI):
    """LightningCLI with mmlit's links and defaults: the data module reads the model's tasks, checkpoints
    go to ``{trainer.default_root_dir}/checkpoints``, written atomically (``--ckpt_path last`` resumes from the newest
    one that loads, ``--ckpt_path auto`` too or starts fresh without one, and the W&B run continues), and every
    checkpoint is loaded with ``weights_only=True``."""

    def __init__(self, args=None, run: bool = True):
        super().__init__(MultiTaskModule, MultiTaskDataModule, save_config_callback=_SaveConfigToLoggers,
                         save_config_kwargs={"overwrite": False}, args=args, run=run,
                         parser_kwargs={"default_env": False})

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {k: v for k, v in LightningCLI.subcommands().items() if k in ("fit", "validate", "test", "predict")}

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(Throughput, "throughput")
        parser.add_lightning_class_args(DataMonitor, "data_monitor")
        parser.add_lightning_class_args(PredictionWriter, "predictions")
        parser.add_lightning_class_args(Preemption, "preemption")
        parser.add_lightning_class_args(Heartbeat, "heartbeat")
        parser.set_defaults({"checkpoint.save_last": True})
        parser.link_arguments("trainer.default_root_dir", "checkpoint.dirpath", compute_fn=_checkpoint_dir)
        parser.link_arguments("model", "data.tasks", compute_fn=_tasks_of, apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if "weights_only" in config and config.get("weights_only") is None:
            config.weights_only = True  # no code runs from a checkpoint
        if self.subcommand == "predict" and config.get("return_predictions") is None:
            config.return_predictions = False  # PredictionWriter writes them batch by batch; none are kept in memory

    def instantiate_trainer(self, **kwargs) -> Trainer:
        """Lightning's, with mmlit's ``Progress`` (a bar on a terminal, a line per epoch elsewhere) where the recipe
        shows progress and names no progress bar of its own, ``AtomicCheckpointIO`` where it names no checkpoint
        writer, and ``WandbContinuity``."""
        config = (self.config_init[self.subcommand] if self.subcommand else self.config_init).get("trainer", {})
        callbacks = [*_as_list(config.get("callbacks")), WandbContinuity()]
        if config.get("enable_progress_bar") is not False and not any(isinstance(c, ProgressBar) for c in callbacks):
            callbacks.append(Progress())
        plugins = _as_list(config.get("plugins"))
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO())
        return super().instantiate_trainer(**{"callbacks": callbacks, "plugins": plugins, **kwargs})

    def _resume(self) -> None:
        """``--ckpt_path last|auto`` -> a checkpoint that loads, or none (``auto`` without one); a fit resumed from
        a checkpoint continues its W&B run."""
        config = self.config_init[self.subcommand]
        callback = self.trainer.checkpoint_callback
        folder = getattr(callback, "dirpath", None) or _checkpoint_dir(self.trainer.default_root_dir)
        config["ckpt_path"] = resolve_checkpoint(config.get("ckpt_path"), folder)
        if config["ckpt_path"] is not None and self.subcommand == "fit":
            run_id = wandb_run_of(str(checkpoint_file(config["ckpt_path"])), self.trainer.default_root_dir)
            for logger in self.trainer.loggers:
                if isinstance(logger, WandbLogger) and run_id is not None:
                    logger.continue_run(run_id)

    def before_fit(self) -> None:
        self._resume()

    def before_validate(self) -> None:
        self._resume()

    def before_test(self) -> None:
        self._resume()

    def before_predict(self) -> None:
        self._resume()

    def after_fit(self) -> None:
        self._report()

    def _report(self) -> None:
        trainer = self.trainer
        if not trainer.is_global_zero:
            return
        counts = parameter_counts(trainer.lightning_module)
        lines = [f"run folder:  {trainer.default_root_dir}",
                 f"parameters:  {counts['trainable']:,} trainable, {counts['frozen']:,} frozen; peak memory "
                 f"{peak_memory_mib(trainer.lightning_module.device):,.0f} MiB (rank 0)"]
        if trainer.checkpoint_callback and trainer.checkpoint_callback.last_model_path:
            lines.append(f"checkpoint:  {trainer.checkpoint_callback.last_model_path}")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger) and logger.run_folder() is not None:
                # Every start of a resumed run has a folder of its own with the run's id: one sync uploads them all,
                # in order, into the one W&B run.
                every_start = logger.run_folder().parent / f"offline-run-*-{logger.version}"
                how = f"offline; upload with `wandb sync {every_start}`" if logger.is_offline else "online"
                lines.append(f"W&B run:     {logger.run_folder()} ({how})")
            elif logger.log_dir:
                lines.append(f"{type(logger).__name__}: {logger.log_dir}")
        print("\n".join(lines), flush=True)


_LISTS = {"tasks": "task", "objectives": "objective", "modalities": "modality", "fusions": "fusion",
          "sources": "source"}


def _list_command(kind: str, argv: list[str]) -> int:
    """``mmlit tasks|objectives|modalities|fusions|sources``: every registered name, its summary line and its class
    path (for a modality, also the entries it decodes and its default encoder)."""
    from mmlit import registry

    argparse.ArgumentParser(prog=f"mmlit {kind}", description=f"List the registered {kind}.").parse_args(argv)
    names, get = getattr(registry, f"list_{kind}"), getattr(registry, f"get_{_LISTS[kind]}")
    for name in names():
        cls = get(name)
        summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        extra = ""
        if kind == "modalities":
            extra = f" [.{', .'.join(sorted(cls.extensions))}; encoder {cls.default_encoder}]"
        print(f"{name:<26} {summary}{extra}  ({cls.__module__}.{cls.__qualname__})")
    return 0


def _export_command(argv: list[str]) -> int:
    """``mmlit export-backbone CKPT OUT``: the backbone of an mmlit checkpoint as one safetensors file."""
    from mmlit.transfer import export_backbone

    parser = argparse.ArgumentParser(prog="mmlit export-backbone", description=_export_command.__doc__)
    parser.add_argument("checkpoint", help="an mmlit checkpoint (a .ckpt file, or the folder of a sharded one)")
    parser.add_argument("out", help="the file to write (.safetensors)")
    args = parser.parse_args(argv)
    print(f"backbone written to {export_backbone(args.checkpoint, args.out)}")
    return 0


def _consolidate_command(argv: list[str]) -> int:
    """``mmlit consolidate FOLDER OUT``: a sharded (FSDP) checkpoint folder as one checkpoint file, in Lightning's
    layout, with the whole weights and without the optimizer state: for validate, test, predict,
    export-backbone and model.pretrained under any strategy."""
    from mmlit.checkpoints import consolidate

    parser = argparse.ArgumentParser(prog="mmlit consolidate", description=_consolidate_command.__doc__)
    parser.add_argument("folder", help="a sharded checkpoint folder (e.g. checkpoints/last.ckpt)")
    parser.add_argument("out", help="the file to write (.ckpt)")
    args = parser.parse_args(argv)
    print(f"checkpoint written to {consolidate(args.folder, args.out)}")
    return 0


def _export_run_command(argv: list[str]) -> int:
    """``mmlit export --config RECIPE --ckpt CKPT --out DIR``: the backbone as safetensors and each Hugging Face
    encoder as a model folder, LoRA adapters merged (and kept apart)."""
    from mmlit.export import export_run

    parser = argparse.ArgumentParser(prog="mmlit export", description=_export_run_command.__doc__)
    parser.add_argument("--config", required=True, help="the recipe (or the run's config.yaml) that trained it")
    parser.add_argument("--ckpt", required=True, help="an mmlit checkpoint of that recipe (a file or a sharded folder)")
    parser.add_argument("--out", required=True, help="the folder to write")
    args = parser.parse_args(argv)
    for path in export_run(args.config, args.ckpt, args.out):
        print(f"written: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    quiet_library_notices()
    command_line = argv is None  # (LightningCLI reads sys.argv itself then: given both, it warns)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in _LISTS:
        return _list_command(argv[0], argv[1:])
    if argv and argv[0] == "export":
        return _export_run_command(argv[1:])
    if argv and argv[0] == "export-backbone":
        return _export_command(argv[1:])
    if argv and argv[0] == "consolidate":
        return _consolidate_command(argv[1:])
    if argv and argv[0] == "plot":
        from mmlit.plot import main as plot_main

        return plot_main(argv[1:])
    if argv and argv[0] == "data":
        from mmlit.data.tools import main as data_main

        return data_main(argv[1:])
    MMLitCLI(args=None if command_line else argv)
    _close_process_group()  # (after a failure, mmlit.distributed's failure watch ends the ranks instead)
    return 0


def _close_process_group() -> None:
    """Shut a finished run's process group down before the interpreter exits: left to exit, gloo's threads can be
    destroyed while still joinable, and the process aborts ("terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
