"""VQA accuracy (Antol et al. 2015; Goyal et al. 2017, VQAv2) and the answer normalisation of its official evaluation.

A predicted answer is right in proportion to how many of the human answers agree with it:
``min(#humans that said it / 3, 1)``, averaged over the 10 subsets of 9 of the 10 human answers, as the official
script does (so an answer given by 3 of 10 people scores 0.9, not 1). Answers are compared after the official
normalisation: lower case, punctuation removed (a comma between digits kept out), number words as digits, articles
dropped, contractions given their apostrophe.
"""

from __future__ import annotations

import re
from collections import Counter

import torch
from torchmetrics import MeanMetric, MetricCollection

__all__ = ["generated_answer_metrics", "normalize_answer", "soft_accuracy", "soft_scores", "update_generated_answers",
           "update_subsets"]

_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's", "theyd": "they'd",
    "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # (the official pattern, look-behind typo and all)
_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")


def _punctuation(text: str) -> str:
    out = text
    for p in _PUNCTUATION:
        if f"{p} " in text or f" {p}" in text or _DIGIT_COMMA.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out)


def normalize_answer(answer: str) -> str:
    """An answer as the official VQA evaluation compares it (``"Two dogs."`` -> ``"2 dogs"``)."""
    text = _punctuation(" ".join(answer.replace("\n", " ").replace("\t", " ").split()))
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def soft_accuracy(pred: torch.Tensor, answers: torch.Tensor, missing: int = -2) -> torch.Tensor:
    """The accuracy of predicted answer ids (Q,) against the human answers' ids (Q, K), ``missing``-padded: for each
    human answer left out in turn, ``min(matches among the others / 3, 1)``, averaged; exact match for a question
    with one answer. In closed form with m matches of n answers: (m min((m-1)/3, 1) + (n-m) min(m/3, 1)) / n."""
    given = answers != missing
    n = given.sum(1).clamp(min=1).float()
    m = ((answers == pred[:, None]) & given).sum(1).float()
    soft = (m * ((m - 1) / 3).clamp(max=1) + (n - m) * (m / 3).clamp(max=1)) / n
    return torch.where(n > 1, soft, m)


def update_subsets(metrics, scores: torch.Tensor, subsets: dict[str, torch.Tensor]) -> None:
    """``metrics[name]`` (a mean) takes the ``scores`` (Q,) of its subset (a (Q,) mask), where it has any (torchmetrics
    takes no empty update): overall accuracy, per answer type, relational or not."""
    for name, subset in subsets.items():
        if subset.any():
            metrics[name].update(scores[subset])


def generated_answer_metrics(target: str, relational: bool) -> MetricCollection:
    """What a task that answers or captions by generation reports: the caption metrics (``target: caption``), or the
    share of exact answers, ``acc`` (with ``relational``, also ``acc_rel`` and ``acc_nonrel``)."""
    from mmlit.metrics.caption import caption_metrics

    if target == "caption":
        return MetricCollection(caption_metrics())
    names = ["acc", "acc_rel", "acc_nonrel"] if relational else ["acc"]
    return MetricCollection({name: MeanMetric() for name in names})


def update_generated_answers(metrics: MetricCollection, exact: torch.Tensor, relational: torch.Tensor) -> None:
    """``exact`` (Q,) 1.0 for a generated answer equal to the reference, by the question's ``relational`` (Q,)."""
    split = {"acc_rel": relational, "acc_nonrel": ~relational} if "acc_rel" in metrics else {}
    update_subsets(metrics, exact, {"acc": torch.ones_like(relational), **split})


def soft_scores(answers: list[str]) -> dict[str, float]:
    """Each distinct human answer's accuracy (as ``soft_accuracy`` scores it): the soft target of a question (Teney et
    al. 2018); a question with one answer has that answer as its target."""
    counts = Counter(answers)
    n = len(answers)
    if n == 1:
        return {answers[0]: 1.0}
    return {a: (c * min((c - 1) / 3.0, 1.0) + (n - c) * min(c / 3.0, 1.0)) / n for a, c in counts.items()}
