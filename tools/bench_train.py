"""Benchmark: mmlit's training step against a plain PyTorch loop on the same model, data, batch size, precision
and optimizer.

    python tools/bench_train.py                    # CPU preset: ViT-tiny at 64 px + small text transformer, Sort-of-CLEVR
    python tools/bench_train.py --preset gpu       # CLIP ViT-B/16 at 224 px + 12x512 text transformer, bf16, eager and compiled
    python tools/bench_train.py --preset gpu --dry-run   # builds everything at tiny sizes, 2 steps per case (runs on a CPU)
    python tools/bench_train.py --preset vlm       # a vision-language model's align and LoRA stages (tools/bench_vlm.py)

The tasks are ``contrastive`` + ``captioning`` on one source (recipes/coca.yaml's pair: same shards, same batch
size), the objective static weights of 1 (the plain loop sums the two losses), the optimizer ``torch.optim.AdamW``.
Samples are examples of all tasks (two tasks of batch 32 make 64 per step), as ``train/samples_per_sec`` counts
them. Every case times from the end of its last warm-up step to the end of its last measured step (CUDA synchronised
at both ends), so loader start-up, compilation and Lightning's set-up are outside the window.

* ``a  plain loop, loader``: a ``torch.utils.data.DataLoader`` over an IterableDataset of the benchmark's own (tar
  reading with ``mmlit.data.iter_samples``, ``decode_sample``, a shuffle buffer, the tasks' own ``prepare`` and
  ``collate``; the two tasks' equal image tensors made one with ``mmlit.data.stream._share_equal``, as mmlit's
  ``SourceStream`` does), the same ``data.num_workers`` and ``prefetch_factor``; the step is
  ``task(backbone, batch)["loss"]`` per task inside ``backbone.shared_pass()`` (the backbone's own mechanism, so both
  paths encode each image once), autocast for ``bf16-mixed``, ``loss.backward(); opt.step(); opt.zero_grad()``.
* ``b  mmlit fit, loader``: ``mmlit fit`` in a subprocess on a recipe with the same model, data and optimizer; a
  ``StepTimer`` callback of this file (``trainer.callbacks``, imported with tools/ on ``PYTHONPATH``) times the steps.
  Target: >= 0.95x the plain loop (b/a).
* ``c  in memory``: both on prepared batches already on the device (a list cycled): the plain loop, and
  ``MultiTaskModule`` fitted by a ``lightning.Trainer`` on a DataLoader over that list (same logging interval as b).
  Target: mmlit >= 0.98x the plain loop.
* ``d  shared pass``: ``MultiTaskModule`` in memory with the two tasks' batches holding one image tensor (c's run)
  against the image tensor cloned for captioning (encoded twice); the ratio is of step times.
  Target: shared <= 0.6x separate (which assumes the image encoder dominates the step).
* ``e  statistics``: with gradient statistics on (the default), c's module again with them off, and their share of
  the training time from step times within each run (``statistics_share``), which the machine's drift between runs
  does not move as it moves the ratios. Target: <= 2%.

The GPU preset runs every case eagerly and with ``model.compile: {}`` (the plain loop compiles the same blocks with
``mmlit.compile.compile_modules``). Shards, the tokenizer and run folders go to ``--out`` (reused when present).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import itertools
import json
import logging
import os
import random
from statistics import median
import subprocess
import sys
import time
import warnings
from contextlib import nullcontext
from functools import partial
from multiprocessing import Pool
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
import webdataset as wds
import yaml
from tokenizers import Tokenizer
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mmlit.compile import Compile, compile_modules
from mmlit.data import decode_sample, iter_samples
from mmlit.data.stream import _share_equal
from mmlit.data.tools import iter_texts
from mmlit.module import MultiTaskModule
from mmlit.data.transforms import ImageTransform
from mmlit.data.collate import batch_size_of
from mmlit.tasks.base import Shards
from mmlit.text import train_tokenizer

REPO = Path(__file__).resolve().parents[1]
TASKS = ("contrastive", "captioning")
TASK_CLASSES = {"contrastive": "mmlit.tasks.Contrastive", "captioning": "mmlit.tasks.Captioning"}
LR, WEIGHT_DECAY = 1e-3, 0.01
LOG_EVERY = 10  # recipes/coca.yaml's trainer.log_every_n_steps; mmlit logs gradient statistics at these steps
GRADIENT_STATISTICS = True  # model.gradient_statistics (--no-gradient-statistics: the plain loop computes none)


@dataclasses.dataclass
class Preset:
    image_size: int
    model_name: str
    model_kwargs: dict
    dim: int
    text_depth: int
    heads: int
    vocab_size: int  # the text encoder's; the tokenizer gets at most this many tokens
    max_length: int
    batch_size: int
    precision: str
    warmup: int
    steps: int
    workers: int
    data: str  # "soc": Sort-of-CLEVR PNGs; "photos": JPEG photos (WIDTHxHEIGHT in photo_size)
    photo_size: tuple[int, int] = (500, 375)
    compile: bool = False  # also every case with model.compile: {}
    task_args: dict = dataclasses.field(default_factory=dict)

    @property
    def images(self) -> int:
        return (self.warmup + self.steps) * self.batch_size


# Both loops prepare the same pixels: no augmentation (the plain loop prepares outside a training sample), the
# shorter side resized and the centre cropped; the captions are the generators' json.caption.
_SAME = {"caption_field": "json.caption", "transform": {"augment": False, "crop_pct": 1.0}}
PRESETS = {
    "cpu": Preset(image_size=64, model_name="vit_tiny_patch16_224", model_kwargs={"img_size": 64, "patch_size": 8},
                  dim=128, text_depth=2, heads=4, vocab_size=256, max_length=40, batch_size=32, precision="32-true",
                  warmup=5, steps=30, workers=1, data="soc",
                  task_args={"contrastive": {"embed_dim": 128, **_SAME}, "captioning": {"depth": 2, "heads": 4, **_SAME}}),
    "gpu": Preset(image_size=224, model_name="vit_base_patch16_224", model_kwargs={}, dim=512, text_depth=12, heads=8,
                  vocab_size=1024, max_length=77, batch_size=256, precision="bf16-mixed", warmup=10, steps=30,
                  workers=12, data="photos", compile=True,
                  task_args={"contrastive": {"embed_dim": 512, **_SAME}, "captioning": {"depth": 2, "heads": 8, **_SAME}}),
}


def _dry(preset: Preset) -> Preset:
    """Tiny sizes, 2 steps a case (1 warm-up, 1 measured): the whole benchmark builds and runs on a CPU."""
    return dataclasses.replace(
        preset, image_size=32, model_kwargs={"img_size": 32, "patch_size": 8, "depth": 2}, dim=32, text_depth=1,
        heads=2, max_length=40, batch_size=4, warmup=1, steps=1, workers=1, photo_size=(100, 75),
        task_args={"contrastive": {"embed_dim": 32, **_SAME}, "captioning": {"depth": 1, "heads": 2, **_SAME}})


# ---------------------------------------------------------------------------------------------------------- data

_WORDS = ("a the red blue green small large dog cat car tree house person road sky water boat bird street city "
          "field sitting standing next to on under near with of and in front behind old young white black").split()


def _photo_sample(args: tuple[int, int, int]) -> dict:
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_loader import _photo  # tools/bench_loader.py: a JPEG that compresses like a photograph

    i, width, height = args
    rng = np.random.default_rng(i)
    words = random.Random(i).choices(_WORDS, k=random.Random(i).randint(6, 18))
    return {"__key__": f"img{i:07d}", "jpg": _photo(rng, width, height),
            "json": json.dumps({"caption": " ".join(words)}).encode()}


def _write_photos(out: Path, images: int, shards: int, size: tuple[int, int]) -> list[str]:
    """JPEG shards of photo-like images with a random caption each (``json.caption``); the JPEGs made in parallel."""
    out.mkdir(parents=True, exist_ok=True)
    with Pool(min(os.cpu_count() or 1, 16)) as pool, \
            wds.ShardWriter(str(out / "train-%06d.tar"), maxcount=-(-images // shards), verbose=0) as sink:
        for sample in pool.imap(_photo_sample, [(i, *size) for i in range(images)], chunksize=16):
            sink.write(sample)
    return sorted(str(p) for p in out.glob("train-*.tar"))


def make_data(preset: Preset, out: Path) -> tuple[list[str], str]:
    """The train shards and a tokenizer, made once in ``out``."""
    shards = sorted(str(p) for p in out.glob("train-*.tar"))
    tokenizer = out / "tokenizer.json"
    if not shards or not tokenizer.exists():
        if preset.data == "soc":
            from mmlit.data.sort_of_clevr import write_dataset

            shards = write_dataset(out, {"train": preset.images}, seed=0, shard_size=-(-preset.images // 8))["train"]
        else:
            shards = _write_photos(out, preset.images, 8, preset.photo_size)
        train_tokenizer(iter_texts(shards), tokenizer, vocab_size=min(preset.vocab_size, 1000))
    return shards, str(tokenizer)


class PlainStream(IterableDataset):
    """Batches ``{task: batch}`` from tar shards: read, decode, shuffle buffer, each task's ``prepare`` and
    ``collate``; endless (shards reshuffled each pass), the shards split over the DataLoader's workers."""

    def __init__(self, urls: list[str], tasks: dict, tokenizer: str, batch_size: int, buffer: int, seed: int = 0):
        self.urls, self.tasks, self.tokenizer, self.batch_size, self.buffer, self.seed = \
            urls, tasks, tokenizer, batch_size, buffer, seed
        self.fields = tuple({f for task in tasks.values() for f in task.data.fields})

    def _samples(self, rng: random.Random):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        urls = self.urls[worker::workers] or self.urls
        while True:
            rng.shuffle(urls)
            for url in urls:
                for raw in iter_samples(url):
                    yield decode_sample(raw, self.fields)

    def __iter__(self):
        tokenizer = Tokenizer.from_file(self.tokenizer)
        rng = random.Random(self.seed + (get_worker_info().id if get_worker_info() else 0))
        buffer, chosen = [], []
        for sample in self._samples(rng):
            buffer.append(sample)
            if len(buffer) < self.buffer:
                continue
            chosen.append(buffer.pop(rng.randrange(len(buffer))))
            if len(chosen) == self.batch_size:
                yield _share_equal({name: task.data.collate([e for s in chosen for e in task.data.prepare(s, tokenizer)])
                                    for name, task in self.tasks.items()})
                chosen = []


