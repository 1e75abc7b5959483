"""Each objective against small hand-computed cases (two tasks, known losses or gradients), and every registered
objective through the common interface (a method added later is tested without a new test)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from mmlit.objectives import (CAGrad, DynamicWeightAverage, FAMO, GradNorm, MGDA, PCGrad, RandomWeighting,
                              StaticWeights, UncertaintyWeighting, step_generator)
from mmlit.objectives.cagrad import cagrad_weights
from mmlit.registry import get_objective, list_objectives

TASKS = ["a", "b"]


def _bound(objective, tasks=TASKS):
    objective.bind(tasks)
    return objective


def _combine(objective, grads, losses=(1.0, 1.0), step=0):
    return objective.combine(torch.tensor(grads), torch.tensor(losses), TASKS[:len(grads)], step)


@pytest.mark.parametrize("name", list_objectives())
def test_every_registered_objective_combines_two_tasks(name):
    objective = _bound(get_objective(name)())
    losses = {"a": torch.tensor(1.5, requires_grad=True), "b": torch.tensor(0.5, requires_grad=True)}
    loss = objective(losses, step=0)
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert losses["a"].grad is not None and losses["b"].grad is not None
    if objective.uses_gradients:
        update = objective.combine(torch.randn(2, 7), torch.tensor([1.5, 0.5]), TASKS, 0)
        assert update.shape == (7,) and torch.isfinite(update).all()
    assert set(objective.state()) >= {"weight/a", "weight/b"}


def test_static_weights_and_unknown_task():
    objective = _bound(StaticWeights({"a": 2.0}))
    assert objective({"a": torch.tensor(1.0), "b": torch.tensor(3.0)}, 0).item() == 5.0
    with pytest.raises(ValueError, match="model.objective.init_args.weights: no task named 'c'"):
        _bound(StaticWeights({"c": 1.0}))


def test_uncertainty_weighting_learns_log_variances():
    objective = _bound(UncertaintyWeighting())
    losses = {"a": torch.tensor(2.0), "b": torch.tensor(0.5)}
    loss = objective(losses, 0)
    assert loss.item() == pytest.approx(0.5 * 2.0 + 0.5 * 0.5)  # s = 0: weights 1/2, no log-variance term
    loss.backward()
    # d/ds (0.5 e^-s L + 0.5 s) = -0.5 L + 0.5 at s = 0
    assert objective.log_variance.grad.tolist() == pytest.approx([-0.5, 0.25])
    optimizer = torch.optim.SGD(objective.parameters(), lr=0.5)
    for _ in range(300):
        optimizer.zero_grad()
        objective(losses, 0).backward()
        optimizer.step()
    assert objective.log_variance.tolist() == pytest.approx([math.log(2.0), math.log(0.5)], abs=1e-3)  # s* = log L
    assert float(objective.weights["a"]) < float(objective.weights["b"])  # the larger loss gets the smaller weight


def test_dwa_weighs_up_the_task_whose_loss_fell_less():
    objective = _bound(DynamicWeightAverage(period=2, temperature=2.0))
    history = [(1.0, 1.0), (1.0, 1.0), (0.5, 1.0), (0.5, 1.0)]  # windows 0 and 1; a halves, b stays
    for step, (a, b) in enumerate(history):
        objective({"a": torch.tensor(a), "b": torch.tensor(b)}, step)
        assert [float(objective.weights[t]) for t in TASKS] == [1.0, 1.0]  # fewer than two windows closed
    loss = objective({"a": torch.tensor(0.5), "b": torch.tensor(1.0)}, 4)
    ea, eb = math.exp(0.5 / 2), math.exp(1.0 / 2)  # r = (0.5 / 1, 1 / 1), w = 2 softmax(r / T)
    expected = [2 * ea / (ea + eb), 2 * eb / (ea + eb)]
    assert [float(objective.weights[t]) for t in TASKS] == pytest.approx(expected)
    assert loss.item() == pytest.approx(expected[0] * 0.5 + expected[1] * 1.0)


def test_rlw_draws_softmax_normal_weights_per_step():
    objective = _bound(RandomWeighting(seed=3))
    losses = {"a": torch.tensor(1.0), "b": torch.tensor(2.0)}
    loss = objective(losses, 7)
    expected = torch.softmax(torch.randn(2, generator=step_generator(3, 7)), 0)
    assert [float(objective.weights[t]) for t in TASKS] == pytest.approx(expected.tolist())
    assert loss.item() == pytest.approx(expected[0].item() + 2 * expected[1].item())
    assert objective(losses, 7).item() == loss.item()  # the same step (another rank, micro-batch) draws the same
    assert objective(losses, 8).item() != loss.item()


def test_famo_weighs_gradients_by_z_over_c_loss_and_favours_the_slower_task():
    objective = _bound(FAMO(lr=0.025, gamma=0.0))
    losses = {"a": torch.tensor(1.0, requires_grad=True), "b": torch.tensor(2.0, requires_grad=True)}
    objective(losses, 0).backward()
    # z = (1/2, 1/2), c = z_a / 1 + z_b / 2 = 0.75: d loss / d L_t = z_t / (c L_t) = (2/3, 1/3)
    assert [losses["a"].grad.item(), losses["b"].grad.item()] == pytest.approx([2 / 3, 1 / 3])
    assert [float(objective.weights[t]) for t in TASKS] == pytest.approx([2 / 3, 1 / 3])
    objective({"a": torch.tensor(0.5), "b": torch.tensor(2.0)}, 1)  # a's log-loss fell by log 2, b's did not
    objective({"a": torch.tensor(0.5), "b": torch.tensor(2.0)}, 2)  # the update for step 0 -> 1 happens here
    # delta = (log 2, 0); J^T delta = z (delta - z.delta) = (+log2/4, -log2/4); Adam's first step moves by lr * sign
    assert objective.logits.tolist() == pytest.approx([-0.025, 0.025], abs=1e-6)
    with pytest.raises(ValueError, match="FAMO .* losses >= 0"):
        objective({"a": torch.tensor(-1.0)}, 3)


def test_famo_matches_the_authors_adam_steps_also_when_no_loss_changes():
    """The reference way (the authors' code): logits ``w`` a parameter, ``delta = log L_prev - log L_now``, the
    gradient ``J_softmax(w)^T delta`` stepped by torch's Adam with weight decay gamma after every step, including a
    step whose losses did not change (Adam's momentum still moves the logits)."""
    objective = _bound(FAMO(lr=0.025, gamma=0.01))
    logits = torch.nn.Parameter(torch.zeros(2))
    adam = torch.optim.Adam([logits], lr=0.025, weight_decay=0.01)
    history = [(1.0, 2.0), (0.5, 2.0), (0.5, 2.0), (0.5, 2.0), (0.4, 1.0), (0.4, 1.0)]
    for step, (a, b) in enumerate(history):
        objective({"a": torch.tensor(a), "b": torch.tensor(b)}, step)
        if step >= 2:  # FAMO compares the losses of the previous two steps when a step begins
            previous, now = torch.tensor(history[step - 2]), torch.tensor(history[step - 1])
            delta = torch.log(previous + 1e-8) - torch.log(now + 1e-8)
            with torch.enable_grad():
                grad = torch.autograd.grad(torch.softmax(logits, 0), logits, grad_outputs=delta)[0]
            adam.zero_grad()
            logits.grad = grad
            adam.step()
        assert objective.logits.tolist() == pytest.approx(logits.tolist(), abs=1e-6), step
    assert int(objective.adam_steps) == 4
    assert objective.logits[0] < objective.logits[1]  # a's loss fell: weight moves to b


def test_gradnorm_moves_weights_towards_equal_weighted_gradient_norms():
    objective = _bound(GradNorm(alpha=1.5, lr=0.025))
    update = _combine(objective, [[3.0, 0.0], [0.0, 1.0]])
    assert update.tolist() == pytest.approx([3.0, 1.0])  # this step uses w = (1, 1)
    # G = (3, 1), target = mean(G) = 2 (equal loss ratios): Adam's first step moves each weight by lr against the
    # sign of G - target: w_a - 0.025, w_b + 0.025, renormalised to sum 2
    w = torch.tensor([1 - 0.025, 1 + 0.025])
    assert objective.task_weights.tolist() == pytest.approx((2 * w / w.sum()).tolist())
    # Equal gradient norms, but task b's loss stays high relative to its start: b trains slower, gets more weight.
    objective = _bound(GradNorm(alpha=1.5, lr=0.025))
    _combine(objective, [[1.0, 0.0], [0.0, 1.0]], losses=(1.0, 1.0))
    _combine(objective, [[1.0, 0.0], [0.0, 1.0]], losses=(0.5, 1.0))
    assert objective.task_weights[1] > objective.task_weights[0]
    assert objective.task_weights.sum().item() == pytest.approx(2.0)


def test_gradnorm_matches_adam_on_its_gradient_loss_with_large_gradient_norms():
    """The reference way (LibMTL): the weights are a parameter, ``sum_t |w_t ||g_t|| - target_t|`` (targets
    detached) is back-propagated into it, torch's Adam steps it, and it is renormalised to sum T. With gradient norms of
    30-60 a plain gradient step of 0.025 x the norm would send a weight to the floor in one step."""
    tasks = ["a", "b", "c"]
    objective = _bound(GradNorm(alpha=1.5, lr=0.025), tasks)
    weights = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    adam = torch.optim.Adam([weights], lr=0.025)
    generator, initial = torch.Generator().manual_seed(0), None
    for step in range(6):
        grads = torch.randn(3, 8, generator=generator, dtype=torch.float64)
        grads *= torch.tensor([30.0, 41.0, 60.0], dtype=torch.float64)[:, None] / grads.norm(dim=1, keepdim=True)
        losses = torch.tensor([2.0, 1.5, 1.0], dtype=torch.float64) * (1 - 0.1 * step * torch.tensor([1.0, 0.5, 0.2]))
        objective.combine(grads.float(), losses.float(), tasks, step)

        initial = losses if initial is None else initial
        norms = grads.norm(dim=1)
        weighted = weights * norms
        ratio = losses / initial
        target = (weighted.mean() * (ratio / ratio.mean()) ** 1.5).detach()
        adam.zero_grad()
        (weighted - target).abs().sum().backward()
        adam.step()
        with torch.no_grad():
            weights.clamp_(min=1e-6)
            weights.mul_(3 / weights.sum())
        assert objective.task_weights.tolist() == pytest.approx(weights.tolist(), abs=1e-5)
        assert objective.task_weights.min() > 0.5  # six steps of about 0.025 each
    assert objective.task_weights[0] > objective.task_weights[2]  # the smaller gradient is weighed up


def test_pcgrad_projects_only_conflicting_gradients():
    objective = _bound(PCGrad())
    # g_a . g_b = -1 < 0: g_a - (-1/2) g_b = (0.5, 0.5); g_b - (-1/1) g_a = (0, 1)
    assert _combine(objective, [[1.0, 0.0], [-1.0, 1.0]]).tolist() == pytest.approx([0.5, 1.5])
    assert [float(objective.weights[t]) for t in TASKS] == pytest.approx([2.0, 1.5])  # 0.5 g_a + ... as coefficients
    assert _combine(objective, [[1.0, 0.0], [1.0, 1.0]]).tolist() == pytest.approx([2.0, 1.0])  # no conflict: sum


def test_pcgrad_matches_the_algorithm_on_vectors_for_three_tasks():
    grads = torch.tensor([[1.0, 0.2, -0.5, 0.0], [-0.8, 1.0, 0.1, 0.3], [0.1, -0.9, 0.4, 1.0]])
    tasks = ["a", "b", "c"]
    objective = _bound(PCGrad(seed=5), tasks)
    update = objective.combine(grads, torch.ones(3), tasks, 11)
    generator, expected = step_generator(5, 11), torch.zeros(4)
    for i in range(3):  # Algorithm 1 of the paper, on the vectors themselves
        g = grads[i].clone()
        for j in torch.randperm(3, generator=generator).tolist():
            if j != i and g @ grads[j] < 0:
                g -= (g @ grads[j]) / grads[j].norm() ** 2 * grads[j]
        expected += g
    assert update.tolist() == pytest.approx(expected.tolist(), abs=1e-6)


def test_cagrad_orthogonal_gradients_and_optimality():
    objective = _bound(CAGrad(c=0.5))
    # Orthogonal unit gradients: w = (1/2, 1/2), ||g0|| = ||g_w|| = 1/sqrt2, lambda = c; d = 1.5 g0, then / (1 + c^2)
    assert _combine(objective, [[1.0, 0.0], [0.0, 1.0]]).tolist() == pytest.approx([0.6, 0.6], abs=1e-5)
    assert _combine(_bound(CAGrad(c=0.0)), [[1.0, 2.0], [3.0, -1.0]]).tolist() == pytest.approx([2.0, 0.5])  # mean
    g = torch.randn(3, 10, generator=torch.Generator().manual_seed(0)).double()
    gram = g @ g.T
    w = cagrad_weights(gram, 0.4)
    b = torch.full((3,), 1 / 3, dtype=torch.float64)
    radius = 0.4 * torch.sqrt(b @ gram @ b)

    def dual(x):
        return x @ gram @ b + radius * torch.sqrt(x @ gram @ x)

    candidates = torch.distributions.Dirichlet(torch.ones(3)).sample((5000,)).double()
    assert dual(w) <= min(dual(x) for x in candidates) + 1e-9


def test_mgda_finds_the_minimum_norm_combination():
    objective = _bound(MGDA())
    # min over gamma of ||gamma (1, 0) + (1 - gamma) (-1, 1)||^2: gamma = 0.6, point (0.2, 0.4)
    assert _combine(objective, [[1.0, 0.0], [-1.0, 1.0]]).tolist() == pytest.approx([0.2, 0.4], abs=1e-5)
    assert _combine(objective, [[1.0, 0.0], [1.0, 1.0]]).tolist() == pytest.approx([1.0, 0.0], abs=1e-5)
    grads = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))
    d = _bound(MGDA(), ["a", "b", "c"]).combine(grads, torch.ones(3), ["a", "b", "c"], 0)
    assert (grads @ d >= d @ d - 1e-5).all()  # optimality: a common descent direction with d . g_t >= ||d||^2
    l2 = _combine(_bound(MGDA("l2")), [[2.0, 0.0], [0.0, 1.0]])  # unit gradients: equal weights on them
    assert l2.tolist() == pytest.approx([0.5, 0.5], abs=1e-5)



