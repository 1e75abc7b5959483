"""How a task's DataLoader starts its workers: never by forking the training process.

By the time a loader starts its workers the training process has threads: gloo's or NCCL's, the queue feeders of
the task loaders started before it, W&B's. ``fork`` copies the locks those threads hold at that instant into the
child, with no thread left there to release them, and the child sleeps forever on the first one it takes. mmlit
starts one set of workers per task and split, so in a multi-task DDP run every fork after the first is such a
fork: a worker asleep on a futex before its loop started, its rank waiting for that worker's batch, and the other
ranks waiting for that rank in DDP's collectives.

``forkserver`` (the default) forks the workers from a server process instead. The server is started with exec by
each rank at setup, so it has a single thread, and it imports what a worker uses, the tasks' modules and what the main
module imports (``_main_imports``) before it forks anything, so a worker starts as fast as a forked one. ``spawn``
starts a fresh interpreter per worker.
The stream is pickled to each worker with the tasks' data sides (``TaskData``: plain objects, no head or parameters).

A worker ends with the training process, however that ends (``_end_with``): torch's workers watch their parent, and a
fork server's worker's parent is the server, which a SIGKILLed training process leaves running (with its workers
waiting for work: measured, they were all still there 15 s after the kill; forked workers had gone).

Measured on the 2-core development machine. ``python tools/bench_loader.py --startup`` (5 task loaders of 2 workers
started one after the other, seconds from ``iter()`` to each loader's first batch): fork 0.07-0.11 s a loader;
forkserver 5.2-6.9 s for the first (the server starts and imports its modules) and 0.08-0.15 s for the others; spawn
3.2-4.7 s for every loader. The server's imports are torch (1.4 s of CPU), the tasks' modules (torchmetrics) and what
the main module imports; ``mmlit.data`` imports its modules on first use, so a worker's own modules do not bring
Lightning (docs/benchmarks.md). A whole 2-rank DDP fit (3 tasks x 2 workers, 2 epochs with
validation): 11.1-11.5 s with fork, 14.1-15.0 s with forkserver (three runs each): about 3 s once per run, the
server's imports, which overlap the rest of setup on a machine with cores to spare.
"""

from __future__ import annotations

import ast
import functools
import multiprocessing
import multiprocessing.forkserver
import os
import pickle
import select
import sys
import threading
import time
from typing import Iterable, Literal

from torch.utils.data import DataLoader, IterableDataset

__all__ = ["StartMethod", "start_fork_server", "task_loader"]

StartMethod = Literal["forkserver", "spawn", "fork"]

# What a worker needs to unpickle its stream and run it: the fork server imports these before it forks a worker, with
# the tasks' modules and what the main module imports (``_main_imports``).
_PRELOAD = ["torch", "numpy", "PIL.Image", "tokenizers", "mmlit.data.stream"]


def _main_imports() -> list[str]:
    """The modules the main module imports at its top level, whether it runs as a script or as ``python -m NAME``.

    Every worker started by forkserver or spawn runs the main module again, as __mp_main__ (multiprocessing's
    spawn.prepare): for `mmlit fit` that is the console script, which imports mmlit.cli with Lightning and timm, 1-2 s
    per worker when the server has not imported them (measured: a 3-task, 2-worker fit took 17.7 s instead of 7.1 s).
    With them imported by the server, the worker only runs the main module's own lines; a script that imports less
    (``tools/bench_loader.py``) starts its server sooner. The main module itself is not preloaded: CPython 3.11's
    forkserver asks get_preparation_data for 'main_path', which that names 'init_main_from_path', and never gets it;
    and a module run as ``-m NAME`` that the server had imported as NAME would make runpy warn in every worker
    ("found in sys.modules ... prior to execution"), where importing what NAME imports saves the same time.
    """
    main = sys.modules.get("__main__")
    name = getattr(getattr(main, "__spec__", None), "name", None)
    if name is not None and (name == "__main__" or name.endswith(".__main__")):
        return []  # (spawn.prepare does not run a package's __main__ again)
    path = getattr(main, "__file__", None)
    try:
        with open(path, "rb") as file:
            tree = ast.parse(file.read())
    except (TypeError, OSError, SyntaxError, ValueError):  # no file (an interactive session), or not Python source
        return []
    # (only what imported cleanly here: the server stops at an import that raises anything but ImportError)
    return [name for name in dict.fromkeys(_imports(tree.body)) if name in sys.modules]