# ---------------------------------------------------------------------------------------------------------- model

def backbone_spec(preset: Preset) -> dict:
    return {"class_path": "mmlit.models.Backbone", "init_args": {"encoders": {
        "image": {"class_path": "mmlit.models.TimmImageEncoder", "init_args": {
            "model_name": preset.model_name, "dim": preset.dim, "image_size": preset.image_size,
            "model_kwargs": preset.model_kwargs}},
        "text": {"class_path": "mmlit.models.TransformerTextEncoder", "init_args": {
            "vocab_size": preset.vocab_size, "dim": preset.dim, "depth": preset.text_depth, "heads": preset.heads,
            "max_length": preset.max_length}}}}}


def task_specs(preset: Preset, shards: str) -> dict:
    return {name: {"class_path": TASK_CLASSES[name],
                   "init_args": {"shards": {"train": shards}, "batch_size": preset.batch_size, **preset.task_args[name]}}
            for name in TASKS}


def _build(spec):
    """A ``{class_path, init_args}`` spec (nested ones too) -> the object, as the recipe would build it."""
    if isinstance(spec, dict) and "class_path" in spec:
        module, name = spec["class_path"].rsplit(".", 1)
        args = {k: _build(v) for k, v in spec.get("init_args", {}).items()}
        if "shards" in args:
            args["shards"] = Shards(**args["shards"])
        if "transform" in args:
            args["transform"] = ImageTransform(**args["transform"])
        return getattr(importlib.import_module(module), name)(**args)
    if isinstance(spec, dict) and all(isinstance(v, dict) and "class_path" in v for v in spec.values()) and spec:
        return {k: _build(v) for k, v in spec.items()}  # (the backbone's encoders by modality)
    return spec