def _min_norm_by_supports(g):
    """The exact minimum-norm weights by enumeration: for every support S, the affine minimum of its points (a linear
    solve of the KKT system); the best one with non-negative weights is the optimum of the convex problem."""
    n, best = g.shape[0], None
    for k in range(1, n + 1):
        for support in itertools.combinations(range(n), k):
            index = torch.tensor(support)
            kkt = torch.ones(k + 1, k + 1, dtype=torch.float64)
            kkt[:k, :k], kkt[k, k] = g[index][:, index], 0.0
            v = torch.linalg.lstsq(kkt, torch.eye(k + 1, dtype=torch.float64)[k:].T).solution[:k, 0]
            if (v < -1e-12).any():
                continue
            w = torch.zeros(n, dtype=torch.float64)
            w[index] = v
            if best is None or w @ g @ w < best @ g @ best:
                best = w
    return best


def _badly_scaled_conflicting_gradients(tasks=5, dim=40, seed=0):
    """Gradients with norms 100x apart and pairwise cosines down to about -0.9 (the hard case of MGDA's solvers)."""
    generator = torch.Generator().manual_seed(seed)
    shared = torch.randn(dim, generator=generator, dtype=torch.float64)
    signs = torch.tensor([1.0, -1.0] * tasks, dtype=torch.float64)[:tasks, None]
    grads = signs * shared + 0.4 * torch.randn(tasks, dim, generator=generator, dtype=torch.float64)
    return grads / grads.norm(dim=1, keepdim=True) * torch.logspace(0, 2, tasks, dtype=torch.float64)[:, None]


