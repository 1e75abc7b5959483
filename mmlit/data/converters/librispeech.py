"""``mmlit data convert librispeech``: LibriSpeech (Panayotov et al. 2015) -> shards, one sample per utterance.

The layout: ``{root}/{subset}/{speaker}/{chapter}/{speaker}-{chapter}-{utterance}.flac`` with one
``{speaker}-{chapter}.trans.txt`` per chapter, whose lines are ``UTTERANCE-ID TRANSCRIPT``. A sample is the recording
as found (``.flac``), ``.txt`` (the transcript as written: LibriSpeech's are upper case without punctuation; a task
that wants another case normalises it itself) and ``.json`` ``{"speaker", "chapter", "utterance", "transcript"}``
(the folder names and the utterance id, as strings). Keys are the utterance ids (``103-1240-0000``).

``--train``, ``--val`` and ``--test`` name the subsets (``train-clean-100``, ``dev-clean``, ...) each split is made
of, repeated for several (``--train train-clean-100 --train train-clean-360``); without them ``--root`` is one
subset's folder, written as ``--split``. A recording without a transcript line, a transcript line without a
recording, and a recording that cannot be decoded (or is longer than ``--max-seconds``) are left out and listed.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from mmlit.data.converters.media import add_limit_arguments, checking_modality, natural_key
from mmlit.data.converters.writer import Planned, Skipped, check_output, sample_key, write_split
from mmlit.registry import get_modality

HELP = "LibriSpeech: {subset}/{speaker}/{chapter}/*.flac with {speaker}-{chapter}.trans.txt"
__all__ = ["HELP", "add_arguments", "plan_subset", "run"]

_SPLITS = ("train", "val", "test")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", required=True,
                        help="the LibriSpeech folder (holding train-clean-100/, dev-clean/, ...), or with none of "
                             "--train/--val/--test one subset's folder")
    for split in _SPLITS:
        parser.add_argument(f"--{split}", action="append", metavar="SUBSET",
                            help=f"a subset folder below --root written as the {split} split (repeat for more)")
    parser.add_argument("--split", default="train", help="the split --root is written as, without --train/--val/--test")
    add_limit_arguments(parser, "audio")


def _folders(path: Path) -> list[Path]:
    return sorted((p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")),
                  key=lambda p: natural_key(p.name))


def _transcripts(path: Path, skipped: list[Skipped]) -> dict[str, tuple[str, str]]:
    """utterance id -> (where its line is, transcript); a line without a transcript is left out and listed."""
    lines = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        utterance, _, text = line.strip().partition(" ")
        where = f"{path} line {number}"
        if not text.strip():
            skipped.append(Skipped(where, f"no transcript for {utterance}"))
        elif utterance in lines:
            skipped.append(Skipped(where, f"{utterance} has a transcript already ({lines[utterance][0]})"))
        else:
            lines[utterance] = (where, text.strip())
    return lines


def _recordings(chapter: Path, root: Path, skipped: list[Skipped]) -> dict[str, Path]:
    """utterance id -> its recording (any audio format); a second recording of one utterance is left out and listed."""
    extensions = get_modality("audio").extensions
    recordings: dict[str, Path] = {}
    for path in sorted(chapter.iterdir()):
        if not path.is_file() or path.suffix.lower().lstrip(".") not in extensions:
            continue
        if path.stem in recordings:
            why = f"another recording of {path.stem}: {recordings[path.stem].name}"
            skipped.append(Skipped(path.relative_to(root).as_posix(), why, str(path)))
        else:
            recordings[path.stem] = path
    return recordings


def plan_subset(folder: Path, root: Path) -> tuple[list[Planned], list[Skipped]]:
    """The utterances of one subset's folder, in (speaker, chapter, utterance) order, and those left out; origins are
    paths below ``root``."""
    planned, skipped = [], []
    for speaker in _folders(folder):
        for chapter in _folders(speaker):
            recordings = _recordings(chapter, root, skipped)
            trans = chapter / f"{speaker.name}-{chapter.name}.trans.txt"
            lines = _transcripts(trans, skipped) if trans.is_file() else {}
            for utterance in sorted(set(recordings) | set(lines), key=natural_key):
                if utterance not in recordings:
                    skipped.append(Skipped(lines[utterance][0], f"no recording of {utterance} in {chapter}"))
                    continue
                origin, path = recordings[utterance].relative_to(root).as_posix(), recordings[utterance]
                if utterance not in lines:
                    why = f"no line {utterance} in {trans}" if trans.is_file() else f"no file {trans}"
                    skipped.append(Skipped(origin, f"no transcript: {why}", str(path)))
                    continue
                text = lines[utterance][1]
                planned.append(Planned(sample_key(utterance), origin, str(path), {
                    "txt": text, "json": {"speaker": speaker.name, "chapter": chapter.name, "utterance": utterance,
                                          "transcript": text}}, modality="audio"))
    return planned, skipped


def _subsets(args: argparse.Namespace, root: Path) -> dict[str, list[Path]]:
    """split -> the subset folders it is made of."""
    named = {split: getattr(args, split) for split in _SPLITS if getattr(args, split)}
    if not named:
        if not any(root.glob("*/*/*.trans.txt")):
            found = ", ".join(p.name for p in _folders(root)[:6])
            raise ValueError(f"--root: '{root}' holds no {{speaker}}/{{chapter}}/*.trans.txt; name its subsets with "
                             f"--train/--val/--test (its folders: {found or 'none'})")
        return {args.split: [root]}
    subsets = {}
    for split, names in named.items():
        for name in names:
            if not (root / name).is_dir():
                raise FileNotFoundError(f"--{split}: no folder '{root / name}' (the folders of --root: "
                                        f"{', '.join(p.name for p in _folders(root)) or 'none'})")
        subsets[split] = [root / name for name in names]
    return subsets


def run(args: argparse.Namespace) -> list:
    root = Path(args.root)
    if not root.is_dir():
        raise FileNotFoundError(f"--root: '{root}' is not a folder")
    subsets = _subsets(args, root)
    plans = {}
    for split, folders in subsets.items():
        planned, skipped = [], []
        for folder in folders:
            more, left = plan_subset(folder, root)
            planned += more
            skipped += left
        plans[split] = planned, skipped
    out = check_output(args.out, list(subsets), args.overwrite)
    audio = checking_modality(args, "audio")
    return [write_split(planned, out, split, shard_size=args.shard_size, workers=args.workers, progress=args.progress,
                        skipped=skipped, modalities={"audio": audio}) for split, (planned, skipped) in plans.items()]
