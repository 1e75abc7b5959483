"""Dynamic time warping in torch: soft-DTW as a loss, its divergence, and hard DTW as an alignment.

* ``soft_dtw(cost)``: soft-DTW of Cuturi & Blondel 2017 ("Soft-DTW: a Differentiable Loss Function for
  Time-Series", arXiv:1703.01541). With ``R[0, 0] = 0``, ``R[i, 0] = R[0, j] = inf`` and, for 1 <= i <= n,
  1 <= j <= m (1-indexed cells of the cost matrix),
  ``R[i, j] = cost[i, j] + softmin_gamma(R[i-1, j-1], R[i-1, j], R[i, j-1])``, where
  ``softmin_gamma(a) = -gamma * log(sum(exp(-a / gamma)))``; the value is ``R[n, m]``. Its gradient with respect to
  the cost is the paper's expected alignment E (Algorithm 2), computed by our own backward, not by autograd.
* ``soft_dtw_divergence(x, y)``: ``sdtw(x, y) - (sdtw(x, x) + sdtw(y, y)) / 2`` (Blondel, Mensch & Vert 2021,
  "Differentiable Divergences Between Time Series", arXiv:2010.08354). Soft-DTW itself can be negative, and is not
  smallest at ``y = x``; the divergence is 0 at ``x == y`` and non-negative where ``exp(-cost / gamma)`` gives a
  positive definite alignment kernel (the paper's condition; we check it on random sequences, not in general).
* ``dtw(cost)`` and ``dtw_path(cost)``: hard DTW (``min`` in place of the softmin), its cost and its optimal path
  as a boolean alignment matrix. ``dtw`` is the path's summed cost, so its gradient is the path (a subgradient).

Conventions:

* Batches are padded: ``cost`` is (B, N, M) and pair b uses its first ``x_lengths[b]`` rows and ``y_lengths[b]``
  columns (None: all). Cells past a pair's lengths never enter its value, may hold anything (even nan or inf), and
  get a gradient of exactly 0. (Through ``pairwise_cost`` keep padded features finite: a matrix product mixes them
  into the other side's gradient as ``0 * nan``.)
* ``band`` (an int >= 0, Sakoe-Chiba) allows, with 0-indexed cells and the pair's own lengths n and m, the cells
  with ``|i * (m - 1) / (n - 1) - j| <= band`` (``|j| <= band`` when n = 1): a band of half-width ``band`` columns
  around the straight line from the first cell to the last, so it scales to unequal lengths and holds both ends
  (for n = 1 the last only when ``band >= m - 1``). A band narrower than the line's slope can leave no monotone path
  between them: that is a ValueError; ``band >= ceil(max(n, m) / min(n, m))`` always has one. ``band=None`` allows
  every cell.
* Ties in ``dtw_path`` go to the diagonal step, then to the step from the row above.
* dtype: the recursion runs in the cost's dtype when it is float32 or float64 and in float32 for float16 and
  bfloat16 (whose 8 to 11 bits of mantissa cannot hold a sum over N + M cells); the values come back in that dtype.
  We keep float32 as float32 rather than compute in float64 because float64 is 2x slower on CPUs and far slower on
  most GPUs, and the recursion is memory-bound. Its limit: R holds sums of costs with float32's relative error
  (1e-7), and the gradient is a softmax of differences between neighbouring R values divided by gamma, so its
  error grows like ``|R| * 1e-7 / gamma``; where gamma is small next to the summed cost, pass float64 costs.
* Double backward is not supported (it raises).

How it runs: one step per anti-diagonal ``k = i + j`` (N + M - 1 steps), each computing that diagonal's cells for the
whole batch at once with a few tensor ops, so it runs wherever torch does. Work is O(B * N * M) without a band and
O(B * (N + M) * w) with one, w being the rows of a diagonal that some pair's band covers (about ``2 * band + 1``
when the pairs' lengths agree). Memory: the forward keeps R for the backward on the allowed cells only, row by row,
(B, N, W) with W the most allowed cells in one row (W <= max m_b without a band, <= ``2 * band + 1`` with one),
plus three diagonals of (B, N + 1); the backward adds the gradient (B, N, M) and six diagonals. With a band the
memory beyond the caller's cost matrix and its gradient is linear in the length. The per-step tensor ops make short
sequences launch-bound on a GPU (hundreds of small kernels per sequence).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["dtw", "dtw_path", "pairwise_cost", "soft_dtw", "soft_dtw_divergence"]

_INF = float("inf")


def pairwise_cost(x: Tensor, y: Tensor, metric: Literal["sqeuclidean", "cosine"] = "sqeuclidean") -> Tensor:
    """The cost of matching each element of ``x`` (B, N, D) with each of ``y`` (B, M, D): (B, N, M).

    ``sqeuclidean``: ``|x_i - y_j|^2`` (from ``|x|^2 + |y|^2 - 2 x.y``, clamped at 0, so no (B, N, M, D) tensor is
    made); ``cosine``: ``1 - cos(x_i, y_j)``.
    """
    if x.dim() != 3 or y.dim() != 3 or x.shape[0] != y.shape[0] or x.shape[2] != y.shape[2]:
        raise ValueError(f"pairwise_cost: x and y must be (B, N, D) and (B, M, D), got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    if metric == "sqeuclidean":
        squares = x.square().sum(-1)[:, :, None] + y.square().sum(-1)[:, None, :]  # (B, N, M)
        return (squares - 2 * x @ y.transpose(1, 2)).clamp_min(0)
    if metric == "cosine":
        return 1 - F.normalize(x, dim=-1) @ F.normalize(y, dim=-1).transpose(1, 2)
    raise ValueError(f"pairwise_cost: metric must be 'sqeuclidean' or 'cosine', got {metric!r}")


def soft_dtw(cost: Tensor, x_lengths: Tensor | None = None, y_lengths: Tensor | None = None, gamma: float = 1.0,
             band: int | None = None) -> Tensor:
    """Soft-DTW of each pair: ``R[n_b, m_b]`` of the cost matrix (B, N, M) cut to the pair's lengths; (B,)."""
    if not (isinstance(gamma, (int, float)) and math.isfinite(gamma) and gamma > 0):
        raise ValueError(f"soft_dtw: gamma must be a finite number > 0, got {gamma!r}")
    cost = _compute_dtype(cost, "soft_dtw")
    plan = _plan(cost, x_lengths, y_lengths, band, "soft_dtw")
    if torch.is_grad_enabled() and cost.requires_grad:
        return _SoftDTW.apply(cost, plan, float(gamma))
    return _sweep(cost.contiguous(), plan, float(gamma), keep=False)[0]


