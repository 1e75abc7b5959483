"""A real 2-process DDP fit on the gloo backend: it must finish (no hang) with identical weights."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from .conftest import REPO, tiny_recipe, write_recipe


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_rank_fit_finishes_with_identical_weights(soc, tmp_path):
    run = tmp_path / "run"
    recipe = tiny_recipe(soc, run, strategy="ddp", devices=2, max_epochs=2)
    recipe["data"]["num_workers"] = 1  # 2 ranks x 1 worker = 2 readers of the 4 training shards
    recipe["trainer"]["callbacks"] = [{"class_path": "tests._ddp_helpers.DumpWeights",
                                       "init_args": {"dirpath": str(tmp_path / "weights")}}]
    env = dict(os.environ, PYTHONPATH=str(REPO), PL_TORCH_DISTRIBUTED_BACKEND="gloo")
    result = subprocess.run([sys.executable, "-m", "mmlit.cli", "fit", "--config", str(write_recipe(recipe, tmp_path / "r.yaml"))],
                            capture_output=True, text=True, timeout=420, cwd=REPO, env=env)
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
