"""No training step makes the host wait for the device: a host that waits cannot queue the next step while the device
computes this one. On the CPU the waits are counted where a GPU would have them: every Tensor method that hands a
value to the host (``item``, ``tolist``, ``bool``, ``float``, ``int``, ``index``, ``cpu``, ``numpy``) is wrapped, and
the steps of a real fit through the CLI past its first few (none of them a logging step) read nothing.

What those reads guarded still holds: a non-finite loss stops the fit one step later, its update not applied; a
non-finite gradient skips its step exactly (parameters and optimizer state), on the device with a fused optimizer and
after a read with another; on 2 gloo ranks a NaN loss on one rank stops both at the same step, a preemption signal to
one rank saves on both at the same step, and under FSDP a fused optimizer skips a step whose non-finite gradient is in
one rank's shard on both, with no read in any step.

Run as ``python -m torch.distributed.run --nproc_per_node 2 -m tests.test_host_sync ...``, this file is also the ranks'
side of the last test.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

from mmlit.callbacks import Preemption
from mmlit.cli import main
from mmlit.optim import fused_optimizer, skips_on_device

from ._processes import free_port, run as run_process
from .conftest import REPO, tiny_recipe, write_recipe
from .objectives._train import build_module, loader, trainer, weights
from .test_fsdp import _batches, _full, _module as _fsdp_module, _poison

TASKS = ("image_classification", "text_classification")  # (vqa and the cross-attention fusion read: not this test's)
STEPS = 3  # of the fixed-batch runs (tests.test_fsdp's batches)
_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy")
# Reads left out: DataMonitor's counts, which the host makes from its own numbers in one process (a tensor on no
# device); a checkpoint (a preemption's: it copies the weights to the host anyway) and the message of the error that
# stops a fit for a non-finite loss, which are no step's; and Lightning's own, which mmlit cannot turn off: under
# several ranks, before every batch, its training loop broadcasts rank 0's SIGTERM flag and reads it (lightning 2.6,
# ``_TrainingEpochLoop._broadcast_sigterm_tensor``)
_LEFT_OUT = (("mmlit/data/faults.py", "in _sum_over_ranks"),
             ("lightning/pytorch/trainer/trainer.py", "in save_checkpoint"), ("mmlit/step_callbacks.py", "in _check"),
             ("lightning/pytorch/loops/training_epoch_loop.py", "in _broadcast_sigterm_tensor"))


class CountReads(pl.Callback):
    """Records each read of a tensor's value on the host (the method and the stack) from the start of step ``first``
    to the start of step ``last`` or the end of the epoch, and writes them with whether the optimizer skips steps on
    the device to ``out`` (JSON) at the end of the fit; ``reads`` holds them in the process."""

    def __init__(self, out: str | None = None, first: int = 2, last: int = STEPS):
        self.out, self.first, self.last = out, first, last
        self.reads: list[dict] = []
        self.fused, self._on, self._inside, self._saved = None, False, False, {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.fused = skips_on_device(trainer.optimizers[0])
        for name in _READS:
            self._saved[name] = vars(torch.Tensor).get(name)
            setattr(torch.Tensor, name, self._counted(name, getattr(torch.Tensor, name)))

    def _counted(self, name: str, read):
        def counted(tensor, *args, **kwargs):
            if self._on and not self._inside:
                self._inside = True  # (the stack's own formatting reads nothing, but a read may call another)
                self.reads.append({"method": name, "stack": traceback.format_stack(limit=40)[:-1]})
                try:
                    return read(tensor, *args, **kwargs)
                finally:
                    self._inside = False
            return read(tensor, *args, **kwargs)
        return counted

    @contextmanager
    def paused(self):
        """Reads made inside are not counted (a test's own)."""
        on, self._on = self._on, False
        try:
            yield
        finally:
            self._on = on

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        self._on = self.first <= trainer.global_step < self.last

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._on = False  # (an epoch's end, with its checkpoint, is no step)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._on = False
        self.teardown(trainer, pl_module, "fit")
        if self.out:
            Path(self.out).write_text(json.dumps({"fused": self.fused, "reads": self.reads}))

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self.teardown(trainer, pl_module, "fit")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for name, original in self._saved.items():
            if original is None:
                delattr(torch.Tensor, name)  # (inherited from torch._C.TensorBase)
            else:
                setattr(torch.Tensor, name, original)
        self._saved = {}


def _device_reads(reads: list[dict]) -> list[str]:
    """The reads that would wait for a device, each as its method and stack."""
    out = []
    for read in reads:
        frames = "".join(read["stack"])
        if not any(all(part in frames for part in where) for where in _LEFT_OUT):
            out.append(f"{read['method']}:\n{frames}")
    return out


def test_training_steps_read_nothing_from_the_device(soc, tmp_path):
    """``mmlit fit`` of a tiny recipe with the default optimizer (AdamW, fused), its progress bar and every callback
    the CLI adds (preemption, throughput, the data monitor): the steps past the first two read nothing."""
    out = tmp_path / "reads.json"
    recipe = tiny_recipe(soc, tmp_path, tasks=list(TASKS), max_steps=5, log_every_n_steps=50, limit_val_batches=0,
                         num_sanity_val_steps=0, logger=False, enable_progress_bar=True, callbacks=[
                             {"class_path": "mmlit.callbacks.Progress", "init_args": {"lines": False}},
                             {"class_path": "tests.test_host_sync.CountReads",
                              "init_args": {"out": str(out), "first": 2, "last": 5}}])
    recipe["data"]["steps_per_epoch"] = 50  # (no epoch ends among the steps)
    main(["fit", "--config", str(write_recipe(recipe, tmp_path / "r.yaml"))])
    recorded = json.loads(out.read_text())
    assert recorded["fused"], "the default optimizer skips steps on the device"
    unexpected = _device_reads(recorded["reads"])
    assert not unexpected, f"{len(unexpected)} read(s) in 3 steps:\n\n" + "\n\n".join(unexpected)


@pytest.fixture(scope="module")
def batches(soc) -> list[dict]:
    return _batches(soc["shards"]["train"][:2], soc["tokenizer"], "whole", TASKS)


def _module(fused: bool = True):
    module = build_module("static", tasks=TASKS)
    module.optimizer_factory = lambda params: torch.optim.AdamW(params, lr=1e-2, fused=None if fused else False)
    return module


def _state(optimizer: torch.optim.Optimizer) -> dict:
    return {(i, k): v.clone() for i, state in optimizer.state_dict()["state"].items() for k, v in state.items()}


def _reference(batches: list[dict], tmp_path, fused: bool = True):
    """The module trained on ``batches``, and its optimizer's state."""
    module, fit = _module(fused), trainer(tmp_path / "reference", len(batches))
    fit.fit(module, loader(batches))
    return weights(module), _state(fit.optimizers[0])


@pytest.mark.parametrize("fused", [True, False])
def test_a_non_finite_gradient_skips_its_step_exactly(fused, batches, tmp_path, monkeypatch):
    """An infinite gradient at step 1 leaves the parameters and the optimizer's state (Adam's moments, its step
    count) as they were: the run ends as one on the batches of steps 0 and 2. A fused optimizer skips the step on the
    device, reading nothing (the warning comes at the next logging step, here the end); another reads the verdict
    (the log says so once)."""
    module, counter, said = _module(fused), CountReads(first=1, last=2), []
    monkeypatch.setattr("mmlit.objectives.update.rank_zero_info", said.append)
    param = next(module.backbone.parameters())
    param.register_hook(lambda g: g * float("inf") if module.global_step == 1 else g)
    fit = trainer(tmp_path, STEPS, log_every_n_steps=50, callbacks=[counter])
    with pytest.warns(UserWarning, match=r"non-finite gradients at step 1\b.*\(1 skipped so far\)"):
        fit.fit(module, loader(batches))
    said = list(said)  # (before the reference run says it too)
    assert skips_on_device(fit.optimizers[0]) == fused and module.skipped_steps == 1
    expected, state = _reference([batches[0], batches[2]], tmp_path, fused)
    assert max((weights(module)[k] - v).abs().max().item() for k, v in expected.items()) < 1e-6
    after = _state(fit.optimizers[0])
    assert after.keys() == state.keys() and all(torch.allclose(after[k], v, atol=1e-7) for k, v in state.items())
    verdicts = [r for r in counter.reads if "mmlit/objectives/update.py" in "".join(r["stack"])]
    if fused:
        assert not _device_reads(counter.reads) and not said
    else:  # (the verdict, read once a step)
        assert len(said) == 1 and "cannot skip a step on the device" in said[0] and len(verdicts) == 1


@pytest.mark.parametrize("kind", [torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD, torch.optim.Adagrad])
def test_torchs_fused_optimizers_skip_a_step_where_found_inf_is_set(kind):
    """What the device-side skip rests on: ``fused_optimizer`` makes each of torch's optimizers with a fused kernel
    fused, keeping the recipe's settings and groups, and its step with ``found_inf`` set leaves the parameters and
    its state alone; a recipe that sets ``fused: false`` keeps its optimizer."""
    model = torch.nn.Linear(4, 3)
    groups = [{"params": [model.weight], "lr_scale": 0.5}, {"params": [model.bias], "weight_decay": 0.0}]
    optimizer = fused_optimizer(kind(groups, lr=0.1, weight_decay=0.01))
    assert skips_on_device(optimizer) and optimizer.param_groups[0]["lr_scale"] == 0.5
    assert optimizer.param_groups[1]["weight_decay"] == 0.0 and optimizer.param_groups[0]["weight_decay"] == 0.01
    for found in (0.0, 1.0):
        model(torch.randn(2, 4)).sum().backward()
        before, state = [p.clone() for p in model.parameters()], _state(optimizer)
        optimizer.found_inf = torch.tensor(found)
        optimizer.step()
        unchanged = all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
        assert unchanged == (found == 1.0), found
        if found:
            after = _state(optimizer)
            assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())
    assert not skips_on_device(fused_optimizer(kind(model.parameters(), lr=0.1, fused=False)))


