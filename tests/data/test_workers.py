"""DataLoader workers start from a fork server, not by forking the training process: what a thread of the training
process holds does not reach them, they get exactly the batches forked workers got, seeded the same way every run,
they end when the training process is killed, and a task that cannot be sent to them is a clear error."""

from __future__ import annotations

import itertools
import json
import os
import pickle
import subprocess
import sys
import threading
import time

import numpy as np
import psutil
import pytest
import torch

from mmlit.data import MultiTaskDataModule, SampleError, TaskData, TaskStream, scan_shards
from mmlit.data.transforms import ImageTransform, training_sample
from mmlit.data.workers import task_loader
from mmlit.tasks.base import Shards
from mmlit.tasks.image_classification import ImageClassificationData
from mmlit.text import load_tokenizer

# Held by a thread of the test process while workers start; a worker that was forked from this process inherits it
# held, with no thread to release it (the deadlock of issue 16, made deterministic).
_LOCK = threading.Lock()


class _Probe(ImageClassificationData):
    """Image classification's data side, whose examples also say where they were made: the worker's parent process, a
    numpy draw, and whether the lock was free."""

    def __init__(self, shards: Shards, batch_size: int = 4):
        super().__init__(shards, batch_size, "json.labels.n_circles", [str(i) for i in range(7)], ImageTransform())

    def prepare(self, sample, tokenizer):
        free = _LOCK.acquire(timeout=2)
        if not free:
            raise RuntimeError("lock held: this worker was forked while another thread held it")
        _LOCK.release()
        for example in super().prepare(sample, tokenizer):
            yield {**example, "parent": os.getppid(), "draw": int(np.random.randint(1 << 30))}


def _stream(soc, task=None, **kw) -> TaskStream:
    task = task or _Probe(Shards(train=soc["train"]), batch_size=4)
    task.name = "probe"
    index = scan_shards(soc["shards"]["train"], "train")
    return TaskStream(task, index, load_tokenizer(soc["tokenizer"]), batch_size=4, train=True, shuffle_buffer=20, **kw)


def _batches(loader, n: int) -> list[dict]:
    torch.manual_seed(0)  # the loader draws its workers' base seed from here (seed_everything sets it in a run)
    iterator = iter(loader)
    return [next(iterator)[1] for _ in range(n)]


def test_the_data_module_starts_workers_from_a_fork_server(soc, tmp_path):
    task = _Probe(Shards(train=soc["train"]), batch_size=4)
    data = MultiTaskDataModule(soc["tokenizer"], tasks={"probe": task}, num_workers=2, steps_per_epoch=4)
    data.setup("fit")
    parents = {int(p) for step in itertools.islice(data.train_dataloader(), 4) for p in step["probe"]["parent"]}
    assert os.getpid() not in parents and len(parents) == 1  # one server forked both workers


@pytest.mark.parametrize("method", ["forkserver", "spawn", "fork"])
def test_a_lock_held_by_a_training_thread_does_not_reach_the_workers(soc, method):
    held, release = threading.Event(), threading.Event()
    holder = threading.Thread(target=lambda: (_LOCK.acquire(), held.set(), release.wait(), _LOCK.release()), daemon=True)
    holder.start()
    held.wait()
    try:
        loader = task_loader(_stream(soc), workers=2, start_method=method)
        if method == "fork":  # the failure the default avoids, here with a timeout instead of a hang
            with pytest.raises(SampleError, match="lock held"):
                _batches(loader, 2)
        else:
            assert len(_batches(loader, 2)) == 2
    finally:
        release.set()
        holder.join()


def test_workers_get_the_batches_forked_workers_got(soc):
    """The same samples in the same batches, with the same pixels, from forked and fork-server workers, also for a
    stream resumed at batch 3; a worker's numpy draws repeat from run to run and differ between workers."""
    for start in (0, 3):
        forked = _batches(task_loader(_stream(soc, start_batch=start), workers=2, start_method="fork"), 6)
        served = _batches(task_loader(_stream(soc, start_batch=start), workers=2, start_method="forkserver"), 6)
        again = _batches(task_loader(_stream(soc, start_batch=start), workers=2, start_method="forkserver"), 6)
        for a, b, c in zip(forked, served, again):
            assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
            assert torch.equal(a["draw"], b["draw"]) and torch.equal(b["draw"], c["draw"])
        assert not torch.equal(served[0]["draw"], served[1]["draw"])  # batches 0 and 1 come from workers 0 and 1


def test_a_stream_goes_to_its_workers_as_the_tasks_data_side(soc):
    """A stream made from a task's head holds its data side only: what reaches the workers has no parameters."""
    from mmlit.tasks import ImageClassification

    head = ImageClassification(Shards(train=soc["train"]), 4, label_field="json.labels.n_circles", num_classes=7)
    head.head = torch.nn.Linear(8, 7)
    stream = _stream(soc, task=head)
    copy = pickle.loads(pickle.dumps(stream))
    assert stream.task is head.data and isinstance(copy.task, TaskData) and not isinstance(copy.task, torch.nn.Module)
    original, sent = _batches(task_loader(stream, workers=0), 3), _batches(task_loader(copy, workers=0), 3)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(original, sent))


class _Flipped(_Probe):
    """Flips its images for training samples only, as an augmentation would, through an object of its own."""

    def __init__(self, shards: Shards, batch_size: int = 4):
        super().__init__(shards, batch_size)
        self.flip = _Flip()

    def prepare(self, sample, tokenizer):
        for example in super().prepare(sample, tokenizer):
            yield {**example, "image": self.flip(example["image"]), "training": training_sample()}


