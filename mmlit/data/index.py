"""Shard indexes: the sample count (and size, and the samples' byte offsets) of every shard of a split, so that an
epoch is planned without opening a shard and a batch reads its samples alone.

A recipe's ``shards.{split}`` is either a pattern (``data/train-{000000..000999}.tar``) or an index file
(``data/train.json``, local or remote) in webdataset's ``wids-shard-index-v1`` layout::

    {"__kind__": "wids-shard-index-v1", "wids_version": 1,
     "shardlist": [{"url": "train-000000.tar", "nsamples": 10000, "filesize": 251658240, "offsets": "AAAA..."}, ...]}

Shard URLs in an index are relative to the index file. ``offsets`` (mmlit's addition; webdataset's own index files
lack it, and load) lets a batch read exactly its samples by byte range: the base64 of ``nsamples + 1`` little-endian
uint64, the byte offset of each sample's first tar header (a PAX header's, where its first member has one) and then
where the last sample's last member ends, so that sample ``k`` is the bytes ``[off[k], off[k + 1])``; ``""`` for a
shard that cannot be read by range (gzip, bzip2 or xz compressed). ``mmlit data index`` and the converters write
them; they cost 8 bytes a sample (10.7 in the JSON).

Setup reads, in order of preference: the index file; for local shards, a cache of earlier scans keyed by path, size
and modification time (``$MMLIT_CACHE``, default ``~/.cache/mmlit``), and a scan of the shards not in it, headers
only (about 30 us a sample: 0.3 s for a 10,000-sample shard of webdataset's ShardWriter), which gives the offsets
too; for remote shards, img2dataset's ``{shard}_stats.json`` beside each shard (``successes``), which gives counts
without offsets (such shards are read from their start; an index gives them offsets). Local shards are scanned even
where stats files are beside them: the offsets are what lets a batch read its samples alone, and the scan's count is
exact. Remote shards without counts are an error unless ``data.scan_remote`` allows reading them all at setup.
"""

from __future__ import annotations

import base64
import json
import os
import posixpath
import sys
import tempfile
from array import array
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence
from urllib.parse import urlparse

from mmlit.data.shards import ShardError, StaleIndexError, _is_remote, open_shard, resolve_shards
from mmlit.data.sources import Source, TarSource

__all__ = ["DECODED_OFFSETS", "INDEX_KIND", "ShardIndex", "StaleIndexError", "decode_offsets", "encode_offsets",
           "load_index", "plan_shards", "save_index", "scan_shards", "write_index"]

INDEX_KIND = "wids-shard-index-v1"
DECODED_OFFSETS = 64  # shards whose decoded offsets a ShardIndex keeps (per process): memory does not grow with shards


def encode_offsets(offsets: Sequence[int]) -> str:
    """Sample offsets as an index stores them: base64 of little-endian uint64."""
    packed = array("Q", offsets)
    if sys.byteorder == "big":
        packed.byteswap()
    return base64.b64encode(packed.tobytes()).decode("ascii")


def decode_offsets(text: str) -> array:
    """``encode_offsets``' inverse: an ``array("Q")`` (its items are Python ints)."""
    packed = array("Q", base64.b64decode(text, validate=True))
    if sys.byteorder == "big":
        packed.byteswap()
    return packed


