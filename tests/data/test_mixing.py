"""Task samplers: a pure function of (seed, step), with the documented probabilities."""

import copy

import numpy as np
import pytest

from mmlit.data import AllTasks, FixedWeights, Proportional, RoundRobin, Temperature

SIZES = {"a": 900, "b": 90, "c": 10}


def _bound(sampler, seed=0):
    sampler.bind(SIZES, seed)
    return sampler


@pytest.mark.parametrize("sampler", [AllTasks(), RoundRobin(), Proportional(), Temperature(2.0), FixedWeights({"a": 1, "b": 1, "c": 2})])
def test_schedule_is_a_pure_function_of_seed_and_step_and_counts_agree(sampler):
    one, two = _bound(copy.deepcopy(sampler)), _bound(copy.deepcopy(sampler))  # as on two ranks
    steps = [0, 1, 5, 1000, 123456]
    assert [one.tasks(s) for s in steps] == [two.tasks(s) for s in steps]
    tally = dict.fromkeys(SIZES, 0)
    for s in range(300):
        for name in one.tasks(s):
            tally[name] += 1
    assert one.counts(300) == tally
    assert {k: one.counts(300)[k] - one.counts(100)[k] for k in SIZES} == one.counts(300, begin=100)


def test_all_tasks_and_round_robin():
    assert _bound(AllTasks()).tasks(7) == ["a", "b", "c"]
    assert [_bound(RoundRobin()).tasks(s) for s in range(4)] == [["a"], ["b"], ["c"], ["a"]]


@pytest.mark.parametrize("sampler,expected", [
    (Proportional(), [0.9, 0.09, 0.01]),
    (Temperature(2.0), np.sqrt([900, 90, 10]) / np.sqrt([900, 90, 10]).sum()),
    (Temperature(1e9), [1 / 3] * 3),
    (FixedWeights({"a": 1, "b": 1, "c": 2}), [0.25, 0.25, 0.5]),
])
def test_sampled_shares_follow_the_probabilities(sampler, expected):
    sampler = _bound(sampler, seed=11)
    assert list(sampler.probabilities().values()) == pytest.approx(list(expected), rel=1e-6)
    counts = sampler.counts(40_000)
    assert [counts[k] / 40_000 for k in SIZES] == pytest.approx(list(expected), abs=0.01)
    assert sum(counts.values()) == 40_000  # one task per step


def test_seed_changes_the_schedule():
    a, b = _bound(Temperature(2.0), seed=1), _bound(Temperature(2.0), seed=2)
    assert [a.tasks(s) for s in range(50)] != [b.tasks(s) for s in range(50)]


def test_fixed_weights_must_name_every_task():
    with pytest.raises(ValueError, match=r"data.mixture.init_args.weights: give a weight to every task"):
        FixedWeights({"a": 1}).bind(SIZES, 0)
    with pytest.raises(ValueError, match="temperature must be positive"):
        Temperature(0)
