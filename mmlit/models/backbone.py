"""The shared backbone: one encoder per modality and an optional fusion, of one width.

``encoders`` is keyed by modality (``{image: ..., text: ..., audio: ...}``); each is an ``Encoder``: ``dim``, and
``forward(x)`` -> ``Encoded(tokens (B, N, D), pooled (B, D), mask (B, N) or None)``. A fusion (``Fusion``,
``mmlit/models/fusion.py``) combines named modalities. The fusion is optional (a CLIP-style dual encoder has none),
and so is any encoder no task reads: a part that no task uses would hold parameters without gradients, which plain
DDP rejects.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Callable, Iterator, NamedTuple

import torch
from torch import nn

from mmlit.compile import repeated_blocks

__all__ = ["Backbone", "Encoded", "Features"]


class Encoded(NamedTuple):
    """What an encoder (or a fusion) returns: tokens (B, N, D), pooled (B, D) and mask (B, N), True on real tokens
    (None: every token is real). A fusion of pooled features only returns no tokens."""

    tokens: torch.Tensor | None
    pooled: torch.Tensor
    mask: torch.Tensor | None = None


@dataclass
class Features:
    """What the backbone returns: each modality it encoded, and the fused features when it fused them."""

    encoded: dict[str, Encoded] = field(default_factory=dict)
    fused: Encoded | None = None

    def __getitem__(self, modality: str) -> Encoded:
        return self.encoded[modality]


class Backbone(nn.Module):
    """Encode named modalities (and fuse them).

    Args:
        encoders: an encoder per modality, e.g. ``{image: TimmImageEncoder, text: TransformerTextEncoder}``; null
            builds the modality's default encoder (``mmlit modalities`` names it) at the backbone's width.
        fusion: a registered fusion (``mmlit fusions``), e.g. ``CrossAttentionFusion``, ``EarlyFusion``,
            ``LateFusion``, ``HybridFusion``, ``RelationNetworkFusion``; none for recipes whose tasks need no fused
            features.
        dim: the width of every part (default: the encoders' and the fusion's, which must agree); needed when every
            encoder is a modality's default one.
        vocab_size: the vocabulary of task decoders (captioning) when there is no text encoder; with one, its
            ``vocab_size`` is used.
        max_length: the longest text of task decoders when there is no text encoder.
        image_encoder, text_encoder: recipes of an older shape; an error says where they go now.
    """

    def __init__(self, encoders: dict[str, nn.Module | None], fusion: nn.Module | None = None, dim: int | None = None,
                 vocab_size: int = 2000, max_length: int = 64, image_encoder: Any = None, text_encoder: Any = None):
        super().__init__()
        for old, modality in (("image_encoder", "image"), ("text_encoder", "text")):
            if locals()[old] is not None:
                raise ValueError(f"model.backbone.init_args.{old}: encoders are keyed by modality now; write it as "
                                 f"model.backbone.init_args.encoders.{modality}")
        if not encoders:
            raise ValueError("model.backbone.init_args.encoders: give at least one encoder ({image: ..., text: ...})")
        widths = {f"encoders.{name}": e.dim for name, e in encoders.items() if e is not None}
        if fusion is not None:
            widths["fusion"] = fusion.dim
        if dim is not None:
            widths["dim"] = dim
        if len(set(widths.values())) != 1:
            raise ValueError("model.backbone: the encoders and the fusion must have one dim, got "
                             + (", ".join(f"{k}.init_args.dim={v}" for k, v in widths.items()) or "none (set dim)"))
        self.dim = next(iter(widths.values()))
        self.encoders = nn.ModuleDict({name: e if e is not None else _default_encoder(name, self.dim)
                                       for name, e in encoders.items()})
        self.fusion = fusion
        if fusion is not None:
            missing = sorted(set(getattr(fusion, "modalities", ())) - set(self.encoders))
            if missing:
                raise ValueError(f"model.backbone.init_args.fusion: it fuses {', '.join(missing)}, but "
                                 f"model.backbone.init_args.encoders has no {', '.join(missing)} (it has "
                                 f"{', '.join(self.encoders)})")
            grid, context = getattr(fusion, "grid", None), getattr(fusion, "context", None)
            cells = getattr(self.encoders[context], "grid", None) if context in self.encoders else None
            if grid is not None and cells is not None and tuple(grid) != tuple(cells):
                raise ValueError(f"model.backbone.init_args.fusion.init_args.grid: {list(grid)}, but the {context} "
                                 f"encoder's grid is {list(cells)}")
        text = self.encoders["text"] if "text" in self.encoders else None
        self.vocab_size = getattr(text, "vocab_size", vocab_size)
        self.max_length = getattr(text, "max_length", max_length)
        self._passes: dict | None = None  # (modality, tensor id) -> (tensor, encoder output), inside shared_pass()
        self._probe: Callable[[Features], Features] | None = None  # sees what each forward returns, inside probing()

    def spec(self, modality: str) -> Any:
        """The encoder of ``modality``, or for ``text`` without one (a captioning decoder's targets) the backbone's
        ``vocab_size`` and ``max_length``: what the modality's data pipeline reads; None otherwise."""
        if modality in self.encoders:
            return self.encoders[modality]
        if modality == "text":
            return SimpleNamespace(vocab_size=self.vocab_size, max_length=self.max_length)
        return None

    def require(self, modality: str, task: str) -> nn.Module:
        """The encoder of ``modality`` (or ``fusion``), or a clear error that task ``task`` needs it."""
        if modality == "fusion":
            if self.fusion is None:
                raise ValueError(f"model.tasks.{task}: the task needs model.backbone.init_args.fusion, and the recipe "
                                 f"has none")
            return self.fusion
        if modality not in self.encoders:
            raise ValueError(f"model.tasks.{task}: the task reads {modality}, but model.backbone.init_args.encoders has "
                             f"no '{modality}' (it has {', '.join(self.encoders)})")
        return self.encoders[modality]

    @contextlib.contextmanager
    def shared_pass(self) -> Iterator[None]:
        """Within it, an input given again (the same tensor: tasks that read one source in a step get one, see
        ``SourceStream``) is encoded once, and each task's head reads that pass. Its graph is shared: a loss-based
        objective back-propagates through it once, a gradient-based one once per task (with ``retain_graph``)."""
        self._passes = {}
        try:
            yield
        finally:
            self._passes = None

    @contextlib.contextmanager
    def probing(self, probe: Callable[[Features], Features] | None) -> Iterator[None]:
        """Within it, what ``forward`` returns goes through ``probe`` (None: nothing changes). The gradient statistics
        use it to see each task's gradient on the features its head reads (``FeatureGradients``)."""
        self._probe = probe
        try:
            yield
        finally:
            self._probe = None

    def top_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters at the top of the backbone: each encoder's last repeated block and the modules it
        registers after it (a final norm, a pooler), an encoder without repeated blocks (a small CNN) whole, and the
        fusion whole (its lists of modules may be side by side, one per modality, not stacked). The gradient
        statistics measure the tasks' gradients on these (GradNorm measures them on the last shared layer)."""
        top = []
        for part in self.encoders.values():
            params = list(part.parameters())
            blocks = repeated_blocks(part)
            if blocks:
                last = {id(p) for p in blocks[-1].parameters()}
                params = params[next((i for i, p in enumerate(params) if id(p) in last), 0):]
            top.extend(p for p in params if p.requires_grad)
        if self.fusion is not None:
            top.extend(p for p in self.fusion.parameters() if p.requires_grad)
        return top

    def encode(self, modality: str, x: torch.Tensor) -> Encoded:
        """``x`` through the encoder of ``modality`` (once per tensor inside ``shared_pass``)."""
        if modality not in self.encoders:
            raise ValueError(f"model.backbone: an input of modality '{modality}' was given, but "
                             f"model.backbone.init_args.encoders has no '{modality}' (it has {', '.join(self.encoders)})")
        encoder = self.encoders[modality]
        passes = self._passes
        if passes is None:
            return Encoded(*encoder(x))
        # a padded batch (audio) is moved to the device as a new tuple of the same tensors: its values name it
        tensor = x[0] if isinstance(x, tuple) else x
        done = passes.get((modality, id(tensor)))
        if done is None or done[0] is not tensor:  # (the tensor is kept, so its id is not reused within the step)
            done = passes[(modality, id(tensor))] = (tensor, Encoded(*encoder(x)))
        return done[1]

    def forward(self, fuse: bool = True, index: dict[str, torch.Tensor] | None = None, **inputs: torch.Tensor) -> Features:
        """Each input by its modality (``image=`` (B, 3, H, W), ``text=`` ids (Q, T), ...); with two or more and
        ``fuse``, the fusion's features too.

        ``index`` pairs the rows: ``index["image"]`` (Q,) says which image each of the Q outputs goes with, so an image
        asked several questions is encoded once; a modality without an index has one row per output row.
        """
        out = Features({name: self.encode(name, x) for name, x in inputs.items() if x is not None})
        if fuse and len(out.encoded) > 1:
            if self.fusion is None:
                raise ValueError("model.backbone: a task asked for fused features, but the backbone has no fusion")
            out.fused = self.fusion(out.encoded, index or {})
        return out if self._probe is None else self._probe(out)


def _default_encoder(modality: str, dim: int) -> nn.Module:
    """The modality's default encoder (its ``default_encoder`` class path) at width ``dim``."""
    import importlib

    from mmlit.registry import get_modality

    path = get_modality(modality).default_encoder
    if path is None:
        raise ValueError(f"model.backbone.init_args.encoders.{modality}: the modality has no default encoder; give one")
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)(dim=dim)
