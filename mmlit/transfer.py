"""Transfer learning: start a backbone from saved weights, and export it alone.

- ``load_backbone_weights``: from an mmlit checkpoint (``.ckpt``: the ``backbone.*`` entries of its
  ``state_dict``) or from a backbone file (``.safetensors``, or a ``weights_only`` torch file of
  ``{"encoders.image.…": tensor}``, as ``export_backbone`` writes). The parts in the file (each encoder,
  ``encoders.{modality}``, and the ``fusion``) load strictly; parts missing from it start fresh, so a contrastive
  dual encoder can start a VQA model that adds a fusion. Task heads never load: a fine-tuning run brings its own.
  Files of backbones of the older shape load too: ``image_encoder`` / ``text_encoder`` as ``encoders.image`` /
  ``encoders.text``, and a gated ``LateFusion``'s image/text projections and sigmoid gate as its per-modality
  projections and softmax gate, computing what they computed.
- ``export_backbone``: a checkpoint's backbone (from a file or a sharded FSDP folder) as one ``.safetensors`` file,
  for use outside mmlit.
"""

from __future__ import annotations

from pathlib import Path

import torch
from lightning.pytorch.utilities import rank_zero_info
from safetensors.torch import load_file, save_file
from torch import nn

from mmlit.checkpoints import is_sharded, read_sharded

__all__ = ["CHECKPOINT_LAYOUT", "export_backbone", "load_backbone_weights", "read_backbone_state", "renamed_state",
           "upgrade_checkpoint"]

CHECKPOINT_LAYOUT = 2  # written into every checkpoint (the modality-keyed core); none: the older layout
_RENAMED = {"image_encoder.": "encoders.image.", "text_encoder.": "encoders.text."}  # backbones of the older shape


def _renamed(name: str) -> str:
    for old, new in _RENAMED.items():
        if name.startswith(old):
            return new + name[len(old):]
    return name


def _gated_fusion(state: dict, prefix: str) -> dict:
    """A gated ``LateFusion`` of the older shape in ``state`` (``image_proj``, ``text_proj``, a sigmoid ``gate`` of
    (D, 2D)) as the current one (``projs.0``, ``projs.1``, a softmax ``gate`` of (2D, 2D) over the two modalities):
    the gate's first D outputs are the old logits, the text half is zero, and softmax([a, 0]) = [sigmoid(a),
    1 - sigmoid(a)], so the fused features are the same."""
    for key in [k for k in state if k.startswith(f"{prefix}fusion.") and k.endswith(".image_proj.weight")]:
        base = key[: -len("image_proj.weight")]
        if f"{base}text_proj.weight" not in state or f"{base}gate.weight" not in state:
            continue
        for old, new in (("image_proj", "projs.0"), ("text_proj", "projs.1")):
            for kind in ("weight", "bias"):
                state[f"{base}{new}.{kind}"] = state.pop(f"{base}{old}.{kind}")
        for kind in ("weight", "bias"):
            gate = state[f"{base}gate.{kind}"]
            state[f"{base}gate.{kind}"] = torch.cat([gate, torch.zeros_like(gate)])
    return state


def renamed_state(state: dict, prefix: str = "") -> dict:
    """``state`` with the keys of backbones of the older shape (``{prefix}image_encoder.*``, a gated late fusion's
    ``image_proj``) as they are now (``{prefix}encoders.image.*``, ``projs.0``): checkpoints saved before encoders
    were keyed by modality load as they are."""
    return _gated_fusion({prefix + _renamed(k[len(prefix):]) if k.startswith(prefix) else k: v
                          for k, v in state.items()}, prefix)


