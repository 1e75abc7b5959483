"""Metrics against values computed by hand: CIDEr-D, VQA accuracy and its answer normalisation, retrieval recall@K
with several captions per image; and beam search against greedy decoding on a toy language model."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
import torch
from torchmetrics import MetricCollection
from PIL import Image
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from torchmetrics.text import BLEUScore

from mmlit.metrics.caption import CIDErD, caption_metrics, cider_d, update_caption_metrics
from mmlit.metrics.retrieval import RetrievalRecall, recall_at_k
from mmlit.metrics.vqa import normalize_answer, soft_accuracy, soft_scores
from mmlit.models.generation import generate
from mmlit.tasks import VQA
from mmlit.tasks.base import Shards
from mmlit.text import BOS, EOS, PAD


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """The official evaluation's loop (vqaEval.py): for each human answer, min(1, matches among the others / 3),
    averaged."""
    scores = [min(1.0, sum(a == prediction for j, a in enumerate(answers) if j != i) / 3) for i in range(len(answers))]
    return sum(scores) / len(scores)


def official_vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """vqaEval.py's steps for one question: newlines and tabs to spaces and strip; only where the human answers are
    not all the same, the punctuation and digit/article processing of both sides; then the loop above."""
    def written(a):
        return a.replace("\n", " ").replace("\t", " ").strip()

    answers, prediction = [written(a) for a in answers], written(prediction)
    if len(set(answers)) > 1:
        answers, prediction = [normalize_answer(a) for a in answers], normalize_answer(prediction)
    return vqa_accuracy(prediction, answers)


def test_cider_d_by_hand():
    # Two images, so that an n-gram of one image's references has IDF log(2) - log(1) = log 2 =: L.
    # Image A: candidate "1 2 3", reference "1 2". Unigrams: candidate (L, L, L), reference (L, L): cosine 2/sqrt(6);
    # bigrams: candidate (L, L), reference (L): 1/sqrt(2); trigrams: the reference has none: 0. The candidate has one
    # bigram more than the reference: Gaussian penalty exp(-1 / (2 * 6^2)). CIDEr-D = 10 * mean over n = 1..4.
    # Image B: nothing in common: 0.
    a = 10 * (2 / math.sqrt(6) + 1 / math.sqrt(2)) * math.exp(-1 / 72) / 4
    assert cider_d([[1, 2, 3], [9]], [[[1, 2]], [[8]]]) == pytest.approx(a / 2, rel=1e-9)
    # Clipping: candidate "1 1" against "1 2": the candidate's unigram weight 2L is clipped to the reference's L:
    # (L * L) / (2L * sqrt(2) L) = 1 / (2 sqrt 2); no common bigram; equal lengths.
    assert cider_d([[1, 1], [9]], [[[1, 2]], [[8]]]) == pytest.approx(10 / (2 * math.sqrt(2)) / 4 / 2, rel=1e-9)
    # Several references: the similarity is averaged over them (the second one shares nothing).
    assert cider_d([[1, 2], [9]], [[[1, 2], [5, 6]], [[8]]]) == pytest.approx(10 * (1 + 1) / 4 / 2 / 2, rel=1e-9)


def test_cider_metric_gathers_updates_in_order():
    metric = CIDErD()
    metric.update([[1, 2, 3]], [[[1, 2]]])
    metric.update([[9], [4, 5]], [[[8]], [[4, 5], [4]]])
    expected = cider_d([[1, 2, 3], [9], [4, 5]], [[[1, 2]], [[8]], [[4, 5], [4]]])
    assert metric.compute().item() == pytest.approx(expected, rel=1e-6) and expected > 0


def test_caption_metrics_against_several_references():
    metrics = MetricCollection(caption_metrics())
    # two images; references padded to (B, R, T), EOS-ended; the second image has one reference only
    references = torch.tensor([[[5, 6, 7, EOS], [8, 9, EOS, PAD]], [[5, 9, EOS, PAD], [PAD] * 4]])
    generated = torch.tensor([[8, 9, EOS, PAD], [5, 6, EOS, PAD]])  # the first equals its second reference
    update_caption_metrics(metrics, generated, references)
    values = metrics.compute()
    assert values["exact_match"].item() == pytest.approx(0.5)
    # token accuracy against the first reference: image 1 gets none of 5 6 7 EOS right; image 2 gets 5 and EOS of 5 9 EOS
    assert values["token_acc"].item() == pytest.approx(2 / 7)
    perfect = MetricCollection(caption_metrics())
    update_caption_metrics(perfect, references[:, 0], references)
    assert perfect.compute()["bleu4"].item() == pytest.approx(0.0)  # a 2-token caption has no 4-gram: BLEU-4 is 0
    long = torch.tensor([[[5, 6, 7, 8, 9, EOS]], [[9, 8, 7, 6, 5, EOS]]])
    perfect = MetricCollection(caption_metrics())
    update_caption_metrics(perfect, long[:, 0], long)
    assert perfect.compute()["bleu4"].item() == pytest.approx(1.0)


def _bleu4_coco_caption(candidates, references):
    """Corpus BLEU-4 as coco-caption's BleuScorer computes it (option "closest"): clipped n-gram counts summed over
    the corpus, the reference length closest to each candidate's (the shorter one on a tie), the brevity penalty on the
    sums (its 1e-15 / 1e-9 smoothing of empty counts left out: every count here is non-zero)."""
    correct, guessed, length, reference_length = [0] * 4, [0] * 4, 0, 0
    for candidate, refs in zip(candidates, references):
        for n in range(1, 5):
            counts = Counter(tuple(candidate[i:i + n]) for i in range(len(candidate) - n + 1))
            most = Counter()
            for ref in refs:
                most |= Counter(tuple(ref[i:i + n]) for i in range(len(ref) - n + 1))
            correct[n - 1] += sum(min(c, most[g]) for g, c in counts.items())
            guessed[n - 1] += max(len(candidate) - n + 1, 0)
        length += len(candidate)
        reference_length += min((abs(len(r) - len(candidate)), len(r)) for r in refs)[1]
    precision = math.exp(sum(math.log(c / g) for c, g in zip(correct, guessed)) / 4)
    return precision * (1.0 if length >= reference_length else math.exp(1 - reference_length / length))


def test_bleu4_takes_the_shorter_of_two_equally_close_references_whatever_their_order():
    candidate = [5, 6, 7, 8, 9]  # 5 tokens; references of 6 and 4 tokens are both 1 away
    longer, shorter = [5, 6, 7, 8, 9, 10], [5, 6, 7, 8]
    other = ([11, 12, 13, 14, 15, 16, 17], [[11, 12, 13, 14, 15, 16, 17, 18]])  # a second image, no tie
    expected = _bleu4_coco_caption([candidate, other[0]], [[longer, shorter], other[1]])
    assert expected == pytest.approx(1.0)  # reference length 4 + 8 <= 12 tokens: no brevity penalty
    for refs in ([longer, shorter], [shorter, longer]):
        rows = [[*r, EOS] + [PAD] * (8 - len(r)) for r in refs]
        references = torch.tensor([rows, [[*other[1][0], EOS], [PAD] * 9]])
        generated = torch.tensor([[*candidate, EOS, PAD, PAD], [*other[0], EOS]])
        metrics = MetricCollection(caption_metrics())
        update_caption_metrics(metrics, generated, references)
        assert metrics.compute()["bleu4"].item() == pytest.approx(expected, abs=1e-6), refs
    # torchmetrics alone takes the first listed: the longer one first costs a brevity penalty of exp(1 - 14 / 12)
    alone = BLEUScore(n_gram=4)
    alone.update(["5 6 7 8 9", "11 12 13 14 15 16 17"], [["5 6 7 8 9 10", "5 6 7 8"], ["11 12 13 14 15 16 17 18"]])
    assert alone.compute().item() == pytest.approx(math.exp(1 - 14 / 12), abs=1e-6)


def test_bleu4_equals_coco_captions_on_random_captions_with_five_references():
    generator = random.Random(0)
    candidates = [[generator.randint(5, 8) for _ in range(generator.randint(6, 12))] for _ in range(50)]
    references = [[[generator.randint(5, 8) for _ in range(generator.randint(6, 12))] for _ in range(5)]
                  for _ in candidates]
    metrics = MetricCollection(caption_metrics())
    width = 13
    generated = torch.tensor([[*c, EOS] + [PAD] * (width - len(c) - 1) for c in candidates])
    refs = torch.tensor([[[*r, EOS] + [PAD] * (width - len(r) - 1) for r in rs] for rs in references])
    update_caption_metrics(metrics, generated, refs)
    assert metrics.compute()["bleu4"].item() == pytest.approx(_bleu4_coco_caption(candidates, references), abs=1e-6)


@pytest.mark.parametrize("answer,expected", [("Yes.", "yes"), ("Two dogs!", "2 dogs"), ("the red one", "red 1"),
                                             ("isnt it", "isn't it"), ("  a  cat ", "cat"), ("3.5", "3.5")])
def test_answers_are_normalised_as_the_official_evaluation_does(answer, expected):
    assert normalize_answer(answer) == expected


def _vqa_scores(questions: list[tuple[list[str], str]], vocabulary: list[str]) -> torch.Tensor:
    """Each (human answers, predicted answer) scored through the VQA task's data side (prepare, collate) and its
    metric (``soft_accuracy`` on the collated answer ids, as ``update_metrics`` scores them)."""
    task = VQA(Shards(), answers=vocabulary)
    tokenizer = Tokenizer(WordLevel({"[UNK]": 0, "what": 1}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = Whitespace()
    sample = {"__key__": "k", "png": Image.new("RGB", (8, 8)),
              "json": {"questions": [{"question": "what", "answers": h} for h, _ in questions]}}
    batch = task.data.collate(list(task.data.prepare(sample, tokenizer)))
    predicted = torch.tensor([vocabulary.index(p) for _, p in questions])
    metrics = task.metrics()
    task.update_metrics(metrics, {"logits": torch.nn.functional.one_hot(predicted, len(vocabulary)).float()}, batch)
    scores = soft_accuracy(predicted, batch["answers"])
    assert metrics.compute()["acc"].item() == pytest.approx(scores.mean().item())
    return scores


def test_vqa_accuracy_is_the_official_one_for_unanimous_and_split_answers():
    vocabulary = ["2", "dog", "x ray", "yes", "no", "3"]  # as `mmlit data answers` writes them: normalised
    cases = [(["two"] * 10, "2", 0.0), (["a dog"] * 10, "dog", 0.0), (["x-ray"] * 10, "x ray", 0.0),  # unanimous:
             (["yes"] * 10, "yes", 1.0), (["Yes"] * 10, "yes", 0.0),                                   # as written
             (["two"] * 5 + ["2"] * 3 + ["Two."] * 2, "2", 1.0),  # split: all normalised, 10 of 10 agree
             (["dog"] * 2 + ["a dog"] + ["cat"] * 7, "dog", 0.9),  # 3 of 10 say "dog": (3 * 2/3 + 7 * 1) / 10
             (["x-ray", "X-Ray", "bone"] + ["no"] * 7, "x ray", 0.6),  # (2 * 1/3 + 8 * 2/3) / 10
             ([" yes\n"] * 10, "yes", 1.0)]  # stripped before anything else
    scores = _vqa_scores([(h, p) for h, p, _ in cases], vocabulary)
    assert scores.tolist() == pytest.approx([e for _, _, e in cases])
    assert [official_vqa_accuracy(p, h) for h, p, _ in cases] == pytest.approx([e for _, _, e in cases])
    # a random set against the official steps: answers in several spellings, unanimous about a third of the time
    spellings = {"2": ["two", "2", "Two.", "2 "], "dog": ["dog", "a dog", "Dog", "the dog"], "x ray": ["x-ray", "x ray"],
                 "yes": ["yes", "Yes", "yes."], "no": ["no", "No"], "3": ["three", "3"]}
    generator, questions = random.Random(0), []
    for _ in range(400):
        truth = generator.choice(vocabulary)
        if generator.random() < 0.35:
            humans = [generator.choice(spellings[truth])] * 10
        else:
            humans = [generator.choice(spellings[generator.choice(vocabulary) if generator.random() < 0.3 else truth])
                      for _ in range(10)]
        questions.append((humans, generator.choice([truth, generator.choice(vocabulary)])))
    scores = _vqa_scores(questions, vocabulary)
    official = [official_vqa_accuracy(p, h) for h, p in questions]
    assert scores.tolist() == pytest.approx(official)
    always_normalised = [vqa_accuracy(normalize_answer(p), [normalize_answer(a) for a in h]) for h, p in questions]
    assert sum(always_normalised) - sum(official) > 10  # what scoring every question normalised would add


def test_a_question_with_one_answer_is_exact_match_after_normalising():
    """One answer (a table row's ``answer``): "Yes" and "Two" are the vocabulary's "yes" and "2", as its target says."""
    vocabulary = ["2", "yes", "no"]
    cases = [(["Yes"], "yes", 1.0), (["Two"], "2", 1.0), (["no."], "no", 1.0), (["Yes"], "no", 0.0), (["3"], "2", 0.0)]
    assert _vqa_scores([(h, p) for h, p, _ in cases], vocabulary).tolist() == [e for _, _, e in cases]


def test_vqa_accuracy_by_hand():
    humans = ["yes"] * 3 + ["no"] * 7
    # "yes": left out one of its 3 -> 2 of 9 agree: 2/3; left out one of the 7 -> 3 agree: 1. (3 * 2/3 + 7) / 10
    assert vqa_accuracy("yes", humans) == pytest.approx(0.9)
    assert vqa_accuracy("no", humans) == pytest.approx(1.0)
    assert vqa_accuracy("maybe", humans) == 0.0
    assert vqa_accuracy("no", ["yes"] * 8 + ["no"] * 2) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)  # 0.6
    assert soft_scores(humans) == pytest.approx({"yes": 0.9, "no": 1.0})
    assert soft_scores(["no"]) == {"no": 1.0}  # one answer: it is the target
    # the task's tensor form gives the same numbers: answer ids, -2 padding
    answers = torch.tensor([[1] * 3 + [2] * 7, [1] * 8 + [2] * 2, [2] + [-2] * 9])
    assert soft_accuracy(torch.tensor([1, 2, 2]), answers).tolist() == pytest.approx([0.9, 0.6, 1.0])  # (one: exact)
    for m in range(11):  # the closed form against the official loop, for every number of matching answers
        humans = [1] * m + [2] * (10 - m)
        assert soft_accuracy(torch.tensor([1]), torch.tensor([humans])).item() == pytest.approx(vqa_accuracy(1, humans))


def test_recall_at_k_on_a_fixed_similarity_matrix():
    # 7 captions (rows) of 6 images (columns); captions 0 and 1 are image 0's. With image embeddings the identity, the
    # caption embeddings are the similarity rows themselves.
    sim = torch.tensor([[1, 9, 8, 7, 6, 5], [9, 1, 2, 3, 4, 5], [5, 6, 9, 8, 7, 1], [0, 0, 7, 0, 0, 0],
                        [1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1], [2, 2, 2, 2, 2, 3]], dtype=torch.float)
    owner = torch.tensor([0, 0, 1, 2, 3, 4, 5])
    values = recall_at_k(torch.eye(6), sim, owner, (1, 5, 10))
    # caption -> image, the rank of its own image: 5, 0, 3, 0, 2, 4, 0
    assert values["r@1_t2i"].item() == pytest.approx(3 / 7)
    assert values["r@5_t2i"].item() == pytest.approx(6 / 7)
    assert values["r@10_t2i"].item() == pytest.approx(1.0)
    # image -> caption, the best rank among its captions: 0, 1, 2, 2, 4, 3
    assert values["r@1_i2t"].item() == pytest.approx(1 / 6)
    assert values["r@5_i2t"].item() == pytest.approx(1.0)


def test_retrieval_metric_pairs_captions_with_their_images_across_updates():
    torch.manual_seed(0)
    image, text = torch.randn(5, 8), torch.randn(9, 8)
    owner = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 4])
    whole = RetrievalRecall(8, (1, 2))
    whole.update(image, text, owner)
    parts = RetrievalRecall(8, (1, 2))
    parts.update(image[:2], text[:3], owner[:3])  # images 0-1 and their captions
    parts.update(image[2:], text[3:], owner[3:] - 2)  # images 2-4: indices within this update
    assert {k: v.item() for k, v in parts.compute().items()} == pytest.approx({k: v.item() for k, v in whole.compute().items()})


def _toy_model(ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """After BOS: a 0.6, b 0.4; after a: EOS 0.4, a 0.3, b 0.3; after b: EOS 0.99. Greedy takes a (0.6 * 0.4 = 0.24),
    the best sequence is b EOS (0.4 * 0.99)."""
    table = {BOS: {4: 0.6, 5: 0.4}, 4: {EOS: 0.4, 4: 0.3, 5: 0.3}, 5: {EOS: 0.99, 4: 0.01}}
    probs = torch.full((len(ids), 6), 1e-9)
    for row, last in enumerate(ids[:, -1].tolist()):
        for token, p in table.get(last, {EOS: 1.0}).items():
            probs[row, token] = p
    return probs.log()


def test_beam_search_finds_the_sequence_greedy_decoding_misses():
    prompt = torch.full((2, 1), BOS)
    greedy, greedy_score = generate(_toy_model, prompt, 4)
    beam, beam_score = generate(_toy_model, prompt, 4, beam_size=3)
    assert greedy[0].tolist()[:2] == [4, EOS] and greedy_score[0].item() == pytest.approx(math.log(0.24), abs=1e-4)
    assert beam[0].tolist()[:2] == [5, EOS] and beam_score[0].item() == pytest.approx(math.log(0.396), abs=1e-4)
    assert (beam[:, 2:] == PAD).all() and torch.equal(beam[0], beam[1])
    one, _ = generate(_toy_model, prompt, 4, beam_size=1)
    assert torch.equal(one, greedy)


def _gather_with_an_empty_rank(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    retrieval, cider = RetrievalRecall(4, (1,)), CIDErD()
    if rank == 0:  # rank 1 saw no batch (all its samples skipped)
        retrieval.update(torch.eye(4)[:3], torch.eye(4)[:3])
        cider.update([[1, 2, 3], [9]], [[[1, 2]], [[8]]])
    values = {"r@1_i2t": retrieval.compute()["r@1_i2t"].item(), "cider": cider.compute().item()}
    torch.save(values, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_gathered_metrics_survive_a_rank_without_batches(tmp_path):
    """torchmetrics sends an empty 1-D float tensor for a rank that never updated a list state: mmlit's states are
    flat floats, so the gather matches and both ranks compute the first rank's values."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_gather_with_an_empty_rank, args=(port, str(tmp_path)), nprocs=2, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert ranks[0] == ranks[1] == {"r@1_i2t": 1.0, "cider": pytest.approx(cider_d([[1, 2, 3], [9]], [[[1, 2]], [[8]]]))}
