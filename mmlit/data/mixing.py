"""Task samplers: which tasks contribute a batch to each training step.

The schedule is a pure function of ``(seed, step)``: every DDP rank draws the same tasks in the
same step without communicating, and a resumed run can recompute how many batches of each task
were taken before any step. Sampling one task per step with ``p_t ~ n_t`` or ``p_t ~ n_t^(1/T)``
follows the multi-task mixing of T5 (Raffel et al. 2020, section 3.5.2).
"""

from __future__ import annotations

import numpy as np

from mmlit.seeds import uniform as _uniform

__all__ = ["AllTasks", "FixedWeights", "Proportional", "RoundRobin", "TaskSampler", "Temperature"]


class TaskSampler:
    """Base of the samplers. ``bind`` receives the task names and their sizes (samples per epoch)."""

    def bind(self, sizes: dict[str, int], seed: int) -> None:
        self.names, self.sizes, self.seed = list(sizes), dict(sizes), seed

    def probabilities(self) -> dict[str, float]:
        """The share of steps each task is expected to take part in."""
        raise NotImplementedError

    def tasks(self, step: int) -> list[str]:
        """The tasks of one step."""
        return [self.names[i] for i in np.flatnonzero(self._draw(np.array([step]))[0])]

    def counts(self, step: int, begin: int = 0) -> dict[str, int]:
        """Batches taken from each task in steps ``begin .. step - 1``."""
        total = np.zeros(len(self.names), dtype=np.int64)
        for first in range(begin, step, 1 << 20):  # bounded memory for long runs
            picked = self._draw(np.arange(first, min(step, first + (1 << 20))))
            total += picked.sum(axis=0)
        return dict(zip(self.names, total.tolist()))

    def _draw(self, steps: np.ndarray) -> np.ndarray:
        """(len(steps), tasks) booleans: which tasks take part in each step."""
        raise NotImplementedError


class AllTasks(TaskSampler):
    """Every task in every step (the default)."""

    def probabilities(self) -> dict[str, float]:
        return dict.fromkeys(self.names, 1.0)

    def _draw(self, steps: np.ndarray) -> np.ndarray:
        return np.ones((len(steps), len(self.names)), dtype=bool)


class RoundRobin(TaskSampler):
    """One task per step, in the recipe's order."""

    def probabilities(self) -> dict[str, float]:
        return dict.fromkeys(self.names, 1.0 / len(self.names))

    def _draw(self, steps: np.ndarray) -> np.ndarray:
        return (steps[:, None] % len(self.names)) == np.arange(len(self.names))[None, :]


class _OnePerStep(TaskSampler):
    """One task per step, drawn with fixed probabilities from the hash of (seed, step)."""

    def _weights(self) -> dict[str, float]:
        raise NotImplementedError

    def probabilities(self) -> dict[str, float]:
        weights = self._weights()
        total = sum(weights.values())
        return {name: weights[name] / total for name in self.names}

    def _draw(self, steps: np.ndarray) -> np.ndarray:
        edges = np.cumsum(list(self.probabilities().values()))
        picked = np.minimum(np.searchsorted(edges, _uniform(self.seed, steps), side="right"), len(self.names) - 1)
        return picked[:, None] == np.arange(len(self.names))[None, :]


class Proportional(_OnePerStep):
    """One task per step, with probability proportional to its number of samples."""

    def _weights(self) -> dict[str, float]:
        return {name: float(n) for name, n in self.sizes.items()}


class Temperature(_OnePerStep):
    """One task per step, ``p_t ~ n_t^(1/T)``: T=1 is proportional, large T tends to uniform.

    Args:
        temperature: T; T5 (Raffel et al. 2020) compared T = 2, 4 and 8.
    """

    def __init__(self, temperature: float = 2.0):
        if temperature <= 0:
            raise ValueError(f"data.mixture.init_args.temperature must be positive, got {temperature}")
        self.temperature = temperature

    def _weights(self) -> dict[str, float]:
        return {name: float(n) ** (1.0 / self.temperature) for name, n in self.sizes.items()}


class FixedWeights(_OnePerStep):
    """One task per step, with the recipe's weights (normalised; every task needs one).

    Args:
        weights: task name -> relative weight.
    """

    def __init__(self, weights: dict[str, float]):
        self.weights = dict(weights)

    def bind(self, sizes: dict[str, int], seed: int) -> None:
        super().bind(sizes, seed)
        key = "data.mixture.init_args.weights"
        if set(self.weights) != set(sizes):
            raise ValueError(f"{key}: give a weight to every task and no other; the tasks are {', '.join(sizes)}, "
                             f"the weights name {', '.join(self.weights) or 'none'}")
        if any(w < 0 for w in self.weights.values()) or sum(self.weights.values()) <= 0:
            raise ValueError(f"{key}: weights must be non-negative with a positive sum, got {self.weights}")

    def _weights(self) -> dict[str, float]:
        return self.weights
