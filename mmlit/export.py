"""``mmlit export``: a trained run as files other tools load: each pretrained Hugging Face encoder as a model folder
(``save_pretrained``, with its tokenizer), its LoRA adapters merged into its weights (W + (alpha / r) B A), the adapters
also kept on their own (``peft``'s adapter folder); and the backbone, merged, as safetensors (for ``model.pretrained``
of a recipe without ``lora``)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
import yaml
from lightning.pytorch.cli import LightningArgumentParser
from safetensors.torch import save_file
from torch import nn

from mmlit.checkpoints import AtomicCheckpointIO
from mmlit.module import MultiTaskModule

__all__ = ["build_model", "export_backbone_folders", "export_run"]

# the source folder's files that are not weights: its tokenizer, chat template and generation settings
_FOLDER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                 "vocab.txt", "merges.txt", "vocab.json", "generation_config.json")


def build_model(config: str | Path) -> MultiTaskModule:
    """The ``MultiTaskModule`` a recipe (or a run's ``config.yaml``) describes, with fresh weights."""
    parser = LightningArgumentParser(exit_on_error=False)
    parser.add_lightning_class_args(MultiTaskModule, "model", subclass_mode=False)
    recipe = yaml.safe_load(Path(config).read_text())
    return parser.instantiate_classes(parser.parse_object({"model": recipe.get("model", {})})).model


def _state_dict(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """The weights of a checkpoint file or of a sharded (FSDP) checkpoint folder, read without running code."""
    path = Path(checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"--ckpt: no checkpoint '{path}'")
    return AtomicCheckpointIO().load_checkpoint(path, map_location="cpu", weights_only=True)["state_dict"]


def export_run(config: str | Path, checkpoint: str | Path, out: str | Path) -> list[Path]:
    """Write the backbone of ``checkpoint`` (trained from ``config``) to ``out/backbone.safetensors`` and each
    Hugging Face encoder to ``out/<modality>/`` (LoRA merged; adapters in ``out/<modality>-adapter/``)."""
    model = build_model(config)
    model.load_state_dict(_state_dict(checkpoint))
    return export_backbone_folders(model.backbone, out, str(checkpoint))


def export_backbone_folders(backbone: nn.Module, out: str | Path, source: str = "") -> list[Path]:
    """``backbone``'s Hugging Face encoders as model folders (``out/<modality>/``, LoRA merged; the adapters in
    ``out/<modality>-adapter/``) and the whole backbone, merged, as ``out/backbone.safetensors``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for modality, encoder in backbone.encoders.items():
        if not hasattr(encoder, "base"):  # not a Hugging Face model (HFTextEncoder, HFCausalLM have one)
            continue
        if getattr(encoder, "lora", None) is not None:
            encoder.model.save_pretrained(out / f"{modality}-adapter")
            written.append(out / f"{modality}-adapter")
            encoder.model, encoder.lora = encoder.model.merge_and_unload(), None
        encoder.base.save_pretrained(out / modality)
        for name in _FOLDER_FILES:
            if (Path(encoder.path) / name).is_file():
                shutil.copy2(Path(encoder.path) / name, out / modality / name)
        written.append(out / modality)
    state, seen = {}, set()
    for key, tensor in backbone.state_dict().items():  # tied weights (an LM's embeddings and head) are copied:
        shared = tensor.data_ptr() in seen                   # every key loads on its own, as read_backbone_state reads
        seen.add(tensor.data_ptr())
        state[key] = tensor.clone() if shared else tensor.contiguous()
    save_file(state, str(out / "backbone.safetensors"), metadata={"format": "pt", "source": source})
    return [out / "backbone.safetensors", *written]
