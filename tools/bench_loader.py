"""Benchmark: mmlit's loader alone against a plain PIL loop on the same JPEG images.

    python tools/bench_loader.py --images 2000 --workers 1 2 --rounds 3

Writes JPEG shards of realistic photos-sized images (500x375, about 60 kB: smooth colour fields with
grain, which JPEG compresses like a photo), then measures, in each round and for each number of workers,

* the plain loop: decode each JPEG with PIL from bytes already in memory, random-crop and resize it
  to 224x224, make a uint8 tensor, one process;
* the loader: the same per-image work as an mmlit task inside ``TaskStream`` + ``DataLoader``
  (tar reading, shuffle buffer, safe decoding, batching of 64, transfer to the main process):
  samples/s overall and per worker;

and prints the loader's rate per worker over the plain loop's (target: at least 95%), by wall clock and by CPU time
(the plain loop's CPU per sample over the workers'). On a machine whose cores other work shares, the wall-clock ratio
moves with that work; the CPU ratio says what the loader itself adds per sample.

    python tools/bench_loader.py --startup

measures what starting workers costs by each start method (``data.multiprocessing_context``): in a fresh process
per method, 5 task loaders of 2 workers started one after the other, as a 5-task run does, the seconds from
``iter()`` to the first batch (of 8 images) of each.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset

from mmlit.data import TaskStream, decode_sample, iter_samples, scan_shards
from mmlit.data.workers import task_loader
from mmlit.data import Shards, TaskData

CROP = 224


def _photo(rng: np.random.Generator, width: int, height: int) -> bytes:
    """A JPEG that compresses like a photograph: smooth colour fields, some edges and sensor grain."""
    field = rng.uniform(0, 255, (height // 25 + 1, width // 25 + 1, 3)).astype(np.uint8)
    image = np.asarray(Image.fromarray(field).resize((width, height), Image.BICUBIC), dtype=np.float32)
    image += rng.normal(0, 9, image.shape)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def _crop(image: Image.Image, rng: random.Random) -> torch.Tensor:
    """A random square crop of 50-100% of the short side, resized to 224, as a (3, 224, 224) uint8 tensor."""
    side = int(min(image.size) * rng.uniform(0.5, 1.0))
    left, top = rng.randrange(image.width - side + 1), rng.randrange(image.height - side + 1)
    image = image.convert("RGB").resize((CROP, CROP), Image.BILINEAR, box=(left, top, left + side, top + side))
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


class _CropTask(TaskData):
    """The benchmark's task's data side: the image, randomly cropped."""

    def __init__(self, shards: Shards, batch_size: int = 64):
        super().__init__(shards, batch_size)
        self.name, self._rng = "bench_crop", random.Random(0)

    def prepare(self, sample, tokenizer):
        yield {"image": _crop(sample["jpg"], self._rng), "label": sample["cls"]}


def write_shards(out: Path, images: int, shards: int, width: int, height: int) -> list[str]:
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    with wds.ShardWriter(str(out / "bench-%06d.tar"), maxcount=-(-images // shards), verbose=0) as sink:
        for i in range(images):
            sink.write({"__key__": f"img{i:07d}", "jpg": _photo(rng, width, height), "cls": str(i % 10).encode()})
    return sorted(str(p) for p in out.glob("bench-*.tar"))


class Rate(NamedTuple):
    """A measured rate: samples per second of wall-clock time, and CPU milliseconds per sample of the processes that
    did the work (the plain loop's process; the loader's workers, all their threads, or the main process without
    workers). On a shared machine the first moves with whatever else runs; the second much less."""

    samples_per_s: float
    cpu_ms: float


def plain_rate(urls: list[str]) -> Rate:
    """Decode + crop + tensor in one process, the bytes already in memory."""
    data = [s["jpg"] for url in urls for s in iter_samples(url)]
    rng = random.Random(0)
    start, cpu = time.perf_counter(), time.process_time()
    for raw in data:
        image = Image.open(io.BytesIO(raw))
        image.load()
        _crop(image, rng)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - start
    return Rate(len(data) / wall, cpu / len(data) * 1e3)


def plain_loop(urls: list[str]) -> float:
    """Samples per second of the plain loop."""
    return plain_rate(urls).samples_per_s


class _Clocked(IterableDataset):
    """The stream's items, each with the CPU seconds its process has used so far (all threads) and the process id."""

    def __init__(self, stream: TaskStream):
        self.stream = stream

    def __iter__(self):
        for item in self.stream:
            yield *item, (os.getpid(), time.process_time())


