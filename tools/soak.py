"""Soak test: a 2-rank CPU training run for a set time under injected faults, checked against a clean run.

    python tools/soak.py --minutes 10

The run (2 gloo ranks x 1 DataLoader worker, VQA + image classification on Sort-of-CLEVR, a checkpoint every
``--checkpoint-every`` steps, W&B offline) reads its training shards through an index from an HTTP server on
loopback, and meets:

* data faults, in both runs: one sample with unreadable image bytes, one shard whose second half is random bytes
  (each skipped sample is counted and logged to ``data_faults/rank{r}.jsonl``);
* a dropped HTTP connection every ``--drop-every`` seconds (the server announces a whole shard, sends part of it and
  closes the socket; the reader continues from where it was cut);
* SIGKILL of the whole job after a random number of steps around ``--kill-every``, then a restart with
  ``--ckpt_path auto``; every third start is killed while a checkpoint is half written (each write pauses 0.5 s
  in its middle);
* once every ``--nan-every`` starts, a NaN loss on rank 1: every rank stops with the error, the next start resumes;
* at the end, SIGUSR1 to rank 0 (a preemption): every rank checkpoints the same step and the job ends.

Then a clean run (local shards, no faults but the data's own) trains to the same step, and the soak prints the
steps done, the faults injected and survived, the samples skipped, the samples lost (trained by the clean run and
not by the soaked one, or trained twice: must be 0) and whether the final weights are equal, bit for bit, on both
ranks. Exit status 0 only when nothing was lost and the weights are equal.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import shutil
import signal
import sys
import tarfile
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import yaml  # noqa: E402

from mmlit.data import write_index  # noqa: E402
from mmlit.data.sort_of_clevr import write_dataset  # noqa: E402
from mmlit.data.tools import iter_texts  # noqa: E402
from mmlit.text import train_tokenizer  # noqa: E402
from tests._ddp_helpers import read_keys, read_steps  # noqa: E402
from tests._processes import after_lines, cli_env, lines_in, run_until  # noqa: E402
from tests._stores import HTTPStore  # noqa: E402
from tests.conftest import tiny_recipe  # noqa: E402

SHARDS, PER_SHARD = 20, 12


def _data(root: Path) -> dict:
    """Sort-of-CLEVR with 20 training shards and their index, one sample in shard 5 made unreadable and the second half of
    shard 11 overwritten with random bytes after it was indexed."""
    shards = write_dataset(root, {"train": SHARDS * PER_SHARD, "val": 12}, seed=0, shard_size=PER_SHARD)
    tokenizer = root / "tokenizer.json"
    train_tokenizer(iter_texts(shards["train"]), tokenizer, vocab_size=200)
    corrupt = Path(shards["train"][5])
    with tarfile.open(corrupt) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(corrupt, "w") as tar:
        broken = next(m.name for m, _ in members if m.name.endswith(".png"))
        for member, data in members:
            data = b"\x89PNG but not an image" if member.name == broken else data
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    write_index(shards["train"], str(root / "train.json"), progress=False)
    cut = Path(shards["train"][11])  # after indexing, its size kept (a changed size is a stale index: an error)
    data = cut.read_bytes()
    cut.write_bytes(data[: len(data) // 2] + random.Random(0).randbytes(len(data) - len(data) // 2))
    return {"shards": shards, "tokenizer": str(tokenizer), "index": str(root / "train.json"),
            "val": shards["val"][0], "train": str(root / "train.json")}


def _recipe(data: dict, train: str, root: Path, args, trigger: Path, slow_writes: bool = False) -> Path:
    soc = {**data, "train": train, "test": data["val"]}
    recipe = tiny_recipe(soc, root, tasks=["vqa", "image_classification"], devices=2, max_epochs=-1,
                         max_steps=args.max_steps, limit_val_batches=0, num_sanity_val_steps=0,
                         strategy="ddp_find_unused_parameters_true")
    recipe["trainer"]["logger"] = recipe["trainer"]["logger"][:1]  # W&B (offline), continued by every start
    recipe["data"].update(num_workers=1, steps_per_epoch=20, error_budget=0.1,
                          mixture={"class_path": "mmlit.data.Temperature", "init_args": {"temperature": 2.0}})
    task = recipe["model"]["tasks"]["image_classification"]
    task["class_path"] = "tests._ddp_helpers.NaNOnce"
    task["init_args"].update(trigger=str(trigger), rank=1, transform={"auto_augment": "rand-m9-mstd0.5"})
    recipe["checkpoint"] = {"every_n_train_steps": args.checkpoint_every}
    if slow_writes:  # each checkpoint pauses half-written, so that some kills land in a write
        recipe["trainer"]["plugins"] = [{"class_path": "tests._ddp_helpers.SlowCheckpointIO", "init_args": {
            "marker": str(root / "writing"), "pause": 0.5, "first_only": False}}]
    recipe["trainer"]["callbacks"] = [
        {"class_path": "tests._ddp_helpers.RecordKeys", "init_args": {"dirpath": str(root / "keys")}},
        {"class_path": "tests._ddp_helpers.DumpWeights", "init_args": {"dirpath": str(root / "weights")}}]
    path = root / "recipe.yaml"
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _command(recipe: Path) -> list[str]:
    return [sys.executable, "-m", "mmlit.cli", "fit", "--config", str(recipe), "--ckpt_path", "auto"]


class _Dropper(threading.Thread):
    """Arms one dropped connection on a random training shard every ``every`` seconds while the soak runs."""

    def __init__(self, store: HTTPStore, shards: list[str], every: float, rng: random.Random):
        super().__init__(daemon=True)
        self.store, self.shards, self.every, self.rng = store, shards, every, rng
        self.armed, self.stop = 0, threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.every):
            shard = self.rng.choice(self.shards)
            self.store.drop_after(shard, self.rng.randrange(512, 8192))
            self.armed += 1

    def pending(self) -> int:
        return sum(len(queue) for queue in self.store._faults.values())


def _soak(data: dict, root: Path, args, rng: random.Random, log) -> dict:
    served = root / "served"
    served.mkdir(parents=True)
    for path in [*data["shards"]["train"], data["index"]]:
        shutil.copy(path, served)
    trigger = root / "nan-trigger"
    faults = Counter()
    with HTTPStore(served) as store:
        recipe = _recipe(data, store.url + "/train.json", root / "run", args, trigger, slow_writes=True)
        checkpoints = root / "run" / "checkpoints"
        keys = root / "run" / "keys" / "rank0.jsonl"
        dropper = _Dropper(store, [Path(p).name for p in data["shards"]["train"]], args.drop_every, rng)
        dropper.start()
        deadline, starts = time.monotonic() + 60 * args.minutes, 0

        def trained() -> int:  # steps trained by rank 0, counting the ones trained again after a resume
            return lines_in(keys)

        def after(steps: int, delay: float = 0.0):
            return after_lines(keys, steps, delay)

        def nan_after(steps: int):
            """Never interrupts: arms the NaN trigger once this start trained ``steps`` steps (the run then stops)."""
            due = after(steps)

            def arm() -> bool:
                if due() and not trigger.exists() and not armed:
                    trigger.write_text("nan")
                    armed.append(True)
                return False
            armed: list = []
            return arm

        while True:
            starts += 1
            last = time.monotonic() >= deadline
            nan = not last and starts % args.nan_every == 0
            if last:  # a preemption: SIGUSR1 to rank 0's process only, some steps in
                interrupt, sig = after(max(1, args.kill_every // 2)), signal.SIGUSR1
            elif nan:
                interrupt, sig = nan_after(rng.randrange(1, args.kill_every)), signal.SIGKILL
            elif starts % 3 == 0:  # in the middle of a checkpoint write
                due = after(max(1, round(args.kill_every * rng.uniform(0.5, 1.5))))
                interrupt, sig = (lambda: due() and any(checkpoints.glob(".*.partial"))), signal.SIGKILL
            else:
                interrupt = after(max(1, round(args.kill_every * rng.uniform(0.5, 1.5))), rng.uniform(0, 2))
                sig = signal.SIGKILL
            result = run_until(_command(recipe), interrupt, sig=sig, timeout=args.timeout, env=cli_env(ddp=True))
            output, kind = result.stdout + result.stderr, None
            if last:
                if result.returncode != 0 or "preempted: checkpoint" not in output:
                    raise SystemExit(f"the preempted start failed ({result.returncode}):\n{output[-4000:]}")
                kind = "preemption (SIGUSR1 to rank 0)"
            elif result.returncode == -signal.SIGKILL:
                kind = "SIGKILL of the job"
                if list(checkpoints.glob(".*.partial")):
                    faults["  of which during a checkpoint write"] += 1
            elif nan and result.returncode != 0 and "non-finite loss" in output:
                kind = "NaN loss on rank 1"
            else:
                raise SystemExit(f"start {starts} ended with {result.returncode}:\n{output[-4000:]}")
            faults[kind] += 1
            log(f"start {starts}: {kind}; {trained()} steps trained so far, "
                f"{dropper.armed - dropper.pending()} connections dropped")
            if last:
                break
        dropper.stop.set()
        dropped = dropper.armed - dropper.pending()
    faults["dropped HTTP connection"] = dropped
    step = torch.load(root / "run" / "checkpoints" / "preempted.ckpt", weights_only=True)["global_step"]
    return {"faults": faults, "starts": starts, "step": step, "trained": trained()}


def _skipped(run: Path) -> tuple[int, int]:
    """Distinct training samples skipped, and the lines logging them (a sample is logged again when a resumed run
    reads it again)."""
    lines = [json.loads(line) for path in (run / "data_faults").glob("rank*.jsonl")
             for line in path.read_text().splitlines()]
    lines = [r for r in lines if r["split"] == "train"]
    return len({(r["task"], Path(r.get("url", "")).name, r.get("key"), r.get("index")) for r in lines}), len(lines)


def _schedule(run: Path, rank: int, steps: int) -> list[dict]:
    """The steps ``0 .. steps - 1`` as this rank last trained them (a resumed run trains some steps again; a start
    that ended without a checkpoint may have trained past ``steps``)."""
    return [record for record in read_steps(run / "keys", rank) if record["step"] < steps]


def _samples(schedule: list[dict]) -> Counter:
    return Counter((task, key) for step in schedule for task, keys in step["keys"].items() for key in keys)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10, help="how long the faulted run goes on being killed")
    parser.add_argument("--kill-every", type=int, default=40, help="steps between kills, on average")
    parser.add_argument("--nan-every", type=int, default=4, help="every n-th start gets a NaN loss on rank 1")
    parser.add_argument("--drop-every", type=float, default=5.0, help="seconds between dropped HTTP connections")
    parser.add_argument("--checkpoint-every", type=int, default=10, help="steps between checkpoints")
    parser.add_argument("--max-steps", type=int, default=100_000, help="the run's max_steps (it is preempted first)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per start before it counts as hung")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    began = time.monotonic()

    def log(message: str) -> None:
        print(f"[{(time.monotonic() - began) / 60:5.1f} min] {message}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or Path(tmp)
        data = _data(root / "data")
        soaked = _soak(data, root / "soak", args, rng, log)
        log(f"soak done at step {soaked['step']}; the clean run trains to the same step")
        args.max_steps = soaked["step"]
        clean_recipe = _recipe(data, data["index"], root / "clean", args, root / "clean" / "never")
        clean = run_until(_command(clean_recipe), None, timeout=max(args.timeout, 60 * args.minutes),
                          env=cli_env(ddp=True))
        if clean.returncode != 0:
            raise SystemExit(f"the clean run failed:\n{(clean.stdout + clean.stderr)[-4000:]}")
        soak_run, clean_run = root / "soak" / "run", root / "clean"
        equal, same_order, lost, twice, step = True, True, 0, 0, soaked["step"]
        for rank in range(2):  # (BatchNorm's running statistics differ between ranks: each rank is compared alone)
            a = torch.load(clean_run / "weights" / f"rank{rank}.pt", weights_only=True)
            b = torch.load(soak_run / "weights" / f"rank{rank}.pt", weights_only=True)
            equal &= a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
            expected, got = _schedule(clean_run, rank, step), _schedule(soak_run, rank, step)
            same_order &= expected == got
            lost += sum((_samples(expected) - _samples(got)).values())
            twice += sum((_samples(got) - _samples(expected)).values())
        skipped, skip_lines = _skipped(soak_run)
        clean_skipped, _ = _skipped(clean_run)
        runs = {p.name.rsplit("-", 1)[1] for p in (soak_run / "wandb").glob("offline-run-*")}
        rows = [("minutes (soak, then clean run)", f"{(time.monotonic() - began) / 60:.1f}"),
                ("steps done", f"{soaked['step']} (trained {soaked['trained']} on rank 0, counting repeats "
                               f"after a resume; {len(read_keys(clean_run / 'keys', 0))} in the clean run)"),
                ("process starts", str(soaked["starts"]))]
        order = ["SIGKILL of the job", "  of which during a checkpoint write", "NaN loss on rank 1",
                 "dropped HTTP connection", "preemption (SIGUSR1 to rank 0)"]
        rows += [(f"fault: {name}", f"{soaked['faults'][name]} injected, {soaked['faults'][name]} survived")
                 for name in order]
        rows += [("fault: unreadable sample, garbled shard", "in the data: skipped by both runs"),
                 ("samples skipped (counted, logged)", f"{skipped} distinct ({skip_lines} log lines; clean run "
                                                       f"{clean_skipped})"),
                 ("samples lost", str(lost)),
                 ("samples trained twice", str(twice)),
                 ("same samples, same order as the clean run", "yes" if same_order else "NO"),
                 ("W&B runs (offline) of the soaked run", f"{len(runs)} run id over {soaked['starts']} starts"),
                 ("final weights == clean run", "yes, bit for bit on both ranks" if equal else "NO")]
        width = max(len(name) for name, _ in rows)
        print("\n" + "\n".join(f"{name:<{width}}  {value}" for name, value in rows))
        return 0 if equal and same_order and lost == 0 and twice == 0 and len(runs) == 1 else 1


if __name__ == "__main__":
    raise SystemExit(main())
