"""Writing a converted data set as shards, the part every converter shares.

A converter plans its samples (``Planned``: a key, a media file of a named modality (an image, a recording, a clip)
and the other entries) in a fixed order; ``write_split`` writes them as ``{split}-000000.tar, ...`` of ``shard_size``
samples each, one shard per worker process at a time, with a progress bar. Each media file is read and decoded as the
training loader will decode it (``decode_sample`` with that modality: the image, audio or video modality, with the
limits the converter gives it), and kept byte for byte as found, under its own extension (``jpg``, ``flac``,
``mp4``); one that cannot be read, or whose extension is not one of its modality's, is left out and listed, with
where it came from, in ``{split}-skipped.jsonl``. The index ``{split}.json`` (``wids-shard-index-v1``) is written
from what was written, so setup never opens a shard and nothing is read twice. The output is a function of the input:
samples in the planned order, tar members with fixed metadata (mtime 0), JSON with sorted keys; each shard is written
to a temporary name and renamed, so a crash leaves no half shard under a shard's name.
"""

from __future__ import annotations

import json
import os
import random
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import webdataset as wds

from mmlit.data.decode import SampleError, decode_sample
from mmlit.data.index import save_index
from mmlit.registry import get_modality

__all__ = ["Planned", "Skipped", "SplitReport", "check_output", "hold_out", "numbered", "sample_key", "write_split"]


@dataclass(frozen=True)
class Planned:
    """One sample to write: its key, where it comes from (``labels.csv row 12``, for the report), its media file, its
    other entries by extension (``txt``: str, ``cls``: int, ``json``: a dict), and the registered modality the media
    file must be of (its extension one of that modality's; ``image``, what the image converters write, unless said)."""

    key: str
    origin: str
    media: str
    entries: dict[str, Any] = field(default_factory=dict)
    modality: str = "image"


@dataclass(frozen=True)
class Skipped:
    """A sample (or an annotation) left out, where it came from and why."""

    origin: str
    reason: str
    path: str | None = None


@dataclass
class SplitReport:
    split: str
    shards: list[tuple[str, int, int]]  # (path, samples, bytes)
    skipped: list[Skipped]
    index: str

    @property
    def samples(self) -> int:
        return sum(n for _, n, _ in self.shards)

    def summary(self) -> str:
        line = f"{self.split}: {self.samples} samples in {len(self.shards)} shard(s), index {self.index}"
        if self.skipped:
            line += f"; {len(self.skipped)} skipped, listed in {Path(self.index).with_name(f'{self.split}-skipped.jsonl')}"
        return line


def sample_key(item_id) -> str:
    """A sample key from a data set's id of an image, a clip, ...: COCO's 12-digit form for integers, a string with
    its dots made underscores (a key may hold no dot)."""
    return f"{item_id:012d}" if isinstance(item_id, int) else str(item_id).replace(".", "_")


def hold_out(planned: list[Planned], split: str, val_fraction: float, seed: int) -> dict[str, list[Planned]]:
    """``{split: ..., "val": ...}``: ``val_fraction`` of the samples, drawn by a generator seeded with ``seed``, as the
    val split (``--val-fraction``, ``--seed``), the others in ``split``, each in the planned order."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    held = set(random.Random(seed).sample(range(len(planned)), round(len(planned) * val_fraction)))
    splits = {split: [p for i, p in enumerate(planned) if i not in held]}
    if held:
        splits["val"] = [p for i, p in enumerate(planned) if i in held]
    return splits


def numbered(samples: list[Planned]) -> list[Planned]:
    """The samples keyed by their position (``00000000``, ...), for layouts without ids of their own."""
    return [replace(s, key=f"{i:08d}") for i, s in enumerate(samples)]


def _outputs(out: Path, split: str) -> list[Path]:
    """A split's shards (and those a crash left half written), index and report."""
    named = (out / f"{split}.json", out / f"{split}-skipped.jsonl")
    return sorted([*out.glob(f"{split}-[0-9]*.tar"), *out.glob(f"{split}-[0-9]*.tar.partial"),
                   *(p for p in named if p.exists())])


