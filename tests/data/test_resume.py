"""Kill and resume, for real: a run is SIGKILLed at random moments (once while it writes a checkpoint, made slow on
purpose), stopped once by SIGUSR1 (a preemption: it checkpoints and ends), and started again each time with
``--ckpt_path auto``; it trains on exactly the samples of the uninterrupted run, in the same order, with the same
augmentations, and ends with bit-identical weights. On 1 rank with no workers and 2 ranks with 2 workers each, the
shards and their index over HTTP and on S3.

A start of a run is most of these tests' time (its processes, their imports, the DataLoader workers), so each case
starts only the runs its setting is needed for: the kill inside a checkpoint's write on 1 rank (rank 0 alone writes,
whatever the world), the preemption on 2 ranks (where "the first rank only" means something), a random kill in both."""

from __future__ import annotations

import random
import shutil
import signal
import sys

import pytest
import torch

from mmlit.data import write_index

from .._ddp_helpers import read_steps
from .._processes import after_lines, cli_env, run_cli, run_until
from ..conftest import tiny_recipe, write_recipe

TOTAL, EVERY = 8, 2  # steps, and a checkpoint every 2; with 3 steps per epoch the run crosses two epoch ends
FIT_TIMEOUT = 300  # seconds per fit (about 10-30 s each here); tools/stress_workers.py sets its own
_REFERENCES: dict = {}  # (world, workers) -> the uninterrupted run's folder (the store does not change what it trains)


def _recipe(soc, root, world: int, workers: int) -> dict:
    recipe = tiny_recipe(soc, root, tasks=["vqa", "image_classification"], max_epochs=-1, max_steps=TOTAL, logger=False,
                         limit_val_batches=0, num_sanity_val_steps=0, devices=world,
                         strategy="ddp_find_unused_parameters_true" if world > 1 else "auto")
    recipe["data"].update(num_workers=workers, mixture={"class_path": "mmlit.data.Temperature", "init_args": {"temperature": 2.0}})
    recipe["model"]["tasks"]["image_classification"]["init_args"]["batch_size"] = 3
    # Augmentation on (random crops, flips, RandAugment): a resumed run draws the same augmentations
    recipe["model"]["tasks"]["image_classification"]["init_args"]["transform"] = {"auto_augment": "rand-m9-mstd0.5"}
    recipe["model"]["tasks"]["vqa"]["init_args"].pop("transform")  # VQA's own: random crops
    recipe["checkpoint"] = {"every_n_train_steps": EVERY}
    recipe["trainer"]["callbacks"] = [
        {"class_path": "tests._ddp_helpers.RecordKeys", "init_args": {"dirpath": str(root / "keys")}},
        {"class_path": "tests._ddp_helpers.DumpWeights", "init_args": {"dirpath": str(root / "weights")}}]
    return recipe


def _on_store(soc: dict, request, store: str) -> dict:
    """``soc`` with its training shards (and an index of them) on a store on loopback: ``http`` or ``s3``."""
    if store == "local":
        return soc
    folder = request.getfixturevalue("tmp_path") / "store"
    folder.mkdir()
    for path in soc["shards"]["train"]:
        shutil.copy(path, folder)
    write_index(sorted(str(p) for p in folder.iterdir()), str(folder / "train.json"), progress=False)
    if store == "http":
        server = request.getfixturevalue("http_store")
        shutil.copytree(folder, server.root, dirs_exist_ok=True)
        return {**soc, "train": server.url + "/train.json"}
    server = request.getfixturevalue("s3_store")  # its environment reaches the fits through os.environ
    server.upload(folder, prefix="soc/")
    return {**soc, "train": server.url + "/soc/train.json"}


