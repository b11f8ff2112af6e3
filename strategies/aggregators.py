"""Aggregation rules: functions ``(U, weights) -> vector`` on an (n, d) matrix of node messages.

Every rule here is pure: it never writes to ``U`` or ``weights`` and keeps no hidden state. The
one stateful rule, centered clipping, takes its centre as explicit state through
``aggregate(U, weights, state) -> (vector, state)``; every rule has that method (stateless rules
return the state unchanged), so strategies call all of them the same way.

Robust rules take ``f``, the number of Byzantine rows the defence *assumes*
(``byzantine.declared``), which may differ from the number actually present. Unless a docstring
says otherwise they ignore ``weights`` (robust rules are unweighted, as in ByzFL). Semantics and
defaults follow ByzFL (LPD-EPFL/byzfl, aggregators.py), summarised in
docs/methods/robust_aggregation.md; deviations are stated per rule.

Non-finite rows (an Inf or NaN attack) are handled explicitly: distance-based rules treat them as
infinitely far from everything, sort-based rules sort them to the ends (NaN counts as largest),
and the geometric median drops them. Within the declared f every rule below returns a finite
vector; the conformance suite in tests/strategies/test_aggregators.py checks it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from fedsim.errors import ConfigError


def _check_matrix(U: torch.Tensor) -> None:
    if U.ndim != 2:
        raise ValueError(f"aggregators take an (n, d) matrix, got shape {tuple(U.shape)}")
    if U.shape[0] == 0:
        raise ValueError("aggregators need at least one row")


def finite_rows(U: torch.Tensor) -> torch.Tensor:
    """(n,) bool: rows without NaN/Inf, read off the row sums (one pass over U instead of an (n, d)
    boolean temporary; docs/benchmarks.md). A row whose finite values are so large that their sum
    overflows float32 (|values| ~ 1e38 / d) also counts as non-finite: as far away as an Inf row."""
    return torch.isfinite(U.sum(dim=1))


def pairwise_sq_distances(U: torch.Tensor) -> torch.Tensor:
    """(n, n) float64 squared Euclidean distances via the Gram matrix: one (n, d) x (d, n)
    product, O(n^2 d) flops but matrix-multiply fast, instead of n^2 vector subtractions.

    Rows are centred on the mean of the finite rows first (distances are translation invariant),
    which keeps the cancellation error of the Gram trick relative to the spread of the rows, not
    to their norms; the product runs in the input dtype (float32: ~1e-6 relative error of the
    spread; faster than float64, docs/benchmarks.md) and the result is combined in float64,
    clamped at 0, with an exactly zero diagonal. A row with any NaN/Inf is at
    distance +inf from every other row (the MoNNA code's convention for non-finite distances).
    """
    _check_matrix(U)
    n = U.shape[0]
    finite = finite_rows(U)
    D = torch.full((n, n), float("inf"), dtype=torch.float64, device=U.device)
    all_finite = bool(finite.all())
    idx = finite.nonzero().flatten()
    if idx.numel() > 0:
        X = U if all_finite else U.index_select(0, idx)
        X = X - X.mean(dim=0, keepdim=True)
        G = (X @ X.T).to(torch.float64)
        sq = G.diagonal()
        Dsub = (sq[:, None] + sq[None, :] - 2.0 * G).clamp_(min=0.0)
        if all_finite:
            D = Dsub
        else:
            D[idx[:, None], idx[None, :]] = Dsub
    D.fill_diagonal_(0.0)
    return D


class Rule:
    """Base of the rules: the contract's ``aggregate`` form (``fedsim.contract.Aggregator``) with
    explicit state, an initial state and a size check, around a plain ``__call__(U, weights)``."""

    f: int = 0

    def init(self) -> dict[str, Any]:
        """Initial state (empty for stateless rules)."""
        return {}

    def aggregate(
        self, U: torch.Tensor, weights: torch.Tensor, state: dict[str, Any]
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        return self(U, weights), state

    def check(self, n: int) -> None:
        """Raise ConfigError if the rule cannot run on n rows with its declared f."""

    def __call__(self, U: torch.Tensor, weights: torch.Tensor, /) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


def _need_f(name: str, f: int) -> int:
    if isinstance(f, bool) or not isinstance(f, int) or f < 0:
        raise ConfigError(f"{name}: f={f!r} must be an integer >= 0 (set byzantine.declared)")
    return f


def _need_majority(name: str, n: int, f: int, *, factor: int = 2, extra: int = 0) -> None:
    if not factor * f + extra < n:
        raise ConfigError(
            f"{name} needs {factor}f{' + ' + str(extra) if extra else ''} < n, but f={f} and n={n}; "
            f"lower byzantine.declared or raise nodes_per_round"
        )


class Mean(Rule):
    """Weighted mean (``mean``).

    Rule: the weighted average of the rows; with w_i = the examples of node i it is FedAvg's
    sample-weighted mean.

    Formula: Mean(x_1, ..., x_n) = sum_i w_i x_i / sum_i w_i. Rows with zero weight do not count;
    if every weight is zero the result is the zero vector (no data, no update).

    Tolerates: f = 0 (one arbitrary row moves the output arbitrarily far).

    Reference: H. B. McMahan, E. Moore, D. Ramage, S. Hampson, B. Agüera y Arcas.
    Communication-Efficient Learning of Deep Networks from Decentralized Data. AISTATS 2017."""

    def __call__(self, U: torch.Tensor, weights: torch.Tensor, /) -> torch.Tensor:
        if U.ndim != 2:
            raise ValueError(f"aggregators take an (n, d) matrix, got shape {tuple(U.shape)}")
        w = weights.to(device=U.device, dtype=torch.float64)
        total = w.sum()
        if U.shape[0] == 0 or total <= 0:
            return U.new_zeros(U.shape[1])
        return ((w / total).to(U.dtype) @ U).contiguous()


def _nan_last_sort(U: torch.Tensor) -> torch.Tensor:
    """Sort each column ascending, NaN after +inf (so NaN rows count as largest). On the CPU this
    uses numpy's vectorised sort, faster than torch.sort along dim 0 (docs/benchmarks.md); both
    order NaN last."""
    if U.device.type == "cpu":
        return torch.from_numpy(np.sort(U.detach().numpy(), axis=0))
    return torch.sort(U, dim=0).values


class Median(Rule):
    """Coordinate-wise median (``median``; ByzFL ``Median``).

    Rule: each coordinate of the output is the median of that coordinate over the n rows.

    Formula: [CWMed(x_1, ..., x_n)]_k = median(x_1k, ..., x_nk). For even n it is the **average of
    the two middle values** (numpy's convention, and the interpolating ``quantile(0.5)`` of the
    MoNNA code), not torch.median's lower middle value. NaN sorts as the largest value.

    Tolerates: f < n/2 (checked: 2f < n); ``f`` is only checked, the rule does not use it.

    Reference: D. Yin, Y. Chen, K. Ramchandran, P. Bartlett. Byzantine-Robust Distributed
    Learning: Towards Optimal Statistical Rates. ICML 2018."""

    def __init__(self, *, f: int = 0) -> None:
        self.f = _need_f("median", f)

    def check(self, n: int) -> None:
        _need_majority("median", n, self.f)

    def __call__(self, U: torch.Tensor, weights: torch.Tensor, /) -> torch.Tensor:
        _check_matrix(U)
        n = U.shape[0]
        S = _nan_last_sort(U)
        if n % 2 == 1:
            return S[n // 2].clone()
        return (S[n // 2 - 1] + S[n // 2]) / 2


class TrimmedMean(Rule):
    """Coordinate-wise trimmed mean (``trimmed_mean``; ByzFL ``TrMean``).

    Rule: per coordinate, sort the n values, drop the f smallest and the f largest, and average
    the n - 2f left.

    Formula: [TM_f(x_1, ..., x_n)]_k = 1/(n - 2f) sum_{j=f+1}^{n-f} x_(j)k, where
    x_(1)k <= ... <= x_(n)k are the sorted values of coordinate k (NaN sorts as the largest).
    With f = 0 it is the (unweighted) mean.

    Tolerates: f < n/2 (checked: 2f < n).

    Reference: D. Yin, Y. Chen, K. Ramchandran, P. Bartlett. Byzantine-Robust Distributed
    Learning: Towards Optimal Statistical Rates. ICML 2018."""

    def __init__(self, *, f: int = 0) -> None:
        self.f = _need_f("trimmed_mean", f)

    def check(self, n: int) -> None:
        _need_majority("trimmed_mean", n, self.f)

    def __call__(self, U: torch.Tensor, weights: torch.Tensor, /) -> torch.Tensor:
        _check_matrix(U)
        n = U.shape[0]
        self.check(n)
        if self.f == 0:
            return U.mean(dim=0)
        return _nan_last_sort(U)[self.f : n - self.f].mean(dim=0)


def _krum_scores(U: torch.Tensor, f: int) -> torch.Tensor:
    """s_i = mean of the n - f - 1 smallest squared distances from x_i to the other rows."""
    n = U.shape[0]
    D = pairwise_sq_distances(U)
    m = n - f - 1
    if m <= 0:
        return torch.zeros(n, dtype=torch.float64, device=U.device)
    D = D + torch.diag(torch.full((n,), float("inf"), dtype=torch.float64, device=D.device))  # exclude j = i
    return torch.topk(D, m, dim=1, largest=False).values.mean(dim=1)


class Krum(Rule):
    """Krum (``krum``; ByzFL ``Krum``).

    Rule: score each row by its squared distances to its n - f - 1 nearest other rows and return
    the row with the lowest score (ties: the lowest index).

    Formula: s_i = 1/(n - f - 1) sum_{j in N_i} ||x_i - x_j||^2, N_i the n - f - 1 rows nearest to
    x_i (j != i); Krum(x_1, ..., x_n) = x_{i*}, i* = argmin_i s_i. Mean or sum of the squared
    distances gives the same argmin (ByzFL's mean is used); squared distances as in the paper
    (the MoNNA repository's Krum uses plain distances). Non-finite rows are infinitely far.

    Tolerates: f with 2f + 2 < n (checked).

    Reference: P. Blanchard, E. M. El Mhamdi, R. Guerraoui, J. Stainer. Machine Learning with
    Adversaries: Byzantine Tolerant Gradient Descent. NeurIPS 2017."""

    def __init__(self, *, f: int = 0) -> None:
        self.f = _need_f("krum", f)

    def check(self, n: int) -> None:
        _need_majority("krum", n, self.f, extra=2)

    def __call__(self, U: torch.Tensor, weights: torch.Tensor, /) -> torch.Tensor:
        _check_matrix(U)
        if U.shape[0] == 1:
            return U[0].clone()
        scores = _krum_scores(U, self.f)
        return U[int(torch.argmin(scores))].clone()


class MultiKrum(Rule):
    """Multi-Krum (``multi_krum``; ByzFL ``MultiKrum``).

    Rule: Krum's scores, then the mean of the m rows with the lowest scores.

    Formula: MultiKrum_m(x_1, ..., x_n) = 1/m sum_{i in S_m} x_i, S_m the m rows of lowest Krum
    score s_i (see `Krum`; ties: the lower index). ``m=None`` means m = n - f (ByzFL's default).

    Tolerates: f with 2f + 2 < n (checked).

    Reference: P. Blanchard, E. M. El Mhamdi, R. Guerraoui, J. Stainer. Machine Learning with
    Adversaries: Byzantine Tolerant Gradient Descent. NeurIPS 2017."""

    def __init__(self, *, f: int = 0, m: int | None = None) -> None:
        self.f = _need_f("multi_krum", f)
        if m is not None and (isinstance(m, bool) or not isinstance(m, int) or m < 1):
            raise ConfigError(f"multi_krum: m={m!r} must be an integer >= 1 or null (n - f)")
        self.m = m

    def check(self, n: int) -> None:
        _need_majority("multi_krum", n, self.f, extra=2)

    def __call__(self, U: torch.Tensor, weights: torch.Tensor, /) -> torch.Tensor:
        _check_matrix(U)
        n = U.shape[0]
        m = min(n - self.f if self.m is None else self.m, n)
        scores = _krum_scores(U, self.f)
        order = torch.argsort(scores, stable=True)[: max(m, 1)]
        return U.index_select(0, order).mean(dim=0)


class GeometricMedian(Rule):
    """Geometric median by the smoothed Weiszfeld algorithm (``geometric_median``; ByzFL
    ``GeometricMedian``; RFA).

    Rule: approximately the point that minimises the sum of Euclidean distances to the rows,
    argmin_z sum_i ||z - x_i||, by T smoothed Weiszfeld iterations.

    Formula: from z_0, T times: beta_i = (1/n) / max(nu, ||z - x_i||),
    z <- sum_i beta_i x_i / sum_i beta_i. Defaults nu = 0.1, T = 3, z_0 = 0 (ByzFL and the MoNNA
    code); ``start`` picks z_0 (``zero``, ``mean`` or ``median``: the coordinate-wise median, with
    which a few more iterations, T ~ 8-10, converge far better in practice). Rows with NaN/Inf are
    dropped first (ByzFL). Ignores weights.

    Tolerates: f < n/2 (checked: 2f < n; the breakdown point of the exact geometric median).

    Reference: K. Pillutla, S. M. Kakade, Z. Harchaoui. Robust Aggregation for Federated
    Learning. IEEE Transactions on Signal Processing 70, 2022."""

    def __init__(self, *, f: int = 0, nu: float = 0.1, iters: int = 3, start: str = "zero") -> None:
        self.f = _need_f("geometric_median", f)
        if nu <= 0:
            raise ConfigError(f"geometric_median: nu={nu} must be > 0")
        if iters < 1:
            raise ConfigError(f"geometric_median: iters={iters} must be >= 1")
        if start not in ("zero", "mean", "median"):
            raise ConfigError(f"geometric_median: start={start!r} must be one of zero, mean, median")
        self.nu = float(nu)
        self.iters = int(iters)
        self.start = start

    def check(self, n: int) -> None:
        _need_majority("geometric_median", n, self.f)

    def __call__(self, U: torch.Tensor, weights: torch.Tensor, /) -> torch.Tensor:
        _check_matrix(U)
        X = U[finite_rows(U)]
        if X.shape[0] == 0:
            raise ValueError("geometric_median: every row is NaN or Inf")
        if self.start == "zero":
            z = U.new_zeros(U.shape[1])
        elif self.start == "mean":
            z = X.mean(dim=0)
        else:
            z = Median()(X, weights)
        n = X.shape[0]
        for _ in range(self.iters):
            dist = torch.linalg.vector_norm(X - z, dim=1).to(torch.float64)
            beta = (1.0 / n) / dist.clamp(min=self.nu)
            z = ((beta / beta.sum()).to(U.dtype) @ X).contiguous()
        return z


def _clip_rows(delta: torch.Tensor, radius: float) -> torch.Tensor:
    """delta_i * min(1, radius / ||delta_i||); rows with NaN/Inf have no direction and become 0."""
    norms = torch.linalg.vector_norm(delta, dim=1)
    ok = torch.isfinite(norms)
    scale = torch.where(ok, (radius / norms.clamp(min=1e-30)).clamp(max=1.0), torch.zeros_like(norms))
    return torch.where(ok[:, None], delta, torch.zeros_like(delta)) * scale[:, None]


def _clipped_mean(U: torch.Tensor, v: torch.Tensor, radius: float) -> torch.Tensor:
    """(1/n) sum_i (x_i - v) min(1, radius / ||x_i - v||) with one (n, d) temporary: the
    clipping factors as a vector, then one matrix-vector product (rows with NaN/Inf: factor 0,
    and zeroed so that they cannot poison the product)."""
    delta = U - v
    norms = torch.linalg.vector_norm(delta, dim=1)
    ok = torch.isfinite(norms)
    if not bool(ok.all()):
        delta[~ok] = 0.0
    scale = torch.where(ok, (radius / norms.clamp(min=1e-30)).clamp(max=1.0), torch.zeros_like(norms))
    return (scale / U.shape[0]).to(U.dtype) @ delta


class CenteredClipping(Rule):
    """Centered clipping, CClip(m, L, tau) (``centered_clipping``; ByzFL ``CenteredClipping``).

    Rule: starting from a centre m, move towards the mean of the rows' deviations from the
    centre, each deviation clipped to norm tau; L times.

    Formula: v_0 = m; v_{l+1} = v_l + (1/n) sum_i (x_i - v_l) min(1, tau / ||x_i - v_l||);
    the output is v_L. Defaults L = 1, tau = 100.

    **Stateful**: the centre m is the previous output, carried in the explicit state
    ``{"center": v}`` (zeros at the first call, as in ByzFL). One state per aggregation site: each
    P2P node keeps its own. A row with NaN/Inf has no direction from the centre and contributes
    nothing (deviation: in ByzFL it would make the output NaN). ``center="own"`` centres on row 0
    instead, a P2P node's own vector: the self-centred clipping ("SCC") baseline of the MoNNA code
    (L = 3, tau = 2 on MNIST, 5 on CIFAR-10); it keeps no state.

    Tolerates: a Byzantine fraction f/n below a small constant in the paper's analysis (with
    worker momentum and tau tuned to the honest spread); ``f`` is recorded, not used or checked.

    Reference: S. P. Karimireddy, L. He, M. Jaggi. Learning from History for Byzantine Robust
    Optimization. ICML 2021.
    """

    def __init__(self, *, f: int = 0, tau: float = 100.0, iters: int = 1, center: str = "previous") -> None:
        self.f = _need_f("centered_clipping", f)
        if tau <= 0:
            raise ConfigError(f"centered_clipping: tau={tau} must be > 0")
        if iters < 1:
            raise ConfigError(f"centered_clipping: iters={iters} must be >= 1")
        if center not in ("previous", "own"):
            raise ConfigError(f"centered_clipping: center={center!r} must be 'previous' or 'own'")
        self.tau = float(tau)
        self.iters = int(iters)
        self.center = center

    def aggregate(
        self, U: torch.Tensor, weights: torch.Tensor, state: dict[str, Any]
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        _check_matrix(U)
        if self.center == "own":
            v = U[0].clone()
            for _ in range(self.iters):
                v = v + _clipped_mean(U, v, self.tau)
            return v, state
        center = state.get("center")
        v = U.new_zeros(U.shape[1]) if center is None else center.to(device=U.device, dtype=U.dtype)
        for _ in range(self.iters):
            v = v + _clipped_mean(U, v, self.tau)
        return v, {"center": v.clone()}

    def __call__(self, U: torch.Tensor, weights: torch.Tensor, /) -> torch.Tensor:
        """One call from a zero centre (the first call of a run)."""
        return self.aggregate(U, weights, {})[0]


class Meamed(Rule):
    """Mean around the median (``meamed``; ByzFL ``Meamed``).

    Rule: per coordinate, the average of the n - f values closest to the coordinate-wise median
    (of two values equally far on either side, the smaller is kept).

    Formula: [Meamed_f(x_1, ..., x_n)]_k = 1/(n - f) sum_{i in K_k} x_ik, K_k the n - f indices i
    with the smallest |x_ik - med_k|, med_k the median of coordinate k (NaN and infinities are the
    farthest).

    Tolerates: f < n/2 (checked: 2f < n).

    Reference: C. Xie, O. Koyejo, I. Gupta. Generalized Byzantine-tolerant SGD.
    arXiv:1802.10116, 2018."""

    def __init__(self, *, f: int = 0) -> None:
        self.f = _need_f("meamed", f)

    def check(self, n: int) -> None:
        _need_majority("meamed", n, self.f)

    def __call__(self, U: torch.Tensor, weights: torch.Tensor, /) -> torch.Tensor:
        """The n - f values closest to the median are a window of each column's sorted values:
        from the whole column, drop f times the end farther from the median (the larger value
        on a tie; NaN and infinities are the farthest), then average the window. One sort (the
        median's) and O(f d) comparisons, instead of sorting the distances."""
        _check_matrix(U)
        n, d = U.shape
        S = _nan_last_sort(U)
        med = S[n // 2].clone() if n % 2 else (S[n // 2 - 1] + S[n // 2]) / 2
        cols = torch.arange(d, device=S.device)
        lo = torch.zeros(d, dtype=torch.int64, device=S.device)
        hi = torch.full((d,), n - 1, dtype=torch.int64, device=S.device)
        inf = float("inf")
        for _ in range(self.f):
            left = (med - S[lo, cols]).nan_to_num_(nan=inf)
            right = (S[hi, cols] - med).nan_to_num_(nan=inf)
            drop_right = right >= left
            hi -= drop_right.to(torch.int64)
            lo += (~drop_right).to(torch.int64)
        # rows f .. n-1-f are in every window; of the f rows at either end, those inside it
        total = S[self.f : n - self.f].sum(dim=0)
        zero = S.new_zeros(())
        for i in range(self.f):
            total += torch.where(lo <= i, S[i], zero)
            total += torch.where(hi >= n - 1 - i, S[n - 1 - i], zero)
        return total / (n - self.f)


class NNA(Rule):
    """Nearest-neighbour averaging around a centre row (``nna``; ByzFL ``MoNNA(f, idx)``; the
    MoNNA code's "CVA").

    Rule: the mean of the n - f rows closest to the centre row U[center] in l2, that row included
    (it is at distance 0). Ties go to the lower row index; non-finite rows are infinitely far.

    Formula: NNA_f(x_1, ..., x_n; c) = 1/(n - f) sum_{i in N_c} x_i, N_c the n - f rows nearest
    to x_c (x_c first). Unlike the other rules it is *not* permutation invariant: it is defined
    relative to the centre row (a node's own model in the peer-to-peer loop, where the node's
    vector is row 0).

    Tolerates: f < n (checked); its guarantee, from the centre's own honest model, holds for
    f < n/2 in the analysis of the paper (with a connected honest graph).

    Reference: S. Farhadkhani, R. Guerraoui, N. Gupta, L.-N. Hoang, R. Pinot, J. Stephan.
    Robust Collaborative Learning with Linear Gradient Overhead. ICML 2023."""

    def __init__(self, *, f: int = 0, center: int = 0) -> None:
        self.f = _need_f("nna", f)
        self.center = int(center)

    def check(self, n: int) -> None:
        if not self.f < n:
            raise ConfigError(f"nna needs f < n, but f={self.f} and n={n}; lower byzantine.declared")

    def around(self, U: torch.Tensor, center: int) -> torch.Tensor:
        _check_matrix(U)
        n = U.shape[0]
        k = max(n - self.f, 1)
        gap = torch.linalg.vector_norm(U - U[center], dim=1).to(torch.float64).nan_to_num(nan=float("inf"))
        gap[center] = -1.0
        keep = torch.sort(gap, stable=True).indices[:k]
        return U.index_select(0, keep).mean(dim=0)

    def __call__(self, U: torch.Tensor, weights: torch.Tensor, /) -> torch.Tensor:
        return self.around(U, self.center)


class FunctionRule(Rule):
    """A plain function ``(U, weights) -> vector`` as a stateless rule (see `as_rule`)."""

    def __init__(self, fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        self.fn = fn

    def __call__(self, U: torch.Tensor, weights: torch.Tensor, /) -> torch.Tensor:
        return self.fn(U, weights)

    def __repr__(self) -> str:
        return f"FunctionRule({getattr(self.fn, '__name__', self.fn)!r})"


def as_rule(aggregator: Any) -> Rule:
    """Any aggregator as a `Rule`: rules pass through, plain functions are wrapped."""
    if isinstance(aggregator, Rule):
        return aggregator
    if callable(aggregator):
        return FunctionRule(aggregator)
    raise ConfigError(f"aggregator {aggregator!r} is neither a rule nor a function (U, weights) -> vector")