def soft_dtw_divergence(x: Tensor, y: Tensor, x_lengths: Tensor | None = None, y_lengths: Tensor | None = None,
                        gamma: float = 1.0, band: int | None = None,
                        metric: Literal["sqeuclidean", "cosine"] = "sqeuclidean") -> Tensor:
    """Soft-DTW divergence of sequences ``x`` (B, N, D) and ``y`` (B, M, D): ``sdtw(x, y) - (sdtw(x, x) +
    sdtw(y, y)) / 2``, (B,)."""
    xy = soft_dtw(pairwise_cost(x, y, metric), x_lengths, y_lengths, gamma, band)
    xx = soft_dtw(pairwise_cost(x, x, metric), x_lengths, x_lengths, gamma, band)
    yy = soft_dtw(pairwise_cost(y, y, metric), y_lengths, y_lengths, gamma, band)
    return xy - (xx + yy) / 2


def dtw_path(cost: Tensor, x_lengths: Tensor | None = None, y_lengths: Tensor | None = None,
             band: int | None = None) -> Tensor:
    """The optimal hard-DTW alignment of each pair: (B, N, M) bool, True on the cells of a monotone path from
    ``(0, 0)`` to ``(n_b - 1, m_b - 1)`` of least summed cost, False elsewhere (padding included). Its cost is
    ``torch.where(path, cost, 0).sum((1, 2))``, which is what ``dtw`` returns."""
    with torch.no_grad():
        cost = _compute_dtype(cost, "dtw_path").contiguous()
        plan = _plan(cost, x_lengths, y_lengths, band, "dtw_path")
        steps = _sweep(cost, plan, None, keep=True)[1]  # (B, N * W + 1): 0 diagonal, 1 from above, 2 from the left
        return _backtrack(steps, plan, cost.shape)


def dtw(cost: Tensor, x_lengths: Tensor | None = None, y_lengths: Tensor | None = None,
        band: int | None = None) -> Tensor:
    """Hard-DTW cost of each pair, (B,): the summed cost along ``dtw_path``; its gradient is that path."""
    path = dtw_path(cost, x_lengths, y_lengths, band)
    return torch.where(path, _compute_dtype(cost, "dtw"), 0).sum((1, 2))


@dataclass
class _Plan:
    """Where each pair's allowed cells lie. Rows and columns are 1-indexed as in the recursion; row 0 is unused."""

    lo: Tensor  # (B, N + 1) long, on the cost's device: first allowed column of each row
    hi: Tensor  # (B, N + 1) long: last allowed column; hi < lo on rows past the pair's length
    width: int  # W: the most allowed cells in one row, the columns stored per row
    ranges: list[tuple[int, int]]  # per diagonal k: first and last row with an allowed cell in some pair (empty: >)
    ends: dict[int, tuple[Tensor, Tensor]]  # diagonal n_b + m_b -> (the pairs b that end on it, their n_b)


