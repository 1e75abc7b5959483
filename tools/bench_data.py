"""Benchmark: what mmlit's data layer costs at setup, at a resume and per loader worker.

    python tools/bench_data.py                      # all three parts, a plain-text table
    python tools/bench_data.py --markdown           # the same table in Markdown, for docs/benchmarks.md
    python tools/bench_data.py --skip loader --shards 100 1000

Measures, on shards it writes once under ``--out`` (and reuses on later runs):

* **setup**: ``plan_shards(spec, key)`` for 100, 1,000 and 10,000 small shards (10 samples of a small ``.json``
  each; ``--shards``), three ways: a brace pattern with an empty scan cache (``$MMLIT_CACHE`` a fresh folder: every
  shard's tar headers are read), the same pattern again (the counts come from that cache), and an index file
  written by ``write_index``; and ``MultiTaskDataModule.setup("fit")`` of a ``text_classification`` task on the
  largest index. The page cache is warm in every case. Target: under 2 s with an index at 10,000 shards.
* **resume**: seconds and bytes read from the shards until the first batch of a ``TaskStream`` (one reader, batch
  64, shuffle buffer 1000) that resumes at 0%, 50% and 95% of an epoch, on JPEG shards (``--images`` 500x375 photos,
  100 a shard) in the page cache, with one torch thread as in a DataLoader worker. Target: 95% within 2x of 0%.
* **loader**: samples/s per worker of mmlit's loader (``TaskStream`` + ``task_loader``, ``tools/bench_loader.py``'s
  ``pipeline``), of webdataset's own pipeline (``WebDataset().shuffle(1000).decode("pil").map(crop).batched(64)``
  in a ``DataLoader``) and of the plain PIL decode-and-crop loop, on the same JPEG shards, after 2 warm-up batches
  per worker, for each of ``--workers``. Targets: mmlit per worker at least 95% of the plain loop, and ahead of
  webdataset.

Each setup and resume number is the median of 3 runs; each loader rate the median of 3 rounds of ``--batches``
batches, each round with the plain loop measured right before, and each ratio the median of the rounds' ratios.
Progress goes to stderr, the table to stdout.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import random
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
import webdataset as wds

from mmlit.data import MultiTaskDataModule, TarSource, TaskStream, iter_samples, plan_shards, write_index
from mmlit.registry import get_task
from mmlit.tasks.base import Shards
from mmlit.text import train_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))  # also in the workers' sys.path (multiprocessing passes it)
import bench_loader  # noqa: E402  (tools/ is no package)

REPEATS = 3  # setup and resume numbers are the median of this many runs
SAMPLES_PER_SHARD = 10  # setup shards
IMAGES_PER_SHARD = 100  # JPEG shards
BATCH = 64


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _median_time(function: Callable[[], object]) -> tuple[float, object]:
    """The median seconds of ``REPEATS`` calls, and the last call's result."""
    times, result = [], None
    for _ in range(REPEATS):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def _quietly(function: Callable[[], object]) -> None:
    """Run ``function`` with file descriptor 1 on stderr: the tokenizers trainer writes progress lines to stdout
    (from Rust, past ``sys.stdout``), which would land in the table."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        function()
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _met(ok: bool) -> str:
    return "met" if ok else "MISSED"


# Setup -------------------------------------------------------------------------------------------------------------

def _write_tiny(path: Path, shard: int) -> None:
    """A shard of ``SAMPLES_PER_SHARD`` samples of one small ``.json`` (a text_classification item), as tests write."""
    tmp = path.with_suffix(".tmp")
    with tarfile.open(tmp, "w") as tar:
        for i in range(SAMPLES_PER_SHARD):
            data = json.dumps({"questions": [{"question": f"a b c {shard} {i}", "type": "shape"}]}).encode()
            info = tarfile.TarInfo(f"s{shard:06d}-{i:02d}.json")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, path)  # a run stopped half way leaves no half shard to reuse


def _tiny_shards(folder: Path, count: int) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"s-{i:06d}.tar" for i in range(count)]
    missing = [(i, p) for i, p in enumerate(paths) if not p.is_file()]
    if missing:
        _log(f"writing {len(missing)} setup shards in {folder}")
        for i, path in missing:
            _write_tiny(path, i)
    return [str(p) for p in paths]


def _plan_cold(spec: str) -> object:
    with tempfile.TemporaryDirectory(prefix="mmlit-cache-") as cache:
        os.environ["MMLIT_CACHE"] = cache
        return plan_shards(spec, "--shards")


def _datamodule_setup(index: str, tokenizer: str) -> MultiTaskDataModule:
    task = get_task("text_classification")(Shards(train=index), classes=["unused"], batch_size=BATCH)
    datamodule = MultiTaskDataModule(tokenizer, tasks={task.name: task}, num_workers=0)
    datamodule.setup("fit")
    return datamodule


def bench_setup(out: Path, sizes: list[int]) -> list[tuple[str, str, str, str]]:
    folder = out / "setup"
    urls = _tiny_shards(folder, max(sizes))
    rows, saved = [], os.environ.get("MMLIT_CACHE")
    try:
        for n in sizes:
            spec = str(folder / f"s-{{000000..{n - 1:06d}}}.tar")
            index = str(folder / f"index-{n}.json")
            write_index(urls[:n], index, progress=False)
            _log(f"setup: {n} shards")
            cold, plan = _median_time(lambda: _plan_cold(spec))
            assert plan.total == n * SAMPLES_PER_SHARD, plan.total
            with tempfile.TemporaryDirectory(prefix="mmlit-cache-") as cache:
                os.environ["MMLIT_CACHE"] = cache
                plan_shards(spec, "--shards")  # the first setup fills the cache
                cached, _ = _median_time(lambda: plan_shards(spec, "--shards"))
            indexed, plan = _median_time(lambda: plan_shards(index, "--shards"))
            assert plan.total == n * SAMPLES_PER_SHARD, plan.total
            name = f"plan_shards, {n:,} shards"
            rows += [("setup", f"{name}, no index, first (empty scan cache)", f"{cold:.3f} s", ""),
                     ("setup", f"{name}, no index, second (scan cache)", f"{cached:.3f} s", ""),
                     ("setup", f"{name}, index file", f"{indexed:.3f} s",
                      f"< 2 s: {_met(indexed < 2)}" if n == 10_000 else "")]
        n = max(sizes)
        tokenizer = str(out / "tokenizer.json")
        _quietly(lambda: train_tokenizer(["a b c"], tokenizer, vocab_size=50))
        _log(f"setup: MultiTaskDataModule.setup('fit'), {n} shards")
        seconds, datamodule = _median_time(lambda: _datamodule_setup(str(folder / f"index-{n}.json"), tokenizer))
        assert datamodule.epoch_samples["text_classification"] == n * SAMPLES_PER_SHARD
        rows.append(("setup", f"MultiTaskDataModule.setup('fit'), {n:,} shards, index file", f"{seconds:.3f} s", ""))
    finally:
        if saved is None:
            os.environ.pop("MMLIT_CACHE", None)
        else:
            os.environ["MMLIT_CACHE"] = saved
    return rows


# Resume ------------------------------------------------------------------------------------------------------------

def _jpeg_shards(out: Path, images: int) -> list[str]:
    shards = max(1, images // IMAGES_PER_SHARD)
    folder = out / f"jpeg-{images}x{shards}"
    urls = sorted(str(p) for p in folder.glob("bench-*.tar"))
    if not urls:
        _log(f"writing {images} JPEGs in {shards} shards in {folder}")
        urls = bench_loader.write_shards(folder, images, shards, 500, 375)
    return urls


def _first_batch(index, fraction: float) -> tuple[int, int, int, dict]:
    """The batch a stream resumed at ``fraction`` of an epoch starts at, the batches of its epoch, the bytes it read
    until its first batch, and that batch."""
    stream = TaskStream(bench_loader._CropTask(Shards()), index, None, batch_size=BATCH, train=True,
                        shuffle_buffer=1000, seed=0, source=TarSource())
    stream.start_batch = int(fraction * stream.reader_batches(0))
    _, batch, _ = next(iter(stream))
    return stream.start_batch, stream.reader_batches(0), stream.source.bytes_read, batch


def bench_resume(urls: list[str]) -> list[tuple[str, str, str, str]]:
    for url in urls:  # warm the page cache
        Path(url).read_bytes()
    index = plan_shards(_pattern(urls), "--images")
    rows, results = [], {}
    # One intra-op thread, as in a DataLoader worker: on a busy 2-core machine torch's default 2 threads made each
    # torch.stack of a batch take 0.5 s instead of 10 ms (its threads wait for a core another job holds).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for fraction in (0.0, 0.5, 0.95):
            _log(f"resume: at {fraction:.0%}")
            seconds, (start, batches, read, batch) = _median_time(lambda: _first_batch(index, fraction))
            assert len(batch["label"]) > 0
            results[fraction] = seconds, read
            rows.append(("resume", f"first batch at {fraction:.0%} (batch {start} of {batches}), page cache warm",
                         f"{seconds:.3f} s, {read / 1e6:.1f} MB read", ""))
    finally:
        torch.set_num_threads(threads)
    (t0, b0), (t95, b95) = results[0.0], results[0.95]
    rows.append(("resume", "95% against 0%", f"{t95 / t0:.2f}x time, {b95 / max(b0, 1):.2f}x bytes",
                 f"within 2x: {_met(t95 / t0 <= 2 and b95 <= 2 * b0)}"))
    return rows


def _pattern(urls: list[str]) -> str:
    """The brace pattern of ``write_shards``'s files (``bench-000000.tar`` ...)."""
    folder = Path(urls[0]).parent
    return str(folder / f"bench-{{000000..{len(urls) - 1:06d}}}.tar")


