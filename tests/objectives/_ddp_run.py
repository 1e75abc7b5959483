"""Run under ``python -m torch.distributed.run --nproc_per_node 2``: every rank trains each method on its half of
the fixed global batches (gloo) and writes its weights, so the test can compare ranks with each other and with the
one-process run on the whole batches. ``*_inf`` runs put an infinite gradient into rank 1's backbone at step 1; ``*_absent`` runs leave
image_classification out of step 1; ``*_imageonly`` runs train image_classification alone (the text encoder and
the fusion get no gradient), and write the error, if any, instead of weights."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import DDPStrategy

from tests.objectives._train import TASKS, build_module, loader, shared, step_batches, trainer, weights

STEPS = 3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--train", nargs="+", required=True)
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--runs", nargs="+", required=True, help="method, then _inf (32-bit), _fp16_inf, _absent, _imageonly or _shared")
    args = parser.parse_args()
    rank = int(os.environ["RANK"])
    batches = step_batches(args.train, args.tokenizer, STEPS, part=rank)
    for run in args.runs:
        module = build_module(run.split("_")[0], tasks=("image_classification",) if run.endswith("_imageonly") else TASKS)
        steps = batches
        if run.endswith("_absent"):  # step 1 has vqa only
            steps = [batches[0], {"vqa": batches[1]["vqa"]}, *batches[2:]]
        if run.endswith("_shared"):  # one image tensor for both tasks: encoded once, both heads read it
            steps = shared(batches)
        if run.endswith("_imageonly"):  # the text encoder and the fusion get no gradient
            steps = [{"image_classification": b["image_classification"]} for b in batches]
        if run.endswith("_inf"):
            param = next(module.backbone.parameters())
            param.register_hook(lambda g: g * float("inf") if module.global_step == 1 and rank == 1 else g)
        plugins = [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** 8))] \
            if "_fp16" in run else []
        fit = trainer(Path(args.out) / run, STEPS, devices=2, strategy=DDPStrategy(process_group_backend="gloo"),
                      plugins=plugins)
        folder = Path(args.out) / run
        folder.mkdir(parents=True, exist_ok=True)
        try:
            fit.fit(module, loader(steps))
        except ValueError as err:  # expected for a loss-based objective with unused parameters under plain DDP
            (folder / f"rank{rank}.error").write_text(str(err))
            continue
        torch.save(weights(module), folder / f"rank{rank}.pt")
        scaler = getattr(fit.precision_plugin, "scaler", None)
        (folder / f"rank{rank}.json").write_text(json.dumps({
            "skipped_steps": module.skipped_steps, "global_step": fit.global_step,
            "scale": float(scaler.get_scale()) if scaler is not None else None}))


if __name__ == "__main__":
    main()
