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