def build_model(preset: Preset, shards: str) -> tuple[nn.Module, dict]:
    """The backbone and built task heads (seeded alike for every case)."""
    pl.seed_everything(0, verbose=False)
    backbone = _build(backbone_spec(preset))
    tasks = {name: _build(spec) for name, spec in task_specs(preset, shards).items()}
    for name, task in tasks.items():
        task.name = name
        task.build(backbone)
    return backbone, tasks


def _compile(backbone, tasks: dict) -> None:
    parts = [*backbone.encoders.values(), *filter(None, [backbone.fusion])]
    heads = [c for t in tasks.values() for c in t.children() if any(True for _ in c.parameters())]
    compile_modules(parts, heads, Compile())


def _adamw(params):
    return torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)


def _to_device(step: dict, device: torch.device) -> dict:
    """A step's batches on ``device``, a tensor that several tasks hold moved once (as mmlit moves it)."""
    moved = {}

    def move(t):
        if id(t) not in moved:
            moved[id(t)] = (t, t.to(device, non_blocking=True))
        return moved[id(t)][1]

    return {name: {k: move(v) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            for name, batch in step.items()}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _samples(step: dict) -> int:
    return sum(batch_size_of(b) for b in step.values())


# ---------------------------------------------------------------------------------------------------------- cases

def plain_loop(preset: Preset, device: torch.device, steps_iter, backbone, tasks: dict, compiled: bool) -> dict:
    """The plain PyTorch loop over ``steps_iter`` (step dicts): seconds and examples of the measured steps."""
    model = nn.ModuleDict({"backbone": backbone, "tasks": nn.ModuleDict(tasks)}).to(device).train()
    if compiled:
        _compile(backbone, tasks)
    opt = _adamw(model.parameters())
    autocast = (partial(torch.autocast, device.type, dtype=torch.bfloat16) if preset.precision == "bf16-mixed"
                else nullcontext)
    start, samples = None, 0
    for i, step in enumerate(itertools.islice(steps_iter, preset.warmup + preset.steps)):
        step = _to_device(step, device)
        with autocast(), backbone.shared_pass():
            loss = sum(tasks[name](backbone, batch)["loss"] for name, batch in step.items())
        loss.backward()
        opt.step()
        opt.zero_grad()
        if i >= preset.warmup:
            samples += _samples(step)
        if i + 1 == preset.warmup:
            _sync(device)
            start = time.perf_counter()
    _sync(device)
    return {"seconds": time.perf_counter() - start, "samples": samples, "steps": preset.steps}


class StepTimer(pl.Callback):
    """Times the steps after ``warmup`` (from the end of step ``warmup`` to the end of step ``warmup + steps``) and
    writes ``{"seconds", "samples", "steps", "logging", "others"}`` to ``out`` as JSON: the last two are the seconds
    of each measured logging step (``trainer.log_every_n_steps``, where mmlit measures gradient statistics) and of
    each other step, from one step's end to the next's (CUDA synchronised at each on a GPU)."""

    def __init__(self, out: str, warmup: int, steps: int):
        self.out, self.warmup, self.steps = out, warmup, steps
        self._start, self._samples, self._last = None, 0, None
        self._logging: list[float] = []
        self._others: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        step = trainer.global_step  # steps done, this one included
        measured = self.warmup < step <= self.warmup + self.steps
        if measured:
            self._samples += _samples(batch)
        if step >= self.warmup:
            _sync(pl_module.device)
            now = time.perf_counter()
            if measured:
                every = trainer.log_every_n_steps
                (self._logging if every > 0 and step % every == 0 else self._others).append(now - self._last)
            self._last = now
        if step == self.warmup:
            self._start = self._last
        elif step == self.warmup + self.steps:
            result = {"seconds": self._last - self._start, "samples": self._samples, "steps": self.steps,
                      "logging": self._logging, "others": self._others}
            Path(self.out).write_text(json.dumps(result))


def mmlit_fit(preset: Preset, device: torch.device, shards: list[str], tokenizer: str, root: Path, compiled: bool) -> dict:
    """``mmlit fit`` in a subprocess on the benchmark's recipe, timed by ``StepTimer``."""
    root.mkdir(parents=True, exist_ok=True)
    timing = root / "timing.json"
    timing.unlink(missing_ok=True)
    total = preset.warmup + preset.steps
    recipe = {
        "seed_everything": 0,
        "trainer": {"accelerator": device.type, "devices": 1, "precision": preset.precision, "max_steps": total,
                    "max_epochs": -1, "log_every_n_steps": LOG_EVERY, "default_root_dir": str(root),
                    "enable_progress_bar": False, "enable_model_summary": False,
                    "logger": [{"class_path": "lightning.pytorch.loggers.CSVLogger",
                                "init_args": {"save_dir": str(root), "name": "csv"}}],
                    "callbacks": [{"class_path": "bench_train.StepTimer",
                                   "init_args": {"out": str(timing), "warmup": preset.warmup, "steps": preset.steps}}]},
        "model": {"backbone": backbone_spec(preset), "tasks": task_specs(preset, _brace(shards)),
                  "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": LR, "weight_decay": WEIGHT_DECAY}},
                  "gradient_statistics": GRADIENT_STATISTICS, **({"compile": {}} if compiled else {})},
        "data": {"tokenizer": tokenizer, "steps_per_epoch": total, "num_workers": preset.workers,
                 "shuffle_buffer": 4 * preset.batch_size, "seed": 0},
    }
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), str(REPO),
                                                          os.environ.get("PYTHONPATH", "")]),
           "WANDB_MODE": "offline", "TOKENIZERS_PARALLELISM": "false"}
    run = subprocess.run([sys.executable, "-c", "import sys; from mmlit.cli import main; sys.exit(main(sys.argv[1:]))",
                          "fit", "--config", str(path)], cwd=REPO, env=env, capture_output=True, text=True)
    if run.returncode != 0 or not timing.exists():
        raise RuntimeError(f"mmlit fit failed ({run.returncode}):\n{run.stdout[-3000:]}\n{run.stderr[-5000:]}")
    return json.loads(timing.read_text())


