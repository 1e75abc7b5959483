"""Stress test: DDP runs whose ranks start DataLoader workers for several tasks, repeated until they hang or not.

    python tools/stress_workers.py --runs 30

Each round runs two of the test suite's scenarios on 2 gloo ranks, each process killed with all it started if it
runs past ``--timeout`` seconds:

* ``resume``: 2 ranks x 2 workers, 2 tasks; a run killed twice (once while writing a checkpoint), preempted once and
  resumed must train on exactly the samples of the uninterrupted run and end with bit-identical weights
  (``tests/data/test_resume.py``);
* ``fit``: 3 tasks, 2 ranks x 2 workers, 2 epochs with validation (``tests/test_ddp.py``);
* ``fit-all`` (not by default): the same with every registered task, so more loaders start workers per rank.

It prints one line per run and, at the end, how many runs passed, failed and hung. A hung run's Python stacks
(with py-spy installed) go to ``--out``/hang-{round}-{scenario}.txt.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests import test_ddp  # noqa: E402
from tests._processes import ProcessTimeout  # noqa: E402
from tests.conftest import make_soc  # noqa: E402
from tests.data import test_resume  # noqa: E402


class _Folders:
    """``tmp_path_factory``'s ``mktemp`` under one folder."""

    def __init__(self, root: Path):
        self.root = root

    def mktemp(self, name: str) -> Path:
        return Path(tempfile.mkdtemp(prefix=name, dir=self.root))


def _resume(soc: dict, tmp: Path) -> None:
    test_resume.test_runs_killed_at_random_moments_resume_to_the_uninterrupted_weights(
        soc, tmp, _Folders(tmp), None, world=2, workers=2, store="local")


def _fit(soc: dict, tmp: Path) -> None:
    test_ddp.test_two_rank_fit_finishes_with_identical_weights(soc, tmp, ["vqa", "contrastive", "image_classification"], 2)


def _fit_all(soc: dict, tmp: Path) -> None:
    test_ddp.test_two_rank_fit_finishes_with_identical_weights(soc, tmp, None, 2)


SCENARIOS = {"resume": _resume, "fit": _fit, "fit-all": _fit_all}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30, help="rounds; each runs every chosen scenario once")
    parser.add_argument("--timeout", type=float, default=120, help="seconds per process (a fit takes about 10 s here)")
    parser.add_argument("--scenarios", nargs="+", choices=list(SCENARIOS), default=["resume", "fit"])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "stress_workers")
    args = parser.parse_args()
    test_resume.FIT_TIMEOUT = test_ddp.FIT_TIMEOUT = args.timeout
    args.out.mkdir(parents=True, exist_ok=True)
    counts = {name: {"passed": 0, "failed": 0, "hung": 0} for name in args.scenarios}
    with tempfile.TemporaryDirectory() as tmp:
        soc = make_soc(Path(tmp) / "soc")
        for round_ in range(args.runs):
            for name in args.scenarios:
                work = Path(tmp) / f"{round_}-{name}"
                work.mkdir()
                begin, outcome = time.perf_counter(), "passed"
                try:
                    SCENARIOS[name](soc, work)
                except ProcessTimeout as err:
                    outcome = "hung"
                    (args.out / f"hang-{round_}-{name}.txt").write_text(str(err))
                except Exception:  # an assertion or an error: counted apart from hangs, with its traceback
                    outcome = "failed"
                    (args.out / f"failure-{round_}-{name}.txt").write_text(traceback.format_exc())
                counts[name][outcome] += 1
                print(f"run {round_ + 1}/{args.runs} {name}: {outcome} in {time.perf_counter() - begin:.1f} s", flush=True)
    for name, count in counts.items():
        print(f"{name}: {args.runs} runs, {count['passed']} passed, {count['failed']} failed, {count['hung']} hung")
    total_hung = sum(c["hung"] for c in counts.values())
    print(f"hung: {total_hung} of {args.runs * len(args.scenarios)} runs")
    return 1 if total_hung or any(c["failed"] for c in counts.values()) else 0


if __name__ == "__main__":
    raise SystemExit(main())