# Loader ------------------------------------------------------------------------------------------------------------

class _WdsCrop:
    """webdataset's map: the same crop as the mmlit task's (``bench_loader._crop``), a generator per worker."""

    def __init__(self):
        self.rng = random.Random(0)

    def __call__(self, sample: dict) -> dict:
        return {"image": bench_loader._crop(sample["jpg"], self.rng), "label": sample["cls"]}


def webdataset_pipeline(urls: list[str], workers: int, batches: int) -> float:
    """Samples/s of webdataset's own pipeline in a DataLoader, after 2 warm-up batches per worker."""
    dataset = (wds.WebDataset(urls, shardshuffle=False, empty_check=False).shuffle(1000).decode("pil")
               .map(_WdsCrop()).batched(BATCH).repeat())
    loader = iter(torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers))
    for _ in range(2 * max(workers, 1)):
        next(loader)
    start, samples = time.perf_counter(), 0
    for _ in range(batches):
        samples += len(next(loader)["label"])
    rate = samples / (time.perf_counter() - start)
    del loader
    gc.collect()  # its workers end before the next loader starts
    return rate


def bench_loader_rates(urls: list[str], workers: list[int], batches: int, rounds: int = 3) -> list[tuple[str, str, str, str]]:
    """Each rate is measured ``rounds`` times, the plain loop right before each pipeline run, and each ratio is the
    median of the rounds' ratios: the shared machine's speed drifts by 20% between minutes, which a plain loop
    measured once at the start would put into the ratio."""
    rows = []
    for w in workers:
        plain, ours, theirs = [], [], []
        for r in range(rounds):
            _log(f"loader: {w} worker(s), round {r + 1} of {rounds}: plain loop, webdataset, mmlit")
            plain.append(bench_loader.plain_loop(urls))
            theirs.append(webdataset_pipeline(urls, w, batches) / w)
            ours.append(bench_loader.pipeline(urls, w, batches) / w)
            gc.collect()
        to_plain = statistics.median(o / p for o, p in zip(ours, plain))
        to_theirs = statistics.median(o / t for o, t in zip(ours, theirs))
        theirs_to_plain = statistics.median(t / p for t, p in zip(theirs, plain))
        rows += [("loader", f"plain PIL decode + crop loop, 1 process (before the {w}-worker runs)",
                  f"{statistics.median(plain):.1f} samples/s (median of {rounds})", ""),
                 ("loader", f"mmlit TaskStream + task_loader, {w} worker(s), shuffle 256",
                  f"{statistics.median(ours):.1f} samples/s per worker ({to_plain:.0%} of plain, {to_theirs:.0%} of "
                  f"webdataset)",
                  f">= 95% of plain: {_met(to_plain >= 0.95)}; ahead of webdataset: {_met(to_theirs > 1)}"),
                 ("loader", f"webdataset pipeline, {w} worker(s), shuffle 1000",
                  f"{statistics.median(theirs):.1f} samples/s per worker ({theirs_to_plain:.0%} of plain)", "")]
    return rows