def _reference(soc, tmp_path_factory, world: int, workers: int):
    if (world, workers) not in _REFERENCES:
        root = tmp_path_factory.mktemp(f"whole-{world}-{workers}")
        recipe = write_recipe(_recipe(soc, root, world, workers), root / "r.yaml")
        whole = run_cli("fit", "--config", str(recipe), timeout=FIT_TIMEOUT, ddp=True)
        assert whole.returncode == 0, whole.stderr[-4000:]
        _REFERENCES[world, workers] = root
    return _REFERENCES[world, workers]


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(5 * FIT_TIMEOUT)
# 1 rank without workers over HTTP, 2 ranks with 2 workers each on S3 (local shards: tests/test_cli.py's resume)
@pytest.mark.parametrize("world,workers,store", [(1, 0, "http"), (2, 2, "s3")])
def test_runs_killed_at_random_moments_resume_to_the_uninterrupted_weights(soc, tmp_path, tmp_path_factory, request,
                                                                           world, workers, store):
    whole = _reference(soc, tmp_path_factory, world, workers)
    soc = _on_store(soc, request, store)
    recipe = _recipe(soc, tmp_path / "b", world, workers)
    marker = tmp_path / "writing"
    # The kill inside a checkpoint's write on 1 rank only: rank 0 writes it (AtomicCheckpointIO) whatever the world
    kill_while_writing = world == 1
    if kill_while_writing:  # (elsewhere its 5 s pause in the first write would only slow the run down)
        recipe["trainer"]["plugins"] = [{"class_path": "tests._ddp_helpers.SlowCheckpointIO",
                                         "init_args": {"marker": str(marker)}}]
    recipe["trainer"]["callbacks"].append({"class_path": "tests._ddp_helpers.Pace", "init_args": {"seconds": 0.5}})
    path = write_recipe(recipe, tmp_path / "b.yaml")
    command = [sys.executable, "-m", "mmlit.cli", "fit", "--config", str(path), "--ckpt_path", "auto"]
    rng = random.Random(f"{world}-{workers}-{store}")

    keys = tmp_path / "b" / "keys" / "rank0.jsonl"

    def after(steps: int, delay: float):  # steps trained by rank 0 in the start to come
        return after_lines(keys, steps, delay)

    if kill_while_writing:
        # 1. SIGKILL while the first checkpoint (step 2) is half written: no checkpoint is left, the next start is fresh
        killed = run_until(command, marker.exists, timeout=FIT_TIMEOUT, env=cli_env(ddp=True))
        assert killed.returncode == -signal.SIGKILL, killed.stderr[-4000:]
        assert not list((tmp_path / "b" / "checkpoints").glob("*.ckpt")), "a half-written checkpoint under a real name"
    # 2. SIGKILL at a random moment after a random number of steps: the next start resumes from the last checkpoint
    killed = run_until(command, after(rng.randrange(EVERY + 1, TOTAL - 3), rng.uniform(0, 1)), timeout=FIT_TIMEOUT,
                       env=cli_env(ddp=True))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-4000:]
    if world > 1:  # (on 1 rank, "the first rank only" is every rank)
        # 3. a preemption: SIGUSR1 to the first rank only; every rank checkpoints the same step and the run ends
        stopped = run_until(command, after(1, rng.uniform(0, 0.5)), sig=signal.SIGUSR1, timeout=FIT_TIMEOUT,
                            env=cli_env(ddp=True))
        assert stopped.returncode == 0 and "preempted: checkpoint" in stopped.stdout + stopped.stderr, \
            stopped.stderr[-4000:]
        preempted = torch.load(tmp_path / "b" / "checkpoints" / "preempted.ckpt", weights_only=True)
        assert preempted["global_step"] < TOTAL, "the preempted run stopped before its end"
    resumed = run_until(command, None, timeout=FIT_TIMEOUT, env=cli_env(ddp=True))
    assert resumed.returncode == 0, resumed.stderr[-4000:]

    for rank in range(world):
        expected = read_steps(whole / "keys", rank)
        assert [r["step"] for r in expected] == list(range(TOTAL))
        assert read_steps(tmp_path / "b" / "keys", rank) == expected, f"rank {rank} saw other samples after resuming"
        a = torch.load(whole / "weights" / f"rank{rank}.pt", weights_only=True)
        b = torch.load(tmp_path / "b" / "weights" / f"rank{rank}.pt", weights_only=True)
        for key in a:
            assert torch.equal(a[key], b[key]), key
    tasks_per_step = [sorted(r["keys"]) for r in read_steps(whole / "keys", 0)]
    assert all(len(t) == 1 for t in tasks_per_step) and len({t[0] for t in tasks_per_step}) == 2  # sampled mixture