def _encoded_length(count: int) -> int:
    return 4 * -(-8 * (count + 1) // 3)  # base64 of count + 1 uint64


@dataclass
class ShardIndex:
    """The readable shards of one task and split, with their sample counts (and byte sizes, from an index, and
    sample offsets, where known). Pickles as its fields (it is sent to the loader's workers): the offsets stay
    encoded until ``sample_offsets`` asks for a shard's."""

    urls: list[str]
    counts: list[int]
    bad: list[ShardError] = field(default_factory=list)  # shards unreadable to the end, found by a scan
    sizes: list[int] | None = None  # bytes per shard, where an index file gives them (checked when read)
    origin: str | None = None  # the index file, for error messages
    offsets: list[str] | None = None  # per shard, encode_offsets of its sample offsets ("" where it has none)
    _decoded: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # shard -> offsets, recent last

    def __post_init__(self):
        if self.offsets is not None and len(self.offsets) != len(self.urls):
            raise ValueError(f"{len(self.offsets)} offsets for {len(self.urls)} shards")

    @property
    def total(self) -> int:
        return sum(self.counts)

    def sample_offsets(self, i: int) -> Sequence[int] | None:
        """The byte offsets of shard ``i``'s samples (``counts[i] + 1`` values: sample ``k`` is the bytes
        ``[off[k], off[k + 1])``), or None where it has none. Decoded when asked; the last ``DECODED_OFFSETS`` shards
        asked for are kept (safe to call from several threads)."""
        if not self.offsets or not self.offsets[i]:
            return None
        cache = self._decoded
        found = cache.pop(i, None)
        if found is None:
            found = decode_offsets(self.offsets[i])
            if len(found) != self.counts[i] + 1:
                where = f"the index '{self.origin}'" if self.origin else "the scan"
                raise StaleIndexError(f"{self.urls[i]}: {len(found)} offsets for {self.counts[i]} samples in {where}; "
                                      f"make the index again (`mmlit data index`)")
        cache[i] = found
        for old in list(cache)[:-DECODED_OFFSETS]:
            cache.pop(old, None)
        return found

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_decoded"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _decoded={})


def _scan(source: Source, url: str) -> tuple[int, str, ShardError | None]:
    """(samples, encoded offsets or "", the error of a shard unreadable to the end)."""
    try:
        count, offsets = source.scan(url)
    except ShardError as err:
        return err.read, "", err
    return count, encode_offsets(offsets) if offsets else "", None


def _map(function: Callable, items: list, threads: int, progress: str | None = None) -> list:
    """``function`` over ``items`` in a thread pool (counting is I/O: the tar headers, or a download), with a
    progress bar when ``progress`` names what is counted."""
    with ThreadPoolExecutor(max(1, min(threads, len(items)))) as pool:
        results = pool.map(function, items)
        if progress:
            from tqdm import tqdm  # a Lightning dependency

            results = tqdm(results, total=len(items), desc=progress, unit="shard")
        return list(results)


def scan_shards(urls: list[str], key: str, *, source: Source | None = None, threads: int = 8,
                cache: bool = False, progress: bool = False) -> ShardIndex:
    """Count every shard's samples and take their offsets (``Source.scan``: headers only, for local files). A shard
    that fails part way keeps the samples before the failure (without offsets) and is listed in ``bad``; an empty
    tar is an error naming ``key``. With ``cache``, local shards scanned before (same path, size and modification
    time) are not read again."""
    source = source or TarSource()
    known = _ScanCache.load() if cache else None
    cached = {u: c for u in urls if (c := known.get(u)) is not None} if known is not None else {}
    todo = [u for u in urls if u not in cached]
    scanned = dict(zip(todo, _map(lambda u: _scan(source, u), todo, threads, "counting" if progress else None)))
    index = ShardIndex([], [], offsets=[])
    for url in urls:
        count, offsets, error = scanned[url] if url in scanned else (*cached[url], None)
        if error is not None:
            index.bad.append(error)
        elif count == 0:
            raise ValueError(f"{key}: shard '{url}' holds no sample (an empty tar); remove it from the pattern")
        if count:
            index.urls.append(url)
            index.counts.append(count)
            index.offsets.append(offsets)
    if not any(index.offsets):
        index.offsets = None
    if known is not None and todo:
        known.update({u: (c, o) for u, (c, o, e) in scanned.items() if e is None and c and not _is_remote(u)})
        known.save()
    return index


class _ScanCache:
    """Sample counts and offsets of local shards scanned before, keyed by absolute path, size and mtime (one JSON
    file, ``{"format": 2, "shards": {key: [count, encoded offsets or ""]}}``; format 1 held counts alone, in another
    file)."""

    FORMAT = 2

    def __init__(self, path: Path, entries: dict):
        self.path, self.entries = path, entries

    @classmethod
    def load(cls) -> _ScanCache:
        path = Path(os.environ.get("MMLIT_CACHE", Path.home() / ".cache" / "mmlit")) / "shard-scans.json"
        try:
            content = json.loads(path.read_text())
        except (OSError, ValueError):
            content = {}
        fits = isinstance(content, dict) and content.get("format") == cls.FORMAT
        return cls(path, content["shards"] if fits and isinstance(content.get("shards"), dict) else {})

    @staticmethod
    def _key(url: str) -> str | None:
        try:
            stat = os.stat(url)
        except OSError:
            return None
        return f"{os.path.abspath(url)}:{stat.st_size}:{stat.st_mtime_ns}"

    def get(self, url: str) -> tuple[int, str] | None:
        """(count, encoded offsets or "") of a shard scanned before, unchanged since."""
        entry = self.entries.get(self._key(url)) if not _is_remote(url) else None
        ok = isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], int) and isinstance(entry[1], str)
        return (entry[0], entry[1]) if ok else None

    def update(self, scans: dict[str, tuple[int, str]]) -> None:
        for url, (count, offsets) in scans.items():
            if key := self._key(url):
                self.entries[key] = [count, offsets]

    def save(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=self.path.parent, delete=False, suffix=".tmp") as out:
                json.dump({"format": self.FORMAT, "shards": self.entries}, out)
            os.replace(out.name, self.path)  # atomic: a reader never sees half a file
        except OSError:
            pass  # a read-only home: the next setup scans again


