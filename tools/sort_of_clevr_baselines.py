"""Chance levels for the quickstart's validation metrics on Sort-of-CLEVR shards.

"Chance" here is the best a model can do without looking at the image: the majority answer per
question type, the majority class, and, for captions, the most frequent token at each position
(all counted on the training split, scored on the evaluation split). Retrieval chance is 1/N.

    python tools/sort_of_clevr_baselines.py --train 'data/sort_of_clevr/train-{000000..000007}.tar' \
        --eval data/sort_of_clevr/val-000000.tar --tokenizer data/sort_of_clevr/tokenizer.json
"""

from __future__ import annotations

import argparse
import collections
import itertools

import webdataset as wds

from mmlit.data import decode_sample, resolve_shards
from mmlit.text import load_tokenizer


def scenes(spec: str) -> dict[str, dict]:
    """Sample key -> its Sort-of-CLEVR annotations (objects, questions, caption), in shard order."""
    samples = wds.tarfile_samples({"url": u} for u in resolve_shards(spec, "--shards"))
    return {s["__key__"]: decode_sample({k: v for k, v in s.items() if not k.endswith("png")})["json"] for s in samples}


def chance_levels(train_shards: str, eval_shards: str, tokenizer_path: str) -> dict[str, float]:
    """The chance level of every quickstart metric (``val/{task}/{metric}``), learned on ``train_shards`` and scored on
    ``eval_shards``."""
    train, evaluation = list(scenes(train_shards).values()), list(scenes(eval_shards).values())
    tokenizer = load_tokenizer(tokenizer_path, key="--tokenizer")

    by_type = collections.defaultdict(collections.Counter)
    for ann in train:
        for q in ann["questions"]:
            by_type[q["type"]][q["answer"]] += 1
    majority = {t: c.most_common(1)[0][0] for t, c in by_type.items()}
    hits = collections.defaultdict(list)
    for ann in evaluation:
        for q in ann["questions"]:
            hits["rel" if q["relational"] else "nonrel"].append(q["answer"] == majority[q["type"]])
    circles = collections.Counter(a["labels"]["n_circles"] for a in train).most_common(1)[0][0]
    types = collections.Counter(q["type"] for a in train for q in a["questions"]).most_common(1)[0][0]

    encode = lambda text: tokenizer.encode(text, add_special_tokens=False).ids + [3]  # noqa: E731 (EOS)
    position = collections.defaultdict(collections.Counter)
    for ann in train:
        for i, token in enumerate(encode(ann["caption"])):
            position[i][token] += 1
    guess = [position[i].most_common(1)[0][0] for i in range(len(position))]
    correct = total = exact = 0
    for ann in evaluation:
        target = encode(ann["caption"])
        matches = [g == t for g, t in itertools.zip_longest(guess[: len(target)], target)]
        correct, total, exact = correct + sum(matches), total + len(target), exact + all(matches)

    return {
        "val/vqa/acc_nonrel": sum(hits["nonrel"]) / len(hits["nonrel"]),
        "val/vqa/acc_rel": sum(hits["rel"]) / len(hits["rel"]),
        "val/vqa/acc": sum(hits["nonrel"] + hits["rel"]) / len(hits["nonrel"] + hits["rel"]),
        "val/contrastive/r@1": 1 / len(evaluation),
        "val/captioning/exact_match": exact / len(evaluation),
        "val/captioning/token_acc": correct / total,
        "val/image_classification/acc": sum(a["labels"]["n_circles"] == circles for a in evaluation) / len(evaluation),
        "val/text_classification/acc": sum(q["type"] == types for a in evaluation for q in a["questions"])
        / sum(len(a["questions"]) for a in evaluation),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", required=True)
    parser.add_argument("--eval", required=True)
    parser.add_argument("--tokenizer", required=True)
    args = parser.parse_args()
    for key, value in chance_levels(args.train, args.eval, args.tokenizer).items():
        print(f"{key:<32} {value:.3f}")


if __name__ == "__main__":
    main()