@pytest.mark.parametrize("nan_step", [1, 2])
def test_a_non_finite_loss_stops_the_fit_a_step_later_without_its_update(nan_step, batches, tmp_path):
    """A NaN loss at step 1 stops the fit at the end of step 2 (the host learns of it a step later), at step 2, the
    last, at the end of the fit; either way the NaN step's update is not applied."""
    module = _module()
    module.tasks["image_classification"].register_forward_hook(
        lambda task, args, out: {**out, "loss": out["loss"] * float("nan")} if module.global_step == nan_step else None)
    fit = trainer(tmp_path, STEPS, log_every_n_steps=50)
    with pytest.raises(FloatingPointError, match=rf"non-finite loss at step {nan_step} on at least one rank \(here: "
                                                 rf"train/image_classification/loss=nan, train/text_classification"):
        fit.fit(module, loader(batches))
    assert fit.global_step == STEPS
    expected, _ = _reference([b for step, b in enumerate(batches) if step != nan_step], tmp_path)
    assert max((weights(module)[k] - v).abs().max().item() for k, v in expected.items()) < 1e-6


# --- 2 gloo ranks -------------------------------------------------------------------------------------------------

RUNS = ("ddp_nan", "ddp_preempted", "fsdp_inf")


class _SignalOn(pl.Callback):
    """SIGUSR1 to this process at the start of batch ``batch_idx`` on rank ``rank`` only."""

    def __init__(self, rank: int, batch_idx: int):
        self.rank, self.batch_idx = rank, batch_idx

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank == self.rank and batch_idx == self.batch_idx:
            os.kill(os.getpid(), signal.SIGUSR1)