def _brace(shards: list[str]) -> str:
    """The shard list as one brace pattern (train-000000.tar ... train-000007.tar -> train-{000000..000007}.tar)."""
    first, last = Path(shards[0]), Path(shards[-1])
    a, b = first.stem.split("-")[-1], last.stem.split("-")[-1]
    return str(first.parent / f"{first.stem[:-len(a)]}{{{a}..{b}}}.tar") if len(shards) > 1 else shards[0]


def mmlit_in_memory(preset: Preset, device: torch.device, steps: list[dict], backbone, tasks: dict, root: Path,
                    compiled: bool, statistics: bool | None = None) -> dict:
    """``MultiTaskModule`` fitted by a ``lightning.Trainer`` on a DataLoader over ``steps`` (already on the device),
    with gradient statistics as ``statistics`` says (default: ``GRADIENT_STATISTICS``)."""
    statistics = GRADIENT_STATISTICS if statistics is None else statistics
    module = MultiTaskModule(backbone, tasks, optimizer=_adamw, compile=Compile() if compiled else None,
                             gradient_statistics=statistics)
    timing = root / "timing.json"
    root.mkdir(parents=True, exist_ok=True)
    timing.unlink(missing_ok=True)
    total = preset.warmup + preset.steps
    trainer = pl.Trainer(accelerator=device.type, devices=1, precision=preset.precision, max_steps=total,
                         log_every_n_steps=LOG_EVERY, default_root_dir=str(root),
                         logger=pl.loggers.CSVLogger(str(root), name="csv"), enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
                         callbacks=[StepTimer(str(timing), preset.warmup, preset.steps)])
    data = [steps[i % len(steps)] for i in range(total)]
    trainer.fit(module, DataLoader(data, batch_size=None, shuffle=False, collate_fn=lambda b: b))
    return json.loads(timing.read_text())


