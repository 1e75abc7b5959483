"""Tasks: one file each, a head and its data side, registered by name (``mmlit tasks`` lists them)."""

from mmlit.data.task_data import Shards, TaskData
from mmlit.data.transforms import ImageTransform
from mmlit.tasks.base import Task
from mmlit.tasks.captioning import Captioning
from mmlit.tasks.contrastive import Contrastive, ZeroShot
from mmlit.tasks.image_classification import ImageClassification
from mmlit.tasks.multilabel_classification import MultiLabelClassification
from mmlit.tasks.prefix_lm import PrefixLM
from mmlit.tasks.speech_text_alignment import SpeechTextAlignment
from mmlit.tasks.text_classification import TextClassification
from mmlit.tasks.vlm import VLM
from mmlit.tasks.vqa import VQA

__all__ = ["VQA", "Captioning", "Contrastive", "ImageClassification", "ImageTransform", "MultiLabelClassification",
           "PrefixLM", "Shards", "SpeechTextAlignment", "Task", "TaskData", "TextClassification", "VLM", "ZeroShot"]
