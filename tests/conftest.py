"""Shared fixtures: a tiny Sort-of-CLEVR set with its tokenizer, and a tiny recipe over every task."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import yaml

os.environ["WANDB_MODE"] = "offline"  # tests never reach the W&B service
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Scan counts are cached per user (mmlit/data/index.py): tests keep theirs apart, and processes they start inherit it.
os.environ["MMLIT_CACHE"] = tempfile.mkdtemp(prefix="mmlit-cache-")

from mmlit.data.sort_of_clevr_av import write_dataset  # noqa: E402
from mmlit.data.tiny_lm import save_tiny_lm  # noqa: E402
from mmlit.data.tools import iter_texts  # noqa: E402
from mmlit.registry import get_task, list_tasks  # noqa: E402
from mmlit.text import train_tokenizer  # noqa: E402

from ._soc import LM_TASKS, soc_settings, soc_task  # noqa: E402, F401 (soc_task: for the tests that import it from here)

from ._stores import http_store, s3_store  # noqa: E402, F401 (fixtures)

REPO = Path(__file__).resolve().parents[1]


def make_soc(root: Path) -> dict:
    """Spoken and moving Sort-of-CLEVR in ``root`` (``mmlit data sort-of-clevr --spoken --video``: every modality a
    shipped task reads): train 40 images in 4 shards, val 12 and test 12 in 2 shards each (10 + 2), plus a tokenizer
    and a tiny LM of width 32 (``mmlit data tiny-lm``: ``soc["lm"]``);
    ``soc["val"]`` and ``soc["test"]`` name the first shard of each."""
    shards = write_dataset(root, {"train": 40, "val": 12, "test": 12}, seed=0, shard_size=10)
    tokenizer = root / "tokenizer.json"
    train_tokenizer(iter_texts(shards["train"]), tokenizer, vocab_size=200)
    lm = save_tiny_lm(root / "tiny-lm", iter_texts(shards["train"]), vocab_size=300, hidden=32, layers=1, heads=2,
                      steps=20)
    return {"root": root, "shards": shards, "tokenizer": str(tokenizer), "lm": str(lm),
            "train": str(root / "train-{000000..000003}.tar"), "val": str(root / "val-000000.tar"),
            "test": str(root / "test-000000.tar")}


@pytest.fixture(scope="session")
def soc(tmp_path_factory) -> dict:
    return make_soc(tmp_path_factory.mktemp("soc"))


def tiny_backbone(dim: int = 32, causal: bool = False, audio: bool = False, lm: str | None = None) -> dict:
    """Cross-attention fusion over a bidirectional text encoder, or over a GPT-style decoder (``causal``,
    which the ``prefix_lm`` task needs and every other task can use), or the pretrained LM folder ``lm`` (``vlm``);
    with ``audio``, an audio encoder too (a part that no task reads would hold parameters without gradients, which DDP
    rejects)."""
    text = "CausalTextDecoder" if causal else "TransformerTextEncoder"
    text_args = {"vocab_size": 256, "dim": dim, "depth": 1, "heads": 2, "max_length": 40}
    backbone = {
        "class_path": "mmlit.models.Backbone",
        "init_args": {
            "encoders": {
                "image": {"class_path": "mmlit.models.TimmImageEncoder",
                          "init_args": {"model_name": "test_byobnet", "dim": dim, "image_size": 75, "feature_index": 2}},
                "text": {"class_path": f"mmlit.models.{text}", "init_args": text_args},
            },
            "fusion": {"class_path": "mmlit.models.CrossAttentionFusion", "init_args": {"dim": dim, "depth": 1, "heads": 2}},
        },
    }
    if audio:
        backbone["init_args"]["encoders"]["audio"] = tiny_audio_encoder(dim)
    if lm is not None:
        backbone["init_args"]["encoders"]["text"] = {"class_path": "mmlit.models.HFCausalLM", "init_args": {"path": lm}}
    return backbone


def tiny_audio_encoder(dim: int = 32) -> dict:
    return {"class_path": "mmlit.models.SpectrogramTransformer",
            "init_args": {"dim": dim, "max_frames": 800,
                          "model_kwargs": {"embed_dim": dim, "depth": 1, "num_heads": 2}}}


def tiny_video_encoder(dim: int = 32, tokens: str = "frames") -> dict:
    return {"class_path": "mmlit.models.VideoEncoder",
            "init_args": {"dim": dim, "frames": 4, "tokens": tokens, "depth": 1, "heads": 2,
                          "frame_encoder": {"model_name": "test_byobnet", "image_size": 75, "feature_index": 2}}}


def reads_audio(name: str) -> bool:
    """Whether the registered task ``name`` reads the audio encoder with its Sort-of-CLEVR settings."""
    return "audio" in getattr(get_task(name), "modalities", ())


def tiny_recipe(soc: dict, root: Path, tasks: list[str] | None = None, **trainer) -> dict:
    """A recipe over the registered tasks (all by default) that runs in seconds."""
    task_specs, tasks = {}, tasks or [t for t in list_tasks() if t not in LM_TASKS]
    for name in tasks:
        cls = get_task(name)
        task_specs[name] = {"class_path": f"{cls.__module__}.{cls.__qualname__}",
                            "init_args": {"shards": {"train": soc["train"], "val": soc["val"], "test": soc["test"]},
                                          "batch_size": 4, **soc_settings(name)}}
    return {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 1, "log_every_n_steps": 1,
                    "default_root_dir": str(root), "enable_progress_bar": False, "enable_model_summary": False,
                    "logger": [{"class_path": "mmlit.loggers.WandbLogger", "init_args": {"save_dir": str(root), "name": "test"}},
                               {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                "init_args": {"save_dir": str(root), "name": "csv"}}],
                    **trainer},
        "model": {"backbone": tiny_backbone(causal="prefix_lm" in tasks, audio=any(map(reads_audio, tasks)),
                                            lm=soc["lm"] if set(tasks) & set(LM_TASKS) else None),
                  "tasks": task_specs},
        "data": {"tokenizer": soc["tokenizer"], "steps_per_epoch": 3, "num_workers": 0, "shuffle_buffer": 20, "seed": 0},
    }


def write_recipe(recipe: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def write_tar(path: Path, samples: list[dict[str, bytes]]) -> Path:
    """A tar shard with one member per entry: ``{"__key__": "k0", "json": b"..."}`` -> ``k0.json``."""
    import io
    import tarfile

    with tarfile.open(path, "w") as tar:
        for sample in samples:
            for ext, data in sample.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path
