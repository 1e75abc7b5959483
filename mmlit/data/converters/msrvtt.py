"""``mmlit data convert msrvtt``: MSR-VTT (Xu et al. 2016) video captions -> shards, one sample per clip with all its
captions, in the splits the annotations give.

The layout: MSR-VTT's JSON (``train_val_videodatainfo.json``, ``test_videodatainfo.json``; repeat ``--annotations``
for both) ``{"videos": [{"video_id": "video0", "split": "train", "category": 9, ...}], "sentences": [{"video_id":
"video0", "caption": "...", "sen_id": 0}, ...]}`` and a folder of the clips, ``{video_id}.mp4``
(``--video-pattern``). Splits are the videos' ``split``, ``validate`` written as ``val``. A sample is the clip as
found (``.mp4``), ``.txt`` (its first caption) and ``.json`` ``{"video_id", "captions": [...], "category"}``
(captions in ``sen_id`` order; ``category`` where the file has it). Keys are the video ids. A sentence without a
caption or for a video the files do not list, a video without a caption, and a clip that is missing or cannot be
decoded (or is past ``--max-frames`` / ``--max-pixels``) are left out and listed.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path

from mmlit.data.converters.coco import load_json
from mmlit.data.converters.media import add_limit_arguments, checking_modality, natural_key, text_entries
from mmlit.data.converters.writer import Planned, Skipped, check_output, sample_key, write_split

HELP = "MSR-VTT: its videodatainfo JSON and the folder of its clips"
__all__ = ["HELP", "add_arguments", "plan_msrvtt", "run"]

_SPLIT_NAMES = {"validate": "val", "validation": "val"}
_ORDER = ("train", "val", "test")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--annotations", required=True, action="append",
                        help="MSR-VTT JSON with videos and sentences (repeat: train_val_videodatainfo.json and "
                             "test_videodatainfo.json)")
    parser.add_argument("--videos", required=True, help="the folder of the clips")
    parser.add_argument("--video-pattern", default="{video_id}.mp4", help="a clip's file name; field: video_id")
    add_limit_arguments(parser, "video")


def _split(video: dict) -> str:
    return _SPLIT_NAMES.get(str(video["split"]), str(video["split"]))


def plan_msrvtt(annotations: list[Path], videos: Path, pattern: str
                ) -> tuple[dict[str, list[Planned]], dict[str, list[Skipped]]]:
    """Each split's clips (in video-id order) and what was left out of it (a sentence for a video no file lists: of
    the first split)."""
    if not videos.is_dir():
        raise FileNotFoundError(f"--videos: '{videos}' is not a folder")
    listed: dict[str, tuple[str, dict]] = {}  # video_id -> (where, its entry)
    sentences: list[tuple[str, dict]] = []
    for path in annotations:
        content = load_json(path, "--annotations", "videos", "sentences")
        for i, video in enumerate(content["videos"]):
            where = f"{path} videos[{i}]"
            if not isinstance(video, dict) or not isinstance(video.get("video_id"), str) or "split" not in video:
                raise ValueError(f"{where}: needs \"video_id\" (a string) and \"split\", got {str(video)[:200]}")
            if video["video_id"] in listed:
                raise ValueError(f"{where}: {video['video_id']!r} is listed already ({listed[video['video_id']][0]})")
            listed[video["video_id"]] = (where, video)
        sentences += [(f"{path} sentences[{i}]", s) for i, s in enumerate(content["sentences"])]
    captions: dict[str, list[tuple]] = defaultdict(list)
    skipped: dict[str, list[Skipped]] = defaultdict(list)  # split ("": none known) -> left out
    for where, sentence in sentences:
        caption = sentence.get("caption") if isinstance(sentence, dict) else None
        video_id = sentence.get("video_id") if isinstance(sentence, dict) else None
        if video_id not in listed:
            skipped[""].append(Skipped(where, f"video_id {video_id!r} is not in the files' videos"))
        elif not isinstance(caption, str) or not caption.strip():
            skipped[_split(listed[video_id][1])].append(Skipped(where, "no caption"))
        else:
            order = sentence.get("sen_id", len(captions[sentence["video_id"]]))
            captions[sentence["video_id"]].append((order, " ".join(caption.split())))
    splits: dict[str, list[Planned]] = defaultdict(list)
    for video_id in sorted(listed, key=natural_key):
        where, video = listed[video_id]
        try:
            path = videos / pattern.format(video_id=video_id)
        except (KeyError, ValueError, IndexError) as err:
            raise ValueError(f"--video-pattern {pattern!r}: {err!r} (field: video_id)") from None
        if not captions[video_id]:
            skipped[_split(video)].append(Skipped(where, "no caption", str(path)))
            continue
        texts = [text for _, text in sorted(captions[video_id], key=lambda c: c[0])]
        info = {"video_id": video_id, **({"category": video["category"]} if "category" in video else {})}
        splits[_split(video)].append(Planned(sample_key(video_id), where, str(path), text_entries(texts, **info),
                                     modality="video"))
    ordered = sorted(splits, key=lambda s: (_ORDER.index(s) if s in _ORDER else len(_ORDER), s))
    if ordered:
        skipped[ordered[0]] = skipped.pop("", []) + skipped[ordered[0]]
    return {split: splits[split] for split in ordered}, skipped


def run(args: argparse.Namespace) -> list:
    splits, skipped = plan_msrvtt([Path(a) for a in args.annotations], Path(args.videos), args.video_pattern)
    if not splits:
        raise ValueError(f"--annotations: no video with a caption in {', '.join(args.annotations)}")
    out = check_output(args.out, list(splits), args.overwrite)
    video = checking_modality(args, "video")
    return [write_split(planned, out, split, shard_size=args.shard_size, workers=args.workers, progress=args.progress,
                        skipped=skipped.get(split), modalities={"video": video}) for split, planned in splits.items()]
