"""The device image path (``data.decode_images: device``): DataLoader workers check each JPEG's header (format, size)
and pass its bytes on; the training process decodes a whole batch on its device with ``torchvision.io.decode_jpeg``
(nvJPEG on a CUDA device) and resizes it there, so the workers only read. PNG and the other formats are decoded in
the workers as before. On the CPU the same code runs with the CPU decoder (libjpeg-turbo, as Pillow's).
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

__all__ = ["EncodedImage", "EncodedImages", "decode_batch_images", "move_batch"]

_log = logging.getLogger(__name__)


class EncodedImage:
    """A JPEG entry whose header was checked in the worker and whose pixels are decoded on the training device
    (``data.decode_images: device``); ``size`` is (width, height), ``target`` the square side a task crops it to
    after resizing its shorter side to ``target / crop_pct`` with ``interpolation`` (``bilinear`` or ``bicubic``)."""

    __slots__ = ("data", "size", "target", "crop_pct", "interpolation")

    def __init__(self, data: bytes, size: tuple[int, int], target: int | None = None, crop_pct: float = 1.0,
                 interpolation: str = "bilinear"):
        self.data, self.size, self.target, self.crop_pct, self.interpolation = data, size, target, crop_pct, interpolation

    def convert(self, mode: str) -> EncodedImage:  # (decode_jpeg's RGB mode converts on the device)
        return self


class EncodedImages:
    """A batch of JPEGs left for the device: their bytes (1-D uint8 tensors: they go to the training process through
    shared memory like any tensor), the square side ``target`` to crop them to (None: as they are) and the share
    ``crop_pct`` of the resized shorter side that the centre crop keeps (the evaluation pipeline of
    ``mmlit/data/transforms.py``)."""

    def __init__(self, images: list[EncodedImage]):
        self.data = [torch.frombuffer(bytearray(image.data), dtype=torch.uint8) for image in images]
        self.target, self.crop_pct, self.interpolation = images[0].target, images[0].crop_pct, images[0].interpolation
        if self.interpolation not in ("bilinear", "bicubic"):
            self.interpolation = "bicubic" if "cubic" in self.interpolation else "bilinear"  # (torch has these two)

    def __len__(self) -> int:
        return len(self.data)

    def __eq__(self, other) -> bool:
        return (isinstance(other, EncodedImages)
                and (self.target, self.crop_pct, self.interpolation) == (other.target, other.crop_pct, other.interpolation)
                and len(self) == len(other) and all(torch.equal(a, b) for a, b in zip(self.data, other.data)))

    __hash__ = object.__hash__

    def decode(self, device: torch.device) -> torch.Tensor:
        """(B, 3, S, S) uint8 on ``device``; an image the decoder cannot read is black, and logged."""
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            images = decode_jpeg(self.data, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # one bad JPEG fails the batch call: decode them one by one to find it
            images = []
            for i, data in enumerate(self.data):
                try:
                    images.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
                except RuntimeError as err:
                    _log.warning("image %d of a batch cannot be decoded on %s (%s); it trains as a black image", i,
                                 device, err)
                    images.append(torch.zeros(3, self.target or 8, self.target or 8, dtype=torch.uint8, device=device))
        return torch.stack([self._resized(image) for image in images])

    def _resized(self, image: torch.Tensor) -> torch.Tensor:
        """The shorter side resized to ``target / crop_pct`` (bilinear or bicubic with antialiasing, as Pillow's),
        then the centre ``target`` x ``target`` (torchvision's ``Resize`` and ``CenterCrop`` arithmetic)."""
        if self.target is None or tuple(image.shape[1:]) == (self.target, self.target):
            return image
        height, width = image.shape[1:]
        short = math.floor(self.target / self.crop_pct)
        size = (short, int(short * width / height)) if height <= width else (int(short * height / width), short)
        if size != (height, width):
            image = F.interpolate(image[None].float(), size=size, mode=self.interpolation, antialias=True,
                                  align_corners=False)[0].round().clamp(0, 255).to(torch.uint8)
        top, left = (int(round((side - self.target) / 2.0)) for side in size)
        return image[:, top:top + self.target, left:left + self.target]


def decode_batch_images(batch: dict, device: torch.device) -> dict:
    """``{task: {key: value}}`` with every ``EncodedImages`` decoded on ``device``; one object several task batches
    hold (tasks on one source) is decoded once and stays one tensor (the backbone's shared pass needs it)."""
    done: dict[int, tuple[EncodedImages, torch.Tensor]] = {}
    for task_batch in batch.values():
        for key, value in list(task_batch.items()):
            if isinstance(value, EncodedImages):
                if id(value) not in done:
                    done[id(value)] = (value, value.decode(device))
                task_batch[key] = done[id(value)][1]
    return batch


def move_batch(batch, device: torch.device):
    """Lightning's move of a batch to ``device``, but a tensor that several task batches hold (the images of tasks
    that read one source) is moved once and stays one tensor, which the backbone's shared pass encodes once; JPEGs
    left for the device are decoded there."""
    from lightning.fabric.utilities.apply_func import move_data_to_device
    from lightning_utilities.core.apply_func import apply_to_collection

    moved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def move(tensor: torch.Tensor) -> torch.Tensor:
        if id(tensor) not in moved:
            moved[id(tensor)] = (tensor, move_data_to_device(tensor, device))  # (the tensor is kept: its id is not reused)
        return moved[id(tensor)][1]

    return decode_batch_images(apply_to_collection(batch, torch.Tensor, move), device)
