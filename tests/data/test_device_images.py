"""The device image path (``data.decode_images: device``), run with the CPU decoder: the workers pass JPEG bytes, the
training process decodes and resizes them to the pixels the worker path makes; a bad JPEG trains as a black image."""

from __future__ import annotations

import logging

import pytest
import torch

from mmlit.cli import main
from mmlit.data import SourceStream, TaskStream, scan_shards
from mmlit.data.device_images import EncodedImages, decode_batch_images
from mmlit.data.sort_of_clevr import write_dataset
from mmlit.modalities import ImagePipeline
from mmlit.tasks.base import Shards

from ..conftest import soc_task, tiny_recipe, write_recipe


@pytest.fixture(scope="module")
def jpeg_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("jpg")
    return write_dataset(root, {"train": 24, "val": 8}, seed=0, shard_size=8, image_format="jpg")


def _first_batch(index, mode: str, size: int, name: str = "image_classification") -> dict:
    task = soc_task(name, Shards(), batch_size=8)
    task.data.bind({"image": ImagePipeline(size, None)})  # (images at the encoder's size, without a model)
    _, batch, _ = next(iter(TaskStream(task, index, None, batch_size=8, train=False, decode_images=mode)))
    return batch


@pytest.mark.parametrize("size", [75, 64, 96])
def test_the_device_path_gives_the_worker_paths_pixels(jpeg_shards, size):
    index = scan_shards(jpeg_shards["train"], "k")
    encoded = _first_batch(index, "device", size)["image"]
    assert isinstance(encoded, EncodedImages) and all(t.dtype == torch.uint8 and t.dim() == 1 for t in encoded.data)
    decoded, worker = encoded.decode(torch.device("cpu")), _first_batch(index, "worker", size)["image"]
    assert decoded.shape == worker.shape == (8, 3, size, size) and decoded.dtype == torch.uint8
    # the same libjpeg decode; Pillow's and torch's antialiased bilinear resizes differ by rounding only
    assert (decoded.int() - worker.int()).abs().max() <= 1


def test_tasks_on_one_source_share_one_encoded_batch_which_is_decoded_once(jpeg_shards):
    tasks = {name: soc_task("image_classification", Shards(), batch_size=4) for name in ("a", "b")}
    for task in tasks.values():
        task.data.bind({"image": ImagePipeline(75, None)})
    stream = SourceStream(tasks, scan_shards(jpeg_shards["train"], "k"), None, batch_size=4, train=False,
                          decode_images="device")
    batches, _ = next(iter(stream))
    assert isinstance(batches["a"]["image"], EncodedImages) and batches["a"]["image"] is batches["b"]["image"]
    batch = decode_batch_images(batches, torch.device("cpu"))
    assert batch["a"]["image"] is batch["b"]["image"] and batch["a"]["image"].shape == (4, 3, 75, 75)


def test_a_jpeg_the_decoder_cannot_read_trains_as_a_black_image(jpeg_shards, caplog):
    images = _first_batch(scan_shards(jpeg_shards["train"], "k"), "device", 75)["image"]
    images.data[3] = images.data[3][:200].clone()  # the header, then nothing: decode_jpeg fails on it
    with caplog.at_level(logging.WARNING):
        decoded = images.decode(torch.device("cpu"))
    assert decoded.shape == (8, 3, 75, 75) and decoded[3].sum() == 0 and decoded[2].sum() > 0
    assert "image 3 of a batch cannot be decoded" in caplog.text


@pytest.mark.slow
def test_a_fit_with_images_decoded_on_the_device(soc, jpeg_shards, tmp_path):
    recipe = tiny_recipe(soc, tmp_path / "run", tasks=["vqa", "image_classification"], logger=False, max_steps=3,
                         limit_val_batches=2, num_sanity_val_steps=0)
    for task in recipe["model"]["tasks"].values():
        task["init_args"]["shards"] = {"train": "{" + ",".join(jpeg_shards["train"]) + "}", "val": jpeg_shards["val"][0]}
    recipe["data"].update(decode_images="device", num_workers=1)
    main(["fit", "--config", str(write_recipe(recipe, tmp_path / "r.yaml"))])
    assert (tmp_path / "run" / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.parametrize("transform", [{"crop_pct": 0.75, "interpolation": "bilinear"}, {}],
                         ids=["set", "the encoder's config"])
def test_the_device_path_crops_the_centre_as_the_evaluation_pipeline_does(tmp_path, transform):
    """A 120x80 JPEG: the worker's pipeline resizes its shorter side to 48 / crop_pct and crops the centre 48; the
    device path does the same, with the settings the recipe gives or, by default, the encoder's own (test_byobnet's:
    bicubic, crop_pct 0.95)."""
    import io

    import numpy as np
    from PIL import Image

    from mmlit.data.transforms import ImageTransform
    from mmlit.models import Backbone, TimmImageEncoder
    from mmlit.tasks import ImageClassification

    from ..conftest import write_tar

    y, x = np.mgrid[0:80, 0:120]
    samples = []
    for i in range(3):
        pixels = np.stack([x * 2 + i * 9, y * 3, (x + y) + i * 20], -1).clip(0, 255).astype(np.uint8)  # smooth ramps
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
        samples.append({"__key__": f"k{i}", "jpg": buffer.getvalue(), "cls": b"1"})
    index = scan_shards([str(write_tar(tmp_path / "photos.tar", samples))], "k")
    task = ImageClassification(Shards(), batch_size=3, num_classes=2, transform=ImageTransform(**transform))
    task.build(Backbone({"image": TimmImageEncoder("test_byobnet", dim=32, image_size=48, feature_index=2)}))
    pipeline = task.data.inputs["image"]
    assert (pipeline.crop_pct, pipeline.interpolation) == ((0.75, "bilinear") if transform else (0.95, "bicubic"))

    def first(mode: str):
        return next(iter(TaskStream(task, index, None, batch_size=3, train=False, decode_images=mode)))[1]["image"]

    worker, device = first("worker"), first("device").decode(torch.device("cpu"))
    assert worker.shape == device.shape == (3, 3, 48, 48)
    assert (worker.int() - device.int()).abs().max() <= 2


def test_device_decoding_refuses_training_augmentation_it_cannot_apply(soc):
    from mmlit.data import MultiTaskDataModule

    tasks = {"shapes": soc_task("image_classification", Shards(train=soc["train"]), transform={"augment": True})}
    module = MultiTaskDataModule(soc["tokenizer"], tasks=tasks, decode_images="device", num_workers=0)
    with pytest.raises(ValueError, match=r"data.decode_images: device .* task\(s\) shapes; set their "
                                         r"init_args.transform.augment: false"):
        module.setup("fit")