def prepared_steps(preset: Preset, shards: list[str], tokenizer: str, tasks: dict, device: torch.device,
                   count: int = 8) -> list[dict]:
    """``count`` step dicts read once (in this process), their image tensor shared by the two tasks, on the device."""
    stream = PlainStream(shards, tasks, tokenizer, preset.batch_size, buffer=1)
    steps = [_to_device(s, device) for s in itertools.islice(iter(stream), count)]
    assert all(s["contrastive"]["image"] is s["captioning"]["image"] for s in steps)
    return steps


def separate(steps: list[dict]) -> list[dict]:
    """The same steps with captioning's image tensor a clone: the backbone encodes the images once per task."""
    return [{**s, "captioning": {**s["captioning"], "image": s["captioning"]["image"].clone()}} for s in steps]


# ---------------------------------------------------------------------------------------------------------- main

def run(preset: Preset, out: Path, device: torch.device, variants: list[bool]) -> list[tuple]:
    shards, tokenizer = make_data(preset, out)
    rows = []
    for compiled in variants:
        tag = " (compiled)" if compiled else ""
        rate = lambda r: r["samples"] / r["seconds"]  # noqa: E731
        step_s = lambda r: r["seconds"] / r["steps"]  # noqa: E731

        backbone, tasks = build_model(preset, _brace(shards))
        loader = DataLoader(PlainStream(shards, tasks, tokenizer, preset.batch_size, 4 * preset.batch_size),
                            batch_size=None, num_workers=preset.workers, prefetch_factor=4 if preset.workers else None,
                            persistent_workers=preset.workers > 0)
        a = plain_loop(preset, device, iter(loader), backbone, tasks, compiled)
        del loader
        print(f"a{tag}: {rate(a):.1f} samples/s", flush=True)
        b = mmlit_fit(preset, device, shards, tokenizer, out / f"run_fit{'_compiled' if compiled else ''}", compiled)
        print(f"b{tag}: {rate(b):.1f} samples/s", flush=True)

        backbone, tasks = build_model(preset, _brace(shards))
        steps = prepared_steps(preset, shards, tokenizer, tasks, device)
        c_plain = plain_loop(preset, device, itertools.cycle(steps), backbone, tasks, compiled)
        print(f"c plain{tag}: {rate(c_plain):.1f} samples/s", flush=True)
        backbone, tasks = build_model(preset, _brace(shards))
        c_mmlit = mmlit_in_memory(preset, device, steps, backbone, tasks, out / "run_memory_shared", compiled)
        print(f"c mmlit{tag}: {rate(c_mmlit):.1f} samples/s", flush=True)
        backbone, tasks = build_model(preset, _brace(shards))
        d_sep = mmlit_in_memory(preset, device, separate(steps), backbone, tasks, out / "run_memory_separate", compiled)
        print(f"d separate{tag}: {step_s(d_sep) * 1e3:.0f} ms/step", flush=True)
        if GRADIENT_STATISTICS:
            backbone, tasks = build_model(preset, _brace(shards))
            e_off = mmlit_in_memory(preset, device, steps, backbone, tasks, out / "run_memory_no_statistics", compiled,
                                    statistics=False)
            print(f"e statistics off{tag}: {rate(e_off):.1f} samples/s", flush=True)

        rows += [
            (f"a  plain loop, DataLoader{tag}", f"{rate(a):.1f}", "", ""),
            (f"b  mmlit fit (CLI){tag}", f"{rate(b):.1f}", f"{rate(b) / rate(a):.3f} (b/a)", ">= 0.95"),
            (f"c  plain loop, in memory{tag}", f"{rate(c_plain):.1f}", "", ""),
            (f"c  mmlit module, in memory{tag}", f"{rate(c_mmlit):.1f}", f"{rate(c_mmlit) / rate(c_plain):.3f} (mmlit/plain)",
             ">= 0.98"),
            (f"d  shared pass, in memory{tag}", f"{rate(c_mmlit):.1f}", f"{step_s(c_mmlit) * 1e3:.0f} ms/step", ""),
            (f"d  separate passes, in memory{tag}", f"{rate(d_sep):.1f}", f"{step_s(d_sep) * 1e3:.0f} ms/step", ""),
            (f"d  shared / separate step time{tag}", "", f"{step_s(c_mmlit) / step_s(d_sep):.3f}", "<= 0.6"),
        ]
        if GRADIENT_STATISTICS:
            rows += [
                (f"e  mmlit module, statistics off{tag}", f"{rate(e_off):.1f}",
                 f"{rate(e_off) / rate(c_plain):.3f} (mmlit/plain)", ""),
                (f"e  statistics' share of step time{tag}", "", f"{statistics_share(c_mmlit, e_off):.4f}", "<= 0.02"),
            ]
    return rows


