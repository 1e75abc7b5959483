"""``mmlit.fsdp.FSDP2Strategy``: fully sharded data parallel training as a recipe's ``trainer.strategy``.

Each of N ranks holds 1/N of every parameter, gradient and optimizer state, and gathers a part's parameters only while
it computes (ZeRO-3: Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter
Models"; PyTorch's FSDP2, ``torch.distributed.fsdp.fully_shard``, through Lightning's ``ModelParallelStrategy``).

Units of sharding: each repeated block of the model (the items of a list of modules of one class: a ViT's or a
language model's layers, a fusion's layers, the blocks ``model.compile`` compiles one by one) is gathered just before
its forward and its gradients reduce-scattered after its backward; the rest (embeddings, norms, projections, the task
heads, the objective's parameters) is the root unit, gathered for the whole step, so that a task may read any
parameter of the backbone (a tied embedding, a generating decoder) without knowing it is sharded. The root is the
``MultiTaskModule`` itself, with ``training_step`` (and the evaluation steps) as its forward. Parameters of no
dimension, which FSDP2 cannot shard (a contrastive task's logit scale), stay whole on every rank with their gradients
averaged, and buffers (BatchNorm's running statistics) follow rank 0's, as under DDP: wherever they are read (an
evaluation, a checkpoint, the end of the fit), not at every step.

Checkpoints are folders (``last.ckpt/``): each rank writes its shards and rank 0 the loops, data position and callbacks
(``meta.pt``), atomically (``mmlit.checkpoints.save_sharded``); a fit resumes from one on any number of ranks, and
``mmlit consolidate`` gathers one into a single file.
"""

from __future__ import annotations

import functools
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy, Strategy
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import (CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard,
                                    register_fsdp_forward_method)
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

from mmlit.checkpoints import SHARDED_META, is_sharded, load_sharded, save_sharded
from mmlit.compat.lightning import one_data_parallel_dimension
from mmlit.compile import repeated_blocks

__all__ = ["FSDP2Strategy", "shards_parameters"]

Dtype = Literal["float32", "bfloat16"]
_STEPS = ("training_step", "validation_step", "test_step", "predict_step")  # the root's forward methods


def shards_parameters(strategy: Strategy) -> bool:
    """Whether ``strategy`` shards parameters over ranks (FSDP, FSDP2): a rank then holds no whole parameter, so
    gradients taken with ``autograd.grad`` on the model's parameters are out of reach."""
    return isinstance(strategy, (ModelParallelStrategy, FSDPStrategy))


def _checkpoint_activations(block: nn.Module) -> None:
    """Recompute ``block``'s activations in the backward pass instead of keeping them (``torch.utils.checkpoint``,
    non-reentrant, the random state restored). Its ``forward`` is replaced on the instance rather than the block
    wrapped (torch's ``checkpoint_wrapper``), so every parameter keeps its name: optimizer groups, layer decay and
    checkpoints read those names."""
    forward = block.forward

    @functools.wraps(forward)
    def recomputed(*args, **kwargs):
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)

    block.forward = recomputed


def _gather_on_use(block: FSDPModule) -> None:
    """Gather ``block``'s parameters also when the model runs the block's modules without calling the block (mmlit's
    cross-attention fusion runs the parts of its decoder layers itself): each of its modules that holds parameters
    gathers the block before it runs, a no-op when the block's own forward has gathered it. A block gathered so
    stays gathered until the end of the backward pass, where FSDP reduce-scatters the gradients of every unit whose
    forward did not run."""

    def gather(module: nn.Module, args) -> None:
        if any(isinstance(p, DTensor) for p in module.parameters()):  # (sharded: the block's forward has not run)
            block.unshard()

    for module in block.modules():
        if module is not block and any(True for _ in module.parameters()):
            module.register_forward_pre_hook(gather)