class _Flip:
    def __call__(self, image):
        return image.flip(-1) if training_sample() else image


def test_the_data_sides_objects_reach_the_workers_and_the_stream_says_what_is_training(soc):
    task = _Flipped(Shards(train=soc["train"]), batch_size=4)
    sent = pickle.loads(pickle.dumps(_stream(soc, task=task))).task
    assert isinstance(sent.flip, _Flip)
    stream = _stream(soc, task=task)
    stream.train = False  # an evaluation stream: the workers must not augment
    batch = _batches(task_loader(stream, workers=2), 1)[0]
    assert not batch["training"].any()


def test_a_task_that_cannot_be_pickled_is_an_error_naming_it_and_the_key(soc):
    task = _Probe(Shards(train=soc["train"]), batch_size=4)
    task.normalise = lambda x: x  # a lambda cannot be pickled
    with pytest.raises(TypeError, match=r"data.multiprocessing_context: 'probe' cannot be sent to its DataLoader "
                                        r"workers, which start by forkserver.*lambda"):
        task_loader(_stream(soc, task=task), workers=2)
    assert task_loader(_stream(soc, task=task), workers=2, start_method="fork") is not None


def test_unknown_start_method_names_the_key(soc):
    with pytest.raises(ValueError, match="data.multiprocessing_context is one of forkserver, spawn, fork, got 'threads'"):
        MultiTaskDataModule(soc["tokenizer"], multiprocessing_context="threads")


_TRAINER = """
import sys, time
from mmlit.data import TaskStream, scan_shards
from mmlit.data.workers import task_loader
from mmlit.tasks.base import Shards
from mmlit.tasks.image_classification import ImageClassification

task = ImageClassification(Shards(), batch_size=2, label_field="json.labels.n_circles", num_classes=7)
stream = TaskStream(task, scan_shards(sys.argv[1:], "k"), None, batch_size=2,
                    train=True, shuffle_buffer=1)
batches = iter(task_loader(stream, workers=2, persistent=True))
next(batches)
print("ready", flush=True)
time.sleep(600)
"""


def _running(processes: list[psutil.Process], within: float) -> list[psutil.Process]:
    """Those still running after ``within`` seconds (a zombie that no one has reaped yet has ended)."""
    deadline = time.monotonic() + within
    while True:
        running = []
        for p in processes:
            try:
                if p.status() != psutil.STATUS_ZOMBIE:
                    running.append(p)
            except psutil.NoSuchProcess:
                pass
        if not running or time.monotonic() > deadline:
            return running
        time.sleep(0.2)


def test_workers_end_when_the_training_process_is_killed(soc):
    """A fork server's workers are its children, not the training process's; killed with SIGKILL, the training
    process leaves the server and its workers behind unless they watch it (torch's workers watch their parent)."""
    trainer = subprocess.Popen([sys.executable, "-c", _TRAINER, *soc["shards"]["train"]], stdout=subprocess.PIPE,
                               text=True, start_new_session=True)
    left: list[psutil.Process] = []
    try:
        assert trainer.stdout.readline().strip() == "ready"
        left = psutil.Process(trainer.pid).children(recursive=True)  # the server, its workers, the resource tracker
        assert len(left) >= 3
        trainer.kill()
        trainer.wait()
        alive = _running(left, within=20)
        assert not alive, f"still running 20 s after the training process was killed: {[p.pid for p in alive]}"
    finally:
        for process in [psutil.Process(trainer.pid), *left] if trainer.poll() is None else left:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass


def test_what_a_worker_imports_leaves_lightning_out_and_the_server_preloads_what_a_script_imports(tmp_path):
    """A worker unpickles its stream from ``mmlit.data.stream``: importing that (and the ``mmlit.data`` package) does
    not import Lightning, which only the training process uses. The fork server imports what the main script imports
    at its top level, not what it imports inside functions, only for type checkers or only when run as a script."""
    script = tmp_path / "main.py"
    script.write_text(
        "import json, sys\n"
        "from typing import TYPE_CHECKING\n"
        "import mmlit.data.stream\n"
        "from mmlit.data import TaskStream\n"
        "from mmlit.data.workers import _main_imports\n"
        "if TYPE_CHECKING:\n"
        "    import transformers\n"
        "def later():\n"
        "    import timm\n"
        "try:\n"
        "    import tomllib\n"
        "except ImportError:\n"
        "    pass\n"
        "if __name__ == '__main__':\n"
        "    import wave\n"
        "print(json.dumps({'lightning': 'lightning' in sys.modules, 'imports': _main_imports()}))\n")
    expected = ["json", "sys", "typing", "mmlit.data.stream", "mmlit.data", "mmlit.data.workers", "tomllib"]
    # run as a script, and as ``python -m main``: its imports, never the module itself (runpy would warn in a worker)
    for command in ([str(script)], ["-m", "main"]):
        out = subprocess.run([sys.executable, *command], capture_output=True, text=True, check=True, timeout=120,
                             cwd=tmp_path, env=dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [
                                 str(tmp_path), os.environ.get("PYTHONPATH")]))))
        result = json.loads(out.stdout.strip().splitlines()[-1])
        assert result["lightning"] is False
        # (names that are not modules, or were not imported here, are left out: the server would stop at a failing one)
        assert result["imports"] == expected, command
