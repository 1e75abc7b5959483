"""A real 2-process DDP fit on the gloo backend: it must finish (no hang) with identical weights."""

from __future__ import annotations

import json

import pytest
import torch

from mmlit.data import iter_samples

from ._processes import run_cli
from .conftest import tiny_recipe, write_recipe

FIT_TIMEOUT = 300  # seconds (about 15 s here); tools/stress_workers.py sets its own


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(2 * FIT_TIMEOUT + 60)
@pytest.mark.parametrize("tasks,workers", [(None, 1), (["vqa", "contrastive", "image_classification"], 2)],
                         ids=["all-tasks-1-worker", "3-tasks-2-workers"])
def test_two_rank_fit_finishes_with_identical_weights(soc, tmp_path, tasks, workers):
    """Each rank starts its pool of workers (one for the training steps of every task, one per validation) beside
    the gloo threads."""
    run = tmp_path / "run"
    recipe = tiny_recipe(soc, run, tasks=tasks, strategy="ddp", devices=2, max_epochs=2)
    recipe["data"]["num_workers"] = workers  # 2 ranks x 1 or 2 workers = 2 or 4 readers of the 4 training shards
    recipe["trainer"]["callbacks"] = [{"class_path": "tests._ddp_helpers.DumpWeights",
                                       "init_args": {"dirpath": str(tmp_path / "weights")}}]
    result = run_cli("fit", "--config", str(write_recipe(recipe, tmp_path / "r.yaml")), timeout=FIT_TIMEOUT, ddp=True)
    assert result.returncode == 0, result.stderr[-4000:]
    rank0 = torch.load(tmp_path / "weights" / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "weights" / "rank1.pt", weights_only=True)
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 6  # 3 steps per epoch on every rank, 2 epochs
    for key, value in checkpoint["state_dict"].items():
        assert torch.equal(value, rank0[key]), key  # the checkpoint holds the weights the ranks ended with
    if tasks is None:  # every task predicts on 2 ranks: each writes its own file, together every test sample once
        result = run_cli("predict", "--config", str(tmp_path / "r.yaml"), "--ckpt_path", str(run / "checkpoints" / "last.ckpt"),
                         timeout=FIT_TIMEOUT, ddp=True)
        assert result.returncode == 0, result.stderr[-4000:]
        expected = sorted(s["__key__"] for s in iter_samples(soc["test"]))  # (the recipe's test shard)
        for name in recipe["model"]["tasks"]:
            ranks = [[json.loads(line)["key"] for line in (run / "predictions" / f"{name}.rank{r}.jsonl").open()]
                     for r in range(2)]
            assert ranks[0] and ranks[1] and set(ranks[0]).isdisjoint(ranks[1]), name
            assert sorted(set(ranks[0]) | set(ranks[1])) == expected, name


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(FIT_TIMEOUT + 60)
def test_uneven_shards_two_ranks_two_workers_one_exact_epoch(soc, tmp_path):
    """Shards of 10, 50 and 7 samples over 2 ranks x 2 workers: 67 samples in global batches of 2 x 4, so 9 steps on
    each rank (the last global batch's 3 samples split 1 + 2) and every sample exactly once."""
    from mmlit.data import iter_samples

    from ._ddp_helpers import read_keys
    from .conftest import write_tar

    samples = [s for url in soc["shards"]["train"] for s in iter_samples(url)][:37] + \
              [s for url in soc["shards"]["val"] + soc["shards"]["test"] for s in iter_samples(url)][:24]
    samples += [dict(s, __key__=f"copy{i}") for i, s in enumerate(samples[:6])]  # 67 samples, unique keys
    shards, begin = [], 0
    for i, size in enumerate((10, 50, 7)):
        chunk = [{k: v for k, v in s.items() if k not in ("__url__", "__index__")} for s in samples[begin:begin + size]]
        shards.append(str(write_tar(tmp_path / f"uneven-{i}.tar", chunk)))
        begin += size
    run = tmp_path / "run"
    recipe = tiny_recipe(soc, run, tasks=["vqa"], strategy="ddp", devices=2, max_epochs=1, logger=False,
                         limit_val_batches=0, num_sanity_val_steps=0)
    recipe["model"]["tasks"]["vqa"]["init_args"]["shards"]["train"] = "{" + ",".join(shards) + "}"
    recipe["data"].update(num_workers=2, steps_per_epoch=None)
    recipe["trainer"]["callbacks"] = [{"class_path": "tests._ddp_helpers.RecordKeys", "init_args": {"dirpath": str(tmp_path / "keys")}}]
    result = run_cli("fit", "--config", str(write_recipe(recipe, tmp_path / "r.yaml")), timeout=FIT_TIMEOUT, ddp=True)
    assert result.returncode == 0, result.stderr[-4000:]
    steps = [read_keys(tmp_path / "keys", rank) for rank in range(2)]
    assert [len(s) for s in steps] == [9, 9]  # ceil(67 / (2 ranks x 4))
    keys = [k for rank in steps for step in rank for k in step["keys"]["vqa"]]
    assert sorted(keys) == sorted(s["__key__"] for s in samples)  # every sample once, none twice
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 9
