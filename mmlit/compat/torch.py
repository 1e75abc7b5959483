"""PyTorch internals (checked against torch 2.14.1)."""

from __future__ import annotations

import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

__all__ = ["allow_retained_compiled_backward", "default_store", "reduce_gradients_manually"]


def default_store() -> dist.Store:
    """The default process group's key-value store (no public accessor; there since torch 1.8)."""
    return dist.distributed_c10d._get_default_store()


def reduce_gradients_manually(wrapper: nn.Module) -> None:
    """Turn DDP's gradient reducer off for the next backward passes (as ``no_sync`` does, through the same flag) while
    it still broadcasts buffers before each forward: mmlit reduces per-task gradients itself."""
    if isinstance(wrapper, DistributedDataParallel):
        wrapper.require_backward_grad_sync = False
        wrapper.require_forward_param_sync = True


def allow_retained_compiled_backward() -> None:
    """A compiled backward donates its saved buffers by default, which forbids ``retain_graph``; mmlit back-propagates
    one graph several times (one pass per task for gradient-based objectives, and the gradient statistics), and
    torch's error names this switch as the way out. It costs the donation's memory saving."""
    import torch._functorch.config

    torch._functorch.config.donated_buffer = False
