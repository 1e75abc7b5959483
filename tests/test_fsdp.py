"""FSDP2 (``mmlit.fsdp.FSDP2Strategy``) on 2 gloo ranks: the weights of one process on the whole batch, with each
option; a non-finite gradient in one rank's shard skips the step on both; mixed precision; a run SIGKILLed mid-epoch
resumes from its sharded checkpoint to the uninterrupted run's samples and weights; every registered task trains and
evaluates; a gradient-based objective is refused; a sharded checkpoint is written atomically, read without running
code, consolidated into one file and exported.

Run as ``python -m torch.distributed.run --nproc_per_node 2 -m tests.test_fsdp ...``, this file is also the ranks'
side of the first test: each rank trains on its half of fixed global batches (``tests/objectives/_train.py``)."""

from __future__ import annotations

import argparse
import csv
import json
import os
import pickle
import shutil
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from tokenizers import Tokenizer
from torch.distributed.tensor import DTensor

from mmlit.checkpoints import AtomicCheckpointIO, read_sharded, resolve_checkpoint, save_sharded, unloadable
from mmlit.cli import main
from mmlit.compat.torch import DCP_INDEX
from mmlit.data import iter_samples
from mmlit.data.decode import decode_sample
from mmlit.fsdp import FSDP2Strategy
from mmlit.models import Backbone, CrossAttentionFusion, TimmImageEncoder, TransformerTextEncoder
from mmlit.module import MultiTaskModule
from mmlit.registry import get_objective
from mmlit.tasks.base import Shards
from mmlit.transfer import read_backbone_state, upgrade_checkpoint

from ._ddp_helpers import read_steps
from ._processes import after_lines, cli_env, free_port, run as run_process, run_cli, run_until
from ._soc import soc_task
from .conftest import REPO, tiny_recipe, write_recipe

STEPS = 3  # of the fixed-batch runs
TOTAL, EVERY = 6, 2  # steps of the kill-and-resume runs, and a checkpoint every 2 (3 steps per epoch: mid-epoch)
FIT_TIMEOUT = 300  # seconds per 2-rank fit (15-30 s here)
TASKS = ("vqa", "image_classification")
# The fixed-batch runs: the strategy's settings, the objective, trainer.precision, the tasks
RUNS = {
    "static": ({}, "static", "32-true", TASKS),
    "uncertainty": ({}, "uncertainty", "32-true", TASKS),  # learnable task weights: parameters of the root unit
    "checkpointed": ({"activation_checkpointing": True, "reshard_after_forward": False}, "static", "32-true", TASKS),
    "offloaded": ({"cpu_offload": True}, "static", "32-true", TASKS),
    "bf16": ({}, "static", "bf16-mixed", TASKS),  # autocast: computed in bfloat16, gathered and reduced in float32
    "bf16_reduced": ({"reduce_dtype": "bfloat16"}, "static", "bf16-mixed", TASKS),  # reduced in bfloat16, over gloo
    # gathered in bfloat16 too: a text task (the image encoder adds a float32 buffer before a layer norm, and the
    # CPU's autocast, unlike CUDA's, leaves layer norms to their input's dtype)
    "bf16_gathered": ({"param_dtype": "bfloat16"}, "static", "bf16-mixed", ("text_classification",)),
    "pcgrad": ({}, "pcgrad", "32-true", TASKS),
    # an infinite gradient at step 1 on rank 1, in one output channel of the image stem: in rank 0's shard alone
    "static_inf": ({}, "static", "32-true", TASKS),
}


