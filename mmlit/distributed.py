"""Errors are collective: an exception on one rank stops every rank within seconds, with its message and its rank.

Without this, a rank that fails alone leaves the others waiting in their next collective (a broadcast at setup, a
gradient all-reduce) until the process group's timeout, 30 minutes by default, unless the launcher happens to kill
them (Lightning's launcher does; torchrun does not always, ``srun`` without ``--kill-on-bad-exit`` does not, and
NCCL may never return). Every rank watches a key in the process group's own store (the one every launcher sets up:
torchrun's rendezvous store, Lightning's TCP store) from a daemon thread; the failing rank writes its error there
(``report_failure``, from Lightning's exception hooks), and every other rank prints it and exits at once; a rank whose
own error came second (gloo: "connection closed by peer") prints the first one too. The watch costs one store lookup
per second per rank.
"""

from __future__ import annotations

import os
import sys
import threading
import traceback

import torch.distributed as dist

from mmlit.compat.torch import default_store

__all__ = ["reduce_over_ranks", "report_failure", "watch_peers"]

_KEY = "mmlit/failed"
_POLL_S = 1.0
_state: dict = {"thread": None, "store": None, "rank": 0}


def watch_peers() -> None:
    """Start watching for another rank's failure (once per process; nothing without a process group of 2+)."""
    if _state["thread"] is not None or not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return
    _state.update(store=default_store(), rank=dist.get_rank())
    _state["thread"] = threading.Thread(target=_watch, name="mmlit-peer-watch", daemon=True)
    _state["thread"].start()


def _watch() -> None:
    store, rank = _state["store"], _state["rank"]
    stop = threading.Event()
    while not stop.wait(_POLL_S):
        try:
            if not store.check([_KEY]):
                continue
            failed, message = store.get(_KEY).decode(errors="replace").split("\n", 1)
        except Exception:  # the store is gone: the job is ending anyway
            return
        if int(failed) == rank or _state.get("failing"):
            return  # this rank is raising an error of its own (the same, or its own failure)
        print(f"mmlit: rank {failed} failed, so rank {rank} stops too. Rank {failed}'s error:\n{message}",
              file=sys.stderr, flush=True)
        os._exit(1)  # a collective may hold the main thread for the process group's timeout: no way to raise there


def report_failure(exception: BaseException) -> None:
    """Tell every other rank that this one failed (the first failure is kept)."""
    store = _state["store"]
    if store is None:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return
        store, _state["rank"] = default_store(), dist.get_rank()
    _state["failing"] = True  # this rank's own error goes on: its watch must not cut it short
    summary = "".join(traceback.format_exception_only(type(exception), exception)).strip()
    try:  # set only if no rank has failed before (atomic: two ranks may fail at once); the first failure is returned
        first = store.compare_set(_KEY, "", f"{_state['rank']}\n{summary}")
        failed, message = first.decode(errors="replace").split("\n", 1)
    except Exception:  # the store is unreachable: the launcher is all that is left
        return
    if int(failed) != _state["rank"]:  # this error may only follow from it (a peer closed its connection)
        print(f"mmlit: rank {failed} failed first; rank {_state['rank']}'s error below may follow from it. Rank "
              f"{failed}'s error:\n{message}", file=sys.stderr, flush=True)