@pytest.mark.parametrize("seed", range(4))
def test_mgda_update_is_the_exact_minimum_norm_point_on_badly_scaled_conflicting_gradients(seed):
    grads = _badly_scaled_conflicting_gradients(seed=seed)
    cosines = torch.nn.functional.normalize(grads, dim=1) @ torch.nn.functional.normalize(grads, dim=1).T
    assert cosines.min() < -0.85 and grads.norm(dim=1).max() / grads.norm(dim=1).min() > 99
    tasks = list("abcde")
    expected = _min_norm_by_supports(grads @ grads.T) @ grads
    update = _bound(MGDA(), tasks).combine(grads.float(), torch.ones(5), tasks, 0).double()
    assert (update - expected).abs().max() <= 1e-4 * expected.abs().max()
    # the same for the l2-normalised problem, with the weights on the normalised gradients (LibMTL) or the raw ones
    unit = grads / grads.norm(dim=1, keepdim=True)
    w = _min_norm_by_supports(unit @ unit.T)
    for weights_on, reference in (("normalized", w @ unit), ("raw", w @ grads)):
        update = _bound(MGDA("l2", weights_on), tasks).combine(grads.float(), torch.ones(5), tasks, 0).double()
        assert (update - reference).abs().max() <= 1e-4 * reference.abs().max(), weights_on


def test_mgda_two_tasks_closed_form_and_a_zero_gradient_under_l2():
    a, b = torch.tensor([300.0, 20.0, -5.0]), torch.tensor([-2.0, 1.5, 0.5])  # norms 150x apart, cosine ~ -0.8
    gamma = ((b @ b - a @ b) / (a - b).pow(2).sum()).clamp(0, 1)  # the minimum of ||gamma a + (1 - gamma) b||^2
    update = _bound(MGDA()).combine(torch.stack([a, b]), torch.ones(2), TASKS, 0)
    assert update.tolist() == pytest.approx((gamma * a + (1 - gamma) * b).tolist(), rel=1e-5, abs=1e-7)
    objective = _bound(MGDA("l2"), ["a", "b", "c"])
    grads = torch.tensor([[3.0, 0.0], [0.0, 0.0], [0.0, 1.0]])  # task b: a zero gradient
    update = objective.combine(grads, torch.ones(3), ["a", "b", "c"], 0)
    assert update.tolist() == pytest.approx([0.5, 0.5], abs=1e-6)  # a and c solved alone: unit vectors, equal weights
    assert [float(objective.weights[t]) for t in "abc"] == pytest.approx([0.5 / 3, 0.0, 0.5], abs=1e-6)