def _relative(url: str, base: str) -> str:
    """``url`` as written in an index at ``base`` (relative when it lies below the index's folder)."""
    if _is_remote(base) != _is_remote(url):
        return url
    if _is_remote(url):
        folder = base.rsplit("/", 1)[0] + "/"
        return url[len(folder):] if url.startswith(folder) else url
    try:
        return os.path.relpath(os.path.abspath(url), os.path.dirname(os.path.abspath(base))).replace(os.sep, "/")
    except ValueError:  # another drive (Windows)
        return os.path.abspath(url)


def _absolute(url: str, base: str) -> str:
    if _is_remote(url) or os.path.isabs(url):
        return url
    if _is_remote(base):
        parsed = urlparse(base)
        return parsed._replace(path=posixpath.join(posixpath.dirname(parsed.path), url)).geturl()
    return os.path.join(os.path.dirname(base), url)


def write_index(urls: list[str], out: str, *, source: Source | None = None, threads: int = 16,
                progress: bool = True) -> dict:
    """Count, size and take the sample offsets of every shard and write the ``wids-shard-index-v1`` file ``out``
    (URLs relative to it)."""
    source = source or TarSource()
    index = scan_shards(urls, "SHARDS", source=source, threads=threads, progress=progress)
    if index.bad:
        raise ShardError(index.bad[0].url, index.bad[0].read, f"{index.bad[0].reason}; {len(index.bad)} shard(s) cannot "
                         f"be read to the end; fix or leave them out of the index")
    sizes = _map(source.size, index.urls, threads)
    offsets = index.offsets or [""] * len(index.urls)
    return _write(out, [_entry(u, n, s, o, out) for u, n, s, o in zip(index.urls, index.counts, sizes, offsets)],
                  source.storage_options)


def save_index(shards: list[tuple[str, int, int]], out: str, *, storage_options: dict | None = None,
               offsets: Sequence[Sequence[int] | None] | None = None, threads: int = 8) -> dict:
    """Write the ``wids-shard-index-v1`` file ``out`` for shards given as (URL, samples, bytes), URLs relative to it
    (a local file is replaced atomically). ``offsets``: each shard's sample offsets (``Source.scan``), or None; a
    local tar shard without them is scanned for them (headers only), and must hold the samples it is said to."""
    given = list(offsets) if offsets is not None else [None] * len(shards)
    if len(given) != len(shards):
        raise ValueError(f"save_index: {len(given)} offsets for {len(shards)} shards")

    def scanned(job: tuple[tuple[str, int, int], Sequence[int] | None]) -> str:
        (url, count, _), known = job
        if known is None and not _is_remote(url):
            found, known = TarSource().scan(url)
            if found != count:
                raise ValueError(f"save_index: '{url}' holds {found} sample(s), not {count}")
        return encode_offsets(known) if known else ""

    encoded = _map(scanned, list(zip(shards, given)), threads)
    return _write(out, [_entry(u, n, s, o, out) for (u, n, s), o in zip(shards, encoded)], storage_options)


def _entry(url: str, count: int, size: int, offsets: str, out: str) -> dict:
    return {"url": _relative(url, out), "nsamples": count, "filesize": size, "offsets": offsets}


def _write(out: str, shardlist: list[dict], storage_options: dict | None) -> dict:
    content = {"__kind__": INDEX_KIND, "wids_version": 1, "shardlist": shardlist}
    text = json.dumps(content, indent=1)
    if _is_remote(out):
        import fsspec

        with fsspec.open(out, "w", **(storage_options or {})) as f:
            f.write(text)
    else:
        folder = os.path.dirname(os.path.abspath(out))
        with tempfile.NamedTemporaryFile("w", dir=folder, delete=False, suffix=".tmp") as f:
            f.write(text)
        os.replace(f.name, out)
    return content


def is_index(spec: str) -> bool:
    return spec.lower().endswith(".json")


