"""Shard indexes: the sample count (and size) of every shard of a split, so that an epoch is planned without
opening a shard.

A recipe's ``shards.{split}`` is either a pattern (``data/train-{000000..000999}.tar``) or an index file
(``data/train.json``, local or remote) in webdataset's ``wids-shard-index-v1`` layout::

    {"__kind__": "wids-shard-index-v1", "wids_version": 1,
     "shardlist": [{"url": "train-000000.tar", "nsamples": 10000, "filesize": 251658240}, ...]}

Shard URLs in an index are relative to the index file. ``mmlit data index`` writes one. Setup reads, in order of
preference: the index file; img2dataset's ``{shard}_stats.json`` beside each shard (``successes``); for local
shards, a cache of earlier scans keyed by path, size and modification time (``$MMLIT_CACHE``, default
``~/.cache/mmlit``), and a scan of the shards not in it. Remote shards without counts are an error unless
``data.scan_remote`` allows reading them all at setup.
"""

from __future__ import annotations

import json
import os
import posixpath
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

from mmlit.data.shards import ShardError, _is_remote, open_shard, resolve_shards
from mmlit.data.sources import Source, TarSource

__all__ = ["INDEX_KIND", "ShardIndex", "StaleIndexError", "load_index", "plan_shards", "save_index", "scan_shards",
           "write_index"]

INDEX_KIND = "wids-shard-index-v1"


class StaleIndexError(RuntimeError):
    """An index whose counts no longer describe its shards (a shard changed size or is gone): the epoch plan
    is wrong, so the run stops instead of skipping."""


@dataclass
class ShardIndex:
    """The readable shards of one task and split, with their sample counts (and byte sizes, from an index)."""

    urls: list[str]
    counts: list[int]
    bad: list[ShardError] = field(default_factory=list)  # shards unreadable to the end, found by a scan
    sizes: list[int] | None = None  # bytes per shard, where an index file gives them (checked when read)
    origin: str | None = None  # the index file, for error messages

    @property
    def total(self) -> int:
        return sum(self.counts)


def _count(source: Source, url: str) -> tuple[int, ShardError | None]:
    try:
        return source.count(url), None
    except ShardError as err:
        return err.read, err


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
    """Count every shard's samples (headers only, for local files). A shard that fails part way keeps the samples
    before the failure and is listed in ``bad``; an empty tar is an error naming ``key``. With ``cache``, local
    shards counted before (same path, size and modification time) are not read again."""
    source = source or TarSource()
    known = _ScanCache.load() if cache else None
    cached = {u: c for u in urls if (c := known.get(u)) is not None} if known is not None else {}
    todo = [u for u in urls if u not in cached]
    counted = dict(zip(todo, _map(lambda u: _count(source, u), todo, threads, "counting" if progress else None)))
    index = ShardIndex([], [])
    for url in urls:
        count, error = counted[url] if url in counted else (cached[url], None)
        if error is not None:
            index.bad.append(error)
        elif count == 0:
            raise ValueError(f"{key}: shard '{url}' holds no sample (an empty tar); remove it from the pattern")
        if count:
            index.urls.append(url)
            index.counts.append(count)
    if known is not None and todo:
        known.update({u: c for u, (c, e) in counted.items() if e is None and c and not _is_remote(u)})
        known.save()
    return index


class _ScanCache:
    """Sample counts of local shards scanned before, keyed by absolute path, size and mtime (one JSON file)."""

    def __init__(self, path: Path, entries: dict):
        self.path, self.entries = path, entries

    @classmethod
    def load(cls) -> _ScanCache:
        path = Path(os.environ.get("MMLIT_CACHE", Path.home() / ".cache" / "mmlit")) / "shard-counts.json"
        try:
            entries = json.loads(path.read_text())
        except (OSError, ValueError):
            entries = {}
        return cls(path, entries if isinstance(entries, dict) else {})

    @staticmethod
    def _key(url: str) -> str | None:
        try:
            stat = os.stat(url)
        except OSError:
            return None
        return f"{os.path.abspath(url)}:{stat.st_size}:{stat.st_mtime_ns}"

    def get(self, url: str) -> int | None:
        key = None if _is_remote(url) else self._key(url)
        return self.entries.get(key) if key else None

    def update(self, counts: dict[str, int]) -> None:
        for url, count in counts.items():
            if key := self._key(url):
                self.entries[key] = count

    def save(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=self.path.parent, delete=False, suffix=".tmp") as out:
                json.dump(self.entries, out)
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
    """Count and size every shard and write the ``wids-shard-index-v1`` file ``out`` (URLs relative to it)."""
    source = source or TarSource()
    index = scan_shards(urls, "SHARDS", source=source, threads=threads, progress=progress)
    if index.bad:
        raise ShardError(index.bad[0].url, index.bad[0].read, f"{index.bad[0].reason}; {len(index.bad)} shard(s) cannot "
                         f"be read to the end; fix or leave them out of the index")
    sizes = _map(source.size, index.urls, threads)
    return save_index(list(zip(index.urls, index.counts, sizes)), out, storage_options=source.storage_options)


def save_index(shards: list[tuple[str, int, int]], out: str, *, storage_options: dict | None = None) -> dict:
    """Write the ``wids-shard-index-v1`` file ``out`` for shards given as (URL, samples, bytes), URLs relative to it
    (a local file is replaced atomically)."""
    content = {"__kind__": INDEX_KIND, "wids_version": 1, "shardlist": [
        {"url": _relative(u, out), "nsamples": n, "filesize": s} for u, n, s in shards]}
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
    urls, counts, sizes = [], [], []
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
    if not urls:
        raise ValueError(f"{key}: index file '{url}' lists no shard")
    return ShardIndex(urls, counts, sizes=sizes, origin=url)


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
    """The index of a recipe's ``shards.{split}`` value: an index file, or a pattern whose counts come from
    img2dataset's stats files, the scan cache, or a scan (remote shards only when ``scan_remote``)."""
    source = source or TarSource()
    if is_index(spec):
        return load_index(spec, key, storage_options=source.storage_options)
    urls = resolve_shards(spec, key, allow_pipe=source.allow_pipe)
    stats = _stats_counts(urls, threads, source.storage_options)
    if all(c is not None for c in stats):
        return ShardIndex(urls, stats)  # (img2dataset writes no shard without a success)
    unknown = [u for u, c in zip(urls, stats) if c is None and _is_remote(u)]
    if unknown and not scan_remote:
        raise ValueError(
            f"{key}: {len(unknown)} remote shard(s) without sample counts (e.g. '{unknown[0]}'); setup would download "
            f"them all. Make an index once with `mmlit data index '{spec}' --out INDEX.json`, put it beside the shards "
            f"and set {key}: INDEX.json (or set data.scan_remote: true to read every shard at each setup)")
    index = scan_shards([u for u, c in zip(urls, stats) if c is None], key, source=source, threads=threads, cache=True)
    known = dict(zip(index.urls, index.counts)) | {u: c for u, c in zip(urls, stats) if c is not None}
    order = [u for u in urls if u in known]
    return ShardIndex(order, [known[u] for u in order], bad=index.bad)