def _module(method: str, tasks: tuple[str, ...] = TASKS) -> MultiTaskModule:
    """``tests/objectives/_train.py``'s module with two layers in the text encoder and the fusion, so that every part
    has blocks of its own to shard."""
    pl.seed_everything(0, verbose=False)
    backbone = Backbone({"image": TimmImageEncoder("test_convnext", dim=32, image_size=75, feature_index=2),
                         "text": TransformerTextEncoder(vocab_size=256, dim=32, depth=2, heads=2, max_length=40)},
                        CrossAttentionFusion(dim=32, depth=2, heads=2))
    heads = {name: soc_task(name, Shards(train="unused")) for name in tasks}
    return MultiTaskModule(backbone, heads, get_objective(method)(),
                           optimizer=lambda params: torch.optim.SGD(params, lr=0.05))


def _batches(urls: list[str], tokenizer: str, part: str | int, tasks: tuple[str, ...]) -> list[dict]:
    """``tests/objectives/_train.py``'s ``step_batches`` (``STEPS`` batches: the whole global batch, or half 0 / 1 of
    it) for any tasks: its own takes the data sides of its two tasks."""
    from tests.objectives._train import IMAGES

    data = {name: task.data for name, task in _module("static", tasks).tasks.items()}
    tok = Tokenizer.from_file(tokenizer)
    samples = [decode_sample(s) for url in urls for s in iter_samples(url)]
    out = []
    for step in range(STEPS):
        batch = {}
        for name, task in data.items():
            examples = [e for s in samples[step * IMAGES:(step + 1) * IMAGES] for e in task.prepare(s, tok)]
            if part != "whole":
                examples = examples[part * IMAGES // 2:(part + 1) * IMAGES // 2]
            batch[name] = task.collate(examples)
        out.append(batch)
    return out


def _full(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's whole weights (gathered from the shards: a collective, called on every rank alike)."""
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu().clone()
            for k, v in module.state_dict().items()}


class DumpFullWeights(pl.Callback):
    """Every rank writes the whole weights it ended with (``rank{r}.pt``)."""

    def __init__(self, dirpath: str):
        self.dirpath = Path(dirpath)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        weights = _full(pl_module)
        self.dirpath.mkdir(parents=True, exist_ok=True)
        torch.save(weights, self.dirpath / f"rank{trainer.global_rank}.pt")


def _poison(module: MultiTaskModule, rank: int):
    """A forward hook that makes the gradient of output channel 0 infinite on rank 1 at step 1: only row 0 of the
    layer's weight gradient is infinite, a row of rank 0's shard (FSDP shards along the first dimension)."""

    def hook(layer, args, out: torch.Tensor) -> None:
        if rank == 1 and module.global_step == 1 and out.requires_grad:
            infinite = torch.zeros_like(out)
            infinite[:, 0] = float("inf")
            out.register_hook(lambda grad: grad + infinite)
    return hook


def _ranks_main() -> None:
    """One rank of the fixed-batch runs: each of ``--runs`` on this rank's half of every global batch."""
    from tests.objectives._train import loader, trainer

    parser = argparse.ArgumentParser()
    parser.add_argument("--train", nargs="+", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--runs", nargs="+", required=True, choices=list(RUNS))
    args = parser.parse_args()
    rank = int(os.environ["RANK"])
    for run in args.runs:
        settings, method, precision, tasks = RUNS[run]
        folder = Path(args.out) / run
        folder.mkdir(parents=True, exist_ok=True)
        module = _module(method, tasks)
        gathered, computed = set(), set()  # the dtypes of each Linear's weight in its forward, and of its output
        for layer in module.modules():
            if isinstance(layer, torch.nn.Linear):
                layer.register_forward_pre_hook(lambda m, _: gathered.add(str(m.weight.dtype)))
                layer.register_forward_hook(lambda m, _, out: computed.add(str(out.dtype)))
        if run.endswith("_inf"):
            module.backbone.encoders["image"].model.stem[0].register_forward_hook(_poison(module, rank))
        fit = trainer(folder, STEPS, devices=2, strategy=FSDP2Strategy(process_group_backend="gloo", **settings),
                      precision=precision)
        try:
            fit.fit(module, loader(_batches(args.train, args.tokenizer, rank, tasks)))
        except ValueError as err:
            (folder / f"rank{rank}.error").write_text(str(err))
            continue
        params = list(module.parameters())
        info = {"global_step": fit.global_step, "skipped_steps": module.skipped_steps, "gathered": sorted(gathered),
                "computed": sorted(computed), "stored": sorted({str(p.dtype) for p in params}),
                "dtensors": all(isinstance(p, DTensor) for p in params),
                "local": sum(p.to_local().numel() for p in params), "whole": sum(p.numel() for p in params)}
        (folder / f"rank{rank}.json").write_text(json.dumps(info))
        torch.save(_full(module), folder / f"rank{rank}.pt")


def _max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def fixed_batch_runs(soc, tmp_path_factory):
    """Every run of ``RUNS`` on 2 gloo ranks (one torchrun), and the one-process references on the whole batches
    (``{objective: weights}``)."""
    from tests.objectives._train import loader, trainer

    out = tmp_path_factory.mktemp("fsdp-runs")
    urls = soc["shards"]["train"][:2]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), "-m", "tests.test_fsdp", "--train", *urls, "--tokenizer", soc["tokenizer"],
               "--out", str(out), "--runs", *RUNS]
    result = run_process(command, timeout=FIT_TIMEOUT, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == 0, result.stderr[-4000:]
    assert "gradient statistics (train/objective/grad_norm/*, cosine/*) are off under FSDP2Strategy" in result.stderr
    whole, references = _batches(urls, soc["tokenizer"], "whole", TASKS), {}
    for name, method, batches in (("static", "static", whole), ("uncertainty", "uncertainty", whole),
                                  ("static_inf", "static", [whole[0], whole[2]])):  # (step 1 skipped)
        references[name] = _module(method)
        trainer(out / name, len(batches)).fit(references[name], loader(batches))
    return out, {name: _full(module) for name, module in references.items()}


def _ranks(out: Path, run: str) -> tuple[list[dict], list[dict]]:
    weights = [torch.load(out / run / f"rank{r}.pt", weights_only=True) for r in range(2)]
    info = [json.loads((out / run / f"rank{r}.json").read_text()) for r in range(2)]
    return weights, info


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(FIT_TIMEOUT + 120)
def test_two_ranks_end_with_the_weights_of_one_process_on_the_whole_batch(fixed_batch_runs):
    """Each rank holds half of every parameter (DTensor shards); both end with the same whole weights, those of one
    process on the whole batches (a loss-based objective; with learnable task weights; with activation
    checkpointing and the blocks kept gathered until their backward; with CPU offload)."""
    out, one = fixed_batch_runs
    for run in ("static", "uncertainty", "checkpointed", "offloaded"):
        weights, info = _ranks(out, run)
        assert info[0]["global_step"] == info[1]["global_step"] == STEPS, run
        assert info[0]["dtensors"] and info[0]["local"] + info[1]["local"] == info[0]["whole"], run  # halves
        assert _max_difference(weights[0], weights[1]) == 0.0, run
        assert _max_difference(weights[0], one[RUNS[run][1]]) < 1e-5, run
    assert _max_difference(one["static"], _full(_module("static"))) > 1e-2  # it trained
    uncertainty, _ = _ranks(out, "uncertainty")
    assert (uncertainty[0]["objective.log_variance"] != 0).all()  # (the task weights trained, in the root unit)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(FIT_TIMEOUT + 120)
def test_a_non_finite_gradient_in_one_ranks_shard_skips_the_step_on_every_rank(fixed_batch_runs):
    """Rank 1's shards are finite, rank 0's are not: both skip step 1, and end with the weights of the whole batches
    of steps 0 and 2."""
    out, one = fixed_batch_runs
    weights, info = _ranks(out, "static_inf")
    assert [i["skipped_steps"] for i in info] == [1, 1] and info[0]["global_step"] == STEPS
    assert _max_difference(weights[0], weights[1]) == 0.0
    assert _max_difference(weights[0], one["static_inf"]) < 1e-5


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(FIT_TIMEOUT + 120)
def test_mixed_precision_computes_in_bfloat16_and_keeps_float32_shards(fixed_batch_runs):
    """Under ``bf16-mixed`` every layer computes in bfloat16 while the shards (and the optimizer) stay float32; the
    result is the float32 one up to bfloat16 rounding, with gradients reduced in float32 or, over gloo too, in
    bfloat16; ``param_dtype: bfloat16`` gathers the parameters in bfloat16 as well."""
    out, one = fixed_batch_runs
    one = one["static"]
    for run in ("bf16", "bf16_reduced", "bf16_gathered"):
        weights, info = _ranks(out, run)
        assert info[0]["computed"] == ["torch.bfloat16"] and info[0]["stored"] == ["torch.float32"], run
        assert info[0]["gathered"] == ["torch.bfloat16" if run == "bf16_gathered" else "torch.float32"], run
        assert _max_difference(weights[0], weights[1]) == 0.0, run
        if run != "bf16_gathered":
            assert 1e-5 < _max_difference(weights[0], one) < 2e-2, run
    weights, _ = _ranks(out, "bf16_gathered")
    assert _max_difference(weights[0], _full(_module("static", ("text_classification",)))) > 1e-3  # it trained


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(FIT_TIMEOUT + 120)
def test_a_gradient_based_objective_under_fsdp_is_a_clear_error(fixed_batch_runs):
    out, _ = fixed_batch_runs
    for r in range(2):
        error = (out / "pcgrad" / f"rank{r}.error").read_text()
        assert error.startswith("model.objective: PCGrad combines per-task gradients")
        assert "Gramian" in error and "not supported yet" in error and "trainer.strategy: ddp" in error


def _resume_recipe(soc, root: Path) -> Path:
    recipe = tiny_recipe(soc, root, tasks=["vqa", "image_classification"], devices=2, max_epochs=-1, max_steps=TOTAL,
                         logger=False, limit_val_batches=0, num_sanity_val_steps=0,
                         strategy={"class_path": "mmlit.fsdp.FSDP2Strategy",
                                   "init_args": {"activation_checkpointing": True}})
    backbone = recipe["model"]["backbone"]["init_args"]
    for part in (backbone["encoders"]["text"], backbone["fusion"]):
        part["init_args"]["depth"] = 2  # blocks to shard in every part
    # Tasks left out of some steps (their heads get no gradient there), and augmentation a resumed run must redraw
    recipe["data"]["mixture"] = {"class_path": "mmlit.data.Temperature", "init_args": {"temperature": 2.0}}
    recipe["model"]["tasks"]["image_classification"]["init_args"]["transform"] = {"auto_augment": "rand-m9-mstd0.5"}
    recipe["checkpoint"] = {"every_n_train_steps": EVERY}
    recipe["trainer"]["callbacks"] = [
        {"class_path": "tests._ddp_helpers.RecordKeys", "init_args": {"dirpath": str(root / "keys")}},
        {"class_path": "tests.test_fsdp.DumpFullWeights", "init_args": {"dirpath": str(root / "weights")}},
        {"class_path": "tests._ddp_helpers.Pace", "init_args": {"seconds": 0.5}}]
    return write_recipe(recipe, root / "r.yaml")


@pytest.fixture(scope="module")
def uninterrupted(soc, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fsdp-whole")
    result = run_process([sys.executable, "-m", "mmlit.cli", "fit", "--config", str(_resume_recipe(soc, root))],
                         timeout=FIT_TIMEOUT, env=cli_env(ddp=True))
    assert result.returncode == 0, result.stderr[-4000:]
    assert "FSDP2: 6 blocks" in result.stdout + result.stderr  # the image stages, the text and fusion layers
    return root


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(3 * FIT_TIMEOUT)
def test_a_run_killed_mid_epoch_resumes_from_its_sharded_checkpoint_bit_identically(soc, uninterrupted, tmp_path):
    command = [sys.executable, "-m", "mmlit.cli", "fit", "--config", str(_resume_recipe(soc, tmp_path)),
               "--ckpt_path", "auto"]
    keys = tmp_path / "keys" / "rank0.jsonl"
    killed = run_until(command, after_lines(keys, EVERY + 3), timeout=FIT_TIMEOUT, env=cli_env(ddp=True))
    assert killed.returncode == -9, killed.stderr[-4000:]
    trained = len(keys.read_text().splitlines())
    meta = tmp_path / "checkpoints" / "last.ckpt" / "meta.pt"  # a folder: every rank's shards, and the rest
    step = torch.load(meta, weights_only=True)["global_step"]
    assert step == 2 * EVERY and step % 3 != 0, step  # (mid-epoch: 3 steps per epoch)
    resumed = run_until(command, None, timeout=FIT_TIMEOUT, env=cli_env(ddp=True))
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert len(keys.read_text().splitlines()) - trained == TOTAL - step  # it went on from the checkpoint
    for rank in range(2):
        expected = read_steps(uninterrupted / "keys", rank)
        assert read_steps(tmp_path / "keys", rank) == expected, f"rank {rank} trained on other samples after resuming"
        a = torch.load(uninterrupted / "weights" / f"rank{rank}.pt", weights_only=True)
        b = torch.load(tmp_path / "weights" / f"rank{rank}.pt", weights_only=True)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
    assert len({tuple(sorted(r["keys"])) for r in read_steps(uninterrupted / "keys", 0)}) > 1  # tasks left out


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(FIT_TIMEOUT + 120)
def test_a_sharded_checkpoint_consolidates_to_one_file_and_exports(uninterrupted, tmp_path):
    folder = uninterrupted / "checkpoints" / "last.ckpt"
    weights = torch.load(uninterrupted / "weights" / "rank0.pt", weights_only=True)
    whole = read_sharded(folder)
    assert whole["global_step"] == TOTAL and whole["state_dict"].keys() == weights.keys()
    assert all(torch.equal(whole["state_dict"][k], weights[k]) for k in weights)

    assert main(["consolidate", str(folder), str(tmp_path / "one.ckpt")]) == 0
    one = torch.load(tmp_path / "one.ckpt", weights_only=True)
    assert one["global_step"] == TOTAL and "loops" in one and "optimizer_states" not in one
    assert all(torch.equal(one["state_dict"][k], weights[k]) for k in weights)
    assert AtomicCheckpointIO().load_checkpoint(folder)["state_dict"].keys() == weights.keys()  # any strategy reads it
    with pytest.raises(ValueError, match="without the optimizer state.*resumes under trainer.strategy"):
        upgrade_checkpoint(one, fitting=True)

    for source in (folder, tmp_path / "one.ckpt"):
        out = tmp_path / f"{source.stem}.safetensors"
        assert main(["export-backbone", str(source), str(out)]) == 0
        backbone = read_backbone_state(out)
        assert backbone.keys() == {k[len("backbone."):] for k in weights if k.startswith("backbone.")}
        assert all(torch.equal(v, weights[f"backbone.{k}"]) for k, v in backbone.items())


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(2 * FIT_TIMEOUT)
@pytest.mark.parametrize("tasks", [None, ["vlm"]], ids=["every-task", "pretrained-causal-lm"])
def test_every_registered_task_trains_and_evaluates_under_fsdp(soc, tmp_path, tasks):
    """Every registered task, with the encoders it reads (image, text, a causal decoder, audio, video; for ``vlm`` a
    Hugging Face causal LM from a local folder, whose embeddings it reads and which generates), trains and validates
    on 2 ranks under FSDP2, with activation checkpointing and bf16-mixed; one process tests the sharded checkpoint
    (any strategy reads it)."""
    recipe = tiny_recipe(soc, tmp_path / "run", tasks=tasks, devices=2, precision="bf16-mixed",
                         strategy={"class_path": "mmlit.fsdp.FSDP2Strategy",
                                   "init_args": {"activation_checkpointing": True}})
    recipe["trainer"]["logger"] = recipe["trainer"]["logger"][1:]  # the CSV logger only
    path = write_recipe(recipe, tmp_path / "r.yaml")
    result = run_cli("fit", "--config", str(path), timeout=FIT_TIMEOUT, ddp=True)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = list(csv.DictReader(open(next((tmp_path / "run" / "csv").glob("version_*/metrics.csv")))))
    keys = {k for row in rows for k, v in row.items() if v}
    for name in recipe["model"]["tasks"]:
        assert f"train/{name}/loss" in keys and f"val/{name}/loss" in keys, name
    if tasks is None:
        tested = run_cli("test", "--config", str(path), "--trainer.devices", "1", "--trainer.strategy", "auto",
                         "--ckpt_path", "last", timeout=FIT_TIMEOUT)
        assert tested.returncode == 0, tested.stderr[-4000:]
        assert "test/vqa/acc" in tested.stdout


def _save(folder: Path, name: str, step: int) -> Path:
    """A sharded checkpoint written by one process (no process group: torch's checkpoint writes it alone)."""
    checkpoint = {"global_step": step, "state_dict": {"w": torch.full((4, 4), float(step))},
                  "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.1, "params": ["w"]}]}]}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        save_sharded(checkpoint, folder / name, rank=0, barrier=lambda: None)
    return folder / name


def test_a_sharded_checkpoint_is_replaced_whole_and_a_kill_leaves_the_previous_one(tmp_path):
    last = _save(tmp_path, "last.ckpt", 2)
    _save(tmp_path, "last.ckpt", 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    assert read_sharded(last)["state_dict"]["w"][0, 0] == 4.0 and unloadable(last) is None

    # killed between the two renames: the previous folder set aside, the new one whole but not in place
    os.replace(last, tmp_path / ".last.ckpt.replaced")
    shutil.copytree(tmp_path / ".last.ckpt.replaced", tmp_path / ".last.ckpt.partial")
    assert resolve_checkpoint("last", tmp_path) == str(last)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    # killed while the shards were written: no index yet; the folder in place is untouched
    (tmp_path / ".last.ckpt.partial").mkdir()
    (tmp_path / ".last.ckpt.partial" / "__0_0.distcp").write_bytes(b"half")
    assert resolve_checkpoint("auto", tmp_path) == str(last) and not (tmp_path / ".last.ckpt.partial").exists()


def test_a_sharded_checkpoint_with_a_shard_cut_short_is_passed_over(tmp_path):
    older = _save(tmp_path, "epoch=0-step=2.ckpt", 2)
    os.utime(older, (1, 1))
    last = _save(tmp_path, "last.ckpt", 4)
    shard = next(last.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:10])
    assert "cut short" in unloadable(last)
    with pytest.warns(UserWarning, match=r"last.ckpt cannot be loaded \(shard file\(s\) missing or cut short"):
        assert resolve_checkpoint("last", tmp_path) == str(older)


def test_a_sharded_checkpoint_runs_no_code_from_its_index(tmp_path):
    """torch unpickles a checkpoint's index whole; mmlit reads only the classes torch writes there."""
    last = _save(tmp_path, "last.ckpt", 2)

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "ran"),))

    (last / DCP_INDEX).write_bytes(pickle.dumps(Payload()))
    assert "system is not something torch writes" in unloadable(last)
    with pytest.raises(pickle.UnpicklingError):
        read_sharded(last)
    assert not (tmp_path / "ran").exists()


if __name__ == "__main__":
    _ranks_main()