def pipeline_rate(urls: list[str], workers: int, batches: int) -> Rate:
    """TaskStream + DataLoader after the first batches (worker start-up, shuffle buffers): samples/s, and the CPU
    time per sample of the processes that made the batches."""
    stream = TaskStream(_CropTask(Shards()), scan_shards(urls, "--out"), None, batch_size=64, train=True,
                        shuffle_buffer=256)
    loader = iter(task_loader(_Clocked(stream), workers=workers, persistent=True, preload=["mmlit.tasks.base"]))
    first: dict[int, float] = {}
    for _ in range(2 * max(workers, 1)):
        *_, (pid, cpu) = next(loader)  # warm-up: workers start and fill their shuffle buffers
        first[pid] = cpu
    last, made = dict(first), dict.fromkeys(first, 0)
    start, samples = time.perf_counter(), 0
    for _ in range(batches):
        _, batch, _, (pid, cpu) = next(loader)
        samples += len(batch["label"])
        last[pid], made[pid] = cpu, made.get(pid, 0) + len(batch["label"])
    wall = time.perf_counter() - start
    # Each worker's CPU from its last warm-up batch to its last batch, over the samples it made in between.
    cpu = sum(last[pid] - first[pid] for pid in made if made[pid])
    return Rate(samples / wall, cpu / sum(made.values()) * 1e3)


def pipeline(urls: list[str], workers: int, batches: int) -> float:
    """Samples per second through TaskStream + DataLoader, after the first batches (worker start-up)."""
    return pipeline_rate(urls, workers, batches).samples_per_s


class _SideBySide(IterableDataset):
    """The stream's batches, each followed, in the same worker, by the plain loop on the same 64 images; each item
    carries the CPU seconds of both: the stream's and the rest of the worker's (its loop, the threads that send
    batches) since the previous item, and the plain loop's. Both meet the same machine at the same moments, in the
    same process."""

    def __init__(self, stream: TaskStream, urls: list[str]):
        self.stream, self.urls = stream, urls

    def __iter__(self):
        raw = {s["__key__"]: s["jpg"] for url in self.urls for s in iter_samples(url)}
        rng, batches, last = random.Random(0), iter(self.stream), time.process_time()
        while True:
            start = time.thread_time()
            name, batch, report = next(batches)
            loader = time.thread_time() - start
            start = time.thread_time()
            for key in batch["key"]:
                image = Image.open(io.BytesIO(raw[key]))
                image.load()
                _crop(image, rng)
            plain = time.thread_time() - start
            now = time.process_time()
            rest, last = now - last - loader - plain, now
            yield name, batch, report, (loader + rest, plain)


def side_by_side(urls: list[str], workers: int, batches: int) -> tuple[float, float]:
    """CPU ms per sample of the loader's workers (all their threads) and of the plain loop on the same images, run in
    turn in each worker (``_SideBySide``)."""
    stream = TaskStream(_CropTask(Shards()), scan_shards(urls, "--out"), None, batch_size=64, train=True,
                        shuffle_buffer=256)
    loader = iter(task_loader(_SideBySide(stream, urls), workers=workers, persistent=True,
                              preload=["mmlit.tasks.base"]))
    for _ in range(2 * max(workers, 1)):
        next(loader)  # warm-up: workers start and fill their shuffle buffers
    cpu, plain, samples = 0.0, 0.0, 0
    for _ in range(batches):
        _, batch, _, (batch_cpu, batch_plain) = next(loader)
        cpu, plain, samples = cpu + batch_cpu, plain + batch_plain, samples + len(batch["label"])
    return plain / samples * 1e3, cpu / samples * 1e3


def startup(urls: list[str], method: str, loaders: int, workers: int) -> list[float]:
    """Seconds from ``iter()`` to the first batch of each of ``loaders`` task loaders, started one after the other
    while the earlier ones keep their workers (as a training run keeps its task loaders)."""
    times, running = [], []
    for _ in range(loaders):
        stream = TaskStream(_CropTask(Shards()), scan_shards(urls, "--out"), None, batch_size=8, train=True,
                            shuffle_buffer=1)
        loader = task_loader(stream, workers=workers, start_method=method, persistent=True,
                             preload=["mmlit.tasks.base"])
        start = time.perf_counter()
        running.append(iter(loader))
        next(running[-1])
        times.append(time.perf_counter() - start)
    return times


