"""Benchmark: mmlit's loader alone against a plain PIL loop on the same JPEG images.

    python tools/bench_loader.py --images 2000 --workers 1 2

Writes JPEG shards of realistic photos-sized images (500x375, about 60 kB: smooth colour fields with
grain, which JPEG compresses like a photo), then measures

* the plain loop: decode each JPEG with PIL from bytes already in memory, random-crop and resize it
  to 224x224, make a uint8 tensor, one process;
* the pipeline: the same per-image work as an mmlit task inside ``TaskStream`` + ``DataLoader``
  (tar reading, shuffle buffer, safe decoding, batching of 64, transfer to the main process), for
  each number of workers: samples/s overall and per worker.

The pipeline's per-worker rate should be within 10% of the plain loop's rate.

    python tools/bench_loader.py --startup

measures what starting workers costs by each start method (``data.multiprocessing_context``): in a fresh process
per method, 5 task loaders of 2 workers started one after the other, as a 5-task run does, the seconds from
``iter()`` to the first batch (of 8 images) of each.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image

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


def plain_loop(urls: list[str]) -> float:
    """Samples per second of decode + crop + tensor in one process, the bytes already in memory."""
    data = [s["jpg"] for url in urls for s in iter_samples(url)]
    rng = random.Random(0)
    start = time.perf_counter()
    for raw in data:
        image = Image.open(io.BytesIO(raw))
        image.load()
        _crop(image, rng)
    return len(data) / (time.perf_counter() - start)


def pipeline(urls: list[str], workers: int, batches: int) -> float:
    """Samples per second through TaskStream + DataLoader, after the first batches (worker start-up)."""
    stream = TaskStream(_CropTask(Shards()), scan_shards(urls, "--out"), None, batch_size=64, train=True,
                        shuffle_buffer=256)
    loader = iter(task_loader(stream, workers=workers, persistent=True, preload=["mmlit.tasks.base"]))
    for _ in range(2 * max(workers, 1)):
        next(loader)  # warm-up: workers start and fill their shuffle buffers
    start, samples = time.perf_counter(), 0
    for _ in range(batches):
        _, batch, _ = next(loader)
        samples += len(batch["label"])
    return samples / (time.perf_counter() - start)


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


def _startup_table(urls: list[str], loaders: int, workers: int) -> None:
    print(f"worker start-up: {loaders} task loaders x {workers} workers, seconds from iter() to the first batch")
    for method in ("fork", "forkserver", "spawn"):  # each in a fresh process: the fork server lives as long as it
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
    parser.add_argument("--batches", type=int, default=40, help="batches of 64 timed per run")
    parser.add_argument("--startup", action="store_true", help="measure worker start-up by start method instead")
    parser.add_argument("--loaders", type=int, default=5, help="--startup: task loaders started one after the other")
    parser.add_argument("--startup-one", choices=["fork", "forkserver", "spawn"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    width, height = map(int, args.size.split("x"))
    urls = sorted(str(p) for p in args.out.glob("bench-*.tar")) or write_shards(args.out, args.images, args.shards, width, height)
    if args.startup_one:
        print(json.dumps(startup(urls, args.startup_one, args.loaders, args.workers[-1])))
        return
    if args.startup:
        _startup_table(urls, args.loaders, args.workers[-1])
        return
    sizes = [len(s["jpg"]) for s in iter_samples(urls[0])]
    print(f"{len(urls)} shards of {width}x{height} JPEGs, {np.mean(sizes) / 1e3:.0f} kB on average; "
          f"decoded: {decode_sample(next(iter_samples(urls[0])))['jpg'].size}")
    plain = plain_loop(urls)
    print(f"plain PIL loop (1 process):          {plain:8.1f} samples/s")
    for workers in args.workers:
        rate = pipeline(urls, workers, args.batches)
        per = rate / max(workers, 1)
        print(f"mmlit loader, {workers} worker(s):           {rate:8.1f} samples/s, {per:8.1f} per worker "
              f"({per / plain:.0%} of the plain loop)")


if __name__ == "__main__":
    main()