# Table -------------------------------------------------------------------------------------------------------------

def _table(rows: list[tuple[str, ...]], markdown: bool) -> str:
    header = ("part", "case", "measured", "target")
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda row: "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(tuple("-" * w for w in widths)), *map(line, rows)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/mmlit-bench-data"), help="where the shards are written")
    parser.add_argument("--shards", type=int, nargs="+", default=[100, 1000, 10_000], help="setup: numbers of shards")
    parser.add_argument("--images", type=int, default=4000, help="resume, loader: JPEGs (500x375, 100 a shard)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="loader: numbers of workers")
    parser.add_argument("--batches", type=int, default=40, help="loader: batches of 64 timed per run")
    parser.add_argument("--markdown", action="store_true", help="print the table in Markdown")
    parser.add_argument("--skip", nargs="+", choices=["setup", "resume", "loader"], default=[], help="parts not to run")
    args = parser.parse_args()
    if any(w < 1 for w in args.workers):
        parser.error("--workers: at least 1 (the rate is per worker process)")
    start, rows = time.perf_counter(), []
    if "setup" not in args.skip:
        rows += bench_setup(args.out, sorted(args.shards))
    if not {"resume", "loader"} <= set(args.skip):
        urls = _jpeg_shards(args.out, args.images)
        sizes = [len(s["jpg"]) for s in iter_samples(urls[0])]
        _log(f"{len(urls)} JPEG shards, {sum(sizes) / len(sizes) / 1e3:.0f} kB an image on average")
        if "resume" not in args.skip:
            rows += bench_resume(urls)
        if "loader" not in args.skip:
            rows += bench_loader_rates(urls, args.workers, args.batches)
    print(_table(rows, args.markdown))
    _log(f"done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
