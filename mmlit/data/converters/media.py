"""What the audio and video converters share: the limits their files are checked with, and captions grouped by file.

A recording or a clip is checked by decoding it as the training loader will, with the modality's limits (a clip longer
than ``max_seconds`` is skipped there, so it is skipped here and listed). The limits are the modality's constructor
arguments, offered as flags (``--max-seconds``) with the modality's own defaults; set them to the recipe's
``data.modalities.{name}`` values when the recipe changes them.
"""

from __future__ import annotations

import argparse
import inspect
import re
from pathlib import Path
from typing import Any, Callable, Iterable

from mmlit.data.converters.writer import Skipped
from mmlit.registry import get_modality

__all__ = ["LIMITS", "add_limit_arguments", "captions_by_file", "checking_modality", "media_files", "natural_key",
           "text_entries"]

# modality -> its constructor arguments that decide which files it refuses
LIMITS = {"audio": ("max_seconds",), "video": ("max_frames", "max_pixels")}


def _limit(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        return None if text.lower() == "none" else kind(text)

    parse.__name__ = kind.__name__  # (argparse names the type in its error)
    return parse


def add_limit_arguments(parser: argparse.ArgumentParser, modality: str) -> None:
    """``--max-seconds`` (audio), ``--max-frames`` and ``--max-pixels`` (video), defaults from the modality's
    signature."""
    parameters = inspect.signature(get_modality(modality).__init__).parameters
    for name in LIMITS[modality]:
        default = parameters[name].default
        parser.add_argument(f"--{name.replace('_', '-')}", type=_limit(type(default) if default is not None else float),
                            default=default, help=f"files past this {name.split('_', 1)[1]} limit are skipped, as the "
                            f"loader skips them (the recipe's data.modalities.{modality}.{name}; 'none': no limit; "
                            f"default: %(default)s)")


def checking_modality(args: argparse.Namespace, modality: str) -> Any:
    """The modality object that checks the files, with the limits from the flags."""
    return get_modality(modality)(**{name: getattr(args, name) for name in LIMITS[modality]})


def natural_key(text: str) -> tuple:
    """Sort key that puts ``video2`` before ``video10`` (numbers compared as numbers)."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", text) if part)


def media_files(folder: Path, modality: str) -> list[Path]:
    """The files below ``folder`` with one of the modality's extensions, hidden ones left out, in path order."""
    extensions = get_modality(modality).extensions
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower().lstrip(".") in extensions
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def captions_by_file(rows: Iterable[tuple[str, dict]], file_of: Callable[[dict], str], columns: list[str],
                     flags: dict[str, str]) -> tuple[dict[str, tuple[str, list[str]]], list[Skipped]]:
    """Table rows grouped by the file they caption (a clip may have several rows, each with several caption
    ``columns``): file -> (where its first row is, its captions in row and column order, whitespace made single
    spaces); rows without a file name or a caption are left out and listed. A column a row lacks is an error naming
    the row and the flag that names the column (``flags``: column -> flag)."""
    clips: dict[str, tuple[str, list[str]]] = {}
    skipped = []
    for where, row in rows:
        missing = [c for c in flags if c not in row]
        if missing:
            raise ValueError(f"{where}: no column {missing[0]!r} (the row has: {', '.join(map(str, row))}); "
                             f"set {flags[missing[0]]} to one of them")
        name = file_of(row).strip()
        captions = [" ".join(str(row[c]).split()) for c in columns if row[c] is not None and str(row[c]).strip()]
        if not name:
            skipped.append(Skipped(where, "no file name"))
        elif not captions:
            skipped.append(Skipped(where, f"empty {', '.join(map(repr, columns))}"))
        else:
            clips.setdefault(name, (where, []))[1].extend(captions)
    return clips, skipped


def text_entries(captions: list[str], **info: Any) -> dict[str, Any]:
    """A captioned sample's entries: ``txt`` (the first caption) and ``json`` (``info`` and all ``captions``)."""
    return {"txt": captions[0], "json": {**info, "captions": captions}}
