"""Models: the shared backbone and its parts."""

from mmlit.models.backbone import Backbone, Features
from mmlit.models.fusion import CrossAttentionFusion
from mmlit.models.image import TimmImageEncoder
from mmlit.models.text import TransformerTextEncoder

__all__ = ["Backbone", "CrossAttentionFusion", "Features", "TimmImageEncoder", "TransformerTextEncoder"]