def _av_recipe(soc, root, world: int, workers: int) -> dict:
    """Spoken VQA (its questions' audio augmented: gain, shift, masks), video-text retrieval (random crops of every
    frame, frames drawn per segment) and speech-text alignment (soft-DTW) on the spoken and moving shards."""
    from ..conftest import tiny_audio_encoder, tiny_video_encoder

    recipe = tiny_recipe(soc, root, tasks=["vqa", "contrastive", "speech_text_alignment"], max_epochs=-1,
                         max_steps=TOTAL, logger=False, limit_val_batches=0, num_sanity_val_steps=0, devices=world,
                         strategy="ddp_find_unused_parameters_true" if world > 1 else "auto")
    encoders = recipe["model"]["backbone"]["init_args"]["encoders"]
    encoders.update(audio=tiny_audio_encoder(), video=tiny_video_encoder())
    recipe["model"]["backbone"]["init_args"]["fusion"]["init_args"].update(query="audio", context="image")
    tasks = recipe["model"]["tasks"]
    tasks["vqa"]["init_args"].update(questions_field="json.spoken_questions", spoken=True)
    tasks["vqa"]["init_args"].pop("transform")
    tasks["contrastive"]["init_args"].update(pair=["video", "text"], caption_field="json.motion_caption")
    tasks["contrastive"]["init_args"].pop("transform")  # the default: random crops
    recipe["data"]["num_workers"] = workers
    recipe["checkpoint"] = {"every_n_train_steps": EVERY}
    recipe["trainer"]["callbacks"] = [
        {"class_path": "tests._ddp_helpers.RecordKeys", "init_args": {"dirpath": str(root / "keys")}},
        {"class_path": "tests._ddp_helpers.DumpWeights", "init_args": {"dirpath": str(root / "weights")}},
        {"class_path": "tests._ddp_helpers.Pace", "init_args": {"seconds": 0.3}}]
    return recipe


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.timeout(4 * FIT_TIMEOUT)
# 2 ranks with 2 workers each only: what this test adds to the one above is the audio and video augmentations, and
# each sample draws them from a state of its own (the seed, the epoch, its shard and key), whichever rank or worker
# prepares it; resuming ranks and workers is the test above's (1 rank with 1 worker took a start more for nothing new).
@pytest.mark.parametrize("world,workers", [(2, 2)])
def test_audio_and_video_tasks_killed_and_resumed_end_with_the_same_weights(soc, tmp_path, world, workers):
    """Killed at a random moment after its first checkpoint and started again, a run of audio and video tasks with
    their augmentation on trains on the same samples with the same draws and ends with bit-identical weights."""
    whole = write_recipe(_av_recipe(soc, tmp_path / "a", world, workers), tmp_path / "a.yaml")
    result = run_cli("fit", "--config", str(whole), timeout=FIT_TIMEOUT, ddp=True)
    assert result.returncode == 0, result.stderr[-4000:]
    path = write_recipe(_av_recipe(soc, tmp_path / "b", world, workers), tmp_path / "b.yaml")
    command = [sys.executable, "-m", "mmlit.cli", "fit", "--config", str(path), "--ckpt_path", "auto"]
    rng = random.Random(f"av-{world}-{workers}")
    steps = after_lines(tmp_path / "b" / "keys" / "rank0.jsonl", rng.randrange(EVERY + 1, TOTAL - 1), rng.uniform(0, 0.3))
    killed = run_until(command, steps, timeout=FIT_TIMEOUT, env=cli_env(ddp=True))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-4000:]
    resumed = run_until(command, None, timeout=FIT_TIMEOUT, env=cli_env(ddp=True))
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    for rank in range(world):
        expected = read_steps(tmp_path / "a" / "keys", rank)
        assert [r["step"] for r in expected] == list(range(TOTAL))
        assert read_steps(tmp_path / "b" / "keys", rank) == expected, f"rank {rank} saw other samples after resuming"
        a = torch.load(tmp_path / "a" / "weights" / f"rank{rank}.pt", weights_only=True)
        b = torch.load(tmp_path / "b" / "weights" / f"rank{rank}.pt", weights_only=True)
        assert any(k.startswith("backbone.encoders.audio.") for k in a) and any(".video." in k for k in a)
        for key in a:
            assert torch.equal(a[key], b[key]), key
