"""Several nodes and failing ranks: 2 nodes x 1 process through torchrun on loopback train exact epochs to identical
weights; an exception on one rank (in a DataLoader worker, in the data module's setup before its broadcast) stops
every rank within 60 s with the original message and the rank it came from, under Lightning's launcher and under
torchrun across two nodes, whose agents do not stop each other."""

from __future__ import annotations

import socket
import sys
import time

import pytest
import torch

from ._ddp_helpers import read_keys
from ._processes import cli_env, run_together
from .conftest import tiny_recipe, write_recipe

TIMEOUT = 240  # seconds per run; a rank left waiting would wait for the process group's 30 minutes


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _nodes(config, *extra: str) -> list[list[str]]:
    """The two torchrun commands of a 2-node x 1-process job on loopback."""
    port = _port()
    return [[sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1", "--node_rank",
             str(node), "--master_addr", "127.0.0.1", "--master_port", str(port), "-m", "mmlit.cli", "fit", "--config",
             str(config), *extra] for node in range(2)]


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(TIMEOUT + 60)
def test_two_nodes_through_torchrun_train_exact_epochs_to_identical_weights(soc, tmp_path):
    recipe = tiny_recipe(soc, tmp_path / "run", tasks=["vqa", "image_classification"], strategy="ddp", devices=1,
                         num_nodes=2, max_epochs=2, logger=False, num_sanity_val_steps=0)
    recipe["data"].update(num_workers=1, steps_per_epoch=None)
    recipe["trainer"]["callbacks"] = [
        {"class_path": "tests._ddp_helpers.RecordKeys", "init_args": {"dirpath": str(tmp_path / "keys")}},
        {"class_path": "tests._ddp_helpers.DumpWeights", "init_args": {"dirpath": str(tmp_path / "weights")}}]
    nodes = run_together(_nodes(write_recipe(recipe, tmp_path / "r.yaml")), timeout=TIMEOUT, env=cli_env(ddp=True))
    for node in nodes:
        assert node.returncode == 0, node.stderr[-4000:]
    weights = [torch.load(tmp_path / "weights" / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert weights[0].keys() == weights[1].keys() and all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    steps = [read_keys(tmp_path / "keys", r) for r in range(2)]
    per_epoch = len(steps[0]) // 2
    assert len(steps[0]) == len(steps[1]) == 2 * per_epoch > 0
    for epoch in range(2):  # 40 training samples over 2 nodes: each once per epoch, per task
        seen = [k for rank in steps for step in rank[epoch * per_epoch:(epoch + 1) * per_epoch]
                for k in step["keys"]["image_classification"]]
        assert sorted(seen) == sorted(set(seen)) and len(seen) == 40


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(TIMEOUT + 60)
# Each launcher, each rank and each place once (a failure in setup comes before the shard index's broadcast)
@pytest.mark.parametrize("launcher,rank,where", [("lightning", 1, "worker"), ("torchrun", 0, "setup")])
def test_a_failure_on_one_rank_stops_every_rank_with_its_message(soc, tmp_path, launcher, rank, where):
    recipe = tiny_recipe(soc, tmp_path / "run", tasks=["vqa", "image_classification"], strategy="ddp",
                         max_epochs=1, logger=False, num_sanity_val_steps=0,
                         **({"devices": 2} if launcher == "lightning" else {"devices": 1, "num_nodes": 2}))
    recipe["data"]["num_workers"] = 1
    task = recipe["model"]["tasks"]["image_classification"]
    task["class_path"] = "tests._ddp_helpers.FailingTask"
    task["init_args"].update(fail_rank=rank, fail_in=where, marker=str(tmp_path / "failed_at"))
    config = write_recipe(recipe, tmp_path / "r.yaml")
    commands = _nodes(config) if launcher == "torchrun" else [
        [sys.executable, "-m", "mmlit.cli", "fit", "--config", str(config)]]
    results = run_together(commands, timeout=TIMEOUT, env=cli_env(ddp=True))
    ended = time.time()
    assert all(r.returncode != 0 for r in results)
    took = ended - float((tmp_path / "failed_at").read_text())
    print(f"{launcher}: every rank ended {took:.1f} s after rank {rank} failed in its {where}")  # (-s shows it)
    assert took < 60, "every rank stopped within 60 s of the failure"
    output = "\n".join(r.stdout + r.stderr for r in results)
    where_text = "a DataLoader worker" if where == "worker" else "the data module's setup"
    assert f"injected failure in {where_text} on rank {rank}" in output
    # the other rank says where the failure came from, whether it was stopped by it or failed after it
    assert f"mmlit: rank {rank} failed" in output, output[-4000:]
