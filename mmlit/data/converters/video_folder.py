"""``mmlit data convert video-folder``: a folder of clips and a table of their captions -> shards, one sample per clip
with all its captions.

The layout: clips below ``--videos`` in any of the video modality's formats (``.mp4``, ``.webm``, ``.mkv``, ``.mov``,
``.avi``), and a table (CSV, TSV, JSONL, parquet) with a file column (paths below ``--videos``) and a caption column,
a row per caption (a clip may have several rows). A sample is the clip as found, ``.txt`` (its first caption) and
``.json`` ``{"file", "captions": [...]}`` (captions in row order, whitespace made single spaces). Clips are written in
path order, keyed by position (``00000000``, ...); ``--val-fraction`` holds out that share of them as the val split,
chosen by a generator seeded with ``--seed``. A clip without a caption row, a row without a caption, and a clip that
is missing or cannot be decoded (or is past ``--max-frames`` / ``--max-pixels``) are left out and listed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mmlit.data.converters.media import (add_limit_arguments, captions_by_file, checking_modality, media_files,
                                         text_entries)
from mmlit.data.converters.table import read_table
from mmlit.data.converters.writer import Planned, Skipped, check_output, hold_out, numbered, write_split

HELP = "a folder of video clips and a CSV/TSV of their captions"
__all__ = ["HELP", "add_arguments", "plan_video_folder", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--videos", required=True, help="the folder of the clips")
    parser.add_argument("--captions", required=True, help="the captions table (.csv, .tsv, .jsonl, .parquet)")
    parser.add_argument("--file-column", default="file", help="the column of clip paths (below --videos)")
    parser.add_argument("--caption-column", default="caption", help="the column of captions")
    parser.add_argument("--split", default="train", help="the split to write (its shards are SPLIT-000000.tar, ...)")
    parser.add_argument("--val-fraction", type=float, default=0.0, help="share of clips written as the val split")
    parser.add_argument("--seed", type=int, default=0, help="seed of the val split")
    add_limit_arguments(parser, "video")


def plan_video_folder(videos: Path, captions: Path, file_column: str, caption_column: str
                      ) -> tuple[list[Planned], list[Skipped]]:
    """The captioned clips in path order (a clip the table names but the folder lacks too: the writer lists it) and
    what was left out."""
    if not videos.is_dir():
        raise FileNotFoundError(f"--videos: '{videos}' is not a folder")
    flags = {file_column: "--file-column", caption_column: "--caption-column"}
    clips, skipped = captions_by_file(read_table(captions, "--captions"),
                                      lambda row: str(row[file_column] if row[file_column] is not None else ""),
                                      [caption_column], flags)
    by_path: dict[str, tuple[str, list[str]]] = {}  # ("./a.mp4" and "a.mp4" are one clip)
    for name, (where, texts) in clips.items():
        by_path.setdefault(Path(name).as_posix(), (where, []))[1].extend(texts)
    for path in media_files(videos, "video"):
        relative = path.relative_to(videos).as_posix()
        if relative not in by_path:
            skipped.append(Skipped(relative, f"no caption in {captions}", str(path)))
    planned = [Planned("", where, str(videos / name), text_entries(texts, file=name), modality="video")
               for name, (where, texts) in sorted(by_path.items())]
    return planned, skipped


def run(args: argparse.Namespace) -> list:
    planned, skipped = plan_video_folder(Path(args.videos), Path(args.captions), args.file_column, args.caption_column)
    splits = hold_out(planned, args.split, args.val_fraction, args.seed)
    out = check_output(args.out, [args.split, "val"], args.overwrite)
    video = checking_modality(args, "video")
    return [write_split(numbered(samples), out, split, shard_size=args.shard_size, workers=args.workers,
                        progress=args.progress, skipped=skipped if split == args.split else None,
                        modalities={"video": video}) for split, samples in splits.items()]
