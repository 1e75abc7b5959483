"""Models: the shared backbone, its encoders (one per modality) and its fusions (``mmlit fusions`` lists them)."""

from mmlit.models.audio import SpectrogramTransformer
from mmlit.models.backbone import Backbone, Encoded, Features
from mmlit.models.fusion import CrossAttentionFusion, EarlyFusion, Fusion
from mmlit.models.hf_lm import HFCausalLM
from mmlit.models.hf_text import HFTextEncoder
from mmlit.models.image import TimmImageEncoder
from mmlit.models.late_fusion import HybridFusion, LateFusion
from mmlit.models.relation import RelationNetworkFusion
from mmlit.models.text import CausalTextDecoder, LSTMTextEncoder, TransformerTextEncoder
from mmlit.models.video import VideoEncoder

__all__ = ["Backbone", "CausalTextDecoder", "CrossAttentionFusion", "EarlyFusion", "Encoded", "Features", "Fusion", "HFCausalLM", "HFTextEncoder",
           "HybridFusion", "LSTMTextEncoder", "LateFusion", "RelationNetworkFusion", "SpectrogramTransformer",
           "TimmImageEncoder", "TransformerTextEncoder", "VideoEncoder"]
