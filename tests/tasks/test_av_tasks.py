"""The shipped tasks on audio and video: spoken VQA, video QA, contrastive between any two modalities, and speech-text
alignment by DTW, on the spoken and moving Sort-of-CLEVR shards."""

from __future__ import annotations

import pytest
import torch
from jsonargparse import ArgumentParser

from mmlit.data import TaskStream, scan_shards
from mmlit.data.collate import Padded
from mmlit.models import Backbone
from mmlit.tasks import VQA, Contrastive, Shards, SpeechTextAlignment
from mmlit.text import load_tokenizer

from ..conftest import tiny_audio_encoder, tiny_backbone, tiny_video_encoder



def _backbone(encoders: dict, query: str | None = None, context: str | None = None) -> Backbone:
    config = tiny_backbone()
    config["init_args"]["encoders"] = encoders
    if query is None:
        del config["init_args"]["fusion"]
    else:
        config["init_args"]["fusion"]["init_args"].update(query=query, context=context)
    parser = ArgumentParser()
    parser.add_argument("--backbone", type=Backbone)
    return parser.instantiate_classes(parser.parse_object({"backbone": config})).backbone


def _batch(task, backbone, soc, train: bool = True, batch_size: int = 4) -> dict:
    torch.manual_seed(0)
    task.build(backbone)
    stream = TaskStream(task, scan_shards(soc["shards"]["train" if train else "val"], "k"),
                        load_tokenizer(soc["tokenizer"]), batch_size=batch_size, train=train, seed=0, shuffle_buffer=16)
    return next(iter(stream))[1]


