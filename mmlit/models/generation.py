"""Decoding for every generating task (captioning, the prefix LM): greedy decoding and beam search over one
``next_logits`` function, so a new generating head gets both by writing that function.

``next_logits(ids, rows)`` returns the logits of the token after ``ids`` (N, t) for sequences that continue the
prompts ``rows`` (N,) (an index into the batch: a task uses it to pick each sequence's image or prefix). Beam search
keeps ``beam_size`` hypotheses per prompt; a hypothesis that has ended (EOS) keeps its score and is carried along
until the last step; the best is chosen by its log-probability divided by ``length ** length_penalty``
(Wu et al. 2016's normalisation in its simplest form; 0: raw log-probability).
"""

from __future__ import annotations

from typing import Callable

import torch

from mmlit.text import EOS, PAD

__all__ = ["generate"]

NextLogits = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@torch.no_grad()
def generate(next_logits: NextLogits, prompt: torch.Tensor, steps: int, *, beam_size: int = 1,
             length_penalty: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Continue each prompt (B, P) by up to ``steps`` tokens -> (generated ids (B, L<=steps), EOS then PAD after
    the end; score (B,): the log-probability of the generated tokens, EOS included)."""
    if beam_size < 1:
        raise ValueError(f"beam_size must be at least 1, got {beam_size}")
    if beam_size == 1:
        return _greedy(next_logits, prompt, steps)
    return _beam(next_logits, prompt, steps, beam_size, length_penalty)


def _greedy(next_logits: NextLogits, prompt: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.arange(len(prompt), device=prompt.device)
    ids, done = prompt, torch.zeros(len(prompt), dtype=torch.bool, device=prompt.device)
    score = torch.zeros(len(prompt), device=prompt.device)
    for _ in range(steps):
        logp = next_logits(ids, rows).float().log_softmax(-1)
        step = logp.argmax(-1)
        score += torch.where(done, 0.0, logp.gather(1, step[:, None])[:, 0])
        step = torch.where(done, torch.full_like(step, PAD), step)
        ids = torch.cat([ids, step[:, None]], dim=1)
        done |= step == EOS
        if done.all():
            break
    return ids[:, prompt.shape[1]:], score


def _beam(next_logits: NextLogits, prompt: torch.Tensor, steps: int, k: int,
          length_penalty: float) -> tuple[torch.Tensor, torch.Tensor]:
    batch, device = len(prompt), prompt.device
    rows = torch.arange(batch, device=device).repeat_interleave(k)  # (B*k,)
    ids = prompt.repeat_interleave(k, dim=0)
    score = torch.full((batch, k), float("-inf"), device=device)
    score[:, 0] = 0.0  # the k beams start identical: only one may expand at the first step
    score = score.flatten()
    done = torch.zeros(batch * k, dtype=torch.bool, device=device)
    length = torch.zeros(batch * k, device=device)
    for _ in range(steps):
        logp = next_logits(ids, rows).float().log_softmax(-1)  # (B*k, V)
        vocab = logp.shape[1]
        ended = torch.full_like(logp, float("-inf"))
        ended[:, PAD] = 0.0  # an ended hypothesis continues with PAD at no cost
        logp = torch.where(done[:, None], ended, logp)
        total = (score[:, None] + logp).view(batch, k * vocab)
        score, flat = total.topk(k, dim=1)  # (B, k)
        beam, token = flat // vocab, flat % vocab
        source = (beam + torch.arange(batch, device=device)[:, None] * k).flatten()
        score, token = score.flatten(), token.flatten()
        ids = torch.cat([ids[source], token[:, None]], dim=1)
        was_done = done[source]
        length = length[source] + (~was_done).float()
        done = was_done | (token == EOS)
        if done.all():
            break
    normalised = (score / length.clamp(min=1) ** length_penalty).view(batch, k)
    best = normalised.argmax(1) + torch.arange(batch, device=device) * k
    return ids[best, prompt.shape[1]:], score[best]
