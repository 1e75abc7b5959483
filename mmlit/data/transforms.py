"""Image pipelines of the tasks, built by timm, and the per-sample random state that keeps them reproducible.

A task that reads images takes an ``ImageTransform``. Training images go through timm's ``create_transform``
(``RandomResizedCrop`` at ``scale``/``ratio``, horizontal flip, colour jitter or an ``auto_augment`` policy such as
RandAugment ``rand-m9-mstd0.5``); evaluation images, and training images when ``augment`` is off, are resized on
their shorter side to ``size / crop_pct`` and centre-cropped to ``size``. Interpolation, ``crop_pct`` and the mean
(RandAugment's fill colour) come from the image encoder's pretrained config unless the recipe sets them. Pixels stay
uint8 (timm's ``use_prefetcher`` form): the encoder normalises the batch on its device with its own mean and std.

``sample_context`` runs a sample's ``prepare`` with every standard generator (``random``, NumPy's, torch's CPU
generator) seeded from (seed, epoch, shard, sample key), and ``random_state_kept`` restores them afterwards in the
training process: a sample is augmented the same way whenever and wherever it is prepared, so a resumed run is
bit-identical with augmentation on, whatever the number of workers. Inside it, ``training_sample()`` says whether the
sample is a training one, and ``predicting()`` whether it is prepared for ``mmlit predict`` (its labels may be
missing).
"""

from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import get_worker_info

from mmlit.seeds import seed_of

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
        auto_augment: a timm policy: ``rand-m9-mstd0.5`` (RandAugment), ``augmix-m5-w4-d2``, ``original``, ...
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


def text_safe(scale: tuple[float, float] = (0.5, 1.0)) -> ImageTransform:
    """Random crops without flips or colour changes: the default of tasks whose text names sides and colours
    (captions, questions), and one pipeline for all of them, so tasks on one source share each image's pass."""
    return ImageTransform(scale=scale, hflip=0.0, color_jitter=0.0)


def build_pipelines(transform: ImageTransform, size: int, data_config: dict, key: str) -> dict[bool, Callable]:
    """{True: the training pipeline, False: the evaluation one}, each PIL image -> (3, size, size) uint8 tensor.
    ``data_config`` is the encoder's (``timm.data.resolve_data_config``); ``key`` names the recipe key in errors."""
    from timm.data import create_transform

    if not 0.0 < (transform.crop_pct or 1.0) <= 1.0:
        raise ValueError(f"{key}.crop_pct must be in (0, 1], got {transform.crop_pct}")
    if transform.augment and transform.auto_augment and "inc1" in transform.auto_augment.split("-") and \
            not _posterize_keeps_0_bits():
        raise ValueError(f"{key}.auto_augment: {transform.auto_augment!r}: timm's increasing posterize (-inc1) asks "
                         f"Pillow for 0 bits at the top magnitude, which this Pillow refuses (3 of 3,000 samples at "
                         f"rand-m9-mstd0.5-inc1 would stop the run); use the policy without -inc1")
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


def _posterize_keeps_0_bits() -> bool:
    from PIL import Image, ImageOps

    try:
        ImageOps.posterize(Image.new("RGB", (1, 1)), 0)
        return True
    except ValueError:
        return False


_MODES: list[tuple[bool, bool]] = [(False, False)]  # (training, predicting) of the sample being prepared: a stack


def training_sample() -> bool:
    """Whether the sample being prepared is a training sample (inside ``sample_context(train=True)``)."""
    return _MODES[-1][0]


def predicting() -> bool:
    """Whether the sample being prepared is for ``mmlit predict`` (it may have no label: tasks use a placeholder)."""
    return _MODES[-1][1]


@contextlib.contextmanager
def sample_context(seed: tuple, *, train: bool, predict: bool = False) -> Iterator[None]:
    """Prepare one sample with the standard generators (``random``, NumPy's, torch's CPU generator) seeded from
    ``seed`` (e.g. (seed, epoch, shard, key)), ``training_sample()`` telling ``train`` and ``predicting()``
    ``predict``. The generators are left seeded: in the training process, wrap the samples in
    ``random_state_kept()``."""
    value = seed_of(*seed)
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.default_generator.manual_seed(value)  # (not torch.manual_seed: that would reseed the CUDA generators too)
    _MODES.append((train, predict))
    try:
        yield
    finally:
        _MODES.pop()


@contextlib.contextmanager
def random_state_kept() -> Iterator[None]:
    """Restore the standard generators' states afterwards, in the training process (``data.num_workers: 0``), whose
    own random state must not depend on the samples it prepared. A DataLoader worker's state is its own: there it
    does nothing (saving NumPy's state alone costs ~0.1 ms, measured)."""
    if get_worker_info() is not None:
        yield
        return
    saved = random.getstate(), np.random.get_state(), torch.default_generator.get_state()
    try:
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.default_generator.set_state(saved[2])
