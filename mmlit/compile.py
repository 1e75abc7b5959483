"""``model.compile``: ``torch.compile`` of the backbone and the task heads.

Regional compilation (the default) compiles each repeated block of an encoder (a ViT's or a text transformer's
layers, a CNN's stage blocks) rather than the whole backbone: blocks of one kind share their compiled code, so
compile time is that of a few blocks whatever the depth, and the objective's per-task backward passes and the
evaluation loop run through the same compiled blocks (the advice of PyTorch's regional compilation recipe, which
Lightning and timm follow). Parts with no repeated blocks are compiled whole.

Modules are compiled in place (``nn.Module.compile``), so their parameters keep their names: a compiled run's
checkpoint loads into an uncompiled model and back, without ``_orig_mod.`` keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal

from torch import nn

from mmlit.compat.torch import allow_retained_compiled_backward

__all__ = ["Compile", "compile_modules", "repeated_blocks"]


@dataclass
class Compile:
    """How ``model.compile`` compiles.

    Args:
        mode: ``torch.compile``'s mode.
        regional: compile each repeated block of the backbone's parts (True) or each part whole (False).
        heads: also compile the task heads (each task's submodules that hold parameters).
        dynamic: ``torch.compile``'s ``dynamic`` (None: dynamic shapes after the first recompile, e.g. for a new text
            length).
        fullgraph: fail on a graph break instead of running the break eagerly.
        backend: ``torch.compile``'s backend: ``inductor`` (generated kernels; ``mode`` applies to it alone), or
            ``aot_eager`` / ``eager`` to find graph breaks and compile-only bugs without code generation.
    """

    mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    regional: bool = True
    heads: bool = True
    dynamic: bool | None = None
    fullgraph: bool = False
    backend: str = "inductor"


def _has_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _is_repeated(container: nn.Module) -> bool:
    children = list(container.children())
    return (isinstance(container, (nn.ModuleList, nn.Sequential)) and len(children) > 1
            and len({type(c) for c in children}) == 1 and all(map(_has_parameters, children)))


def repeated_blocks(module: nn.Module) -> list[nn.Module]:
    """The outermost repeated blocks under ``module`` (the children of a list of modules of one class)."""
    found = []
    for child in module.children():
        if _is_repeated(child):
            found.extend(child.children())
        else:
            found.extend(repeated_blocks(child))
    return found


def compile_modules(parts: Iterable[nn.Module], heads: Iterable[nn.Module], settings: Compile) -> list[nn.Module]:
    """Compile ``parts`` (by their repeated blocks, or whole) and, with ``settings.heads``, ``heads``; returns the
    modules compiled."""
    options = {"backend": settings.backend, "dynamic": settings.dynamic, "fullgraph": settings.fullgraph}
    if settings.backend == "inductor":
        options["mode"] = settings.mode
    allow_retained_compiled_backward()
    compiled = []
    for part in parts:
        blocks = repeated_blocks(part) if settings.regional else []
        for module in blocks or [part]:  # a part without repeated blocks: whole
            module.compile(**options)
            compiled.append(module)
    for head in heads if settings.heads else ():
        head.compile(**options)
        compiled.append(head)
    return compiled
