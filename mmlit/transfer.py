"""Transfer learning: start a backbone from saved weights, export it alone, and decay learning rates by depth.

- ``load_backbone_weights``: from an mmlit checkpoint (``.ckpt``: the ``backbone.*`` entries of its
  ``state_dict``) or from a backbone file (``.safetensors``, or a ``weights_only`` torch file of
  ``{"image_encoder.…": tensor}``, as ``export_backbone`` writes). The parts in the file
  (``image_encoder``, ``text_encoder``, ``fusion``) load strictly; parts missing from it start fresh,
  so a contrastive dual encoder can start a VQA model that adds a fusion. Task heads never load: a
  fine-tuning run brings its own.
- ``export_backbone``: a checkpoint's backbone as one ``.safetensors`` file, for use outside mmlit.
- ``layer_decay_groups``: parameter groups whose learning rate shrinks by ``decay`` per layer below
  the top of each encoder (BEiT, Bao et al. 2022; ELECTRA, Clark et al. 2020). Layers of a timm model
  come from timm's own ``group_matcher``; fusion and heads train at the full rate.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_info
from safetensors.torch import load_file, save_file
from torch import nn

__all__ = ["export_backbone", "layer_decay_groups", "load_backbone_weights", "read_backbone_state"]

_PARTS = ("image_encoder", "text_encoder", "fusion")


def read_backbone_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The backbone's entries of a checkpoint or backbone file, keyed as in ``Backbone.state_dict()``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no weights file '{path}'")
    if path.suffix == ".safetensors":
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)  # never runs code from the file
    if isinstance(state, dict) and "state_dict" in state:  # a Lightning checkpoint of a MultiTaskModule
        state = {k[len("backbone."):]: v for k, v in state["state_dict"].items() if k.startswith("backbone.")}
        if not state:
            raise ValueError(f"'{path}' is a checkpoint without backbone.* weights (not an mmlit checkpoint?)")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"'{path}' holds no state dict of tensors")
    return state


def load_backbone_weights(backbone: nn.Module, path: str | Path, key: str = "model.pretrained") -> list[str]:
    """Load every backbone part found in ``path`` (strictly); return the names of the parts loaded."""
    state = read_backbone_state(path)
    by_part: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in state.items():
        part, _, rest = name.partition(".")
        if part not in _PARTS:
            raise ValueError(f"{key}: '{path}' has '{name}', which is not in any backbone part {_PARTS}")
        by_part.setdefault(part, {})[rest] = tensor
    for part, part_state in by_part.items():
        module = getattr(backbone, part)
        if module is None:
            raise ValueError(f"{key}: '{path}' has {part} weights, but the recipe's backbone has no {part}")
        own = module.state_dict()
        missing, unexpected = sorted(set(own) - set(part_state)), sorted(set(part_state) - set(own))
        wrong = [f"{part}.{k}: file {tuple(v.shape)}, model {tuple(own[k].shape)}"
                 for k, v in part_state.items() if k in own and v.shape != own[k].shape]
        if missing or unexpected or wrong:
            raise ValueError(f"{key}: '{path}' does not fit model.backbone.init_args.{part}: "
                             + "; ".join(filter(None, [
                                 missing and f"missing {[f'{part}.{k}' for k in missing[:5]]}",
                                 unexpected and f"unexpected {[f'{part}.{k}' for k in unexpected[:5]]}",
                                 wrong and f"other shapes {wrong[:5]}"]))
                             + " (the recipe must build the same part as the run that saved it)")
        module.load_state_dict(part_state)
    fresh = [p for p in _PARTS if getattr(backbone, p) is not None and p not in by_part]
    rank_zero_info(f"backbone from {path}: loaded {sorted(by_part)}; from scratch: {fresh or 'nothing'}")
    return sorted(by_part)


def export_backbone(checkpoint: str | Path, out: str | Path) -> Path:
    """Write the backbone of ``checkpoint`` (an mmlit ``.ckpt``) to ``out`` (``.safetensors``)."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out: the backbone is written as safetensors; name it '*.safetensors', got '{out}'")
    state = read_backbone_state(checkpoint)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"format": "pt", "source": str(checkpoint)})
    tmp.replace(out)  # an interrupted export leaves no half-written file under the real name
    return out


def _timm_layers(model: nn.Module) -> tuple[dict[str, int], int]:
    """Layer index of every parameter of a timm model from its ``group_matcher`` (0 = stem)."""
    from timm.models import group_parameters

    groups = group_parameters(model, model.group_matcher(coarse=False))
    layer_of = {name: i for i, (_, names) in enumerate(groups.items()) for name in names}
    return layer_of, len(groups) - 1


def _text_layer(name: str) -> int | None:
    """Layer index in an mmlit text encoder: embeddings 0, block ``k`` k + 1; None for the top."""
    match = re.search(r"layers\.layers\.(\d+)\.|_l(\d+)(?:_reverse)?$", name)
    if match:
        return int(match.group(1) or match.group(2)) + 1
    return 0 if re.match(r"(embed|pos|cls)\b", name) else None


def layer_decay_groups(backbone: nn.Module, rest: list[tuple[str, nn.Parameter]], decay: float) -> list[dict]:
    """Parameter groups with ``lr_scale = decay ** (top - layer)`` per encoder; ``rest`` (fusion, heads) at 1."""
    scales: dict[int, float] = {}
    groups: dict[float, list[nn.Parameter]] = {}

    def add(param: nn.Parameter, scale: float) -> None:
        scales[id(param)] = scale
        groups.setdefault(scale, []).append(param)

    for part in ("image_encoder", "text_encoder"):
        encoder = getattr(backbone, part)
        if encoder is None:
            continue
        if part == "image_encoder":
            inner, depth = _timm_layers(encoder.model)
            layer_of = {f"model.{k}": v for k, v in inner.items()}
        else:
            layer_of = {n: layer for n, _ in encoder.named_parameters() if (layer := _text_layer(n)) is not None}
            depth = max(layer_of.values(), default=0)
        top = depth + 1  # the encoder's own output layers (projection, final norm)
        for name, param in encoder.named_parameters():
            add(param, decay ** (top - layer_of.get(name, top)))
    for _, param in rest:
        if id(param) not in scales:
            add(param, 1.0)
    return [{"params": params, "lr_scale": scale} for scale, params in sorted(groups.items())]
