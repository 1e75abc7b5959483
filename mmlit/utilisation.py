"""Model FLOPs utilisation: a training step's FLOPs counted on the real step, and FLOPs and text tokens per second.

MFU (model FLOPs utilisation; Chowdhery et al. 2022, "PaLM", appendix B) is the FLOPs a model computes per second over
the device's peak. The FLOPs here are counted, not estimated by a formula (6N per token fits a decoder-only LM, not a
model of image, audio and text encoders with task heads): PyTorch's ``FlopCounterMode`` counts the matmuls,
convolutions and attention of a step (the ops it has formulas for; elementwise ops count nothing, as usual for MFU),
forward and backward, with the recomputed forward of activation checkpointing.
"""

from __future__ import annotations

import time
from collections import deque

import torch
from torch.utils.flop_counter import FlopCounterMode

from mmlit.text import PAD

__all__ = ["Rates", "StepFlops", "text_tokens"]


def _kind(batch: dict) -> tuple[str, ...]:
    return tuple(sorted(batch))


class StepFlops:
    """The FLOPs of training steps, counted once per kind of step on the real step.

    The tasks in a multi-task step are the sampler's choice and each costs its own FLOPs, so a kind of step is the set
    of tasks in it. The first step of each kind runs under ``FlopCounterMode`` (``start`` before it, ``stop`` after its
    backward passes, a gradient-combining objective's one per task included): nothing runs twice, so counting changes
    neither the weights nor the random stream; it slows that one step. The count is kept per example (the rows of
    every task's batch); a later step of that kind is that count times its examples. That is exact for steps of the
    same shapes and an estimate for others (VQA's questions per image, text padded to another length).
    """

    def __init__(self) -> None:
        self.per_example: dict[tuple[str, ...], float] = {}  # kind of step -> FLOPs per example
        self._counter: FlopCounterMode | None = None

    def start(self, batch: dict) -> None:
        """Count this step if it is the first of its kind."""
        if _kind(batch) not in self.per_example and self._counter is None:
            self._counter = FlopCounterMode(display=False)
            self._counter.__enter__()

    def stop(self, batch: dict, examples: int) -> tuple[float | None, bool]:
        """-> the step's FLOPs (None: its kind was not counted yet) and whether they were counted on this step."""
        counter, kind = self._counter, _kind(batch)
        if counter is not None:
            self.close()
            self.per_example[kind] = counter.get_total_flops() / examples
        per_example = self.per_example.get(kind)
        return (None if per_example is None else per_example * examples), counter is not None

    def close(self) -> None:
        """Leave the counter if a step is being counted (a step that raised leaves it open)."""
        if self._counter is not None:
            counter, self._counter = self._counter, None
            counter.__exit__(None, None, None)


def text_tokens(batch: dict, keys: dict[str, str]) -> torch.Tensor | int:
    """The text tokens of a step: for each task in ``keys`` that is in the batch, the entries of its batch's key that
    are not ``PAD`` (token ids (B, T)) or are True (a mask of real tokens (B, T), when the ids are padded otherwise).
    A tensor on the batch's device: the host reads it only when the rates are logged."""
    total = 0
    for task, key in keys.items():
        if task in batch:
            if key not in batch[task]:
                raise KeyError(f"throughput.token_keys.{task}: the task's batches have no {key!r} (they have "
                               f"{', '.join(batch[task])})")
            value = batch[task][key]
            total = total + (value.sum() if value.dtype == torch.bool else (value != PAD).sum())
    return total


class Rates:
    """FLOPs and text tokens per second over the last ``window`` training steps, each timed from the end of the step
    before (data loading and the optimizer step included, as ``ThroughputMonitor`` times samples).

    Lightning's ``Throughput`` computes such windows but takes tokens only as at least one per example (a step of
    images alone has none), and ``ThroughputMonitor`` keeps its clock (validation taken out) private."""

    def __init__(self, window: int):
        self._steps: deque[tuple[float, float, torch.Tensor | int]] = deque(maxlen=window)  # (seconds, FLOPs, tokens)
        self._last = time.perf_counter()

    def restart(self) -> None:
        """The next step is timed from now: at the start of training, after validation, after a counted step (the
        gap, or the counter's overhead, is no step's time)."""
        self._last = time.perf_counter()

    def add(self, flops: float, tokens: torch.Tensor | int) -> None:
        now = time.perf_counter()
        self._steps.append((now - self._last, flops, tokens))
        self._last = now

    def per_second(self) -> tuple[float, float] | None:
        """(FLOPs, tokens) per second over the window; None until it is full."""
        if len(self._steps) < self._steps.maxlen:
            return None
        seconds, flops, tokens = (sum(column) for column in zip(*self._steps))
        return flops / seconds, float(tokens) / seconds  # (the one read of the tokens on the host)
