"""Benchmark: time and memory of ``mmlit.dtw.soft_dtw``, forward and backward, with and without a band.

    python tools/bench_dtw.py                          # CPU, one thread, the table below
    python tools/bench_dtw.py --device cuda --repeats 5
    python tools/bench_dtw.py --lengths 128 512 --bands 8 32

For B = 8 pairs of lengths N and M = 0.7 N (float32 costs drawn uniformly from [0, 1), gamma = 0.1; drawn rather
than made by ``pairwise_cost``, whose temporaries would set the CPU's peak before the DTW runs) and each band
(``none``: every cell), measures ``soft_dtw(cost, band=band).sum().backward()`` on a cost matrix that is a leaf of
the graph, so the numbers are DTW's alone:

* **forward s / backward s**: medians of ``--repeats`` runs, after a warm-up run at N = 16.
* **R kept**: the bytes ``soft_dtw`` saves for its backward (its autograd node's saved tensors): R on the allowed
  cells, (B, N, W); beside it **cost** is the bytes of the (B, N, M) cost matrix, which the caller holds (and whose
  gradient the backward returns) with or without a band.
* **peak**: on CUDA the growth of ``torch.cuda.max_memory_allocated`` over what was allocated before the runs
  (the cost matrix); on CPU the growth of the process's peak RSS (``ru_maxrss``) over its RSS before the runs, so
  it counts pages rather than tensors and is coarse below a few MiB. Each row runs in a fresh process for it.

Progress goes to stderr, the table to stdout.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import psutil
import torch

from mmlit.dtw import soft_dtw

BATCH = 8
RATIO = 0.7  # M = 0.7 N
GAMMA = 0.1


def measure(length: int, band: int | None, device: str, repeats: int) -> dict:
    """One row of the table, in this process: a warm-up at N = 16 (code paths, allocator), then ``repeats`` runs."""
    torch.manual_seed(0)
    _run(torch.rand(BATCH, 16, 11, device=device, requires_grad=True), band, device)
    cost = torch.rand(BATCH, length, int(RATIO * length), device=device, requires_grad=True)
    rss_before = psutil.Process().memory_info().rss
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = [_run(cost, band, device) for _ in range(repeats)]
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before  # ru_maxrss: KiB on Linux
    if not torch.isfinite(cost.grad).all():  # after the peak: its temporaries are as large as the cost
        raise RuntimeError(f"N={length} band={band}: a gradient is not finite")
    return {"N": length, "M": cost.shape[2], "band": "none" if band is None else band,
            "forward_s": statistics.median(t[0] for t in times), "backward_s": statistics.median(t[1] for t in times),
            "kept_MiB": times[0][2] / 2**20, "cost_MiB": cost.numel() * cost.element_size() / 2**20,
            "peak_MiB": peak / 2**20}


def _run(cost: torch.Tensor, band: int | None, device: str) -> tuple[float, float, int]:
    """Seconds of one forward and one backward, and the bytes the forward saved for the backward."""
    cost.grad = None
    _sync(device)
    start = time.perf_counter()
    value = soft_dtw(cost, gamma=GAMMA, band=band)
    _sync(device)
    middle = time.perf_counter()
    kept = sum(t.numel() * t.element_size() for t in value.grad_fn.saved_tensors)
    value.sum().backward()
    _sync(device)
    end = time.perf_counter()
    if not torch.isfinite(value).all():
        raise RuntimeError(f"N={cost.shape[1]} band={band}: a value is not finite")
    return middle - start, end - middle, kept


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 1024, 2048])
    parser.add_argument("--bands", type=int, nargs="+", default=[32], help="bands besides 'none' (every cell)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads on the CPU")
    parser.add_argument("--one", nargs=2, metavar=("LENGTH", "BAND"), help=argparse.SUPPRESS)  # a child's row
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.one:
        length, band = int(args.one[0]), None if args.one[1] == "none" else int(args.one[1])
        print(json.dumps(measure(length, band, args.device, args.repeats)))
        return
    device = torch.cuda.get_device_name() if args.device == "cuda" else f"CPU, {args.threads} thread(s)"
    print(f"soft_dtw forward + backward, B={BATCH}, M={RATIO} N, float32, gamma={GAMMA}, {device}, torch "
          f"{torch.__version__}")
    print(f"{'N':>5} {'M':>5} {'band':>5} {'forward s':>10} {'backward s':>11} {'R kept MiB':>11} {'cost MiB':>9} "
          f"{'peak MiB':>9}", flush=True)
    for length in args.lengths:
        for band in ["none", *map(str, args.bands)]:
            print(f"N={length} band={band} ...", file=sys.stderr, flush=True)
            out = subprocess.run([sys.executable, __file__, "--one", str(length), band, "--device", args.device,
                                  "--repeats", str(args.repeats), "--threads", str(args.threads)],
                                 check=True, capture_output=True, text=True).stdout
            row = json.loads(out.splitlines()[-1])
            print(f"{row['N']:>5} {row['M']:>5} {row['band']:>5} {row['forward_s']:>10.3f} {row['backward_s']:>11.3f} "
                  f"{row['kept_MiB']:>11.2f} {row['cost_MiB']:>9.2f} {row['peak_MiB']:>9.1f}", flush=True)


if __name__ == "__main__":
    main()
