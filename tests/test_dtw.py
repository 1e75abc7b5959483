"""mmlit.dtw against the papers' recursions written out cell by cell (Python loops, torch autograd, float64), against
brute force over all alignments for hard DTW, and on padding, the divergence's sign and bad input."""

from __future__ import annotations

import math

import pytest
import torch

from mmlit.dtw import dtw, dtw_path, pairwise_cost, soft_dtw, soft_dtw_divergence

F64 = torch.float64
# One padded batch of unequal lengths, x lengths in 3..17 and y lengths in 5..11.
X_LENGTHS = torch.tensor([17, 3, 9, 12])
Y_LENGTHS = torch.tensor([5, 11, 11, 7])


def allowed(i: int, j: int, n: int, m: int, band: int | None) -> bool:
    """The documented band rule for 0-indexed cell (i, j) of an n x m pair, in integers."""
    d = max(n - 1, 1)
    return band is None or abs(i * (m - 1) - j * d) <= band * d


def naive_soft_dtw(cost: torch.Tensor, gamma: float | None, band: int | None = None) -> torch.Tensor:
    """Cuturi & Blondel's recursion for one n x m cost matrix, one cell at a time; gamma None: hard min."""
    n, m = cost.shape
    inf = torch.tensor(math.inf, dtype=cost.dtype)
    r = [[inf] * (m + 1) for _ in range(n + 1)]
    r[0][0] = torch.tensor(0.0, dtype=cost.dtype)
    for i in range(1, n + 1):
        for j in range(1, m + 1):
            if allowed(i - 1, j - 1, n, m, band):
                prev = torch.stack([r[i - 1][j - 1], r[i - 1][j], r[i][j - 1]])
                softmin = prev.min() if gamma is None else -gamma * torch.logsumexp(-prev / gamma, 0)
                r[i][j] = cost[i - 1, j - 1] + softmin
    return r[n][m]


def all_paths(n: int, m: int):
    """Every monotone, contiguous path from (0, 0) to (n - 1, m - 1)."""
    if (n, m) == (1, 1):
        yield [(0, 0)]
        return
    for di, dj in ((1, 1), (1, 0), (0, 1)):
        if n - di >= 1 and m - dj >= 1:
            for path in all_paths(n - di, m - dj):
                yield path + [(n - 1, m - 1)]


def padded_batch(seed: int = 0, dim: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(X_LENGTHS), int(X_LENGTHS.max()), dim, generator=g, dtype=F64)
    y = torch.randn(len(Y_LENGTHS), int(Y_LENGTHS.max()), dim, generator=g, dtype=F64)
    return x, y


@pytest.mark.parametrize("band", [None, 2])
@pytest.mark.parametrize("gamma", [0.01, 0.1, 1.0])
def test_soft_dtw_matches_the_recursion(gamma: float, band: int | None):
    """Values, gradients w.r.t. the cost, and gradients w.r.t. x and y through the cost, per pair of its own lengths
    (each pair weighted differently, so the backward's per-pair scaling counts)."""
    x, y = padded_batch()
    x.requires_grad_(True)
    y.requires_grad_(True)
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=F64)
    cost = pairwise_cost(x, y)
    cost.retain_grad()
    value = soft_dtw(cost, X_LENGTHS, Y_LENGTHS, gamma=gamma, band=band)
    (value * weights).sum().backward()
    for b, (n, m) in enumerate(zip(X_LENGTHS.tolist(), Y_LENGTHS.tolist())):
        xb = x[b, :n].detach().requires_grad_(True)
        yb = y[b, :m].detach().requires_grad_(True)
        cb = (xb[:, None] - yb[None]).square().sum(-1)  # (n, m), straight from the definition
        cb.retain_grad()
        expected = naive_soft_dtw(cb, gamma, band)
        (expected * weights[b]).backward()
        torch.testing.assert_close(value[b], expected.detach(), rtol=0, atol=1e-9)
        torch.testing.assert_close(cost.grad[b, :n, :m], cb.grad, rtol=0, atol=1e-9)
        torch.testing.assert_close(x.grad[b, :n], xb.grad, rtol=0, atol=1e-9)
        torch.testing.assert_close(y.grad[b, :m], yb.grad, rtol=0, atol=1e-9)
    for b, (n, m) in enumerate(zip(X_LENGTHS.tolist(), Y_LENGTHS.tolist())):  # padding: exactly zero gradient
        assert not cost.grad[b, n:].any() and not cost.grad[b, :, m:].any()
        assert not x.grad[b, n:].any() and not y.grad[b, m:].any()