def _imports(body: list[ast.stmt]) -> Iterable[str]:
    """Absolute imports run when these statements run as ``__mp_main__``: not those in functions, classes, ``if
    TYPE_CHECKING`` or ``if __name__ == "__main__"``. A
    ``from X import Y`` names X and X.Y (Y may be a module; the server passes over names that are not)."""
    for node in body:
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names if alias.name != "*")
        elif isinstance(node, ast.If) and not any(word in ast.unparse(node.test) for word in ("TYPE_CHECKING",
                                                                                                "__main__")):
            yield from _imports(node.body + node.orelse)
        elif isinstance(node, ast.Try):
            yield from _imports(node.body + node.orelse + node.finalbody)


def _context(method: StartMethod, modules: Iterable[str]) -> multiprocessing.context.BaseContext:
    if method == "forkserver" and "forkserver" not in multiprocessing.get_all_start_methods():
        method = "spawn"  # Windows
    context = multiprocessing.get_context(method)
    if method == "forkserver":
        # Takes effect when the server starts: at the first loader of this process that starts workers.
        extra = set(modules) | set(_main_imports())
        context.set_forkserver_preload([*_PRELOAD, *sorted(extra - set(_PRELOAD))])
    return context


def start_fork_server(method: StartMethod, preload: Iterable[str] = ()) -> None:
    """Start the fork server now (it imports its modules while the trainer builds the rest) rather than at the
    first loader; a no-op for the other start methods and when it runs already."""
    if _context(method, preload).get_start_method() == "forkserver":
        multiprocessing.forkserver.ensure_running()


def _end_with(trainer: int, worker_id: int) -> None:
    """``worker_init_fn``: end this worker as soon as process ``trainer`` has ended (a thread that waits on a pidfd,
    or polls where there is none)."""

    def watch() -> None:
        try:
            ended = select.poll()  # not select(): it fails on descriptors past 1023
            ended.register(os.pidfd_open(trainer), select.POLLIN)
            ended.poll()
        except ProcessLookupError:  # ended before this worker started
            pass
        except Exception:  # no pidfd_open (not Linux >= 5.3), or it failed: poll instead
            while _alive(trainer):
                time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="mmlit-end-with-trainer", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _check_picklable(dataset: IterableDataset, key: str, method: StartMethod) -> None:
    """Send the stream through pickle as a worker gets it, both ways: here, the error can name the task."""
    try:
        pickle.loads(pickle.dumps(dataset))
    except Exception as err:  # pickle raises TypeError, AttributeError, PicklingError or ImportError, by what it met
        name = ", ".join(getattr(dataset, "names", [type(dataset).__name__]))
        raise TypeError(f"{key}: '{name}' cannot be sent to its DataLoader workers, which start by {method}: {err}. "
                        f"Keep the task's attributes picklable (no lambdas, open files, locks or local classes), "
                        f"or set {key}: fork (the workers may then deadlock; see mmlit/data/workers.py)") from err


def task_loader(dataset: IterableDataset, *, workers: int, start_method: StartMethod = "forkserver",
                persistent: bool = False, preload: Iterable[str] = (),
                key: str = "data.multiprocessing_context") -> DataLoader:
    """A DataLoader of one task's already batched stream, its ``workers`` started by ``start_method``.

    ``preload``: modules the fork server imports before it forks a worker (those of every task in the run: the
    server starts with the first loader and its imports are set then). A worker ends when this process ends. Each
    worker's torch, ``random`` and numpy generators are seeded by the DataLoader from its base seed and the worker
    id, whatever the start method, so they draw what forked workers drew.
    """
    if workers == 0:
        return DataLoader(dataset, batch_size=None, num_workers=0)
    if start_method != "fork":
        _check_picklable(dataset, key, start_method)
    context = _context(start_method, preload)
    # Only a fork server's workers need to watch the trainer: forked and spawned ones are its children, and torch's
    # own watchdog sees their parent go.
    watch = functools.partial(_end_with, os.getpid()) if context.get_start_method() == "forkserver" else None
    return DataLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=persistent, prefetch_factor=4,
                      multiprocessing_context=context, worker_init_fn=watch)
