"""Speech-text alignment by dynamic time warping: audio frames and transcript tokens embedded so that the DTW path
between them follows the words.

Training is weakly supervised, by pairing alone: the cost of matching an audio token (one per 40 ms with the default
audio encoder) with a transcript token is ``1 - cos`` of their embeddings, a clip's score against a transcript is
minus their soft-DTW (Cuturi & Blondel 2017; ``mmlit/dtw.py``) divided by the lengths' sum, and every clip of a batch
is scored against every transcript under a symmetric InfoNCE loss (the DTW-based form of CLIP's): the alignment that
makes a clip closest to its own transcript is the one that puts each word where it is said. The known word times
are only read to score it.

Evaluation, on each clip and its own transcript: the hard DTW path (``dtw_path``) gives each word the audio tokens
aligned to its tokens; its start is the first one's start, its end the last one's end. ``boundary_error_ms`` is the
mean absolute error of word starts and ends against the known ones, ``within_50ms`` the share of boundaries within
50 ms. ``recall_at_1`` is DTW-based retrieval: the share of clips (and transcripts) whose own transcript (clip) is the
closest, by soft-DTW, among the batch's.

Data contract: an audio entry (``audio_field``: ``flac``, the spoken caption of ``mmlit data sort-of-clevr
--spoken``) and its words with their times (``words_field``: a list of ``{"word", "start", "end"}``, seconds). Token
k of the default audio encoder spans frames 4k to 4k + 3 of 10 ms, frame f centred at f x 10 ms: [40k - 5, 40k + 35)
ms.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric, MetricCollection

from mmlit.data import Shards, TaskData
from mmlit.data.collate import collate_examples, pad
from mmlit.data.decode import SampleError, sample_field, sample_location
from mmlit.dtw import dtw_path, soft_dtw
from mmlit.modalities.audio import AudioTransform
from mmlit.registry import register_task
from mmlit.tasks.base import Task

__all__ = ["SpeechTextAlignment", "SpeechTextAlignmentData"]


class SpeechTextAlignmentData(TaskData):
    """Clips, their transcripts' token ids, each token's word and each word's times (the arguments are the task's)."""

    reads = ("audio", "text")

    def __init__(self, shards: Shards, batch_size: int, audio_field: str, words_field: str,
                 audio_transform: AudioTransform):
        super().__init__(shards, batch_size, {"audio": audio_transform})
        self.audio_field, self.words_field, self.fields = audio_field, words_field, (audio_field, words_field)

    def prepare(self, sample: dict, tokenizer) -> Iterator[dict]:
        words = sample_field(sample, self.words_field, self.name)
        timed = (lambda w: isinstance(w, dict) and "word" in w  # noqa: E731
                 and all(isinstance(w.get(k), (int, float)) for k in ("start", "end")))
        if not isinstance(words, list) or not words or not all(map(timed, words)):
            raise SampleError(f"{sample_location(sample)}: '{self.words_field}' must be a list of "
                              f'{{"word", "start", "end"}} (times in seconds)')
        ids, owner = [], []
        for i, w in enumerate(words):
            token_ids = self.token_ids(tokenizer, str(w["word"]))
            if not token_ids:
                raise SampleError(f"{sample_location(sample)}: the word {w['word']!r} has no tokens")
            ids += token_ids
            owner += [i] * len(token_ids)
        limit = self.pipeline("text").max_length
        if limit is not None and len(ids) > limit:
            raise SampleError(f"{sample_location(sample)}: its transcript has {len(ids)} tokens, more than the text "
                              f"encoder's max_length={limit}")
        yield {"audio": self.entry(sample, self.audio_field, "audio"), "text": ids, "word": owner,
               "start": [float(w["start"]) for w in words], "end": [float(w["end"]) for w in words]}

    def collate(self, examples: list[dict]) -> dict[str, Any]:
        """audio (``Padded`` spectrograms), text (B, T) ids, word (B, T) each token's word (-1: padding), start / end
        (B, W) each word's times in seconds (-1: padding), and key (B) when predicting."""
        padded = {"word": (-1, torch.long), "start": (-1.0, torch.float), "end": (-1.0, torch.float)}
        return {"audio": self.collate_input("audio", [e["audio"] for e in examples]),
                "text": self.collate_input("text", [e["text"] for e in examples]),
                **{k: pad([e[k] for e in examples], value, dtype) for k, (value, dtype) in padded.items()},
                **collate_examples([{k: v for k, v in e.items() if k not in {"audio", "text", *padded}}
                                    for e in examples])}