def _compute_dtype(cost: Tensor, fn: str) -> Tensor:
    """``cost`` in the dtype the recursion runs in: float32 and float64 as they are, half precision as float32."""
    if cost.dim() != 3 or 0 in cost.shape:
        raise ValueError(f"{fn}: cost must be (B, N, M) with B, N, M >= 1, got {tuple(cost.shape)}")
    if not cost.is_floating_point():
        raise ValueError(f"{fn}: cost must be a floating-point tensor, got {cost.dtype}")
    return cost.float() if cost.dtype in (torch.float16, torch.bfloat16) else cost


def _lengths(lengths: Tensor | None, batch: int, size: int, name: str, fn: str) -> Tensor:
    """Per-pair lengths as a CPU long tensor (B,), each in [1, size]."""
    if lengths is None:
        return torch.full((batch,), size, dtype=torch.long)
    lengths = torch.as_tensor(lengths).cpu()
    if lengths.shape != (batch,) or lengths.is_floating_point() or lengths.dtype == torch.bool:
        raise ValueError(f"{fn}: {name} must be an integer tensor of shape ({batch},), got {lengths.dtype} "
                         f"{tuple(lengths.shape)}")
    bad = ((lengths < 1) | (lengths > size)).nonzero()
    if len(bad):
        b = int(bad[0])
        raise ValueError(f"{fn}: {name}[{b}] = {int(lengths[b])} is outside [1, {size}]")
    return lengths.long()


