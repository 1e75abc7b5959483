"""Run under ``python -m torch.distributed.run --nproc_per_node 2``: every rank trains each method on its half of
the fixed global batches (gloo) and writes its weights, so the test can compare ranks with each other and with the
one-process run on the whole batches. ``*_inf`` runs put an infinite gradient into rank 1's backbone at step 1; ``*_absent`` runs leave
image_classification out of step 1."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import DDPStrategy

from tests.objectives._train import build_module, loader, step_batches, trainer, weights

STEPS = 3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--train", nargs="+", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--runs", nargs="+", required=True, help="method, method_inf (32-bit), method_fp16_inf or method_absent")
    args = parser.parse_args()
    rank = int(os.environ["RANK"])
    batches = step_batches(args.train, args.tokenizer, STEPS, part=rank)
    for run in args.runs:
        module = build_module(run.split("_")[0])
        steps = batches
        if run.endswith("_absent"):  # step 1 has vqa only
            steps = [batches[0], {"vqa": batches[1]["vqa"]}, *batches[2:]]
        if run.endswith("_inf"):
            param = next(module.backbone.parameters())
            param.register_hook(lambda g: g * float("inf") if module.global_step == 1 and rank == 1 else g)
        plugins = [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 8))] \
            if "_fp16" in run else []
        fit = trainer(Path(args.out) / run, STEPS, devices=2, strategy=DDPStrategy(process_group_backend="gloo"),
                      plugins=plugins)
        fit.fit(module, loader(steps))
        folder = Path(args.out) / run
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(weights(module), folder / f"rank{rank}.pt")
        scaler = getattr(fit.precision_plugin, "scaler", None)
        (folder / f"rank{rank}.json").write_text(json.dumps({
            "skipped_steps": module.skipped_steps, "global_step": fit.global_step,
            "scale": float(scaler.get_scale()) if scaler is not None else None}))


if __name__ == "__main__":
    main()
