"""Caption metrics: CIDEr-D (Vedantam et al. 2015), BLEU-4 (Papineni et al. 2002: torchmetrics' corpus BLEU, with
coco-caption's choice of reference length), exact match and token accuracy, on token ids against all the reference
captions of an image.

Scores are computed on the tokenizer's tokens (lower-cased words and punctuation, word pieces for rare words), not on
the PTB tokenizer of the COCO caption toolkit, so they are close to, not equal to, published numbers. Every metric
keeps what it needs to be computed over the whole split on all ranks: CIDEr-D's document frequencies come from the
references of every image, gathered before it is computed.
"""

from __future__ import annotations

import math
from collections import Counter

import torch
from torchmetrics import MeanMetric, Metric
from torchmetrics.text import BLEUScore
from torchmetrics.utilities import dim_zero_cat

from mmlit.text import BOS, EOS, PAD

__all__ = ["CIDErD", "caption_metrics", "cider_d", "sequence_match", "tokens_of", "update_caption_metrics"]


def _ngrams(tokens: list[int], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + k]) for k in range(1, n + 1) for i in range(len(tokens) - k + 1))


def cider_d(candidates: list[list[int]], references: list[list[list[int]]], n: int = 4, sigma: float = 6.0) -> float:
    """CIDEr-D of each candidate against its references, averaged (x10, as the coco-caption code): per n-gram order,
    the cosine of TF-IDF vectors with the candidate's counts clipped to the reference's, times a Gaussian penalty on
    the length difference; IDF from the references of all the images given."""
    refs = [[_ngrams(r, n) for r in rs] for rs in references]
    frequency: Counter = Counter()
    for counts in refs:
        frequency.update(set().union(*counts) if counts else set())
    log_images = math.log(max(len(refs), 1))

    def vector(counts: Counter) -> tuple[list[dict], list[float], int]:
        vec: list[dict] = [{} for _ in range(n)]
        norm, length = [0.0] * n, 0
        for gram, tf in counts.items():
            k = len(gram) - 1
            vec[k][gram] = tf * (log_images - math.log(max(1.0, frequency[gram])))
            norm[k] += vec[k][gram] ** 2
            if k == 1:
                length += tf  # (the reference code's length: the number of bigrams)
        return vec, [math.sqrt(x) for x in norm], length

    scores = []
    for candidate, counts in zip(candidates, refs):
        vec, norm, length = vector(_ngrams(candidate, n))
        total = 0.0
        for ref in counts:
            vec_r, norm_r, length_r = vector(ref)
            penalty = math.exp(-((length - length_r) ** 2) / (2 * sigma ** 2))
            for k in range(n):
                value = sum(min(v, vec_r[k].get(g, 0.0)) * vec_r[k].get(g, 0.0) for g, v in vec[k].items())
                if norm[k] and norm_r[k]:
                    value /= norm[k] * norm_r[k]
                total += value * penalty / n
        scores.append(10.0 * total / max(len(counts), 1))
    return sum(scores) / max(len(scores), 1)


class CIDErD(Metric):
    """CIDEr-D over every image of the split (gathered over ranks), from candidates and references as token ids.

    The states are flat float tensors (ids and counts are exact in float32 up to 2**24): torchmetrics gathers a rank
    that saw no batch as an empty 1-D float tensor, and every rank must send one shape and type."""

    full_state_update = False

    def __init__(self, n: int = 4, sigma: float = 6.0):
        super().__init__()
        self.n, self.sigma = n, sigma
        self.add_state("tokens", default=[], dist_reduce_fx="cat")  # every candidate and reference, one after another
        self.add_state("lengths", default=[], dist_reduce_fx="cat")  # each of those sequences' length
        self.add_state("references", default=[], dist_reduce_fx="cat")  # each image's number of references

    def update(self, candidates: list[list[int]], references: list[list[list[int]]]) -> None:
        sequences = [s for c, rs in zip(candidates, references) for s in (c, *rs)]
        self.tokens.append(torch.tensor([t for s in sequences for t in s], dtype=torch.float, device=self.device))
        self.lengths.append(torch.tensor([len(s) for s in sequences], dtype=torch.float, device=self.device))
        self.references.append(torch.tensor([len(rs) for rs in references], dtype=torch.float, device=self.device))

    def compute(self) -> torch.Tensor:
        tokens, lengths = dim_zero_cat(self.tokens).long().tolist(), iter(dim_zero_cat(self.lengths).long().tolist())
        position, candidates, references = 0, [], []
        for count in dim_zero_cat(self.references).long().tolist():
            sequences = []
            for _ in range(count + 1):
                length = next(lengths)
                sequences.append(tokens[position:position + length])
                position += length
            candidates.append(sequences[0])
            references.append(sequences[1:])
        return torch.tensor(cider_d(candidates, references, self.n, self.sigma), device=self.device)


def tokens_of(ids: torch.Tensor | list[list[int]]) -> list[list[int]]:
    """Rows of ids -> token lists without BOS, ending before the first EOS or PAD."""
    out = []
    for row in ids.tolist() if isinstance(ids, torch.Tensor) else ids:
        tokens = []
        for t in row:
            if t in (EOS, PAD):
                break
            if t != BOS:
                tokens.append(t)
        out.append(tokens)
    return out


def sequence_match(generated: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Generated ids (B, L) against reference ids (B, T), both left-aligned and PAD-padded (EOS included)
    -> whole-sequence match (B,), correct reference positions (B,) and reference length (B,)."""
    pred = torch.full_like(target, PAD)
    width = min(generated.shape[1], target.shape[1])
    pred[:, :width] = generated[:, :width]
    real = target != PAD
    return ((pred == target) | ~real).all(dim=1), ((pred == target) & real).sum(1), real.sum(1)


def _bleu_references(references: list[list[list[int]]]) -> list[list[str]]:
    """Each image's references as torchmetrics' BLEU takes them, shortest first. The brevity penalty uses the reference
    length closest to the candidate's; where two are equally close, coco-caption takes the shorter and torchmetrics the
    one listed first, so listing the shortest first gives coco-caption's score whatever the order in the data."""
    return [[" ".join(map(str, r)) for r in sorted(rs, key=len)] for rs in references]


def caption_metrics() -> dict[str, Metric]:
    return {"exact_match": MeanMetric(), "token_acc": MeanMetric(), "bleu4": BLEUScore(n_gram=4), "cider": CIDErD()}


def update_caption_metrics(metrics, generated: torch.Tensor, references: torch.Tensor) -> None:
    """Generated ids (B, L), EOS then PAD after the caption, against references (B, R, T) (each EOS-ended and
    PAD-padded; an all-PAD row is no reference). ``exact_match``: equal to one of the references; ``token_acc``:
    position by position against the first one; ``bleu4`` and ``cider`` against all of them."""
    present = (references != PAD).any(-1)  # (B, R)
    exact = torch.stack([sequence_match(generated, references[:, r])[0] for r in range(references.shape[1])], 1)
    metrics["exact_match"].update((exact & present).any(1).float())
    _, correct, real = sequence_match(generated, references[:, 0])
    metrics["token_acc"].update(correct.sum() / real.sum(), weight=real.sum())
    candidates = tokens_of(generated)
    refs = [[r for r, p in zip(tokens_of(rows), kept) if p] for rows, kept in zip(references.tolist(), present.tolist())]
    if "bleu4" in metrics:  # shortest reference first: see _bleu_references
        metrics["bleu4"].update([" ".join(map(str, c)) for c in candidates], _bleu_references(refs))
    if "cider" in metrics:
        metrics["cider"].update(candidates, refs)
