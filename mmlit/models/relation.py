"""The relation network (Santoro et al. 2017, "A simple neural network module for relational reasoning").

``RN(O, q) = f( sum_{i,j} g([o_i; o_j; q]) )``: every pair of objects, with the question, goes
through the MLP ``g``; the sum over pairs goes through ``f``. The objects are the tokens of one modality (the
cells of a CNN feature map, each already tagged with its position, as in the paper), the question is the pooled
vector of another (text). The task's head (the VQA answer MLP) reads the output, so ``f`` here ends one layer
before the paper's answer layer.

``g``'s first layer is linear in ``[o_i; o_j; q]``, so it is computed as ``A o_i + B o_j + C q`` from
per-object projections and broadcast over pairs: the N^2 pairs never exist as concatenated inputs.
"""

from __future__ import annotations

import torch
from torch import nn

from mmlit.models.backbone import Encoded
from mmlit.models.fusion import Fusion, rows
from mmlit.registry import register_fusion

__all__ = ["RelationNetworkFusion"]


@register_fusion("relation_network")
class RelationNetworkFusion(Fusion):
    """Relation network over pairs of ``objects`` tokens, conditioned on the pooled ``question``.

    Args:
        dim: input and output width (the same as the encoders').
        hidden: width of ``g`` and ``f`` (the paper: 256).
        g_layers: layers of ``g`` (the paper: 4).
        f_layers: layers of ``f`` before the task's head (the paper's ``f`` has 3 with the answer layer).
        dropout: dropout in ``f`` (the paper: 0.5 before its last layer).
        objects: the modality whose tokens are the objects: ``image``.
        question: the modality whose pooled vector conditions every pair: ``text``.
    """

    def __init__(self, dim: int = 128, hidden: int = 256, g_layers: int = 4, f_layers: int = 2, dropout: float = 0.0,
                 objects: str = "image", question: str = "text"):
        super().__init__()
        if g_layers < 1 or f_layers < 1:
            raise ValueError("fusion: g_layers and f_layers must be at least 1")
        self.dim, self.modalities = dim, (objects, question)
        self.left, self.right = nn.Linear(dim, hidden), nn.Linear(dim, hidden, bias=False)
        self.question = nn.Linear(dim, hidden, bias=False)
        g = []
        for _ in range(g_layers - 1):
            g += [nn.Linear(hidden, hidden), nn.ReLU()]
        self.g = nn.Sequential(*g)
        f = []
        for i in range(f_layers):
            last = i == f_layers - 1
            f += [nn.Linear(hidden, dim if last else hidden)] + ([] if last else [nn.ReLU(), nn.Dropout(dropout)])
        self.f = nn.Sequential(*f)

    def forward(self, encoded: dict[str, Encoded], index: dict[str, torch.Tensor]) -> Encoded:
        """objects' tokens (Q, N, D) and the question's pooled (Q, D) -> pooled (Q, D); no tokens."""
        objects, question = (rows(encoded[m], index.get(m)) for m in self.modalities)
        left, right = self.left(objects.tokens), self.right(objects.tokens)  # (Q, N, H)
        pairs = left[:, :, None] + right[:, None, :] + self.question(question.pooled)[:, None, None]  # (Q, N, N, H)
        relations = self.g(torch.relu(pairs)).sum(dim=(1, 2))  # (Q, H)
        return Encoded(None, self.f(relations))
