"""Image pipelines of the tasks, built by timm, and the per-sample random state that keeps them reproducible.

A task that reads images takes an ``ImageTransform``. Training images go through timm's ``create_transform``
(``RandomResizedCrop`` at ``scale``/``ratio``, horizontal flip, colour jitter or an ``auto_augment`` policy such as
RandAugment ``rand-m9-mstd0.5``); evaluation images, and training images when ``augment`` is off, are resized on
their shorter side to ``size / crop_pct`` and centre-cropped to ``size``. Interpolation, ``crop_pct`` and the mean
(RandAugment's fill colour) come from the image encoder's pretrained config unless the recipe sets them. Pixels stay
uint8 (timm's ``use_prefetcher`` form): the encoder normalises the batch on its device with its own mean and std.

``sample_context`` runs a sample's ``prepare`` with every standard generator (``random``, NumPy's, torch's CPU
generator) seeded from (seed, epoch, sample key), and restores them after: a sample is augmented the same way
whenever and wherever it is prepared, so a resumed run is bit-identical with augmentation on, whatever the number
of workers. Inside it, ``training_sample()`` says whether the sample is a training one.
"""

from __future__ import annotations

import contextlib
import hashlib
import random
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

__all__ = ["ImageTransform", "training_sample", "build_pipelines", "sample_context"]


@dataclass
class ImageTransform:
    """A task's image pipeline (timm's ``create_transform``).

    Args:
        augment: training images get the random crop, flip and colour changes below; false: they are prepared as
            evaluation images are.
        scale: ``RandomResizedCrop``'s range of the crop's area, as a share of the image.
        ratio: its range of aspect ratios.
        hflip: probability of a horizontal flip (0 for tasks whose labels say left or right).
        color_jitter: brightness, contrast and saturation jitter (0: none; ignored with ``auto_augment``).
        auto_augment: a timm policy: ``rand-m9-mstd0.5-inc1`` (RandAugment), ``augmix-m5-w4-d2``, ``original``, ...
        interpolation: ``bilinear``, ``bicubic``, ...; None: the image encoder's pretrained config.
        crop_pct: evaluation resizes the shorter side to ``size / crop_pct`` and crops the centre ``size``; 1.0 keeps
            the whole of a square image; None: the image encoder's pretrained config.
    """

    augment: bool = True
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    color_jitter: float = 0.4
    auto_augment: str | None = None
    interpolation: str | None = None
    crop_pct: float | None = None


def build_pipelines(transform: ImageTransform, size: int, data_config: dict, key: str) -> dict[bool, Callable]:
    """{True: the training pipeline, False: the evaluation one}, each PIL image -> (3, size, size) uint8 tensor.
    ``data_config`` is the encoder's (``timm.data.resolve_data_config``); ``key`` names the recipe key in errors."""
    from timm.data import create_transform

    if not 0.0 < (transform.crop_pct or 1.0) <= 1.0:
        raise ValueError(f"{key}.crop_pct must be in (0, 1], got {transform.crop_pct}")
    interpolation = transform.interpolation or data_config.get("interpolation", "bilinear")
    common = dict(interpolation=interpolation, mean=data_config.get("mean", (0.485, 0.456, 0.406)),
                  std=data_config.get("std", (0.229, 0.224, 0.225)), use_prefetcher=True)
    try:
        evaluation = create_transform(size, is_training=False, crop_pct=transform.crop_pct or data_config.get("crop_pct"),
                                      **common)
        train = evaluation
        if transform.augment:
            train = create_transform(size, is_training=True, scale=tuple(transform.scale), ratio=tuple(transform.ratio),
                                     hflip=transform.hflip, color_jitter=transform.color_jitter or None,
                                     auto_augment=transform.auto_augment, **common)
    except (ValueError, KeyError, AssertionError) as err:
        raise ValueError(f"{key}: timm cannot build this pipeline: {err!r}") from None
    return {True: train, False: evaluation}


_TRAINING: list[bool] = [False]  # whether the sample being prepared is a training sample (a stack: contexts nest)


def training_sample() -> bool:
    """Whether the sample being prepared is a training sample (inside ``sample_context(train=True)``)."""
    return _TRAINING[-1]


def _seed(parts: tuple) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


@contextlib.contextmanager
def sample_context(seed: tuple, *, train: bool) -> Iterator[None]:
    """Prepare one sample with the standard generators seeded from ``seed`` (e.g. (seed, epoch, key)), and
    ``training_sample()`` telling ``train``; the generators' states are restored afterwards (the training process's own
    random state is untouched when it prepares samples itself, with ``data.num_workers: 0``)."""
    value = _seed(seed)
    saved = random.getstate(), np.random.get_state(), torch.default_generator.get_state()
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.default_generator.manual_seed(value)  # (not torch.manual_seed: that would reseed the CUDA generators too)
    _TRAINING.append(train)
    try:
        yield
    finally:
        _TRAINING.pop()
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.default_generator.set_state(saved[2])
