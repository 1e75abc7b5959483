"""Benchmark: mmlit's vision-language model step (task ``vlm``) against a plain transformers + PyTorch loop on the
same model and batches, in the projector-only stage (``align``) and with LoRA adapters (``finetune`` + ``lora``).

    python tools/bench_train.py --preset vlm     # (or python tools/bench_vlm.py) a 4-layer Llama of width 256 (CPU)
    python tools/bench_vlm.py --size smollm2-135m   # SmolLM2-135M's shape (30 layers, width 576), random weights

Every case runs in its own process (so that its peak memory is its own) on the same prepared batches (Sort-of-CLEVR
images and questions, read once and kept in memory): ``mmlit``: ``MultiTaskModule`` fitted by a ``lightning.Trainer``;
``plain``: the image encoder, the projector, the image tokens spliced into the prompt embeddings
(``mmlit.tasks.vlm.splice``, a pure tensor operation), ``AutoModelForCausalLM(inputs_embeds=..., labels=...)``,
``loss.backward(); opt.step(); opt.zero_grad()`` with ``torch.optim.AdamW`` over the parameters that train. Times run
from the end of the warm-up steps to the end of the last step; peak memory is the process's peak resident set on the
CPU (``max_memory_allocated`` on a GPU).
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SIZES = {"cpu": dict(hidden=256, layers=4, heads=4), "smollm2-135m": dict(hidden=576, layers=30, heads=9)}
STAGES = {"align": {}, "lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}}


def _prepare(out: Path, size: str) -> tuple[Path, list[str]]:
    from mmlit.data import resolve_shards
    from mmlit.data.sort_of_clevr import write_dataset
    from mmlit.data.tiny_lm import save_tiny_lm
    from mmlit.data.tools import iter_texts

    data = out / "data"
    if not (data / "train-000000.tar").exists():
        write_dataset(data, {"train": 64}, seed=0, shard_size=64)
    shards = resolve_shards(str(data / "train-000000.tar"), "--out")
    lm = out / f"lm-{size}"
    if not (lm / "config.json").exists():
        save_tiny_lm(lm, iter_texts(shards), steps=0, **SIZES[size])
    return lm, shards


def _build(lm: Path, stage: str, shards: list[str], batch_size: int):
    from mmlit.data.transforms import ImageTransform
    from mmlit.models import Backbone, HFCausalLM, TimmImageEncoder
    from mmlit.models.hf import LoRA
    from mmlit.tasks import VLM, Shards

    torch.manual_seed(0)
    text = HFCausalLM(str(lm), lora=LoRA(**STAGES[stage]) if STAGES[stage] else None)
    image = TimmImageEncoder("vit_tiny_patch16_224", dim=text.dim, image_size=64,
                             model_kwargs={"img_size": 64, "patch_size": 8})  # 8x8 tokens, 4x4 after the shuffle
    backbone = Backbone({"image": image, "text": text})
    task = VLM(Shards(train=shards[0]), batch_size=batch_size, stage="finetune" if STAGES[stage] else "align",
               projector="pixel_shuffle", transform=ImageTransform(augment=False, crop_pct=1.0))
    task.name = "vqa"
    task.build(backbone)
    return backbone, task


def _batches(task, shards: list[str], batch_size: int, count: int) -> list[dict]:
    from mmlit.data import TaskStream, scan_shards

    stream = TaskStream(task, scan_shards(shards, "--out"), None, batch_size=batch_size, train=True, seed=0,
                        shuffle_buffer=16)
    return [batch for _, batch, _ in itertools.islice(iter(stream), count)]


def _peak_mib(device: torch.device) -> float:
    from mmlit.callbacks import peak_memory_mib

    return peak_memory_mib(device)


def _plain(backbone, task, batches: list[dict], warmup: int, steps: int, device: torch.device) -> float:
    from mmlit.tasks.vlm import splice

    model = torch.nn.ModuleDict({"backbone": backbone, "task": task}).to(device).train()
    lm = backbone.encoders["text"].model  # the transformers model (in its LoRA wrapper with adapters)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.01)
    start = None
    for i, batch in enumerate(itertools.islice(itertools.cycle(batches), warmup + steps)):
        batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        images = backbone.encoders["image"](batch["image"]).tokens
        image = task.projector(images)[batch["image_index"]]
        embeds = lm.get_input_embeddings()(batch["input"])
        embeds, mask, labels = splice(embeds, batch["mask"], batch["slot"], image, batch["labels"])
        loss = lm(inputs_embeds=embeds, attention_mask=mask.long(), labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if i + 1 == warmup:
            _sync(device)
            start = time.perf_counter()
    _sync(device)
    return time.perf_counter() - start


def _mmlit(backbone, task, batches: list[dict], warmup: int, steps: int, device: torch.device, root: Path) -> float:
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from mmlit.module import MultiTaskModule

    times = {}

    class Timer(pl.Callback):
        def on_train_batch_end(self, trainer, *args) -> None:
            if trainer.global_step in (warmup, warmup + steps):
                _sync(device)
                times[trainer.global_step] = time.perf_counter()

    module = MultiTaskModule(backbone, {"vqa": task},
                             optimizer=lambda params: torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01))
    trainer = pl.Trainer(accelerator=device.type, devices=1, max_steps=warmup + steps, log_every_n_steps=50,
                         default_root_dir=str(root), logger=pl.loggers.CSVLogger(str(root), name="csv"),
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         use_distributed_sampler=False, callbacks=[Timer()])
    data = [{"vqa": batches[i % len(batches)]} for i in range(warmup + steps)]
    trainer.fit(module, DataLoader(data, batch_size=None, shuffle=False, collate_fn=lambda b: b))
    return times[warmup + steps] - times[warmup]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def case(args: argparse.Namespace) -> None:
    """One case in this process: prints {"seconds", "steps", "peak_mib"} as JSON."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    lm, shards = _prepare(args.out, args.size)
    backbone, task = _build(lm, args.stage, shards, args.batch_size)
    batches = _batches(task, shards, args.batch_size, 4)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    run = _plain if args.case == "plain" else lambda *a: _mmlit(*a, root=args.out / "run")
    seconds = run(backbone, task, batches, args.warmup, args.steps, device)
    print(json.dumps({"seconds": seconds, "steps": args.steps, "peak_mib": _peak_mib(device)}))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu")
    parser.add_argument("--out", type=Path, default=REPO / "data" / "bench_vlm")
    parser.add_argument("--batch-size", type=int, default=2, help="images per step (each brings its 20 questions)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--case", choices=("plain", "mmlit"), help=argparse.SUPPRESS)  # (one case, in a subprocess)
    parser.add_argument("--stage", choices=sorted(STAGES), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:
        return case(args)
    _prepare(args.out, args.size)
    rows = []
    for stage in STAGES:
        result = {}
        for which in ("plain", "mmlit"):
            command = [sys.executable, __file__, "--case", which, "--stage", stage, "--size", args.size,
                       "--out", str(args.out), "--batch-size", str(args.batch_size), "--steps", str(args.steps),
                       "--warmup", str(args.warmup)]
            run = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
            if run.returncode != 0:
                raise RuntimeError(f"{which} {stage} failed:\n{run.stderr[-4000:]}")
            result[which] = json.loads(run.stdout.strip().splitlines()[-1])
            print(f"{stage} {which}: {result[which]}", flush=True)
        ms = {k: 1e3 * v["seconds"] / v["steps"] for k, v in result.items()}
        rows.append((stage, f"{ms['plain']:.0f}", f"{ms['mmlit']:.0f}", f"{ms['plain'] / ms['mmlit']:.3f}",
                     f"{result['plain']['peak_mib']:.0f}", f"{result['mmlit']['peak_mib']:.0f}"))
    print("\n| stage | plain ms/step | mmlit ms/step | speed mmlit/plain | plain peak MiB | mmlit peak MiB |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