def statistics_share(on: dict, off: dict) -> float:
    """What gradient statistics add to the training time, from step times within each run (so that the machine's
    drift between runs cancels): a logging step's excess over the median other step with statistics on, less that
    excess with them off (logging itself), over a logging interval of median steps."""
    excess = lambda r: median(r["logging"]) - median(r["others"])  # noqa: E731
    return (excess(on) - excess(off)) / (LOG_EVERY * median(on["others"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted([*PRESETS, "vlm"]), default="cpu")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes, 2 steps a case: checks that it all runs")
    parser.add_argument("--out", type=Path, help="shards, tokenizer and run folders (default data/bench_train/PRESET)")
    parser.add_argument("--steps", type=int, help="measured steps per case (default: the preset's)")
    parser.add_argument("--warmup", type=int, help="warm-up steps per case, not measured (default: the preset's)")
    parser.add_argument("--no-compile", action="store_true", help="GPU preset: eager only")
    parser.add_argument("--no-gradient-statistics", action="store_true",
                        help="model.gradient_statistics: false (no task gradients measured at logging steps; no case e)")
    args = parser.parse_args()
    if args.preset == "vlm":  # its own model, data and cases: tools/bench_vlm.py
        from bench_vlm import main as bench_vlm

        if args.dry_run:
            raise SystemExit("--preset vlm has no --dry-run: run `python tools/bench_vlm.py --steps 2 --warmup 1`")
        return bench_vlm([*(["--out", str(args.out)] if args.out else []),
                          *(["--steps", str(args.steps)] if args.steps is not None else []),
                          *(["--warmup", str(args.warmup)] if args.warmup is not None else [])])
    global GRADIENT_STATISTICS
    GRADIENT_STATISTICS = not args.no_gradient_statistics
    preset = _dry(PRESETS[args.preset]) if args.dry_run else PRESETS[args.preset]
    preset = dataclasses.replace(preset, steps=args.steps or preset.steps, warmup=args.warmup or preset.warmup)
    out = args.out or REPO / "data" / "bench_train" / (args.preset + ("_dry" if args.dry_run else ""))
    device = torch.device("cuda" if args.preset == "gpu" and torch.cuda.is_available() else "cpu")
    if args.preset == "gpu" and device.type == "cpu" and not args.dry_run:
        parser.error("--preset gpu needs a CUDA device (use --dry-run to check it on a CPU)")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # the in-memory Trainers' banners
    warnings.filterwarnings("ignore", module="lightning")
    variants = [False, True] if preset.compile and not args.no_compile else [False]

    began = time.perf_counter()
    print(f"preset {args.preset}{' (dry run)' if args.dry_run else ''}: {preset.model_name} at {preset.image_size} px, "
          f"dim {preset.dim}, text depth {preset.text_depth}, batch {preset.batch_size} per task, {preset.precision}, "
          f"{preset.warmup} warm-up + {preset.steps} measured steps, {preset.workers} worker(s), {device}", flush=True)
    rows = run(preset, out, device, variants)
    head = ("case", "samples/s", "ratio", "target")
    widths = [max(len(str(r[i])) for r in (head, *rows)) for i in range(4)]
    print()
    for row in (head, *rows):
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip())
    print(f"\nsamples = examples of both tasks; whole benchmark {time.perf_counter() - began:.0f} s")


if __name__ == "__main__":
    main()