def _trains_down(task, backbone, batch, steps: int = 40) -> list[float]:
    optimizer = torch.optim.AdamW([*backbone.parameters(), *task.parameters()], lr=2e-3)
    losses = []
    for _ in range(steps):
        loss = task(backbone, batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    return losses


def _encoders(*names: str) -> dict:
    base = tiny_backbone()["init_args"]["encoders"]
    known = {**base, "audio": tiny_audio_encoder(), "video": tiny_video_encoder(tokens="grid")}
    return {name: known[name] for name in names}


def test_spoken_vqa_hears_each_question_from_its_own_entry(soc):
    from mmlit.data.sort_of_clevr import ANSWERS

    task = VQA(Shards(train=soc["train"]), list(ANSWERS), batch_size=4, questions_field="json.spoken_questions",
               spoken=True, relational=True)
    backbone = _backbone(_encoders("image", "audio"), query="audio", context="image")
    batch = _batch(task, backbone, soc)
    assert isinstance(batch["question"], Padded) and batch["question"].values.shape[:2] == (16, 64)  # 4 x 4 questions
    lengths = batch["question"].lengths
    assert len(set(lengths.tolist())) > 1 and lengths.max() == batch["question"].values.shape[-1]  # own lengths
    assert batch["image"].shape == (4, 3, 75, 75)
    assert batch["image_index"].tolist() == [i for i in range(4) for _ in range(4)]
    assert task.modalities == ("image", "audio")
    _trains_down(task, backbone, batch)


def test_video_qa_reads_sampled_frames_of_each_clip(soc):
    from mmlit.data.sort_of_clevr_av import MOTION_ANSWERS

    task = VQA(Shards(train=soc["train"]), list(MOTION_ANSWERS), batch_size=4, questions_field="json.motion_questions",
               visual="video", answer_types=["direction", "fastest", "closest_end"], type_key="type")
    backbone = _backbone(_encoders("video", "text"), query="text", context="video")
    batch = _batch(task, backbone, soc)
    assert batch["video"].shape == (4, 4, 3, 75, 75) and batch["video"].dtype == torch.uint8
    assert set(batch["answer_type"].tolist()) == {0, 1, 2}  # every question has its type
    _trains_down(task, backbone, batch)
    metrics = task.metrics()
    task.update_metrics(metrics, task(backbone, batch), batch)
    assert {"acc", "acc_direction", "acc_fastest", "acc_closest_end"} == set(metrics.compute())


@pytest.mark.parametrize("pair,field", [(("image", "audio"), "flac"), (("video", "text"), "json.motion_caption")])
def test_contrastive_pairs_any_two_modalities(soc, pair, field):
    task = Contrastive(Shards(train=soc["train"]), batch_size=4, caption_field=field, pair=pair)
    backbone = _backbone(_encoders(*pair))
    batch = _batch(task, backbone, soc)
    assert pair[0] in batch and len(batch["image_index"]) == 4
    caption = batch["caption"]
    assert (caption.values if isinstance(caption, Padded) else caption).shape[0] == 4
    _trains_down(task, backbone, batch)


def test_contrastive_pairs_are_checked():
    with pytest.raises(ValueError, match="two different modalities"):
        Contrastive(Shards(train="x"), pair=("audio", "audio"))
    from mmlit.tasks.contrastive import ZeroShot

    with pytest.raises(ValueError, match="caption_field: the audio captions are an entry"):
        Contrastive(Shards(train="x"), pair=("image", "audio"))  # (the default caption_field, txt)
    with pytest.raises(ValueError, match="zero_shot"):
        Contrastive(Shards(train="x"), pair=("image", "audio"), caption_field="flac",
                    zero_shot=ZeroShot(Shards(val="x"), classes=["a"]))


def test_word_boundaries_come_from_the_dtw_path():
    """Three words of 1, 2 and 1 tokens over 10 audio tokens of 40 ms (each starting half a 10 ms hop before its first
    frame's centre): the path gives tokens frames 0-2, 3-4, 5-6, 7-9, so the words span frames 0-2, 3-6 and 7-9:
    0-115 ms, 115-275 ms, 275-395 ms."""
    task = SpeechTextAlignment(Shards(train="x"), "json.words")
    task.seconds_per_token, task.offset = 0.04, 0.005
    path = torch.zeros(1, 10, 4, dtype=torch.bool)
    for token, frames in enumerate(((0, 1, 2), (3, 4), (5, 6), (7, 8, 9))):
        path[0, list(frames), token] = True
    start, end = task.boundaries(path, torch.tensor([[0, 1, 1, 2]]), 3)
    assert torch.allclose(start, torch.tensor([[0.0, 0.115, 0.275]])) and \
        torch.allclose(end, torch.tensor([[0.115, 0.275, 0.395]]))
    metrics = task.metrics()
    batch = {"word": torch.tensor([[0, 1, 1, 2]]), "start": torch.tensor([[0.0, 0.15, 0.28]]),
             "end": torch.tensor([[0.1, 0.28, 0.5]])}
    task.update_metrics(metrics, {"path": path, "logits": torch.eye(1)}, batch)
    values = metrics.compute()  # errors 0, 35, 5 ms (starts) and 15, 5, 105 ms (ends)
    assert values["boundary_error_ms"].item() == pytest.approx(165 / 6, abs=1e-3)
    assert values["within_50ms"].item() == pytest.approx(5 / 6)


def test_alignment_needs_audio_tokens_in_time(soc):
    task = SpeechTextAlignment(Shards(train=soc["train"]), "json.spoken_caption.words")
    audio = {**tiny_audio_encoder(), "init_args": {**tiny_audio_encoder()["init_args"], "patch_size": [16, 16]}}
    with pytest.raises(ValueError, match="patch_size spans all n_mels"):
        task.build(_backbone({"audio": audio, **_encoders("text")}))


def test_an_entry_of_another_modality_is_a_counted_skip(soc):
    """A spoken question (from the data) that names an entry which is not audio: the sample fails with its name."""
    from mmlit.data import SampleError, decode_sample, iter_samples
    from mmlit.data.sort_of_clevr import ANSWERS

    task = VQA(Shards(train=soc["train"]), list(ANSWERS), questions_field="json.spoken_questions", spoken=True)
    sample = decode_sample(next(iter(iter_samples(soc["shards"]["val"][0]))), task.data.fields)
    sample["json"]["spoken_questions"][0]["audio"] = "png"
    with pytest.raises(SampleError, match="reads the entry 'png' as audio"):
        list(task.data.prepare(sample, None))
