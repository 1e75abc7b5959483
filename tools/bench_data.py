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

* **memory**: peak RSS per reader and bytes read until its first 3 batches (one process, batch 64, ``shuffle_buffer``
  1,000) on shards of 10,000 JPEGs (``--big-shards``, the photos above repeated), started at 0% and 95% of an epoch,
  each in a fresh process; with ``--baseline REF`` also for the mmlit of git revision ``REF`` (a worktree under
  ``--out``). Target: within 2x of 1,000 samples' bytes, and flat in the position.
* **workers**: the child processes (DataLoader workers, fork server, resource tracker) of a 60-step ``mmlit fit`` of
  ``recipes/quickstart.yaml`` (5 tasks, validation twice) at most at once, and their RSS together; with
  ``--baseline REF`` also for the mmlit of ``REF`` (per-task loaders before the one pool).

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
    stream.start_batch = int(fraction * stream.batches_per_epoch)
    _, batch, _ = next(iter(stream))
    return stream.start_batch, stream.batches_per_epoch, stream.source.bytes_read, batch


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


_READER = r"""
import json, sys, time
import torch
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[1])
import bench_loader
from mmlit.data import TaskStream, scan_shards
from mmlit.tasks.base import Shards
fraction, urls = float(sys.argv[2]), sys.argv[3:]
index = scan_shards(urls, "k")
stream = TaskStream(bench_loader._CropTask(Shards()), index, None, batch_size=64, train=True, seed=0,
                    shuffle_buffer=1000)
epoch = stream.batches_per_epoch if hasattr(stream, "batches_per_epoch") else stream.reader_batches(0)
stream.start_batch = int(fraction * epoch)
def status(field):
    return next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith(field + ":"))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak RSS (VmHWM) starts again from the current RSS
before, start = status("VmRSS"), time.perf_counter()
batches = iter(stream)
for _ in range(3):
    next(batches)
print(json.dumps({"rss": status("VmHWM") - before, "read": stream.source.bytes_read,
                  "seconds": time.perf_counter() - start}))
"""


def _big_shards(out: Path, urls: list[str], shards: int, per_shard: int) -> list[str]:
    """``shards`` tars of ``per_shard`` samples each, the JPEGs of ``urls`` repeated (new keys)."""
    folder = out / f"big-{shards}x{per_shard}"
    paths = [folder / f"big-{i:03d}.tar" for i in range(shards)]
    if all(p.exists() for p in paths):
        return [str(p) for p in paths]
    folder.mkdir(parents=True, exist_ok=True)
    photos = [s for url in urls for s in iter_samples(url)]
    _log(f"writing {shards} shards of {per_shard} JPEGs in {folder}")
    for i, path in enumerate(paths):
        with wds.TarWriter(str(path)) as sink:
            for n in range(per_shard):
                photo = photos[(i * per_shard + n) % len(photos)]
                sink.write({"__key__": f"s{i:03d}_{n:05d}", "jpg": photo["jpg"], "cls": photo["cls"]})
    return [str(p) for p in paths]


def _reader_run(root: Path, urls: list[str], fraction: float) -> dict:
    import subprocess

    env = {**os.environ, "PYTHONPATH": str(root)}
    result = subprocess.run([sys.executable, "-c", _READER, str(root / "tools"), str(fraction), *urls], env=env,
                            cwd=root, capture_output=True, text=True, check=False)  # (cwd: `-c` imports from it first)
    if result.returncode != 0:
        raise RuntimeError(f"the reader of {root} failed: {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _worktree(out: Path, ref: str) -> Path:
    import subprocess

    repo = Path(__file__).resolve().parents[1]
    commit = subprocess.run(["git", "rev-parse", ref], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()
    folder = out / f"baseline-{commit[:10]}"
    if not folder.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(folder), commit], cwd=repo, check=True,
                       capture_output=True)
    return folder


def bench_memory(out: Path, urls: list[str], shards: int, baseline: str | None) -> list[tuple[str, str, str, str]]:
    big = _big_shards(out, urls, shards, 10_000)
    for url in big:  # warm the page cache
        Path(url).read_bytes()
    sample = sum(os.path.getsize(u) for u in big) / (shards * 10_000)
    bound = 2 * 1000 * sample
    roots = [("mmlit", Path(__file__).resolve().parents[1])]
    if baseline:
        roots.append((f"baseline {baseline}", _worktree(out, baseline)))
    rows = []
    for name, root in roots:
        results = {}
        for fraction in (0.0, 0.95):
            _log(f"memory: {name} at {fraction:.0%}")
            runs = [_reader_run(root, big, fraction) for _ in range(REPEATS)]
            results[fraction] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        at0, at95 = results[0.0], results[0.95]
        rows.append(("memory", f"{name}: one reader, {shards} shards of 10,000 JPEGs ({sample / 1e3:.0f} kB a sample), "
                               f"shuffle_buffer 1000, first 3 batches of 64, at 0% / 95%",
                     f"+{at0['rss'] / 2**20:.0f} / +{at95['rss'] / 2**20:.0f} MiB RSS, {at0['read'] / 1e6:.1f} / "
                     f"{at95['read'] / 1e6:.1f} MB read, {at0['seconds']:.2f} / {at95['seconds']:.2f} s",
                     f"RSS within 2x of 1,000 samples ({bound / 2**20:.0f} MiB): "
                     f"{_met(max(at0['rss'], at95['rss']) <= bound)}" if name == "mmlit" else ""))
    return rows


