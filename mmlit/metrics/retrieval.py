"""Image-text retrieval recall@K over a whole split, with several captions per image (the COCO 5k protocol of
Karpathy & Fei-Fei 2015): an image query is right at K when any of its captions is among the K texts most similar
to it; a caption query when its image is among the K most similar images. Embeddings are gathered over ranks, and
similarities are computed in blocks, so 5,000 images x 25,000 captions never need one 500 MB matrix."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

__all__ = ["RetrievalRecall", "recall_at_k"]

_BLOCK = 1024  # query rows per similarity block


def recall_at_k(image: torch.Tensor, text: torch.Tensor, text_image: torch.Tensor,
                ks: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """Image (N, E) and text (M, E) embeddings, L2-normalised; ``text_image`` (M,) the image of each text ->
    ``r@{k}_i2t`` and ``r@{k}_t2i`` for each k (a tie counts for the query)."""
    hits = {f"r@{k}_{d}": torch.zeros((), device=image.device) for k in ks for d in ("i2t", "t2i")}
    for start in range(0, len(text), _BLOCK):  # text -> image: the rank of each text's own image
        sim = text[start:start + _BLOCK] @ image.T  # (b, N)
        own = sim.gather(1, text_image[start:start + _BLOCK, None])
        rank = (sim > own).sum(1)
        for k in ks:
            hits[f"r@{k}_t2i"] += (rank < k).sum()
    for start in range(0, len(image), _BLOCK):  # image -> text: the best rank among the image's texts
        rows = torch.arange(start, min(start + _BLOCK, len(image)), device=image.device)
        sim = image[rows] @ text.T  # (b, M)
        mine = text_image[None, :] == rows[:, None]  # (b, M): the image's own texts
        best = sim.masked_fill(~mine, float("-inf")).amax(1, keepdim=True)
        rank = (sim > best).sum(1)
        for k in ks:
            hits[f"r@{k}_i2t"] += ((rank < k) & mine.any(1)).sum()
    return {key: value / (len(text) if key.endswith("t2i") else len(image)) for key, value in hits.items()}


class RetrievalRecall(Metric):
    """Recall@K in both directions over every image and caption of the split (all ranks together).

    Every state is a flat float tensor: torchmetrics gathers a rank that saw no batch as an empty 1-D float tensor,
    and ranks must send tensors of one shape and type (token ids and counts are exact in float32 up to 2**24)."""

    full_state_update = False

    def __init__(self, dim: int, ks: tuple[int, ...] = (1, 5, 10)):
        super().__init__()
        self.dim, self.ks = dim, tuple(ks)
        self.add_state("image", default=[], dist_reduce_fx="cat")  # (images * dim,)
        self.add_state("text", default=[], dist_reduce_fx="cat")  # (texts * dim,)
        self.add_state("text_image", default=[], dist_reduce_fx="cat")  # each text's image, within its update
        self.add_state("sizes", default=[], dist_reduce_fx="cat")  # images, texts of each update, in order

    def update(self, image: torch.Tensor, text: torch.Tensor, text_image: torch.Tensor | None = None) -> None:
        """Image (B, E) and text (C, E) embeddings; ``text_image`` (C,) pairs each text with an image of this batch
        (default: text i with image i)."""
        if text_image is None:
            text_image = torch.arange(len(text), device=text.device)
        self.image.append(F.normalize(image.float(), dim=-1).flatten())
        self.text.append(F.normalize(text.float(), dim=-1).flatten())
        self.text_image.append(text_image.float())
        self.sizes.append(torch.tensor([len(image), len(text)], dtype=torch.float, device=image.device))

    def compute(self) -> dict[str, torch.Tensor]:
        sizes, local = dim_zero_cat(self.sizes).long().view(-1, 2), dim_zero_cat(self.text_image).long()
        offsets = torch.cumsum(sizes[:, 0], 0) - sizes[:, 0]  # each update's first image, over all ranks in order
        text_image = local + torch.repeat_interleave(offsets, sizes[:, 1])
        image, text = dim_zero_cat(self.image).view(-1, self.dim), dim_zero_cat(self.text).view(-1, self.dim)
        return recall_at_k(image, text, text_image, self.ks)
