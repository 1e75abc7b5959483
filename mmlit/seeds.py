"""Seeds: every random draw mmlit makes is a pure function of named parts (the run's seed, an epoch, a reader, a
sample key, a step), so every rank and worker draws alike and a resumed run draws what the uninterrupted one did.

``seed_of(*parts)`` hashes the parts (BLAKE2b of their ``repr``: no collisions between tuples of different parts);
``random_generator`` and ``torch_generator`` are generators seeded with it. ``uniform(seed, steps)`` is the
counter-based form for draws per step that must be computed for many steps at once (the task mixture recomputes its
whole schedule on resume): the splitmix64 hash of (seed, step), vectorised.
"""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch

__all__ = ["random_generator", "seed_of", "torch_generator", "uniform"]


def seed_of(*parts) -> int:
    """A 64-bit seed of ``parts``: equal parts give equal seeds, in any process."""
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


def random_generator(*parts) -> random.Random:
    """A Python generator seeded by ``parts``."""
    return random.Random(seed_of(*parts))


def torch_generator(*parts) -> torch.Generator:
    """A CPU torch generator seeded by ``parts``."""
    return torch.Generator().manual_seed(seed_of(*parts) % (1 << 63))


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def uniform(seed: int, steps: np.ndarray) -> np.ndarray:
    """One uniform number in [0, 1) per step: the splitmix64 hash of (seed, step)."""
    with np.errstate(over="ignore"):
        x = steps.astype(np.uint64) * _GOLDEN + np.uint64(seed % 2**64) * np.uint64(0xD1B54A32D192ED03)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return (x >> np.uint64(11)).astype(np.float64) / float(2**53)
