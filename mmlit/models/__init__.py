"""Models: the shared backbone and its parts."""

from mmlit.models.backbone import Backbone, Features
from mmlit.models.fusion import CrossAttentionFusion, EarlyFusion
from mmlit.models.image import TimmImageEncoder
from mmlit.models.late_fusion import HybridFusion, LateFusion
from mmlit.models.relation import RelationNetworkFusion
from mmlit.models.text import CausalTextDecoder, LSTMTextEncoder, TransformerTextEncoder

__all__ = ["Backbone", "CausalTextDecoder", "CrossAttentionFusion", "EarlyFusion", "Features", "HybridFusion",
           "LSTMTextEncoder", "LateFusion", "RelationNetworkFusion", "TimmImageEncoder", "TransformerTextEncoder"]
