"""Elastic resume through the real CLI: a run checkpointed on 2 DDP ranks x 2 workers and resumed on one process
without workers continues its task epoch: every sample of the epoch once across the two parts."""

from __future__ import annotations

import pytest

from mmlit.data import iter_samples

from ._ddp_helpers import read_keys
from ._processes import run_cli
from .conftest import tiny_recipe, write_recipe, write_tar

FIT_TIMEOUT = 300


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(2 * FIT_TIMEOUT + 60)
def test_a_two_rank_run_resumed_on_one_process_reads_the_rest_of_its_epoch_once(soc, tmp_path):
    samples = [s for url in soc["shards"]["train"] + soc["shards"]["val"] for s in iter_samples(url)][:30]
    shards = [str(write_tar(tmp_path / f"e-{i}.tar", [{k: v for k, v in s.items() if k not in ("__url__", "__index__")}
                                                      for s in samples[begin:begin + size]]))
              for i, (begin, size) in enumerate([(0, 7), (7, 23)])]
    run = tmp_path / "run"
    recipe = tiny_recipe(soc, run, tasks=["vqa"], strategy="ddp", devices=2, max_steps=2, max_epochs=3,
                         logger=False, limit_val_batches=0, num_sanity_val_steps=0)
    recipe["model"]["tasks"]["vqa"]["init_args"]["shards"]["train"] = "{" + ",".join(shards) + "}"
    recipe["data"].update(num_workers=2, steps_per_epoch=None, shuffle_buffer=8)
    record = {"class_path": "tests._ddp_helpers.RecordKeys", "init_args": {"dirpath": str(tmp_path / "keys")}}
    recipe["trainer"]["callbacks"] = [record]
    result = run_cli("fit", "--config", str(write_recipe(recipe, tmp_path / "two.yaml")), timeout=FIT_TIMEOUT, ddp=True)
    assert result.returncode == 0, result.stderr[-4000:]
    first = [k for rank in range(2) for step in read_keys(tmp_path / "keys", rank) for k in step["keys"]["vqa"]]
    assert len(first) == 2 * 2 * 4  # 2 steps of 2 ranks x 4 samples

    # 14 samples left: one process takes them in 4 steps of 4, 4, 4 and 2 samples.
    recipe["trainer"].update(devices=1, strategy="auto", max_steps=2 + 4)
    recipe["data"]["num_workers"] = 0
    recipe["trainer"]["callbacks"] = [{**record, "init_args": {"dirpath": str(tmp_path / "keys-resumed")}}]
    result = run_cli("fit", "--config", str(write_recipe(recipe, tmp_path / "one.yaml")),
                     "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), timeout=FIT_TIMEOUT)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "other ranks (2 -> 1), workers (2 -> 0)" in result.stderr + result.stdout
    rest = [step["keys"]["vqa"] for step in read_keys(tmp_path / "keys-resumed", 0)]
    assert [len(keys) for keys in rest] == [4, 4, 4, 2]
    keys = first + [k for step in rest for k in step]
    assert sorted(keys) == sorted(s["__key__"] for s in samples)  # every sample of the epoch once
