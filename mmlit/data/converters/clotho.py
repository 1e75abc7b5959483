"""``mmlit data convert clotho``: audio captions (Clotho, Drossos et al. 2020; AudioCaps, Kim et al. 2019) -> shards,
one sample per clip with all its captions.

The layout: a table (CSV, TSV, JSONL, parquet) naming each clip's file and its captions, and a folder of the clips.
Clotho's ``clotho_captions_{development,validation,evaluation}.csv`` have one row per clip (``file_name``,
``caption_1`` .. ``caption_5``: the defaults); AudioCaps' ``{train,val,test}.csv`` have one row per caption
(``audiocap_id,youtube_id,start_time,caption``: ``--file-column youtube_id --caption-columns caption``), and the rows
of a clip are grouped. ``--file-pattern`` builds the file name from the row's columns (``'Y{youtube_id}.wav'``);
without it the file column is the name, and a name without an audio extension is completed with the first of the
audio modality's extensions found (``{youtube_id}.flac``, ``.mp3``, ``.ogg``, ``.wav``).

A sample is the clip as found (``.wav``, ``.flac``, ...), ``.txt`` (its first caption) and ``.json``
``{"file", "captions": [...]}`` (captions in row and column order, whitespace made single spaces). Keys are the
clips' positions (``00000000``, ...) in the table's order. A row without a file name or caption, and a clip that is
missing or cannot be decoded (or is longer than ``--max-seconds``), are left out and listed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mmlit.data.converters.media import add_limit_arguments, captions_by_file, checking_modality, text_entries
from mmlit.data.converters.table import read_table
from mmlit.data.converters.writer import Planned, Skipped, check_output, numbered, write_split
from mmlit.registry import get_modality

HELP = "audio captions: a Clotho or AudioCaps CSV and the folder of its clips"
__all__ = ["HELP", "add_arguments", "plan_clotho", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--csv", required=True, help="the captions table (.csv, .tsv, .jsonl, .parquet)")
    parser.add_argument("--audio", required=True, help="the folder of the clips the table names")
    parser.add_argument("--file-column", default="file_name", help="the column naming each clip's file")
    parser.add_argument("--caption-columns", default=",".join(f"caption_{i}" for i in range(1, 6)),
                        help="comma-separated columns of captions (default: Clotho's)")
    parser.add_argument("--file-pattern", default=None,
                        help="a clip's file name from its row's columns, e.g. 'Y{youtube_id}.wav' "
                             "(default: the file column)")
    parser.add_argument("--split", default="train", help="the split to write (its shards are SPLIT-000000.tar, ...)")
    add_limit_arguments(parser, "audio")


def _file_name(pattern: str | None, column: str):
    def name(row: dict) -> str:
        if pattern is None:
            return str(row[column] if row[column] is not None else "")
        try:
            return pattern.format(**row)
        except (KeyError, ValueError, IndexError) as err:
            raise ValueError(f"--file-pattern {pattern!r}: {err!r} (the row's columns: {', '.join(row)})") from None

    return name


def _find(folder: Path, name: str, extensions: frozenset[str]) -> Path | None:
    """The clip's file: ``name`` itself when it has an audio extension, else the first ``name.{ext}`` that exists."""
    path = folder / name
    if path.suffix.lower().lstrip(".") in extensions:
        return path
    return next((p for p in (folder / f"{name}.{ext}" for ext in sorted(extensions)) if p.is_file()), None)


def plan_clotho(table: Path, audio: Path, file_column: str, caption_columns: list[str],
                file_pattern: str | None) -> tuple[list[Planned], list[Skipped]]:
    if not audio.is_dir():
        raise FileNotFoundError(f"--audio: '{audio}' is not a folder")
    flags = {c: "--caption-columns" for c in caption_columns}
    if file_pattern is None:
        flags[file_column] = "--file-column"
    clips, skipped = captions_by_file(read_table(table, "--csv"), _file_name(file_pattern, file_column),
                                      caption_columns, flags)
    extensions = get_modality("audio").extensions
    planned = []
    for name, (where, captions) in clips.items():
        path = _find(audio, name, extensions)
        if path is None:
            skipped.append(Skipped(where, f"no file {name}.{{{','.join(sorted(extensions))}}} in --audio",
                                   str(audio / name)))
            continue
        entries = text_entries(captions, file=path.relative_to(audio).as_posix())
        planned.append(Planned("", where, str(path), entries, modality="audio"))
    return planned, skipped


def run(args: argparse.Namespace) -> list:
    columns = [c.strip() for c in args.caption_columns.split(",") if c.strip()]
    if not columns:
        raise ValueError("--caption-columns: name at least one column")
    planned, skipped = plan_clotho(Path(args.csv), Path(args.audio), args.file_column, columns, args.file_pattern)
    out = check_output(args.out, [args.split], args.overwrite)
    audio = checking_modality(args, "audio")
    return [write_split(numbered(planned), out, args.split, shard_size=args.shard_size, workers=args.workers,
                        progress=args.progress, skipped=skipped, modalities={"audio": audio})]