def check_output(out: str | Path, splits: list[str], overwrite: bool, extra: tuple[str, ...] = ()) -> Path:
    """Make ``out``; if it holds a split's shards, index or report (or one of ``extra``), fail unless ``overwrite``,
    which removes them first (so that no shard of an earlier, larger conversion is left behind). ``splits`` and
    ``extra`` name everything a conversion may write, also what this one will not (a val split, classes.json)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    existing = [p for split in splits for p in _outputs(out, split)] + [out / e for e in extra if (out / e).exists()]
    if existing and not overwrite:
        more = f" and {len(existing) - 1} more file(s)" if len(existing) > 1 else ""
        raise FileExistsError(f"{existing[0]}{more} exist(s) already; pass --overwrite to replace them")
    for path in existing:
        path.unlink()
    return out


def _encode(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return str(value).encode("utf-8")


def _read_media(planned: Planned, modalities: dict[str, Any]) -> tuple[str, bytes]:
    """The media file's extension and bytes, checked as the training loader decodes them (``SampleError`` if not)."""
    name = planned.modality
    ext = Path(planned.media).suffix.lower().lstrip(".")
    extensions = get_modality(name).extensions
    if ext not in extensions:
        raise SampleError(f"not {_article(name)} {name} format mmlit reads (.{ext}); "
                          f"readable: {', '.join(sorted(extensions))}")
    try:
        data = Path(planned.media).read_bytes()
    except OSError as err:
        raise SampleError(f"cannot read the {name}: {err.strerror or err}") from None
    if name not in modalities:  # (made once per shard, with its defaults)
        modalities[name] = get_modality(name)()
    decode_sample({"__key__": planned.key, ext: data}, (name,), modalities=modalities)
    return ext, data


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


def _write_shard(path: str, samples: list[Planned], modalities: dict[str, Any]) -> tuple[int, int, list[Skipped]]:
    """Write one shard (to a temporary name, then renamed); returns (samples written, bytes, skipped)."""
    skipped, written, modalities = [], 0, dict(modalities)
    partial = path + ".partial"
    with wds.TarWriter(partial, encoder=False, mtime=0, user="mmlit", group="mmlit") as sink:
        for planned in samples:
            try:
                ext, data = _read_media(planned, modalities)
            except SampleError as err:  # (the decoder's own message, without the shard-and-key prefix)
                skipped.append(Skipped(planned.origin, str(err.__cause__ or err), planned.media))
                continue
            sink.write({"__key__": planned.key, ext: data, **{k: _encode(v) for k, v in planned.entries.items()}})
            written += 1
    if not written:
        os.unlink(partial)
        return 0, 0, skipped
    os.replace(partial, path)
    return written, os.path.getsize(path), skipped


def write_split(samples: list[Planned], out: str | Path, split: str, *, shard_size: int = 1000, workers: int = 1,
                skipped: list[Skipped] | None = None, progress: bool = True,
                modalities: dict[str, Any] | None = None) -> SplitReport:
    """Write ``samples`` as the shards of ``split`` in ``out`` with their index and the report of what was skipped
    (``skipped``: what the converter left out before, added to the report). ``modalities``: the modality objects
    (by name) that check the media files, with the converter's limits (an ``AudioModality(max_seconds=...)``); a
    modality not given is made with its defaults. They are pickled to the worker processes."""
    if shard_size < 1:
        raise ValueError(f"--shard-size must be at least 1, got {shard_size}")
    out = Path(out)
    keys = [s.key for s in samples]
    if len(set(keys)) != len(keys):
        raise ValueError(f"{split}: sample keys repeat (e.g. {next(k for k in keys if keys.count(k) > 1)!r})")
    jobs = [(str(out / f"{split}-{i:06d}.tar"), samples[start:start + shard_size])
            for i, start in enumerate(range(0, len(samples), shard_size))]
    results: dict[str, tuple[int, int, list[Skipped]]] = {}
    from tqdm import tqdm  # a Lightning dependency

    with tqdm(total=len(samples), desc=f"{split} ({Path(out).name})", unit="sample", disable=not progress) as bar:
        if workers <= 1 or len(jobs) <= 1:
            for path, chunk in jobs:
                results[path] = _write_shard(path, chunk, modalities or {})
                bar.update(len(chunk))
        else:
            with ProcessPoolExecutor(min(workers, len(jobs))) as pool:
                futures = {pool.submit(_write_shard, path, chunk, modalities or {}): (path, len(chunk)) for path, chunk in jobs}
                for future in as_completed(futures):
                    path, size = futures[future]
                    results[path] = future.result()
                    bar.update(size)
    shards = [(path, n, size) for path, _ in jobs for n, size, _ in [results[path]] if n]
    lost = list(skipped or []) + [s for path, _ in jobs for s in results[path][2]]
    if not shards:
        raise ValueError(f"{split}: no sample could be written ({len(lost)} skipped; first: {lost[0] if lost else None})")
    index = str(out / f"{split}.json")
    save_index(shards, index)
    if lost:
        with open(out / f"{split}-skipped.jsonl", "w") as f:
            for s in lost:
                f.write(json.dumps({"origin": s.origin, "path": s.path, "reason": s.reason}) + "\n")
    return SplitReport(split, shards, lost, index)