def test_padding_changes_nothing():
    """Any padding, nan and inf included, leaves each pair's value and gradient as they are."""
    x, y = padded_batch(1)
    cost = pairwise_cost(x, y)
    other = cost.clone()
    for b, (n, m) in enumerate(zip(X_LENGTHS.tolist(), Y_LENGTHS.tolist())):
        other[b, n:] = torch.nan
        other[b, :, m:] = -torch.inf if b % 2 else 1e30
    results = []
    for c in (cost, other):
        c = c.requires_grad_(True)
        value = soft_dtw(c, X_LENGTHS, Y_LENGTHS, gamma=0.1, band=3)
        value.sum().backward()
        results.append((value.detach(), c.grad))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    # Through pairwise_cost, with finite padding: x's and y's gradients unchanged too.
    grads = []
    for seed in (2, 3):
        g = torch.Generator().manual_seed(seed)
        xp, yp = x.clone(), y.clone()
        for b, (n, m) in enumerate(zip(X_LENGTHS.tolist(), Y_LENGTHS.tolist())):
            xp[b, n:] = torch.randn(xp[b, n:].shape, generator=g, dtype=F64) * 10
            yp[b, m:] = torch.randn(yp[b, m:].shape, generator=g, dtype=F64) * 10
        xp.requires_grad_(True)
        yp.requires_grad_(True)
        soft_dtw(pairwise_cost(xp, yp), X_LENGTHS, Y_LENGTHS, gamma=1.0).sum().backward()
        grads.append((xp.grad, yp.grad))
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-12)


def test_band_none_equals_a_band_that_allows_every_cell():
    x, y = padded_batch(4)
    cost = pairwise_cost(x, y)
    torch.testing.assert_close(soft_dtw(cost, X_LENGTHS, Y_LENGTHS, 0.1),
                               soft_dtw(cost, X_LENGTHS, Y_LENGTHS, 0.1, band=17), rtol=0, atol=0)


def test_divergence_is_zero_at_equal_inputs_and_positive_elsewhere_where_soft_dtw_is_not():
    x, y = padded_batch(5)
    for gamma in (0.1, 1.0):
        for metric in ("sqeuclidean", "cosine"):
            d = soft_dtw_divergence(x, y, X_LENGTHS, Y_LENGTHS, gamma=gamma, metric=metric)
            assert (d > 0).all(), (gamma, metric, d)
            same = soft_dtw_divergence(x, x.clone(), X_LENGTHS, X_LENGTHS, gamma=gamma, metric=metric)
            assert same.abs().max() < 1e-12
    # Soft-DTW of a sequence with itself is below 0 (many near-free alignments each take off gamma * log 3 or so):
    # the reason for the divergence.
    close = 0.1 * torch.randn(1, 8, 2, dtype=F64, generator=torch.Generator().manual_seed(6))
    assert soft_dtw(pairwise_cost(close, close), gamma=1.0).item() < 0
    assert soft_dtw_divergence(close, close).item() == 0


def test_divergence_gradient_is_finite_and_zero_on_padding():
    x, y = padded_batch(7)
    x.requires_grad_(True)
    soft_dtw_divergence(x, y, X_LENGTHS, Y_LENGTHS, gamma=0.5, band=4).sum().backward()
    assert x.grad.isfinite().all()
    for b, n in enumerate(X_LENGTHS.tolist()):
        assert not x.grad[b, n:].any() and x.grad[b, :n].any()


@pytest.mark.parametrize("band", [None, 1])
def test_hard_dtw_is_the_best_of_all_paths(band: int | None):
    """dtw() against brute force over every monotone path (129 of them at 4 x 5), in a batch of unequal lengths;
    dtw_path marks one of the best paths, and it is contiguous, monotone and stays inside the pair's lengths."""
    x_lengths, y_lengths = torch.tensor([4, 3, 4, 2, 4]), torch.tensor([5, 5, 2, 3, 4])
    cost = torch.rand(5, 4, 5, dtype=F64, generator=torch.Generator().manual_seed(8))
    value, path = dtw(cost, x_lengths, y_lengths, band), dtw_path(cost, x_lengths, y_lengths, band)
    for b, (n, m) in enumerate(zip(x_lengths.tolist(), y_lengths.tolist())):
        paths = [p for p in all_paths(n, m) if all(allowed(i, j, n, m, band) for i, j in p)]
        best = min(sum(cost[b, i, j].item() for i, j in p) for p in paths)
        assert value[b].item() == pytest.approx(best, abs=1e-12)
        assert naive_soft_dtw(cost[b, :n, :m], None, band).item() == pytest.approx(best, abs=1e-12)
        cells = sorted(map(tuple, path[b].nonzero().tolist()))
        assert cells in paths  # a valid path: contiguous, monotone, corner to corner, allowed cells only
        assert sum(cost[b, i, j].item() for i, j in cells) == pytest.approx(best, abs=1e-12)
        assert path[b].sum() == len(cells) and not path[b, n:].any() and not path[b, :, m:].any()


def test_hard_path_of_a_sequence_and_itself_slowed_down():
    """y is x with every element said twice: the path takes row i to columns 2i and 2i + 1, at cost 0."""
    x = torch.randn(1, 6, 3, dtype=F64, generator=torch.Generator().manual_seed(9))
    y = x.repeat_interleave(2, dim=1)
    path = dtw_path(pairwise_cost(x, y))
    expected = torch.zeros(1, 6, 12, dtype=torch.bool)
    for i in range(6):
        expected[0, i, 2 * i:2 * i + 2] = True
    assert torch.equal(path, expected)
    assert dtw(pairwise_cost(x, y)).item() == pytest.approx(0, abs=1e-12)


