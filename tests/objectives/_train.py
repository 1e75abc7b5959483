"""A tiny module trained on fixed Sort-of-CLEVR batches, the same in one process and in a DDP run: the reference
runs for the objective tests. The image encoder has no batch norm (``test_convnext``) and nothing drops out, so a
batch split over ranks or micro-batches gives the gradient of the whole batch, up to float rounding."""

from __future__ import annotations

import itertools
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader
from tokenizers import Tokenizer

from mmlit.data import iter_samples
from mmlit.data.decode import decode_sample
from mmlit.data.stream import _share_equal
from mmlit.models import Backbone, CausalTextDecoder, CrossAttentionFusion, TimmImageEncoder, TransformerTextEncoder
from mmlit.module import MultiTaskModule
from mmlit.registry import get_objective
from mmlit.tasks.base import Shards

from .._soc import soc_task

TASKS = ("vqa", "image_classification")  # per-example mean losses over equal halves: halves average to the whole
IMAGES = 4  # per task and step; each half has 2
SETTINGS = {"dwa": {"period": 1}}  # so that DWA's weights change within the few steps of a test


def build_module(method: str, seed: int = 0, tasks=TASKS, **objective) -> MultiTaskModule:
    pl.seed_everything(seed, verbose=False)
    # (prefix_lm's decoder is the text encoder; 2 layers: its top is its last block)
    text, depth = (CausalTextDecoder, 2) if "prefix_lm" in tasks else (TransformerTextEncoder, 1)
    backbone = Backbone({"image": TimmImageEncoder("test_convnext", dim=32, image_size=75, feature_index=2),
                         "text": text(vocab_size=256, dim=32, depth=depth, heads=2, max_length=40)},
                        CrossAttentionFusion(dim=32, depth=1, heads=2))
    heads = {name: soc_task(name, Shards(train="unused")) for name in tasks}
    return MultiTaskModule(backbone, heads, get_objective(method)(**{**SETTINGS.get(method, {}), **objective}),
                           optimizer=lambda params: torch.optim.SGD(params, lr=0.05))


def step_batches(train_urls: list[str], tokenizer: str, steps: int, part: str | int, tasks=TASKS) -> list[dict]:
    """``steps`` batches ``{task: batch}``: the whole global batch (``part="whole"``) or half 0 / 1 of it."""
    module = build_module("static", tasks=tasks)
    tok = Tokenizer.from_file(tokenizer)
    samples = [decode_sample(s) for url in train_urls for s in iter_samples(url)]
    out = []
    for step in range(steps):
        batch = {}
        for name in tasks:
            task = module.tasks[name].data
            chosen = samples[step * IMAGES:(step + 1) * IMAGES]
            examples = [e for s in chosen for e in task.prepare(s, tok)]
            if part != "whole":
                examples = examples[part * IMAGES // 2:(part + 1) * IMAGES // 2]
            batch[name] = task.collate(examples)
        out.append(batch)
    return out


def shared(batches: list[dict]) -> list[dict]:
    """The same batches with the tasks' equal image tensors made one, as tasks reading one source get them
    (``SourceStream``): the backbone then encodes them once per step (its shared pass)."""
    out = [_share_equal({name: dict(batch) for name, batch in step.items()}) for step in batches]
    assert all(step["vqa"]["image"] is step["image_classification"]["image"] for step in out)
    return out


def interleave(first: list[dict], second: list[dict]) -> list[dict]:
    return list(itertools.chain.from_iterable(zip(first, second)))


def loader(batches: list[dict]) -> DataLoader:
    return DataLoader(batches, batch_size=None, shuffle=False, collate_fn=lambda b: b)


def trainer(root: Path, steps: int, **kwargs) -> pl.Trainer:
    options = dict(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root),
                   log_every_n_steps=1, use_distributed_sampler=False)
    return pl.Trainer(**{**options, **kwargs})


def weights(module: MultiTaskModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
