"""Image pipelines from timm: training augments, evaluation resizes the shorter side and crops the centre, a sample's
augmentation is a function of (seed, epoch, key) and leaves the process's random state alone."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from jsonargparse import ArgumentParser
from PIL import Image

from mmlit.data import TaskStream, scan_shards
from mmlit.data.transforms import (ImageTransform, build_pipelines, predicting, random_state_kept, sample_context,
                                   training_sample)
from mmlit.models import Backbone
from mmlit.tasks.base import Shards
from mmlit.text import load_tokenizer

from .._soc import soc_task
from ..conftest import tiny_backbone

CONFIG = {"interpolation": "bilinear", "mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5), "crop_pct": 0.875}


def _photo(width: int = 120, height: int = 80) -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def test_evaluation_resizes_the_shorter_side_and_crops_the_centre():
    pipelines = build_pipelines(ImageTransform(crop_pct=1.0), 40, CONFIG, "t")
    out = pipelines[False](_photo(120, 80))
    assert out.shape == (3, 40, 40) and out.dtype == torch.uint8
    expected = _photo(120, 80).resize((60, 40), Image.BILINEAR).crop((10, 0, 50, 40))  # shorter side 40, centre 40
    assert torch.equal(out.permute(1, 2, 0), torch.from_numpy(np.array(expected)))
    square = _photo(75, 75)  # Sort-of-CLEVR's settings keep a 75-px image's pixels exactly
    kept = build_pipelines(ImageTransform(augment=False, crop_pct=1.0), 75, CONFIG, "t")[True](square)
    assert torch.equal(kept.permute(1, 2, 0), torch.from_numpy(np.array(square)))


def test_training_augments_by_the_sample_seed_and_restores_the_random_state():
    pipelines = build_pipelines(ImageTransform(auto_augment="rand-m9-mstd0.5"), 40, CONFIG, "t")
    image = _photo()

    def augmented(seed: tuple) -> torch.Tensor:
        with sample_context(seed, train=True):
            assert training_sample() and not predicting()
            return pipelines[True](image)

    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    before = random.random(), np.random.rand(), torch.rand(1).item()
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    with random_state_kept():
        first = augmented((0, 0, "key1"))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == before, "the process's generators are untouched"
    assert torch.equal(first, augmented((0, 0, "key1")))  # the same sample in the same epoch: the same pixels
    others = [augmented((0, epoch, "key1")) for epoch in range(1, 4)] + [augmented((0, 0, "key2"))]
    assert all(not torch.equal(first, other) for other in others)
    assert not training_sample(), "outside a context, samples are evaluation samples"
    with sample_context((0, 0, "key1"), train=False):
        assert torch.equal(pipelines[True](image) if training_sample() else pipelines[False](image), pipelines[False](image))


def test_a_bad_pipeline_setting_names_the_recipe_key():
    with pytest.raises(ValueError, match=r"model.tasks.x.init_args.transform.crop_pct must be in \(0, 1\]"):
        build_pipelines(ImageTransform(crop_pct=1.5), 40, CONFIG, "model.tasks.x.init_args.transform")
    with pytest.raises(ValueError, match=r"model.tasks.x.init_args.transform: timm cannot build"):
        build_pipelines(ImageTransform(auto_augment="no-such-policy"), 40, CONFIG, "model.tasks.x.init_args.transform")


def test_training_streams_augment_and_repeat_their_augmentation(soc):
    """A task with augmentation on gives other pixels in training than in evaluation, and the same pixels when the
    stream is read again (and from a pickled copy, as workers get it)."""
    parser = ArgumentParser()
    parser.add_argument("--backbone", type=Backbone)
    backbone = parser.instantiate_classes(parser.parse_object({"backbone": tiny_backbone()})).backbone
    task = soc_task("image_classification", Shards(train=soc["train"]), batch_size=4,
                    transform=ImageTransform(scale=(0.3, 1.0), auto_augment="rand-m9-mstd0.5"))
    task.build(backbone)
    index, tokenizer = scan_shards(soc["shards"]["train"][:1], "k"), load_tokenizer(soc["tokenizer"])  # (no shuffle)

    def first(train: bool) -> dict:
        stream = TaskStream(task, index, tokenizer, batch_size=4, train=train, seed=0, shuffle_buffer=1)
        return next(iter(stream))[1]

    a, b = first(True), first(True)
    assert torch.equal(a["image"], b["image"]) and a["key"] == b["key"]
    plain = first(False)
    assert plain["key"] == a["key"] and not torch.equal(plain["image"], a["image"])


def test_a_randaugment_policy_this_pillow_cannot_run_is_refused_at_build():
    """timm's -inc1 posterize asks for 0 bits at the top magnitude; Pillow 12 raises on it, which would stop a run
    at the first such sample, hours in."""
    from PIL import Image, ImageOps

    try:
        ImageOps.posterize(Image.new("RGB", (1, 1)), 0)
    except ValueError:
        with pytest.raises(ValueError, match=r"auto_augment: 'rand-m9-mstd0.5-inc1': timm's increasing posterize"):
            build_pipelines(ImageTransform(auto_augment="rand-m9-mstd0.5-inc1"), 40, CONFIG, "t")
    else:
        assert build_pipelines(ImageTransform(auto_augment="rand-m9-mstd0.5-inc1"), 40, CONFIG, "t")
