"""Modalities: one file each, registered by name (``mmlit modalities`` lists them). A modality says which shard
entries it decodes (checked by content), how a task's values of it are prepared in the workers, how they are
collated, and which encoder a backbone builds for it by default."""

from mmlit.modalities.audio import AudioModality, AudioPipeline, AudioTransform
from mmlit.modalities.base import Modality
from mmlit.modalities.image import ImageModality, ImagePipeline
from mmlit.modalities.text import TextModality, TextPipeline
from mmlit.modalities.video import VideoModality, VideoPipeline

__all__ = ["AudioModality", "AudioPipeline", "AudioTransform", "ImageModality", "ImagePipeline", "Modality",
           "TextModality", "TextPipeline", "VideoModality", "VideoPipeline"]