def _startup_table(urls: list[str], loaders: int, workers: int, methods: list[str]) -> None:
    print(f"worker start-up: {loaders} task loaders x {workers} workers, seconds from iter() to the first batch")
    for method in methods:  # each in a fresh process: the fork server lives as long as it
        out = subprocess.run([sys.executable, __file__, "--startup-one", method, "--out", str(Path(urls[0]).parent),
                              "--loaders", str(loaders), "--workers", str(workers)],
                             capture_output=True, text=True, check=True).stdout
        times = json.loads(out.splitlines()[-1])
        print(f"  {method:10s}  first loader {times[0]:5.2f}, the others {min(times[1:]):5.2f}-{max(times[1:]):5.2f} "
              f"each, all {sum(times):5.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/bench_loader"))
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--size", default="500x375", help="WIDTHxHEIGHT of the generated images")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batches", type=int, default=40, help="batches of 64 timed per case")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of (plain loop, loader) per number of workers")
    parser.add_argument("--startup", action="store_true", help="measure worker start-up by start method instead")
    parser.add_argument("--loaders", type=int, default=5, help="--startup: task loaders started one after the other")
    parser.add_argument("--methods", nargs="+", choices=["fork", "forkserver", "spawn"],
                        default=["fork", "forkserver", "spawn"], help="--startup: the start methods to measure")
    parser.add_argument("--startup-one", choices=["fork", "forkserver", "spawn"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    width, height = map(int, args.size.split("x"))
    urls = sorted(str(p) for p in args.out.glob("bench-*.tar")) or write_shards(args.out, args.images, args.shards, width, height)
    if args.startup_one:
        print(json.dumps(startup(urls, args.startup_one, args.loaders, args.workers[-1])))
        return
    if args.startup:
        _startup_table(urls, args.loaders, args.workers[-1], args.methods)
        return
    sizes = [len(s["jpg"]) for s in iter_samples(urls[0])]
    print(f"{len(urls)} shards of {width}x{height} JPEGs, {np.mean(sizes) / 1e3:.0f} kB on average; "
          f"decoded: {decode_sample(next(iter_samples(urls[0])))['jpg'].size}; batches of 64, {args.batches} timed")
    print("per worker / plain: the loader's samples/s per worker over the plain loop's, one after the other (wall "
          "clock); by CPU: the plain loop's CPU ms per sample over the loader's, side by side in each worker "
          "(``_SideBySide``), which what else runs on the machine moves far less")
    print(f"{'round':>5}  {'workers':>7}  {'plain/s':>8}  {'loader/s':>9}  {'per worker':>10}  "
          f"{'per worker / plain':>18}  {'plain CPU ms':>12}  {'loader CPU ms':>13}  {'by CPU':>6}")
    ratios: dict[int, list[tuple[float, float]]] = {w: [] for w in args.workers}
    for round_ in range(args.rounds):
        for workers in args.workers:  # the plain loop just before each case: the machine's speed drifts
            plain = plain_rate(urls)
            rate = pipeline_rate(urls, workers, args.batches)
            plain_ms, worker_ms = side_by_side(urls, workers, args.batches)
            per = rate.samples_per_s / max(workers, 1)
            ratios[workers].append((per / plain.samples_per_s, plain_ms / worker_ms))
            print(f"{round_ + 1:>5}  {workers:>7}  {plain.samples_per_s:8.1f}  {rate.samples_per_s:9.1f}  {per:10.1f}  "
                  f"{ratios[workers][-1][0]:18.0%}  {plain_ms:12.3f}  {worker_ms:13.3f}  {ratios[workers][-1][1]:6.0%}")
    for workers, pairs in ratios.items():
        wall, cpu = (statistics.median(p[i] for p in pairs) for i in (0, 1))
        print(f"{workers} worker(s), median of {len(pairs)} rounds: per worker / plain loop {wall:.0%} by wall clock, "
              f"{cpu:.0%} by CPU time (target >= 95%)")


if __name__ == "__main__":
    main()
