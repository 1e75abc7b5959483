"""The shared encoder pass: tasks that read one source get one image tensor per step, the backbone encodes it once,
and the losses and gradients are those of separate passes."""

from __future__ import annotations

import torch
from jsonargparse import ArgumentParser

from mmlit.data import MultiTaskDataModule, SourceStream, plan_shards
from mmlit.models import Backbone
from mmlit.module import MultiTaskModule
from mmlit.tasks.base import Shards
from mmlit.text import load_tokenizer

from ..conftest import soc_task, tiny_backbone


def _model_and_step(soc):
    torch.manual_seed(0)
    parser = ArgumentParser()
    parser.add_argument("--backbone", type=Backbone)
    backbone = parser.instantiate_classes(parser.parse_object({"backbone": tiny_backbone()})).backbone
    tasks = {name: soc_task(name, Shards(train=soc["train"]), batch_size=4) for name in ("contrastive", "captioning")}
    model = MultiTaskModule(backbone, tasks)
    stream = SourceStream(tasks, plan_shards(soc["train"], "k"), load_tokenizer(soc["tokenizer"]), batch_size=4,
                          train=True, shuffle_buffer=20)
    batches, _ = next(iter(stream))
    return model, batches


def _losses_and_gradients(model, batches, shared: bool):
    calls = []
    hook = model.backbone.encoders["image"].register_forward_hook(lambda *_: calls.append(1))
    model.zero_grad()
    if shared:
        with model.backbone.shared_pass():
            losses = {name: model.tasks[name](model.backbone, batch)["loss"] for name, batch in batches.items()}
    else:
        losses = {name: model.tasks[name](model.backbone, batch)["loss"] for name, batch in batches.items()}
    sum(losses.values()).backward()
    hook.remove()
    return len(calls), {k: v.item() for k, v in losses.items()}, {n: p.grad.clone() for n, p in model.named_parameters()
                                                                 if p.grad is not None}


def test_tasks_on_one_source_get_one_image_tensor_which_is_encoded_once(soc):
    model, batches = _model_and_step(soc)
    assert batches["contrastive"]["image"] is batches["captioning"]["image"]
    model.eval()  # (batch-norm statistics: the two runs below start from the same ones)
    calls, losses, grads = _losses_and_gradients(model, batches, shared=True)
    assert calls == 1
    separate = {name: {**batch, "image": batch["image"].clone()} for name, batch in batches.items()}
    calls, losses_apart, grads_apart = _losses_and_gradients(model, separate, shared=False)
    assert calls == 2
    assert losses == losses_apart and grads.keys() == grads_apart.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_apart[name], msg=name)


def test_a_tensor_two_task_batches_hold_is_moved_to_the_device_once(soc):
    model, batches = _model_and_step(soc)
    moved = MultiTaskDataModule("unused").transfer_batch_to_device(batches, torch.device("cpu"), 0)
    assert moved["contrastive"]["image"] is moved["captioning"]["image"]
    assert moved["contrastive"]["caption"] is not moved["captioning"]["image"]