@register_task("speech_text_alignment")
class SpeechTextAlignment(Task):
    """Align speech with its transcript by DTW (soft-DTW InfoNCE in training; word boundaries from the hard path).

    Args:
        audio_field: the audio entry (``flac``).
        words_field: the words with their times, a list of ``{"word", "start", "end"}`` (seconds): Sort-of-CLEVR's
            spoken caption's are ``json.spoken_caption.words``.
        embed_dim: width of the frame and token embeddings.
        gamma: soft-DTW's smoothing (small: close to hard DTW; large: smoother gradients).
        band: a Sakoe-Chiba band (``mmlit.dtw``), in tokens; None: every cell.
        temperature: of the InfoNCE over DTW scores.
        audio_transform: augmentation of the clips in training (no time shift by default: it would move the words).
    """

    modalities = ("audio", "text")

    def __init__(self, shards: Shards, words_field: str, batch_size: int = 16, audio_field: str = "flac",
                 embed_dim: int = 64, gamma: float = 0.1,
                 band: int | None = None, temperature: float = 0.1, audio_transform: AudioTransform | None = None):
        if gamma <= 0 or temperature <= 0:
            raise ValueError(f"model.tasks.{getattr(self, 'task_name', 'speech_text_alignment')}.init_args: gamma and "
                             f"temperature must be > 0, got {gamma} and {temperature}")
        super().__init__(SpeechTextAlignmentData(shards, batch_size, audio_field, words_field,
                                                 audio_transform or AudioTransform(shift_seconds=0.0)))
        self.embed_dim, self.gamma, self.band, self.temperature = embed_dim, gamma, band, temperature

    def build(self, backbone) -> None:
        super().build(backbone)
        audio = backbone.encoders["audio"]
        patch = getattr(audio, "patch", None)
        if patch is None or patch[0] != audio.n_mels:
            raise ValueError(f"model.tasks.{self.name}: alignment needs audio tokens in time (an audio encoder whose "
                             f"patch_size spans all n_mels, the default), got patch_size={patch}")
        # token k spans frames 4k .. 4k+3, frame f centred at f hops (torch.stft(center=True)): half a hop earlier
        self.seconds_per_token = patch[1] * audio.hop_length / audio.sample_rate
        self.offset = audio.hop_length / audio.sample_rate / 2
        self.audio_proj = nn.Linear(backbone.dim, self.embed_dim)
        self.text_proj = nn.Linear(backbone.dim, self.embed_dim)

    def _embed(self, backbone, batch: dict) -> tuple[torch.Tensor, ...]:
        features = backbone(audio=batch["audio"], text=batch["text"], fuse=False)
        audio, text = features["audio"], features["text"]
        offset = text.tokens.shape[1] - batch["text"].shape[1]  # (a class token before the text's)
        a = F.normalize(self.audio_proj(audio.tokens), dim=-1)  # (B, N, E)
        t = F.normalize(self.text_proj(text.tokens[:, offset:]), dim=-1)  # (B, T, E)
        return a, t, audio.mask.sum(1), (batch["word"] >= 0).sum(1)

    def forward(self, backbone, batch: dict) -> dict[str, torch.Tensor]:
        a, t, a_len, t_len = self._embed(backbone, batch)
        size = len(a)
        cost = 1 - torch.einsum("ine,jte->ijnt", a, t).reshape(size * size, a.shape[1], t.shape[1])
        lengths = a_len.repeat_interleave(size), t_len.repeat(size)
        try:
            value = soft_dtw(cost, *lengths, gamma=self.gamma, band=self.band)
        except ValueError as err:  # (a band too narrow for a clip and a transcript of the batch)
            raise ValueError(f"model.tasks.{self.name}.init_args.band: {err}") from None
        score = -value.view(size, size) / (a_len[:, None] + t_len[None, :])  # (clip, transcript)
        logits = score.float() / self.temperature
        target = torch.arange(size, device=logits.device)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        outputs = {"loss": loss, "logits": logits}
        if not self.training:  # (the path is what evaluation scores)
            own = cost.view(size, size, *cost.shape[1:])[target, target]  # (B, N, T) each clip against its transcript
            outputs["path"] = dtw_path(own.detach(), a_len, t_len, self.band)
        return outputs

    def boundaries(self, path: torch.Tensor, word: torch.Tensor, words: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each word's start and end (B, W) in seconds from the path (B, N, T) and each token's word (B, T)."""
        frames = torch.arange(path.shape[1], device=path.device, dtype=torch.float)[None, :, None]
        first = torch.where(path, frames, float("inf")).amin(1)  # (B, T) each token's first audio token
        last = torch.where(path, frames, float("-inf")).amax(1)
        index = word.clamp(min=0)
        start = torch.full((len(path), words), float("inf"), device=path.device).scatter_reduce(
            1, index, torch.where(word >= 0, first, float("inf")), "amin")
        end = torch.full((len(path), words), float("-inf"), device=path.device).scatter_reduce(
            1, index, torch.where(word >= 0, last, float("-inf")), "amax")
        start = (start * self.seconds_per_token - self.offset).clamp(min=0)
        return start, (end + 1) * self.seconds_per_token - self.offset

    def metrics(self) -> MetricCollection:
        return MetricCollection({n: MeanMetric() for n in ("boundary_error_ms", "within_50ms", "recall_at_1")})

    def update_metrics(self, metrics: MetricCollection, outputs: dict, batch: dict) -> None:
        start, end = self.boundaries(outputs["path"], batch["word"], batch["start"].shape[1])
        real = batch["start"] >= 0
        error = torch.cat([(start - batch["start"])[real], (end - batch["end"])[real]]).abs() * 1000
        metrics["boundary_error_ms"].update(error)
        metrics["within_50ms"].update((error <= 50).float())
        logits, target = outputs["logits"], torch.arange(len(outputs["logits"]), device=error.device)
        metrics["recall_at_1"].update(torch.cat([logits.argmax(1) == target, logits.argmax(0) == target]).float())

    def predict(self, outputs: dict, batch: dict, tokenizer) -> list[dict]:
        """Per clip: each word's predicted start and end (seconds), and the clip's DTW score with its transcript."""
        start, end = self.boundaries(outputs["path"], batch["word"], batch["start"].shape[1])
        real = batch["start"] >= 0
        return [{"key": k, "prediction": [[round(s, 4), round(e, 4)] for s, e in zip(s_[r].tolist(), e_[r].tolist())],
                 "score": round(float(outputs["logits"][i, i]), 6)}
                for i, (k, s_, e_, r) in enumerate(zip(batch["key"], start, end, real))]