def _fit_processes(root: Path, run: Path, steps: int) -> dict:
    """``mmlit fit`` of the quickstart recipe for ``steps`` steps with the mmlit of ``root`` (the embedded data in
    this checkout's ``data/``): the most child processes alive at once, their most RSS together, and the seconds."""
    import subprocess

    import psutil

    repo = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", "mmlit.cli", "fit", "--config", str(repo / "recipes" / "quickstart.yaml"),
               f"--trainer.max_steps={steps}", "--trainer.logger=false", f"--trainer.default_root_dir={run}",
               "--trainer.limit_val_batches=4", f"--trainer.val_check_interval={steps // 2}"]
    start = time.perf_counter()
    if not (root / "data").exists():  # (a baseline worktree reads this checkout's embedded data)
        (root / "data").symlink_to(repo / "data")
    # cwd: `python -m` imports from it first
    process = subprocess.Popen(command, cwd=root, env={**os.environ, "PYTHONPATH": str(root), "WANDB_MODE": "offline"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    most, rss = 0, 0
    parent = psutil.Process(process.pid)
    while process.poll() is None:
        try:
            children = parent.children(recursive=True)
            most = max(most, len(children))
            rss = max(rss, sum(c.memory_info().rss for c in children))
        except psutil.Error:
            pass
        time.sleep(0.2)
    if process.returncode != 0:
        raise RuntimeError(f"the fit of {root} failed: {process.stderr.read()[-2000:]}")
    return {"processes": most, "rss": rss, "seconds": time.perf_counter() - start}


def bench_workers(out: Path, baseline: str | None, steps: int = 60) -> list[tuple[str, str, str, str]]:
    """Worker processes of a quickstart fit (5 tasks, data.num_workers 2), training and validation."""
    if not (Path(__file__).resolve().parents[1] / "data" / "sort_of_clevr" / "train-000000.tar").exists():
        raise SystemExit("workers: make the embedded data first: mmlit data sort-of-clevr --out data/sort_of_clevr")
    roots = [("mmlit", Path(__file__).resolve().parents[1])]
    if baseline:
        roots.append((f"baseline {baseline}", _worktree(out, baseline)))
    rows = []
    for name, root in roots:
        _log(f"workers: a {steps}-step quickstart fit with {name}")
        result = _fit_processes(root, out / f"fit-{name.split()[0]}", steps)
        rows.append(("workers", f"{name}: quickstart recipe (5 tasks, data.num_workers 2), {steps} steps with "
                                f"validation, one rank",
                     f"{result['processes']} child processes at most (workers, fork server, resource tracker), "
                     f"{result['rss'] / 2**20:.0f} MiB RSS together, fit {result['seconds']:.0f} s", ""))
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
    parser.add_argument("--skip", nargs="+", choices=["setup", "resume", "loader", "memory", "workers"], default=[],
                        help="parts not to run")
    parser.add_argument("--big-shards", type=int, default=2, help="memory: shards of 10,000 samples")
    parser.add_argument("--baseline", help="memory: also measure the mmlit of this git revision (e.g. a commit)")
    args = parser.parse_args()
    if any(w < 1 for w in args.workers):
        parser.error("--workers: at least 1 (the rate is per worker process)")
    start, rows = time.perf_counter(), []
    if "setup" not in args.skip:
        rows += bench_setup(args.out, sorted(args.shards))
    if not {"resume", "loader", "memory"} <= set(args.skip):
        urls = _jpeg_shards(args.out, args.images)
        sizes = [len(s["jpg"]) for s in iter_samples(urls[0])]
        _log(f"{len(urls)} JPEG shards, {sum(sizes) / len(sizes) / 1e3:.0f} kB an image on average")
        if "resume" not in args.skip:
            rows += bench_resume(urls)
        if "loader" not in args.skip:
            rows += bench_loader_rates(urls, args.workers, args.batches)
        if "memory" not in args.skip:
            rows += bench_memory(args.out, urls, args.big_shards, args.baseline)
    if "workers" not in args.skip:
        rows += bench_workers(args.out, args.baseline)
    print(_table(rows, args.markdown))
    _log(f"done in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
