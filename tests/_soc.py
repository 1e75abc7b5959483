"""The shipped tasks with their Sort-of-CLEVR settings (the recipes' values), for tests and the processes they start."""

from __future__ import annotations

import copy

from mmlit.data.sort_of_clevr import ANSWERS, COLOURS, QUESTION_TYPES, SHAPES
from mmlit.data.transforms import ImageTransform
from mmlit.registry import get_task
from mmlit.tasks import Shards, Task

# The settings of each shipped task on Sort-of-CLEVR, as the recipes give them (task files hold no data set's values).
TRANSFORM = {"augment": False, "crop_pct": 1.0, "interpolation": "bilinear"}  # as generated: labels name sides, colours
TASK_SETTINGS = {
    "vqa": {"answers": list(ANSWERS), "relational": True, "transform": TRANSFORM},
    "contrastive": {"caption_field": "json.caption", "transform": TRANSFORM},
    "captioning": {"caption_field": "json.caption", "transform": TRANSFORM},
    "image_classification": {"label_field": "json.labels.n_circles", "num_classes": 7, "transform": TRANSFORM},
    "multilabel_classification": {"labels_field": "json.labels.objects", "transform": TRANSFORM,
                                  "classes": [f"{c} {s}" for c in COLOURS for s in SHAPES]},
    "text_classification": {"items_field": "json.questions", "text_key": "question", "label_key": "type",
                            "classes": list(QUESTION_TYPES)},
    "prefix_lm": {"caption_field": "json.caption", "relational": True, "transform": TRANSFORM},
    "speech_text_alignment": {"words_field": "json.spoken_caption.words"},
    "vlm": {"relational": True, "stage": "full", "max_new_tokens": 4, "projector": "pixel_shuffle",  # (25 image tokens)
            "transform": TRANSFORM},
}
# Tasks whose text encoder is a pretrained LM (``HFCausalLM``): a recipe of them cannot hold prefix_lm's decoder, so
# the recipes over every task leave them out; their own recipe tests train them.
LM_TASKS = ("vlm",)


def soc_settings(name: str) -> dict:
    """A task's Sort-of-CLEVR settings as recipe values (what the recipes give it; none for a task not listed)."""
    return copy.deepcopy(TASK_SETTINGS.get(name, {}))


def soc_task(name: str, shards: Shards, **kwargs) -> Task:
    """The registered task ``name`` built with its Sort-of-CLEVR settings (``kwargs`` win)."""
    settings = {**soc_settings(name), **kwargs}
    if isinstance(settings.get("transform"), dict):
        settings["transform"] = ImageTransform(**settings["transform"])
    return get_task(name)(shards, **settings)
