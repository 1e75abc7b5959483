"""The optimizer's parameter groups: no weight decay on biases, norms and other 1-D parameters, and layer-wise
learning-rate decay per encoder, both from timm (``timm.optim.param_groups_layer_decay``, BEiT's recipe).

Every parameter of one dimension or less (biases, norm weights, CLIP's ``logit_scale``, the uncertainty method's
log-variances), and those an encoder's ``no_weight_decay()`` names (a timm ViT's ``pos_embed`` and ``cls_token``, as
timm's own optimizer factory leaves them out), is in a group with ``weight_decay: 0``; the others take the
optimizer's own ``weight_decay``. With
``layer_decay < 1`` each encoder's layers train at ``layer_decay ** (top - layer)`` times the rate (BEiT, Bao et al.
2022; ELECTRA, Clark et al. 2020); an encoder's layers come from its ``group_matcher`` (a timm model's own, mmlit's
text encoders'), and fusion, heads and objective at the full rate. Schedulers that scale each group's initial rate
keep the ratios; ``OneCycleLR``, which sets every group from one ``max_lr``, is scaled here. Where the trainer allows
it, torch's optimizers step with their fused kernel (``fused_optimizer``).
"""

from __future__ import annotations

import fnmatch
import inspect
from typing import Iterable

import torch
from timm.optim import param_groups_layer_decay
from torch import nn
from torch.distributed.tensor import DTensor

__all__ = ["build_optimizer", "fused_optimizer", "keep_lr_scales", "parameter_groups", "skips_on_device"]


def parameter_groups(module: nn.Module, encoders: Iterable[nn.Module], layer_decay: float = 1.0) -> list[dict]:
    """Groups of ``module``'s trainable parameters, each with ``lr_scale`` (layer decay, per encoder) and, where no
    weight decay applies, ``weight_decay: 0``."""
    encoders = list(encoders)
    no_decay = {id(p) for encoder in encoders for p in _no_weight_decay(encoder)}
    groups, placed = [], set()
    for encoder in encoders if layer_decay != 1.0 else ():
        named = getattr(encoder, "no_weight_decay", lambda: ())()
        for group in param_groups_layer_decay(encoder, weight_decay=1.0, layer_decay=layer_decay,
                                              no_weight_decay_list=named):
            params = [p for p in group["params"] if id(p) not in placed]
            placed.update(map(id, params))
            groups.append(_group(params, group["lr_scale"], decay=group["weight_decay"] > 0))
    rest = [p for p in module.parameters() if p.requires_grad and id(p) not in placed]
    groups.append(_group([p for p in rest if p.ndim > 1 and id(p) not in no_decay], 1.0, decay=True))
    groups.append(_group([p for p in rest if p.ndim <= 1 or id(p) in no_decay], 1.0, decay=False))
    return [g for g in groups if g["params"]]


def _no_weight_decay(encoder: nn.Module) -> list[nn.Parameter]:
    """The parameters the encoder's ``no_weight_decay()`` names (fnmatch patterns, as timm reads them: a ViT's
    position embedding and class token), which take no weight decay whatever their shape."""
    patterns = getattr(encoder, "no_weight_decay", lambda: ())()
    return [p for name, p in encoder.named_parameters() if any(fnmatch.fnmatch(name, q) for q in patterns)]


def _group(params: list, lr_scale: float, decay: bool) -> dict:
    """A group; without ``weight_decay`` the optimizer's own applies."""
    return {"params": params, "lr_scale": lr_scale, **({} if decay else {"weight_decay": 0.0})}


def keep_lr_scales(optimizer: torch.optim.Optimizer, scheduler) -> None:
    """Schedulers that scale each group's initial rate keep the layer-decay ratios; OneCycleLR sets every group
    from one ``max_lr``, so its per-group rates are scaled here. Any other scheduler that loses the ratios is an
    error rather than a silent full-rate run."""
    groups = optimizer.param_groups
    if isinstance(scheduler, torch.optim.lr_scheduler.OneCycleLR):
        for group in groups:
            for key in ("initial_lr", "max_lr", "min_lr"):
                group[key] *= group["lr_scale"]
            group["lr"] = group["initial_lr"]
    top = max(groups, key=lambda g: g["lr_scale"])
    for group in groups:
        expected = top["lr"] * group["lr_scale"] / top["lr_scale"]
        if abs(group["lr"] - expected) > 1e-6 * max(abs(expected), 1e-12):
            raise ValueError(f"model.layer_decay: {type(scheduler).__name__} sets every parameter group's learning "
                             "rate itself, so the layer-wise decay would be lost; use OneCycleLR or a scheduler that "
                             "scales each group's initial rate (LambdaLR, CosineAnnealingLR, LinearLR, ...)")


def build_optimizer(module: nn.Module, encoders: Iterable[nn.Module], layer_decay: float, optimizer_factory,
                    scheduler_factory=None, fused: bool = False):
    """The optimizer (and the scheduler, stepped every optimizer step) as ``configure_optimizers`` returns them; with
    ``fused``, torch's fused kernel where it has one (``fused_optimizer``)."""
    optimizer = optimizer_factory(parameter_groups(module, encoders, layer_decay))
    if fused:
        optimizer = fused_optimizer(optimizer)
    for group in optimizer.param_groups:
        group["lr"] *= group["lr_scale"]
    if scheduler_factory is None:
        return optimizer
    scheduler = scheduler_factory(optimizer)
    if layer_decay != 1.0:
        keep_lr_scales(optimizer, scheduler)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


# torch's optimizers with a fused kernel that also skips a step on the device where its ``found_inf`` tensor is set,
# and whether that kernel takes FSDP2's sharded parameters (DTensors): torch 2.14 shards Adam's and AdamW's only
_FUSED = {torch.optim.Adam: True, torch.optim.AdamW: True, torch.optim.SGD: False, torch.optim.Adagrad: False}


def fused_optimizer(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """``optimizer`` (new, without state) built again with torch's fused kernel (``fused=True``), its groups as they
    are, where it is one of torch's optimizers that have one (for sharded parameters, one that takes them) and the
    recipe left ``fused`` and ``foreach`` unset; else, or where torch refuses the parameters' device or dtype,
    ``optimizer`` as it is. A fused step is one kernel, and it can skip a step whose gradients are not finite without
    the host reading them (``mmlit.objectives.update``)."""
    settings, kind = optimizer.defaults, type(optimizer)
    sharded = any(isinstance(p, DTensor) for group in optimizer.param_groups for p in group["params"])
    if (kind not in _FUSED or (sharded and not _FUSED[kind]) or settings.get("fused") is not None
            or settings.get("foreach") or settings.get("differentiable")):
        return optimizer
    accepted = inspect.signature(kind).parameters
    try:
        return kind([{**group, "fused": True} for group in optimizer.param_groups],
                    **{**{k: v for k, v in settings.items() if k in accepted}, "fused": True})
    except RuntimeError:  # "`fused=True` requires all the params to be floating point Tensors of supported devices"
        return optimizer


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step`` skips itself, on the device, where its ``found_inf`` tensor is nonzero: torch's
    fused Adam, AdamW, SGD and Adagrad (torch's GradScaler hands them ``found_inf`` so)."""
    return type(optimizer) in _FUSED and bool(optimizer.defaults.get("fused"))