def load_index(url: str, key: str, *, storage_options: dict | None = None) -> ShardIndex:
    """The shards of an index file (``wids-shard-index-v1``), their URLs resolved against the file's own location."""
    try:
        with open_shard(url, storage_options=storage_options) as f:
            content = json.loads(f.read())
    except FileNotFoundError:
        raise FileNotFoundError(f"{key}: index file '{url}' does not exist") from None
    except (OSError, ValueError) as err:
        raise ValueError(f"{key}: cannot read the index file '{url}': {err}") from err
    if not isinstance(content, dict) or content.get("__kind__") != INDEX_KIND or not isinstance(content.get("shardlist"), list):
        raise ValueError(f"{key}: '{url}' is not a shard index (expected a JSON object with \"__kind__\": \"{INDEX_KIND}\" "
                         f"and a \"shardlist\"; `mmlit data index` writes one)")
    urls, counts, sizes, offsets = [], [], [], []
    for i, entry in enumerate(content["shardlist"]):
        _check_entry(str(entry.get("url", "")) if isinstance(entry, dict) else "", url, key)
        try:
            urls.append(_absolute(str(entry["url"]), url))
            counts.append(int(entry["nsamples"]))
            sizes.append(int(entry.get("filesize", -1)))
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{key}: '{url}': shardlist entry {i} needs \"url\" and \"nsamples\": {err!r}") from None
        if counts[-1] < 1:
            raise ValueError(f"{key}: '{url}': shard '{urls[-1]}' has nsamples {counts[-1]}; leave empty shards out")
        offsets.append(entry.get("offsets") or "")
        if not isinstance(offsets[-1], str) or offsets[-1] and len(offsets[-1]) != _encoded_length(counts[-1]):
            raise ValueError(f"{key}: '{url}': shard '{urls[-1]}': \"offsets\" is not the base64 of {counts[-1] + 1} "
                             f"uint64 (its nsamples + 1); make the index again (`mmlit data index`)")
    if not urls:
        raise ValueError(f"{key}: index file '{url}' lists no shard")
    return ShardIndex(urls, counts, sizes=sizes, origin=url, offsets=offsets if any(offsets) else None)


def _check_entry(entry: str, index: str, key: str) -> None:
    """An index names shards, never commands: ``pipe:`` entries are refused whatever ``data.allow_pipe`` says (it
    is for the recipe's own patterns), and a remote index may not point at local files."""
    scheme = urlparse(entry).scheme
    if scheme == "pipe":
        raise ValueError(f"{key}: the index '{index}' lists '{entry}', a shell command; an index may list shards only")
    if _is_remote(index) and (scheme == "file" or (not _is_remote(entry) and os.path.isabs(entry))):
        raise ValueError(f"{key}: the remote index '{index}' lists the local file '{entry}'; list shards relative to "
                         f"the index or by URL")


def _stats_counts(urls: list[str], threads: int, storage_options: dict | None) -> list[int | None]:
    """img2dataset's counts: ``{shard}_stats.json`` beside ``{shard}.tar``, its ``successes`` (None where absent)."""
    def one(url: str) -> int | None:
        stats = url[: -len(".tar")] + "_stats.json" if url.endswith(".tar") else None
        if stats is None or (not _is_remote(stats) and not os.path.isfile(stats)):
            return None
        try:
            with open_shard(stats, storage_options=storage_options) as f:
                return int(json.loads(f.read())["successes"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    first = one(urls[0]) if urls else None
    if first is None:  # not an img2dataset output: ask no more (remote, one request per shard)
        return [None] * len(urls)
    return [first, *_map(one, urls[1:], threads)]


def plan_shards(spec: str, key: str, *, source: Source | None = None, scan_remote: bool = False,
                threads: int = 16) -> ShardIndex:
    """The index of a recipe's ``shards.{split}`` value: an index file, or a pattern whose local shards are scanned
    (or found in the scan cache) and whose remote shards are counted by img2dataset's stats files, or scanned when
    ``scan_remote``."""
    source = source or TarSource()
    if is_index(spec):
        return load_index(spec, key, storage_options=source.storage_options)
    urls = resolve_shards(spec, key, allow_pipe=source.allow_pipe)
    remote = [u for u in urls if _is_remote(u)]
    stats = {u: c for u, c in zip(remote, _stats_counts(remote, threads, source.storage_options)) if c is not None}
    unknown = [u for u in remote if u not in stats]
    if unknown and not scan_remote:
        raise ValueError(
            f"{key}: {len(unknown)} remote shard(s) without sample counts (e.g. '{unknown[0]}'); setup would download "
            f"them all. Make an index once with `mmlit data index '{spec}' --out INDEX.json`, put it beside the shards "
            f"and set {key}: INDEX.json (or set data.scan_remote: true to read every shard at each setup)")
    index = scan_shards([u for u in urls if u not in stats], key, source=source, threads=threads, cache=True)
    scanned = dict(zip(index.urls, zip(index.counts, index.offsets or [""] * len(index.urls))))
    known = scanned | {u: (c, "") for u, c in stats.items()}  # (img2dataset writes no shard without a success)
    order = [u for u in urls if u in known]
    offsets = [known[u][1] for u in order]
    return ShardIndex(order, [known[u][0] for u in order], bad=index.bad, offsets=offsets if any(offsets) else None)