def test_hard_dtw_gradient_is_the_path():
    cost = torch.rand(2, 6, 4, dtype=F64, generator=torch.Generator().manual_seed(10), requires_grad=True)
    dtw(cost, torch.tensor([6, 3]), torch.tensor([4, 2])).sum().backward()
    assert torch.equal(cost.grad, dtw_path(cost, torch.tensor([6, 3]), torch.tensor([4, 2])).to(F64))


def test_soft_dtw_tends_to_dtw_as_gamma_goes_to_zero():
    """0 <= dtw - soft_dtw <= gamma * log(number of paths) <= gamma * (n + m) * log 3, so the gap closes with gamma."""
    x, y = padded_batch(11)
    cost = pairwise_cost(x, y)
    hard = dtw(cost, X_LENGTHS, Y_LENGTHS)
    gaps = []
    for gamma in (1.0, 0.1, 0.01, 0.001):
        gap = hard - soft_dtw(cost, X_LENGTHS, Y_LENGTHS, gamma=gamma)
        assert (gap >= -1e-12).all() and (gap <= gamma * (X_LENGTHS + Y_LENGTHS) * math.log(3)).all()
        gaps.append(gap.max().item())
    assert gaps == sorted(gaps, reverse=True) and gaps[-1] < 0.01


def test_float32_and_half_inputs():
    x, y = padded_batch(12)
    cost = pairwise_cost(x, y)
    exact = soft_dtw(cost, X_LENGTHS, Y_LENGTHS, gamma=0.1, band=3)
    single = soft_dtw(cost.float(), X_LENGTHS, Y_LENGTHS, gamma=0.1, band=3)
    assert single.dtype == torch.float32
    torch.testing.assert_close(single, exact.float(), rtol=1e-5, atol=1e-5)
    half = cost.to(torch.bfloat16).requires_grad_(True)
    value = soft_dtw(half, X_LENGTHS, Y_LENGTHS, gamma=0.1)
    value.sum().backward()
    assert value.dtype == torch.float32 and half.grad.dtype == torch.bfloat16 and half.grad.isfinite().all()


def test_no_grad_gives_the_same_value():
    x, y = padded_batch(13)
    cost = pairwise_cost(x, y).requires_grad_(True)
    with torch.no_grad():
        plain = soft_dtw(cost, X_LENGTHS, Y_LENGTHS, gamma=0.3, band=2)
    assert torch.equal(plain, soft_dtw(cost, X_LENGTHS, Y_LENGTHS, gamma=0.3, band=2).detach())


def test_double_backward_raises():
    cost = torch.rand(1, 3, 4, dtype=F64, requires_grad=True)
    (grad,) = torch.autograd.grad(soft_dtw(cost).sum(), cost, create_graph=True)
    with pytest.raises(RuntimeError):
        grad.sum().backward()


def test_band_check_agrees_with_reachability():
    """The band is refused exactly when no allowed monotone path joins the corners (a reachability table says), and
    the documented ``band >= ceil(max(n, m) / min(n, m))`` is never refused."""
    for n in range(1, 11):
        for m in range(1, 11):
            cost = torch.rand(1, n, m, dtype=F64)
            for band in range(max(n, m)):
                reach = [[False] * (m + 1) for _ in range(n + 1)]
                reach[0][0] = True  # 1-indexed below, as in the recursion
                for i in range(1, n + 1):
                    for j in range(1, m + 1):
                        if allowed(i - 1, j - 1, n, m, band):
                            reach[i][j] = (i, j) == (1, 1) or reach[i - 1][j - 1] or reach[i - 1][j] or reach[i][j - 1]
                try:
                    soft_dtw(cost, band=band)
                    refused = False
                except ValueError:
                    refused = True
                assert refused != reach[n][m], (n, m, band)
                assert not (refused and band >= math.ceil(max(n, m) / min(n, m)))


def test_bad_input():
    cost = torch.rand(2, 5, 6, dtype=F64)
    for gamma in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="gamma"):
            soft_dtw(cost, gamma=gamma)
    with pytest.raises(ValueError, match=r"x_lengths\[1\] = 6 is outside \[1, 5\]"):
        soft_dtw(cost, torch.tensor([5, 6]))
    with pytest.raises(ValueError, match=r"y_lengths\[0\] = 0"):
        dtw(cost, None, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="shape"):
        soft_dtw(cost, torch.tensor([5]))
    with pytest.raises(ValueError, match="no monotone path"):
        soft_dtw(torch.rand(1, 3, 17), band=1)  # slope 8: a band of 1 column cannot follow it
    with pytest.raises(ValueError, match="no monotone path"):
        dtw_path(torch.rand(1, 1, 4), band=2)  # one row: the band must reach the last column
    with pytest.raises(ValueError, match="band"):
        soft_dtw(cost, band=-1)
    with pytest.raises(ValueError, match="metric"):
        pairwise_cost(cost, cost, metric="manhattan")
    with pytest.raises(ValueError, match=r"\(B, N, M\)"):
        soft_dtw(torch.rand(0, 3, 4))
    with pytest.raises(ValueError, match="floating"):
        soft_dtw(torch.ones(1, 2, 2, dtype=torch.long))