class _Step(pl.Callback):
    """The whole weights at the start and at the end of step ``step`` (gathered on every rank alike under FSDP),
    outside ``counter``'s count."""

    def __init__(self, step: int, counter: CountReads, full):
        self.step, self.counter, self.full = step, counter, full
        self.before = self.after = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            with self.counter.paused():
                self.before = self.full(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step + 1:
            with self.counter.paused():
                self.after = self.full(pl_module)


def _ranks_main() -> None:
    """One rank of the 2-rank runs, each on this rank's half of every global batch; writes ``{run}/rank{r}.json``."""
    from lightning.pytorch.strategies import DDPStrategy

    from mmlit.fsdp import FSDP2Strategy

    parser = argparse.ArgumentParser()
    parser.add_argument("--train", nargs="+", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    rank = int(os.environ["RANK"])
    for run in RUNS:
        folder = Path(args.out) / run
        folder.mkdir(parents=True, exist_ok=True)
        counter, preemption = CountReads(first=1, last=STEPS), Preemption(requeue=False)
        step = _Step(1, counter, _full if run == "fsdp_inf" else weights)
        callbacks = [counter, step] + ([preemption, _SignalOn(rank=1, batch_idx=0)] if run == "ddp_preempted" else [])
        if run == "fsdp_inf":  # (AdamW: torch 2.14 has no fused SGD for sharded parameters)
            module = _fsdp_module("static", TASKS)
            module.optimizer_factory = _adamw
            module.backbone.encoders["image"].model.stem[0].register_forward_hook(_poison(module, rank))
            strategy = FSDP2Strategy(process_group_backend="gloo")
        else:
            module = build_module("static", tasks=TASKS)
            strategy = DDPStrategy(process_group_backend="gloo", find_unused_parameters=True)  # (the fusion's)
        if run == "ddp_nan":  # a NaN loss on rank 1 at step 1
            module.tasks["image_classification"].register_forward_hook(
                lambda task, a, out: {**out, "loss": out["loss"] * float("nan")}
                if rank == 1 and module.global_step == 1 else None)
        fit = trainer(folder, STEPS, devices=2, strategy=strategy, callbacks=callbacks, log_every_n_steps=50,
                      enable_checkpointing=run == "ddp_preempted")
        error = None
        try:
            fit.fit(module, loader(_batches(args.train, args.tokenizer, rank, TASKS)))
        except FloatingPointError as err:
            error = str(err)
        torch.save(step.full(module), folder / f"rank{rank}.pt")
        (folder / f"rank{rank}.json").write_text(json.dumps({
            "error": error, "global_step": fit.global_step, "skipped_steps": module.skipped_steps,
            "fused": counter.fused, "reads": _device_reads(counter.reads),
            "preempted": str(preemption.path) if preemption.path else None,
            "step_1_unchanged": bool(step.after) and all(torch.equal(step.before[k], v) for k, v in step.after.items()),
            "step_2_trained": bool(step.after) and any(not torch.equal(step.after[k], v)
                                                       for k, v in step.full(module).items())}))


def _adamw(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-3)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(600)
def test_two_ranks_agree_without_reading_the_device(soc, tmp_path):
    """On 2 gloo ranks, no step past the first reads anything but Lightning's SIGTERM flag (DDP with fused SGD, FSDP2
    with fused AdamW); a NaN loss on rank 1 at step 1 stops both ranks at the end of step 2 with its update skipped;
    SIGUSR1 to rank 1 in step 0 saves ``preempted.ckpt`` on both at the end of step 1; under FSDP an infinite gradient
    in rank 0's shard alone skips step 1 on both ranks, which leaves the weights as they were, and step 2 trains."""
    urls = soc["shards"]["train"][:2]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "-m", "tests.test_host_sync", "--train", *urls, "--tokenizer", soc["tokenizer"],
               "--out", str(tmp_path)]
    result = run_process(command, timeout=540, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == 0, result.stderr[-4000:]
    info = {run: [json.loads((tmp_path / run / f"rank{r}.json").read_text()) for r in range(2)] for run in RUNS}
    ranks = {run: [torch.load(tmp_path / run / f"rank{r}.pt", weights_only=True) for r in range(2)] for run in RUNS}
    for run in RUNS:
        for r in range(2):
            assert info[run][r]["fused"], (run, r)
            assert not info[run][r]["reads"], f"{run}, rank {r}:\n\n" + "\n\n".join(info[run][r]["reads"])
        assert all(torch.equal(ranks[run][0][k], ranks[run][1][k]) for k in ranks[run][0]), run
    assert [i["global_step"] for i in info["ddp_nan"]] == [STEPS, STEPS]
    assert all(i["error"] and i["error"].startswith("non-finite loss at step 1 on at least one rank")
               for i in info["ddp_nan"])
    assert [i["global_step"] for i in info["ddp_preempted"]] == [2, 2]  # (of 3)
    assert all(i["preempted"] for i in info["ddp_preempted"])
    saved = torch.load(tmp_path / "ddp_preempted" / "checkpoints" / "preempted.ckpt", weights_only=True)
    assert saved["global_step"] == 2
    assert [i["skipped_steps"] for i in info["fsdp_inf"]] == [i["skipped_steps"] for i in info["ddp_nan"]] == [1, 1]
    for run in ("ddp_nan", "fsdp_inf"):
        assert all(i["step_1_unchanged"] and i["step_2_trained"] for i in info[run]), run


if __name__ == "__main__":
    _ranks_main()