def reduce_over_ranks(tensor, op: str = "sum"):
    """``tensor`` summed (``sum``), averaged (``mean``) or maximised (``max``) over the ranks of the default process
    group, in place, and returned; as it is without one. Every rank must call it at the same point, with a tensor on
    its own device (NCCL reduces device tensors only). mmlit's one rank reduction: a single all-reduce, without the
    barrier that Lightning's ``strategy.reduce`` adds."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        if op == "mean":
            tensor /= dist.get_world_size()
    return tensor


# (RankFlags' imports: kept here, below the rest of the module, which it leaves as it is)
import weakref  # noqa: E402

import torch  # noqa: E402


class RankFlags:
    """Named flags that any rank raises during training steps and every rank learns of at the same step, without the
    host waiting for the device. At each exchange (one per training batch) the flags raised since the previous one go
    out in one small tensor, max-reduced over ranks by an all-reduce that runs while the next batch computes
    (``async_op``) and is then copied to host memory; the next exchange reads that copy, waiting only for the work
    queued before it (a batch ago: done by then, unless the device lags by more than a batch). A flag is thus known one
    exchange after the one it went out with, on every rank alike. On a CUDA device the reduction and the copy (to
    pinned memory, behind an event) run on a side stream; on the CPU, gloo's reduction is waited for at the next
    exchange; another accelerator's copy waits for its device. Every rank registers the same names in the same order
    (in its callbacks' ``setup``) and exchanges at the same batches; ``rank_flags`` gives a trainer's callbacks one
    instance to share."""

    def __init__(self, device: torch.device):
        self.device, self.names = torch.device(device), []
        self._local: torch.Tensor | None = None  # (F,) this rank's flags since the last exchange, on the device
        self._sent = None  # (flags, work) of the exchange in flight
        self._host = self._values = None  # its reduced flags in host memory, and their numpy view (read without torch)
        self._stream = self._event = None  # CUDA: the side stream of the reduction and copy, and their end
        self._key, self._raised = None, frozenset()

    def register(self, name: str) -> None:
        """Add flag ``name`` (once), and start afresh: nothing raised, nothing in flight (a fit's setup)."""
        if name not in self.names:
            self.names.append(name)
        self._local = self._sent = self._host = self._key = None
        self._raised = frozenset()

    def raise_flag(self, name: str, value: torch.Tensor | bool) -> None:
        """Raise ``name`` on this rank where ``value`` holds: a device tensor (nonzero raises it; nothing reads it
        now) or a bool."""
        index = self.names.index(name)
        if self._local is None:
            self._local = torch.zeros(len(self.names), device=self.device)
        if isinstance(value, torch.Tensor):
            self._local[index] = torch.maximum(self._local[index], value.to(self._local.dtype))
        elif value:
            self._local[index] = 1.0  # (a fill on the device: no copy from the host)

    def exchange(self, key) -> frozenset[str]:
        """The flags raised on some rank before the previous exchange (none at the first); then this rank's flags
        raised since go out. The first call with a new ``key`` (the batch) exchanges; later ones with the same key
        return its answer, so that several callbacks may ask at one batch (a flag raised after goes out with the
        next)."""
        if key != self._key:
            self._key, self._raised = key, self._receive()
            flags = self._local if self._local is not None else torch.zeros(len(self.names), device=self.device)
            self._local = None
            self._send(flags)
        return self._raised

    def finish(self) -> frozenset[str]:
        """The flags of the exchange in flight, without starting another (at the end of a fit); later calls, until
        the next exchange, return the same."""
        if self._sent is not None:
            self._key, self._raised = None, self._receive()
        return self._raised

    def _send(self, flags: torch.Tensor) -> None:
        several = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if self._host is None:
            self._host = torch.zeros(len(self.names), pin_memory=flags.is_cuda)
            self._values = self._host.numpy()
        if not flags.is_cuda:
            self._sent = (flags, dist.all_reduce(flags, op=dist.ReduceOp.MAX, async_op=True) if several else None)
            return
        # On a side stream that waits for the flags: the reduction (NCCL's wait makes that stream, not the host, wait
        # for it) and the copy to pinned memory, whose end the event marks; the training stream never waits for them.
        if self._stream is None:
            self._stream, self._event = torch.cuda.Stream(flags.device), torch.cuda.Event()
        self._stream.wait_stream(torch.cuda.current_stream(flags.device))
        with torch.cuda.stream(self._stream):
            if several:
                dist.all_reduce(flags, op=dist.ReduceOp.MAX, async_op=True).wait()
            self._host.copy_(flags, non_blocking=True)
            self._event.record(self._stream)
        self._sent = (flags, None)  # (flags stays referenced until the event has passed: its memory is not reused)

    def _receive(self) -> frozenset[str]:
        if self._sent is None:
            return frozenset()
        (flags, work), self._sent = self._sent, None
        if flags.is_cuda:
            self._event.synchronize()
        else:
            if work is not None:
                work.wait()
            self._host.copy_(flags)
        return frozenset(name for name, value in zip(self.names, self._values) if value > 0)


_RANK_FLAGS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def rank_flags(trainer) -> RankFlags:
    """The ``RankFlags`` of ``trainer``, shared by its callbacks (made at the first call, on its root device)."""
    if trainer not in _RANK_FLAGS:
        _RANK_FLAGS[trainer] = RankFlags(trainer.strategy.root_device)
    return _RANK_FLAGS[trainer]
