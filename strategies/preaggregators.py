"""Pre-aggregators: ``(U, weights, *, rng) -> (U', weights')``, chained before any aggregator.

A chain is a list, applied left to right; ``build_chain`` accepts names (``"nnm"``), dicts with a
``name`` and options (``{name: clipping, c: 5}``), Hydra ``_target_`` dicts or ready objects, so
``'strategy.preaggregators=[clipping,nnm]'`` works from the command line. Semantics follow ByzFL
(byzfl/aggregators/preaggregators.py), summarised in docs/methods/robust_aggregation.md.
Pre-aggregators never mutate their inputs; outputs carry uniform weights (robust rules are
unweighted).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch

from fedsim.errors import ConfigError
from strategies.aggregators import (
    _check_matrix,
    _clip_rows,
    _need_f,
    _need_majority,
    finite_rows,
    pairwise_sq_distances,
)


def _ones(n: int, device: torch.device) -> torch.Tensor:
    return torch.ones(n, dtype=torch.float64, device=device)


class PreRule:
    """Base of the pre-aggregators (``fedsim.contract.PreAggregator``): ``check(n)`` raises
    ConfigError when it cannot take n rows, ``out_rows(n)`` is how many rows it outputs."""

    def __call__(
        self, U: torch.Tensor, weights: torch.Tensor, *, rng: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def check(self, n: int) -> None:
        pass

    def out_rows(self, n: int) -> int:
        return n


class FunctionPreRule(PreRule):
    """A plain function ``(U, weights, *, rng) -> (U', weights')`` that keeps the row count."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn

    def __call__(
        self, U: torch.Tensor, weights: torch.Tensor, *, rng: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fn(U, weights, rng=rng)


def mix(U: torch.Tensor, M: torch.Tensor) -> torch.Tensor:
    """``M @ U`` for a row-stochastic (m, n) ``M`` that is safe with non-finite rows of U: a
    zero weight on an Inf row contributes nothing (a plain matmul would give 0 * inf = NaN)."""
    finite = finite_rows(U)
    Mf = M.to(U.dtype)
    if bool(finite.all()):
        return Mf @ U
    fi = finite.nonzero().flatten()
    out = Mf.index_select(1, fi) @ U.index_select(0, fi)
    for j in (~finite).nonzero().flatten().tolist():
        rows = (Mf[:, j] != 0).nonzero().flatten()
        if rows.numel():
            out[rows] += Mf[rows, j : j + 1] * U[j]
    return out


class NNM(PreRule):
    """Nearest Neighbour Mixing (``nnm``; ByzFL ``NNM``).

    Rule: replace each row by the mean of its n - f nearest rows in l2 (itself included, at
    distance 0; ties broken by the lower index), before a robust aggregator.

    Formula: NNM(x)_i = 1/(n - f) sum_{j in N_i} x_j, N_i the n - f rows nearest to x_i. Distances
    via the Gram matrix; the mixing is one (n, n) x (n, d) product. Outputs n rows.

    Tolerates: f < n (checked); the paper's guarantees (with a robust aggregator after it) hold
    for f < n/2.

    Reference: Y. Allouah, S. Farhadkhani, R. Guerraoui, N. Gupta, R. Pinot, J. Stephan. Fixing
    by Mixing: A Recipe for Optimal Byzantine ML under Heterogeneity. AISTATS 2023."""

    def __init__(self, *, f: int = 0) -> None:
        self.f = _need_f("nnm", f)

    def check(self, n: int) -> None:
        _need_majority("nnm", n, self.f, factor=1)

    def __call__(self, U: torch.Tensor, weights: torch.Tensor, *, rng: torch.Generator | None = None):
        _check_matrix(U)
        n = U.shape[0]
        k = n - self.f
        if k <= 0:
            raise ConfigError(f"nnm needs f < n, but f={self.f} and n={n}; lower byzantine.declared")
        D = pairwise_sq_distances(U)
        # Stable sort per row: ties go to the lower index; the row itself (distance 0) comes first.
        D.fill_diagonal_(-1.0)
        nearest = torch.sort(D, dim=1, stable=True).indices[:, :k]
        M = torch.zeros(n, n, dtype=torch.float64, device=D.device)
        M.scatter_(1, nearest, 1.0 / k)
        return mix(U, M), _ones(n, U.device)


class Bucketing(PreRule):
    """Bucketing (``bucketing``; ByzFL ``Bucketing``).

    Rule: randomly permute the rows (the generator passed in, seeded per round) and average
    consecutive groups of s; a last partial bucket is its own mean.

    Formula: with a random permutation pi, y_b = 1/|B_b| sum_{i in B_b} x_pi(i),
    B_b = {(b - 1)s + 1, ..., min(bs, n)}, b = 1, ..., ceil(n / s). Outputs ceil(n / s) rows.

    Tolerates: no f of its own; it keeps the aggregator's tolerance when s f stays below the
    aggregator's breakdown point (at most f buckets hold a faulty row), as the paper requires.

    Reference: S. P. Karimireddy, L. He, M. Jaggi. Byzantine-Robust Learning on Heterogeneous
    Datasets via Bucketing. ICLR 2022."""

    def __init__(self, *, s: int = 2) -> None:
        if isinstance(s, bool) or not isinstance(s, int) or s < 1:
            raise ConfigError(f"bucketing: s={s!r} must be an integer >= 1")
        self.s = s

    def out_rows(self, n: int) -> int:
        return -(-n // self.s)

    def __call__(self, U: torch.Tensor, weights: torch.Tensor, *, rng: torch.Generator | None = None):
        _check_matrix(U)
        n = U.shape[0]
        # the permutation comes from the CPU stream (the same draw on any device); the (b, n)
        # mixing matrix is filled there and moved once
        perm = torch.randperm(n, generator=rng, device="cpu")
        b = -(-n // self.s)
        M = torch.zeros(b, n, dtype=torch.float64, device="cpu")
        for i in range(b):
            members = perm[i * self.s : (i + 1) * self.s]
            M[i, members] = 1.0 / members.numel()
        return mix(U, M.to(U.device)), _ones(b, U.device)


class Clipping(PreRule):
    """Static clipping (``clipping``; ByzFL ``Clipping``).

    Rule: scale every row down to norm at most c.

    Formula: x_i <- x_i min(1, c / ||x_i||); ByzFL's default c = 2. A NaN/Inf row has no direction
    and becomes 0 (it can no longer poison a mean). Outputs n rows.

    Tolerates: no f of its own: it bounds what any one row contributes, and the aggregator after
    it gives the tolerance.

    Reference: ByzFL (LPD-EPFL/byzfl), ``Clipping``; norm clipping as a defence in general."""

    def __init__(self, *, c: float = 2.0) -> None:
        if c <= 0:
            raise ConfigError(f"clipping: c={c} must be > 0")
        self.c = float(c)

    def __call__(self, U: torch.Tensor, weights: torch.Tensor, *, rng: torch.Generator | None = None):
        _check_matrix(U)
        return _clip_rows(U, self.c), _ones(U.shape[0], U.device)


class ARC(PreRule):
    """Adaptive Robust Clipping (``arc``; ByzFL ``ARC``).

    Rule: clip the k rows of largest norm to the largest norm among the other rows.

    Formula: k = floor(2 (f/n) (n - f)); with the norms sorted ascending, ||x||_(1) <= ... <=
    ||x||_(n), every row of norm above ||x||_(n-k) is scaled to x_i ||x||_(n-k) / ||x_i||.
    Non-finite rows count as largest and become 0. Outputs n rows.

    Tolerates: f < n (checked); with f = 0 it changes nothing.

    Reference: Y. Allouah, R. Guerraoui, N. Gupta, A. Jellouli, G. Rizk, J. Stephan. Boosting
    Robustness by Clipping Gradients in Distributed Learning. arXiv:2405.14432, 2024."""

    def __init__(self, *, f: int = 0) -> None:
        self.f = _need_f("arc", f)

    def check(self, n: int) -> None:
        _need_majority("arc", n, self.f, factor=1)

    def __call__(self, U: torch.Tensor, weights: torch.Tensor, *, rng: torch.Generator | None = None):
        _check_matrix(U)
        n = U.shape[0]
        k = int(2 * (self.f / n) * (n - self.f))
        if k == 0:
            return U.clone(), _ones(n, U.device)
        norms = torch.linalg.vector_norm(U, dim=1).nan_to_num(nan=float("inf"))
        order = torch.sort(norms, stable=True).indices
        threshold = float(norms[order[n - k - 1]]) if n - k - 1 >= 0 else 0.0
        out = U.clone()
        big = order[n - k :]
        out[big] = _clip_rows(U.index_select(0, big), threshold)
        return out, _ones(n, U.device)


PRE_AGGREGATORS: dict[str, type] = {"nnm": NNM, "bucketing": Bucketing, "clipping": Clipping, "arc": ARC}
"""Short names accepted in ``strategy.preaggregators`` (the classes are also usable directly)."""

_TAKES_F = (NNM, ARC)


def build_chain(spec: Iterable[Any] | None, *, f: int) -> list[PreRule]:
    """Turn a YAML list (names, ``{name: ..., **options}``, ``{_target_: ...}``, objects) into
    pre-aggregator objects; NNM and ARC get the declared ``f`` unless the entry sets its own.
    One entry given alone (``preaggregators=nnm``, a dict, an object) is a chain of one: not a
    name to read letter by letter."""
    from hydra.utils import instantiate
    from omegaconf import DictConfig, OmegaConf

    if isinstance(spec, (str, Mapping, PreRule)) or callable(spec):
        spec = [spec]
    chain: list[PreRule] = []
    for item in spec or ():
        if isinstance(item, DictConfig):
            item = OmegaConf.to_container(item, resolve=True)
        if isinstance(item, str):
            item = {"name": item}
        if isinstance(item, Mapping):
            opts = dict(item)
            if "_target_" in opts:
                made = instantiate(opts)
                chain.append(made if isinstance(made, PreRule) else FunctionPreRule(made))
                continue
            name = str(opts.pop("name", "")).lower()
            if name not in PRE_AGGREGATORS:
                raise ConfigError(f"unknown pre-aggregator {name!r}; choose from {', '.join(sorted(PRE_AGGREGATORS))}")
            cls = PRE_AGGREGATORS[name]
            if cls in _TAKES_F:
                opts.setdefault("f", f)
            try:
                chain.append(cls(**opts))
            except TypeError as exc:
                raise ConfigError(f"bad options for pre-aggregator {name}: {exc}") from None
        elif isinstance(item, PreRule):
            chain.append(item)
        elif callable(item):
            chain.append(FunctionPreRule(item))
        else:
            raise ConfigError(f"pre-aggregator entry {item!r} is neither a name nor a config")
    return chain