def _plan(cost: Tensor, x_lengths: Tensor | None, y_lengths: Tensor | None, band: int | None, fn: str) -> _Plan:
    """Check the lengths and the band, and lay out each pair's allowed cells (computed on the CPU, one sync)."""
    batch, n_rows, n_cols = cost.shape
    n = _lengths(x_lengths, batch, n_rows, "x_lengths", fn)
    m = _lengths(y_lengths, batch, n_cols, "y_lengths", fn)
    row = torch.arange(n_rows)  # 0-indexed
    if band is None:
        first, last = torch.zeros(batch, n_rows, dtype=torch.long), (m - 1)[:, None].expand(batch, n_rows)
    else:
        if isinstance(band, bool) or not isinstance(band, int) or band < 0:
            raise ValueError(f"{fn}: band must be an int >= 0 or None, got {band!r}")
        # |i (m - 1) / d - j| <= band with d = max(n - 1, 1), in integers: ceil(i (m-1) / d) - band <= j <= ...
        d, centre = (n - 1).clamp_min(1)[:, None], row * (m - 1)[:, None]  # (B, 1), (B, N)
        first = (-(-centre // d) - band).clamp_min(0)
        last = torch.minimum(centre // d + band, (m - 1)[:, None])
    inside = row < n[:, None]  # (B, N): rows within the pair's length
    # A monotone path from the first cell to the last exists iff the last row reaches the last column (only n = 1
    # can miss it), no row is empty and each row starts at most one column past the end of the row above (``first``
    # and ``last`` never decrease, and the first row starts at column 0).
    blocked = ((first > last) & inside).any(1) | ((first[:, 1:] > last[:, :-1] + 1) & inside[:, 1:]).any(1)
    blocked |= last.gather(1, (n - 1)[:, None])[:, 0] < m - 1
    if blocked.any():
        b = int(blocked.nonzero()[0])
        nb, mb = int(n[b]), int(m[b])
        need = math.ceil(max(nb, mb) / min(nb, mb))
        raise ValueError(f"{fn}: band={band} leaves pair {b} (lengths {nb} and {mb}) no monotone path from its first "
                         f"cell to its last; band >= {need} always has one")
    first, last = torch.where(inside, first, 0), torch.where(inside, last, -1)  # empty rows past the length
    width = max(int((last - first + 1).max()), 1)
    # Diagonal k = i + j holds row i's allowed cells for k in [i + lo_i, i + hi_i]; both bounds grow with i, so the
    # rows with a cell on k form one run per pair: from the first row whose last diagonal reaches k to the last row
    # whose first diagonal does.
    big = 2 * (n_rows + n_cols) + 4
    row1 = row + 1
    first_diag = torch.where(inside, row1 + first + 1, big)  # (B, N), non-decreasing
    last_diag = torch.where(inside, row1 + last + 1, big)
    k = torch.arange(n_rows + n_cols + 1).expand(batch, -1).contiguous()
    top = torch.searchsorted(last_diag, k)  # 0-indexed row
    bottom = torch.searchsorted(first_diag, k, right=True) - 1
    some = top <= bottom
    i0 = (torch.where(some, top, big).amin(0) + 1).tolist()
    i1 = (torch.where(some, bottom, -2).amax(0) + 1).tolist()
    zero_col = torch.zeros(batch, 1, dtype=torch.long)
    device = cost.device
    ends = {}
    for k_end in (n + m).unique().tolist():
        pairs = (n + m == k_end).nonzero()[:, 0]
        ends[k_end] = (pairs.to(device), n[pairs].to(device))
    return _Plan(lo=torch.cat([zero_col + 1, first + 1], 1).to(device),
                 hi=torch.cat([zero_col, last + 1], 1).to(device), width=width, ranges=list(zip(i0, i1)), ends=ends)


def _cost_diagonal(flat: Tensor, n_cols: int, k: int, i0: int, i1: int) -> Tensor:
    """Cells ``(i, k - i)`` for rows ``i0..i1`` (1-indexed) of the cost flattened to (B, N * M): a strided view."""
    step = max(n_cols - 1, 1)  # n_cols == 1: one cell per diagonal, the step does not matter
    start = (i0 - 1) * (n_cols - 1) + k - 2
    return flat[:, start:start + (i1 - i0) * step + 1:step]


def _slots(plan: _Plan, k: int, i0: int, i1: int, rows: Tensor) -> tuple[Tensor, Tensor]:
    """For cells ``(i, k - i)``, rows ``i0..i1``: whether each pair allows them (B, C), and their slot in the
    (B, N * W + 1) row-wise storage; cells outside a pair's stored columns go to its last slot."""
    i = rows[i0:i1 + 1]
    j = k - i  # (C,)
    lo, hi = plan.lo[:, i0:i1 + 1], plan.hi[:, i0:i1 + 1]  # (B, C)
    allowed = (j >= lo) & (j <= hi)
    column = j - lo
    stored = (column >= 0) & (column < plan.width)
    return allowed, torch.where(stored, (i - 1) * plan.width + column, (rows.shape[0] - 1) * plan.width)


def _sweep(cost: Tensor, plan: _Plan, gamma: float | None, keep: bool) -> tuple[Tensor, Tensor | None]:
    """Run the recursion along anti-diagonals: softmin with ``gamma``, min with None. Returns ``R[n_b, m_b]`` (B,)
    and, with ``keep``, the allowed cells row by row (B, N * W + 1; the last slot takes writes of cells not
    stored): R for soft-DTW (inf where not allowed), the argmin of each cell's three steps for hard DTW."""
    batch, n_rows, n_cols = cost.shape
    flat = cost.view(batch, n_rows * n_cols)
    rows = torch.arange(n_rows + 1, device=cost.device)
    diag = [cost.new_full((batch, n_rows + 1), _INF) for _ in range(3)]  # R on diagonals k - 2, k - 1, k (mod 3)
    diag[0][:, 0] = 0  # R[0, 0]; diagonal 1 holds only the inf border
    value = cost.new_full((batch,), _INF)
    stored = None
    if keep:
        size = (batch, n_rows * plan.width + 1)
        stored = cost.new_full(size, _INF) if gamma is not None else cost.new_zeros(size, dtype=torch.uint8)
    for k in range(2, n_rows + n_cols + 1):
        now, up, upper = diag[k % 3], diag[(k - 1) % 3], diag[(k - 2) % 3]
        now.fill_(_INF)
        i0, i1 = plan.ranges[k]
        if i0 > i1:
            continue
        steps = torch.stack([upper[:, i0 - 1:i1], up[:, i0 - 1:i1], up[:, i0:i1 + 1]])  # (3, B, C): diag, up, left
        if gamma is None:
            best, step = steps.min(0)
        else:
            best = -gamma * torch.logsumexp(steps / -gamma, 0)
        allowed, slot = _slots(plan, k, i0, i1, rows)
        now[:, i0:i1 + 1] = torch.where(allowed, _cost_diagonal(flat, n_cols, k, i0, i1) + best, _INF)
        if keep:
            slot = torch.where(allowed, slot, n_rows * plan.width)
            stored.scatter_(1, slot, now[:, i0:i1 + 1] if gamma is not None else step.to(torch.uint8))
        if k in plan.ends:
            pairs, n = plan.ends[k]
            value[pairs] = now[pairs, n]
    return value, stored


class _SoftDTW(torch.autograd.Function):
    """Soft-DTW with the paper's backward: E[i, j] = dR[n, m] / dR[i, j], run from the last cell back; each cell
    hands E times its softmin weights (the softmax of its three predecessors' -R / gamma) to those predecessors.
    This is Algorithm 2's recursion with its weights ``exp((R[s] - cost[s] - R[i, j]) / gamma)`` taken from the
    predecessors directly instead of from ``R[s] - cost[s]``, which needs neither the cost nor that subtraction."""

    @staticmethod
    def forward(ctx, cost: Tensor, plan: _Plan, gamma: float) -> Tensor:
        cost = cost.contiguous()
        value, stored = _sweep(cost, plan, gamma, keep=True)
        ctx.save_for_backward(stored)
        ctx.plan, ctx.gamma, ctx.shape = plan, gamma, cost.shape
        return value

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_value: Tensor) -> tuple[Tensor, None, None]:
        (stored,) = ctx.saved_tensors
        plan, gamma = ctx.plan, ctx.gamma
        batch, n_rows, n_cols = ctx.shape
        rows = torch.arange(n_rows + 1, device=stored.device)
        grad = stored.new_zeros(batch, n_rows * n_cols)
        r = [stored.new_full((batch, n_rows + 1), _INF) for _ in range(3)]  # R on diagonals k, k - 1, k - 2 (mod 3)
        e = [stored.new_zeros(batch, n_rows + 1) for _ in range(3)]  # E on the same diagonals
        last = n_rows + n_cols
        _load(stored, plan, last, rows, r[last % 3])
        _load(stored, plan, last - 1, rows, r[(last - 1) % 3])
        for k in range(last, 1, -1):
            _load(stored, plan, k - 2, rows, r[(k - 2) % 3])
            e[(k - 2) % 3].zero_()
            if k in plan.ends:
                pairs, n = plan.ends[k]
                e[k % 3][pairs, n] = grad_value[pairs].to(grad.dtype)
            i0, i1 = plan.ranges[k]
            if i0 > i1:
                continue
            up, upper = r[(k - 1) % 3], r[(k - 2) % 3]
            steps = torch.stack([upper[:, i0 - 1:i1], up[:, i0 - 1:i1], up[:, i0:i1 + 1]])  # (3, B, C)
            here = e[k % 3][:, i0:i1 + 1]  # (B, C)
            reached = r[k % 3][:, i0:i1 + 1] < _INF  # unreachable cells have all-inf steps: their softmax is nan
            handed = torch.where(reached, torch.softmax(steps / -gamma, 0) * here, 0)
            e[(k - 2) % 3][:, i0 - 1:i1] += handed[0]
            e[(k - 1) % 3][:, i0 - 1:i1] += handed[1]
            e[(k - 1) % 3][:, i0:i1 + 1] += handed[2]
            _cost_diagonal(grad, n_cols, k, i0, i1).copy_(here)
        return grad.view(batch, n_rows, n_cols), None, None


def _load(stored: Tensor, plan: _Plan, k: int, rows: Tensor, out: Tensor) -> None:
    """Write R on diagonal ``k`` into ``out`` (B, N + 1), indexed by row; inf off the allowed cells."""
    out.fill_(_INF)
    if k == 0:
        out[:, 0] = 0
        return
    i0, i1 = plan.ranges[k]
    if i0 <= i1:
        out[:, i0:i1 + 1] = stored.gather(1, _slots(plan, k, i0, i1, rows)[1])


def _backtrack(steps: Tensor, plan: _Plan, shape: torch.Size) -> Tensor:
    """Follow the stored argmin steps back from each pair's last cell: the path as (B, N, M) bool."""
    batch, n_rows, n_cols = shape
    device = steps.device
    i = plan.hi.new_zeros(batch)
    j = plan.hi.new_zeros(batch)
    for k, (pairs, n) in plan.ends.items():
        i[pairs], j[pairs] = n, k - n
    path = torch.zeros(batch, n_rows * n_cols + 1, dtype=torch.bool, device=device)  # last slot: finished pairs
    for _ in range(int((i + j).max()) - 1):
        on = (i >= 1) & (j >= 1)
        path.scatter_(1, torch.where(on, (i - 1) * n_cols + j - 1, n_rows * n_cols)[:, None], True)
        column = j - plan.lo.gather(1, i[:, None])[:, 0]
        step = steps.gather(1, torch.where(on, (i - 1) * plan.width + column, n_rows * plan.width)[:, None])[:, 0]
        i = i - (on & (step != 2)).long()
        j = j - (on & (step != 1)).long()
    return path[:, :-1].reshape(batch, n_rows, n_cols)