def _broadcast_buffers(module: nn.Module) -> None:
    """Every rank takes rank 0's buffers (one broadcast per dtype): FSDP shards parameters but leaves buffers to each
    rank, where BatchNorm's running statistics follow that rank's own batches."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for buffer in module.buffers():
        if buffer.dtype != torch.bool:  # (masks: constants)
            by_dtype.setdefault(buffer.dtype, []).append(buffer)
    for buffers in by_dtype.values():
        flat = torch.cat([b.detach().reshape(-1) for b in buffers])
        dist.broadcast(flat, src=0)
        for buffer, value in zip(buffers, flat.split([b.numel() for b in buffers])):
            buffer.detach().copy_(value.view_as(buffer))


def _average_gradients(params: list[nn.Parameter]) -> None:
    """Average the gradients of ``params`` over ranks in one all-reduce, as DDP would (a parameter without a
    gradient counts as zero on its rank, and keeps none where no rank has one). Where this rank has a gradient, some
    rank has one, so the host reads whether any rank had one only for a parameter without a gradient here (a task
    left out of this rank's step): the common step reads nothing from the device."""
    grads = [p.grad.float() if p.grad is not None else torch.zeros((), device=p.device) for p in params]
    have = [torch.full((), float(p.grad is not None), device=p.device) for p in params]  # (fills: no host copy)
    summed = torch.stack(grads + have)
    dist.all_reduce(summed)
    for param, grad, had in zip(params, summed[:len(params)], summed[len(params):]):
        if param.grad is not None or had > 0:
            param.grad = (grad / dist.get_world_size()).to(param.dtype)


class FSDP2Strategy(ModelParallelStrategy):
    """Fully sharded data parallel (FSDP2) over every rank; loss-based objectives only.

    Mixed precision follows ``trainer.precision`` as in any mmlit recipe: under ``bf16-mixed`` autocast computes in
    bfloat16 while the shards, the optimizer state and the reduction of gradients stay float32. ``16-mixed`` is
    refused: its loss scaler would decide to skip a step from each rank's shard of the gradients alone.

    Args:
        param_dtype: the dtype the blocks' and the root's parameters are gathered in (None: their own, float32).
            ``bfloat16`` halves the memory and traffic of the gathered parameters; it needs ``trainer.precision:
            bf16-mixed``, whose autocast casts the activations that meet them (CUDA's autocast casts every op's
            inputs; the CPU's leaves layer norms out, so there a float32 activation, e.g. from a float32 buffer, must
            not meet a bfloat16 norm).
        reduce_dtype: the dtype gradients are reduce-scattered in (None: ``param_dtype``'s, or the parameters' own
            without it); ``bfloat16`` halves the traffic and rounds the sum.
        activation_checkpointing: recompute each block's activations in the backward pass instead of keeping them:
            memory for about one more forward pass.
        reshard_after_forward: free each block's gathered parameters after its forward and gather them again for its
            backward (true: ZeRO-3, least memory), or keep them until then (false: one gather fewer per block).
        cpu_offload: keep the sharded parameters, gradients and optimizer state in CPU memory, the optimizer
            stepping there (FSDP2's ``CPUOffloadPolicy``); for an accelerator whose memory is the limit.
        process_group_backend: ``nccl``, ``gloo`` (default: the device's).
        timeout: of the process group's collectives.
    """

    def __init__(self, param_dtype: Dtype | None = None, reduce_dtype: Dtype | None = None,
                 activation_checkpointing: bool = False, reshard_after_forward: bool = True, cpu_offload: bool = False,
                 process_group_backend: str | None = None, timeout: timedelta | None = default_pg_timeout):
        super().__init__(save_distributed_checkpoint=True, process_group_backend=process_group_backend,
                         timeout=timeout)
        self.param_dtype, self.reduce_dtype = param_dtype, reduce_dtype
        self.activation_checkpointing, self.reshard_after_forward = activation_checkpointing, reshard_after_forward
        self.cpu_offload = cpu_offload

    def precision_policy(self) -> MixedPrecisionPolicy:
        """The dtypes of gathering and reducing, from the arguments and ``trainer.precision``."""
        precision = self.precision_plugin.precision
        if precision == "16-mixed":
            raise ValueError("trainer.precision: 16-mixed scales the loss and skips a step when a gradient is not "
                             "finite, which under FSDP each rank would decide from its own shard; use bf16-mixed")
        if self.param_dtype == "bfloat16" and precision != "bf16-mixed":
            raise ValueError(f"trainer.strategy.init_args.param_dtype: bfloat16 gathers the parameters in bfloat16; "
                             f"set trainer.precision: bf16-mixed too (its autocast casts the activations that meet "
                             f"them), not {precision}, or leave param_dtype out")
        return MixedPrecisionPolicy(param_dtype=self.param_dtype and getattr(torch, self.param_dtype),
                                    reduce_dtype=self.reduce_dtype and getattr(torch, self.reduce_dtype))

    def setup_environment(self) -> None:
        # One data-parallel dimension over every rank (Lightning's default splits ranks into a data-parallel and a
        # tensor-parallel dimension, nodes x devices); these are the sizes its own arguments set.
        one_data_parallel_dimension(self, self.num_nodes * self.num_processes)
        super().setup_environment()

    def shard(self, module: nn.Module) -> None:
        """Shard ``module`` (a ``MultiTaskModule``, from its ``configure_model``): each repeated block, then the rest
        as the root. Lightning calls ``configure_model`` again in each fit, validate or test: once is enough."""
        if isinstance(module, FSDPModule):
            return
        options = {"mesh": self.device_mesh["data_parallel"], "mp_policy": self.precision_policy(),
                   "offload_policy": CPUOffloadPolicy(pin_memory=self.root_device.type == "cuda")
                   if self.cpu_offload else OffloadPolicy()}
        blocks = repeated_blocks(module)
        kinds = sorted({type(block).__name__ for block in blocks})  # (before fully_shard renames their classes)
        for block in blocks:
            if self.activation_checkpointing:
                _checkpoint_activations(block)
            fully_shard(block, reshard_after_forward=self.reshard_after_forward,
                        ignored_params={p for p in block.parameters() if p.ndim == 0}, **options)
            _gather_on_use(block)
        fully_shard(module, ignored_params={p for p in module.parameters() if p.ndim == 0}, **options)
        for step in _STEPS:  # Lightning calls the steps, never forward: these gather the root's parameters
            register_fsdp_forward_method(module, step)
        rank_zero_info(f"FSDP2: {len(blocks)} blocks ({', '.join(kinds) or 'none'}) and the root sharded over "
                       f"{self.world_size} ranks")

    def post_backward(self, closure_loss: torch.Tensor) -> None:
        """After each backward pass, average the gradients of the parameters FSDP leaves whole (of no dimension: a
        contrastive task's logit scale), which FSDP does not reduce."""
        whole = [p for p in self.lightning_module.parameters() if p.ndim == 0 and not isinstance(p, DTensor)]
        if whole and self.world_size > 1:
            _average_gradients(whole)

    # Rank 0's buffers on every rank where they are read: evaluation, a checkpoint (which keeps one copy of what is not
    # sharded) and the end of the fit. DDP broadcasts them before every forward; between these points only rank 0's
    # matter, since a broadcast overwrites the others' and leaves rank 0's as they are, and a training step does not
    # read them (BatchNorm normalises a batch by its own statistics; the objectives' state is the same on every rank,
    # from losses averaged over ranks). So no step pays a broadcast.
    def on_validation_start(self) -> None:
        super().on_validation_start()
        self._agree_on_buffers()

    def on_train_end(self) -> None:
        super().on_train_end()
        self._agree_on_buffers()

    def lightning_module_state_dict(self) -> dict[str, Any]:
        self._agree_on_buffers()
        return super().lightning_module_state_dict()

    def _agree_on_buffers(self) -> None:
        if self.world_size > 1:
            _broadcast_buffers(self.lightning_module)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        """A sharded folder at ``filepath``, written atomically (``mmlit.checkpoints.save_sharded``)."""
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} writes sharded checkpoints itself: no storage_options")
        save_sharded(checkpoint, self.broadcast(str(filepath)), self.global_rank, self.barrier)

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        """Load the weights and optimizer states of a sharded folder into this run's shards (any number of ranks)
        without running code from it, and return its other entries; a one-file checkpoint as Lightning does."""
        path = Path(self.broadcast(str(checkpoint_path)))
        if not is_sharded(path):
            return super().load_checkpoint(path, weights_only=weights_only)
        strict = self.lightning_module.strict_loading
        weights = {"state_dict": get_model_state_dict(self.model)}
        load_sharded(weights, path, strict=strict)
        set_model_state_dict(self.model, weights["state_dict"], options=StateDictOptions(strict=strict))
        for i, optimizer in enumerate(self.optimizers):
            state = {f"optimizer_{i}": get_optimizer_state_dict(self.model, optimizer)}
            load_sharded(state, path, strict=strict)
            set_optimizer_state_dict(self.model, optimizer, state[f"optimizer_{i}"])
        return torch.load(path / SHARDED_META, map_location="cpu", weights_only=True)
