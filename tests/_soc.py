"""The shipped tasks with their Sort-of-CLEVR settings (the recipes' values), for tests and the processes they start."""

from __future__ import annotations

import copy

from mmlit.data.sort_of_clevr import TASK_SETTINGS
from mmlit.data.transforms import ImageTransform
from mmlit.registry import get_task
from mmlit.tasks import Shards, Task


def soc_settings(name: str) -> dict:
    """A task's Sort-of-CLEVR settings as recipe values (what the recipes give it; none for a task not listed)."""
    return copy.deepcopy(TASK_SETTINGS.get(name, {}))


def soc_task(name: str, shards: Shards, **kwargs) -> Task:
    """The registered task ``name`` built with its Sort-of-CLEVR settings (``kwargs`` win)."""
    settings = {**soc_settings(name), **kwargs}
    if isinstance(settings.get("transform"), dict):
        settings["transform"] = ImageTransform(**settings["transform"])
    return get_task(name)(shards, **settings)
