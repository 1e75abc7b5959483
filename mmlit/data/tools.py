"""``mmlit data ...``: make Sort-of-CLEVR shards, index shards, train a tokenizer on shards' text, inspect shards."""

from __future__ import annotations

import argparse
import collections
import json
from typing import Iterator

from mmlit.data import sort_of_clevr
from mmlit.data.decode import decode_sample
from mmlit.data.index import write_index
from mmlit.data.shards import iter_samples, resolve_shards
from mmlit.data.sources import get_source
from mmlit.text import train_tokenizer

__all__ = ["main", "iter_texts"]


def _strings(value) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def iter_texts(urls: list[str]) -> Iterator[str]:
    """Every text in the shards: ``.txt`` entries and every string inside ``.json`` entries."""
    for sample in (s for url in urls for s in iter_samples(url)):
        sample = {k: v for k, v in sample.items() if k.startswith("__") or k.rsplit(".", 1)[-1] in ("txt", "json")}
        for key, value in decode_sample(sample).items():
            if not key.startswith("__"):
                yield from _strings(value)


def _sort_of_clevr(args: argparse.Namespace) -> None:
    sizes = dict(sort_of_clevr.PRESETS[args.preset])
    for split in sort_of_clevr.SPLITS:
        if getattr(args, split) is not None:
            sizes[split] = getattr(args, split)
    shards = sort_of_clevr.write_dataset(args.out, sizes, seed=args.seed, shard_size=args.shard_size,
                                         image_format=args.format)
    for split, paths in shards.items():
        print(f"{split}: {sizes[split]} images in {len(paths)} shard(s): {paths[0]} ... {paths[-1]}")


def _tokenizer(args: argparse.Namespace) -> None:
    urls = resolve_shards(args.shards, "--shards")
    tokenizer = train_tokenizer(iter_texts(urls), args.out, vocab_size=args.vocab_size)
    print(f"tokenizer with {tokenizer.get_vocab_size()} tokens written to {args.out}")


def _index(args: argparse.Namespace) -> None:
    urls = [url for spec in args.shards for url in resolve_shards(spec, "SHARDS")]
    options = json.loads(args.storage_options) if args.storage_options else None
    content = write_index(urls, args.out, source=get_source(args.format, "--format")(storage_options=options),
                          threads=args.threads)
    shards = content["shardlist"]
    print(f"{args.out}: {len(shards)} shard(s), {sum(s['nsamples'] for s in shards)} samples, "
          f"{sum(s['filesize'] for s in shards) / 1e9:.2f} GB")


def _inspect(args: argparse.Namespace) -> None:
    urls = resolve_shards(args.shards, "--shards")
    counts, entries = collections.Counter(), collections.Counter()
    first = None
    for sample in (s for url in urls for s in iter_samples(url)):
        counts[sample["__url__"]] += 1
        entries.update(k for k in sample if not k.startswith("__"))
        first = first or sample
    for url, n in counts.items():
        print(f"{url}: {n} samples")
    print(f"total: {sum(counts.values())} samples; entries: {dict(entries)}")
    if first is not None:
        decoded = decode_sample(first)
        print("first sample:", json.dumps({k: (v if isinstance(v, (str, int, float, dict, list)) else type(v).__name__)
                                           for k, v in decoded.items()}, default=str)[:2000])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mmlit data", description="Data tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    soc = sub.add_parser("sort-of-clevr", help="generate Sort-of-CLEVR shards (train/val/test)")
    soc.add_argument("--out", default="data/sort_of_clevr")
    soc.add_argument("--preset", choices=sorted(sort_of_clevr.PRESETS), default="quickstart",
                     help="split sizes: quickstart (4000/250/250) or full (9600/200/200, 10,000 images)")
    for split in sort_of_clevr.SPLITS:
        soc.add_argument(f"--{split}", type=int, default=None, help=f"images in {split} (overrides the preset)")
    soc.add_argument("--seed", type=int, default=0)
    soc.add_argument("--shard-size", type=int, default=500, help="samples per shard")
    soc.add_argument("--format", choices=("png", "jpg"), default="png")
    soc.set_defaults(run=_sort_of_clevr)
    tok = sub.add_parser("tokenizer", help="train a WordPiece tokenizer on the shards' text")
    tok.add_argument("--shards", required=True, help="shard pattern, e.g. 'data/sort_of_clevr/train-{000000..000007}.tar'")
    tok.add_argument("--out", required=True, help="where to write tokenizer.json")
    tok.add_argument("--vocab-size", type=int, default=2000)
    tok.set_defaults(run=_tokenizer)
    idx = sub.add_parser("index", help="write a shard index (wids-shard-index-v1 JSON: samples and bytes per shard), "
                                       "so that setup reads one file and opens no shard")
    idx.add_argument("shards", nargs="+", help="shard patterns or URLs, e.g. 's3://bucket/train-{000000..009999}.tar'")
    idx.add_argument("--out", required=True, help="the index file; shard URLs in it are relative to it")
    idx.add_argument("--threads", type=int, default=16, help="shards counted at once")
    idx.add_argument("--format", default="tar", help="the shard format (data.shard_format)")
    idx.add_argument("--storage-options", default=None, help="fsspec options as JSON, e.g. '{\"anon\": true}'")
    idx.set_defaults(run=_index)
    ins = sub.add_parser("inspect", help="count samples and entries in shards")
    ins.add_argument("--shards", required=True)
    ins.set_defaults(run=_inspect)
    args = parser.parse_args(argv)
    args.run(args)
    return 0