def upgrade_checkpoint(checkpoint: dict, fitting: bool) -> None:
    """A ``MultiTaskModule`` checkpoint as this version loads it: backbone keys of the older shape renamed. One of
    before the modality-keyed core (no ``mmlit_layout``) cannot resume a fit: its optimizer state is grouped
    differently, and torch would only say that the group counts differ."""
    if fitting and "mmlit_layout" not in checkpoint:
        raise ValueError("ckpt_path: this checkpoint was written before encoders were keyed by modality; its "
                         "optimizer state does not fit the current parameter groups, so it cannot resume a fit. "
                         "Start a new run from its weights (model.pretrained) or evaluate it (mmlit validate / "
                         "test --ckpt_path).")
    if fitting and "state_dict" in checkpoint and "loops" in checkpoint and "optimizer_states" not in checkpoint:
        raise ValueError("ckpt_path: this checkpoint holds the weights without the optimizer state (a consolidated "
                         "or whole-read sharded FSDP checkpoint, or one saved with checkpoint.save_weights_only), so "
                         "it cannot resume a fit; a sharded folder resumes under trainer.strategy: "
                         "mmlit.fsdp.FSDP2Strategy. Start a new run from its weights (model.pretrained) or evaluate it")
    if "state_dict" in checkpoint:  # (none where the strategy loaded the weights itself: a sharded checkpoint)
        checkpoint["state_dict"] = renamed_state(checkpoint["state_dict"], prefix="backbone.")


def _part(name: str) -> tuple[str, str]:
    """``encoders.image.proj.weight`` -> (``encoders.image``, ``proj.weight``); ``fusion.x`` -> (``fusion``, ``x``)."""
    head, _, rest = name.partition(".")
    if head == "encoders":
        modality, _, rest = rest.partition(".")
        return f"encoders.{modality}", rest
    return head, rest


def read_backbone_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The backbone's entries of a checkpoint (a file, or a sharded folder) or backbone file, keyed as in
    ``Backbone.state_dict()``."""
    path = Path(path)
    if is_sharded(path):
        state = read_sharded(path)  # (without running code from it)
    elif not path.is_file():
        raise FileNotFoundError(f"no weights file or sharded checkpoint folder '{path}'")
    elif path.suffix == ".safetensors":
        return renamed_state(load_file(str(path)))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)  # never runs code from the file
    if isinstance(state, dict) and "state_dict" in state:  # a Lightning checkpoint of a MultiTaskModule
        state = {k[len("backbone."):]: v for k, v in state["state_dict"].items() if k.startswith("backbone.")}
        if not state:
            raise ValueError(f"'{path}' is a checkpoint without backbone.* weights (not an mmlit checkpoint?)")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"'{path}' holds no state dict of tensors")
    return renamed_state(state)


def load_backbone_weights(backbone: nn.Module, path: str | Path, key: str = "model.pretrained") -> list[str]:
    """Load every backbone part found in ``path`` (strictly); return the names of the parts loaded."""
    state = read_backbone_state(path)
    by_part: dict[str, dict[str, torch.Tensor]] = {}
    parts = {f"encoders.{m}": e for m, e in backbone.encoders.items()}
    parts["fusion"] = backbone.fusion
    for name, tensor in state.items():
        part, rest = _part(name)
        if not (part == "fusion" or part.startswith("encoders.")):
            raise ValueError(f"{key}: '{path}' has '{name}', which is in no backbone part (encoders.*, fusion)")
        by_part.setdefault(part, {})[rest] = tensor
    for part, part_state in by_part.items():
        module = parts.get(part)
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
    fresh = [p for p, module in parts.items() if module is not None and p not in by_part]
    rank_zero_info(f"backbone from {path}: loaded {sorted(by_part)}; from scratch: {fresh or 'nothing'}")
    return sorted(by_part)


def export_backbone(checkpoint: str | Path, out: str | Path) -> Path:
    """Write the backbone of ``checkpoint`` (an mmlit ``.ckpt`` file or sharded folder) to ``out``
    (``.safetensors``)."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"--out: the backbone is written as safetensors; name it '*.safetensors', got '{out}'")
    state = read_backbone_state(checkpoint)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp), metadata={"format": "pt", "source": str(checkpoint)})
    tmp.replace(out)  # an interrupted export leaves no half-written file under the real name
    return out
