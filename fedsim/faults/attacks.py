"""Byzantine attacks.

An *update attack* runs at the server after the honest nodes of a round have reported: it sees
their messages (omniscient, as in every paper below) and returns the f Byzantine rows,

    attack(honest (h, d), f, *, info, rng, state, defence) -> ((f, d) rows, state)

``rng`` is the round's attack stream (seed, "attack", round); ``state`` is the attack's own
explicit state (only the mimic heuristic uses it); ``defence`` is the configured aggregation as a
function ``U -> vector`` (pre-aggregators and aggregator, for the optimal attacks that line-search
their strength against it). All f rows are identical unless a docstring says otherwise. The same
attack acts on whatever the honest rows are: momenta or pseudo-gradients at a server, parameters
in the peer-to-peer loop (docs/methods/robust_aggregation.md, "Attacks").

A *data attack* (``LabelFlip``) runs inside the Byzantine nodes instead: they train on poisoned
labels and send what honest training on those labels gives.

Formulas and defaults: ByzFL (LPD-EPFL/byzfl, attacks.py) unless stated, the MoNNA repository
(LPD-EPFL/robust-collaborative-learning) where it differs, and the original papers cited per
class.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from statistics import NormalDist
from typing import Any

import numpy as np
import torch

from fedsim.contract import DataAttack, Defence, PeerDefence, UpdateAttack
from fedsim.errors import ConfigError
from fedsim.types import RoundInfo


def honest_stats(honest: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and coordinate-wise standard deviation (ddof = 1, as ByzFL) of the honest rows; the
    standard deviation is 0 with fewer than two rows, and both are 0 with none."""
    h, d = honest.shape
    if h == 0:
        z = honest.new_zeros(d)
        return z, z.clone()
    mean = honest.mean(dim=0)
    std = honest.std(dim=0, correction=1) if h > 1 else torch.zeros_like(mean)
    return mean, std


def _rows(vector: torch.Tensor, f: int) -> torch.Tensor:
    return vector.unsqueeze(0).expand(f, -1).clone()


class Attack(UpdateAttack):
    """Base of the update attacks here: stateless, needs no defence, one identical row per
    attacker (``vector``)."""

    def vector(self, honest: torch.Tensor, f: int, rng: torch.Generator) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def __call__(
        self,
        honest: torch.Tensor,
        f: int,
        *,
        info: RoundInfo | None = None,
        rng: torch.Generator | None = None,
        state: dict[str, Any] | None = None,
        defence: Defence | None = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        state = {} if state is None else state
        if f == 0:
            return honest.new_zeros((0, honest.shape[1])), state
        return _rows(self.vector(honest, f, rng if rng is not None else torch.Generator(device="cpu")), f), state

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v}' for k, v in vars(self).items())})"


class SignFlip(Attack):
    """Sign flipping (Allen-Zhu et al. 2020; ByzFL ``SignFlipping``): b = -mean(honest)."""

    def vector(self, honest, f, rng):
        return -honest_stats(honest)[0]


class IPM(Attack):
    """Inner product manipulation, "Fall of Empires" (Xie, Koyejo & Gupta, UAI 2019):
    b = -tau mean(honest). ByzFL default tau = 2; the paper uses small tau (0.1) against
    median/Krum-type rules and large tau (100) against the others."""

    def __init__(self, *, tau: float = 2.0) -> None:
        self.tau = float(tau)

    def vector(self, honest, f, rng):
        return -self.tau * honest_stats(honest)[0]


class ALIE(Attack):
    """A Little Is Enough (Baruch, Baruch & Goldberg, NeurIPS 2019), two forms.

    - ``z=None`` (default, ByzFL's form): b = mean + tau * std, tau = 1.5.
    - ``z="max"`` (the paper's rule): b = mean - z_max * std with s = floor(n/2 + 1) - f and
      z_max = Phi^-1((n - s) / n), n = honest + Byzantine rows of the round.
    """

    def __init__(self, *, tau: float = 1.5, z: str | None = None) -> None:
        if z not in (None, "max"):
            raise ConfigError(f"alie: z={z!r} must be null (tau form) or 'max' (Baruch et al.'s z_max)")
        self.tau = float(tau)
        self.z = z

    @staticmethod
    def z_max(n: int, f: int) -> float:
        s = n // 2 + 1 - f
        p = (n - s) / n
        if not 0.0 < p < 1.0:
            return 0.0
        return NormalDist().inv_cdf(p)

    def vector(self, honest, f, rng):
        mean, std = honest_stats(honest)
        if self.z == "max":
            return mean - self.z_max(honest.shape[0] + f, f) * std
        return mean + self.tau * std


class Gaussian(Attack):
    """Random vectors b ~ N(mu, sigma^2 I), independent of the honest rows; each attacker draws
    its own row (ByzFL ``Gaussian``, defaults mu = 0, sigma = 1)."""

    def __init__(self, *, mu: float = 0.0, sigma: float = 1.0) -> None:
        if sigma < 0:
            raise ConfigError(f"gaussian: sigma={sigma} must be >= 0")
        self.mu = float(mu)
        self.sigma = float(sigma)

    def __call__(self, honest, f, *, info=None, rng=None, state=None, defence=None):
        state = {} if state is None else state
        # drawn from the CPU stream (the same rows on any device), then moved to the rows' device
        noise = torch.randn((f, honest.shape[1]), generator=rng, dtype=honest.dtype, device="cpu").to(honest.device)
        return self.mu + self.sigma * noise, state


class Infinite(Attack):
    """Every coordinate +inf (ByzFL ``Inf``): tests that defences survive non-finite input."""

    def vector(self, honest, f, rng):
        return honest.new_full((honest.shape[1],), float("inf"))


class NotANumber(Attack):
    """Every coordinate NaN."""

    def vector(self, honest, f, rng):
        return honest.new_full((honest.shape[1],), float("nan"))


class Mimic(Attack):
    """Mimic (Karimireddy, He & Jaggi, ICLR 2022): every attacker sends a copy of one honest row,
    over-representing that node's data.

    - ``heuristic=False`` (ByzFL): the honest row ``index`` (rows in node-id order).
    - ``heuristic=True`` (the paper; as in the MoNNA repository): for the first ``warmup`` rounds
      track the honest mean mu and, by power iteration, the top principal direction z of the
      honest rows; then copy the honest row maximising |<x_i - mu, z>|. mu, z and the round count
      live in the explicit state.
    """

    def __init__(self, *, index: int = 0, heuristic: bool = False, warmup: int = 100) -> None:
        if index < 0:
            raise ConfigError(f"mimic: index={index} must be >= 0")
        self.index = int(index)
        self.heuristic = bool(heuristic)
        self.warmup = int(warmup)

    def __call__(self, honest, f, *, info=None, rng=None, state=None, defence=None):
        state = {} if state is None else dict(state)
        h = honest.shape[0]
        if f == 0 or h == 0:
            return honest.new_zeros((f, honest.shape[1])), state
        if not self.heuristic:
            return _rows(honest[min(self.index, h - 1)], f), state
        t = int(state.get("t", 0))
        mu = state.get("mu")
        z = state.get("z")
        if mu is None:
            mu = honest.new_zeros(honest.shape[1])
            z = torch.randn(honest.shape[1], generator=rng, dtype=honest.dtype, device="cpu").to(honest.device)
            z = z / z.norm()
        else:  # a state restored from a checkpoint is on the CPU
            mu, z = mu.to(honest.device), z.to(honest.device)
        if t < self.warmup:
            mu = (t + 1) / (t + 2) * mu + honest.mean(dim=0) / (t + 2)
            centred = honest - mu
            proj = centred @ z
            norms = torch.linalg.vector_norm(centred, dim=1).clamp(min=1e-30)
            z = (t + 1) / (t + 2) * z + ((proj / norms)[:, None] * centred).sum(dim=0) / (t + 2)
            z = z / z.norm().clamp(min=1e-30)
            state = {"t": t + 1, "mu": mu, "z": z}
        target = int(torch.argmax(((honest - mu) @ z).abs()))
        return _rows(honest[target], f), state


SEARCHES = ("byzfl", "monna")
OBJECTIVES = ("node0", "all_honest")
BYZFL_SEARCH = {"search": "byzfl", "objective": "node0", "delta": 10.0, "budget": 20}
"""ByzFL's settings of the line-searched attacks: the defaults of every strategy that does not
declare its own (``Strategy.attack_defaults``)."""


def _expand(
    objective: Callable[[float], float], start: float, delta: float, budget: int, ratio: float
) -> tuple[float, float, int, float, float]:
    """The expansion both searches share: from ``start``, try best + delta, doubling delta while
    the objective improves; at the first failure delta *= ratio. Returns (best point, its value,
    evaluations spent, last point tried, delta)."""
    best_x, best = start, objective(start)
    evals, x = 1, start
    while evals < budget:
        x = best_x + delta
        value = objective(x)
        evals += 1
        if value > best:
            best_x, best = x, value
            delta *= 2.0
        else:
            delta *= ratio
            break
    return best_x, best, evals, x, delta


def line_maximize(
    objective: Callable[[float], float],
    *,
    start: float = 0.0,
    delta: float = 10.0,
    budget: int = 20,
    ratio: float = 0.8,
    below: bool = False,
) -> float:
    """ByzFL's search (``byzfl``). Expansion: from ``start``, try best + delta, doubling delta
    while the objective improves; at the first failure delta *= ratio. Contraction: try
    best + delta and shrink delta by ``ratio`` after each try, until ``budget`` evaluations in
    all. ``below=True`` (an extension of ours, not a published search) also tries best - delta
    in the contraction, never below 0."""
    best_x, best, evals, _, delta = _expand(objective, start, delta, budget, ratio)
    while evals < budget:
        for x in (best_x + delta, best_x - delta) if below else (best_x + delta,):
            if evals >= budget or x < 0:
                continue
            value = objective(x)
            evals += 1
            if value > best:
                best_x, best = x, value
        delta *= ratio
    return best_x


def line_maximize_monna(
    objective: Callable[[float], float],
    *,
    start: float = 0.0,
    delta: float = 1.0,
    budget: int = 16,
    ratio: float = 0.8,
) -> float:
    """The MoNNA authors' search (``monna``; ``tools.line_maximize`` of
    LPD-EPFL/robust-collaborative-learning, defaults start 0, delta 1, 16 evaluations, ratio 0.8).
    The expansion is ByzFL's. The contraction moves the *last point tried*, not the best one: it
    steps up by delta when that point lies below the best, else down by delta (halving the way
    back towards it while that would go below 0); every try shrinks delta by ``ratio``. The
    result is the best point tried."""
    best_x, best, evals, x, delta = _expand(objective, start, delta, budget, ratio)
    while evals < budget:
        if x < best_x:
            x += delta
        else:
            down = x - delta
            if x <= 0.0:  # the halving below converges to 0 from below; the authors' loop ends at -0.0
                down = 0.0
            while down < 0.0:
                down = (down + x) / 2.0
            x = down
        value = objective(x)
        evals += 1
        if value > best:
            best_x, best = x, value
        delta *= ratio
    return best_x


class _Optimal(Attack):
    """Shared line search: the f rows are b(tau) = base + tau * step, with the strength tau >= 0
    that maximises how far the defence's output moves from the honest mean,
    ||out(H + f x b(tau)) - mean(H)|| (Byzantine rows after the honest ones).

    - ``search``: ``byzfl`` (`line_maximize`) or ``monna`` (`line_maximize_monna`);
    - ``objective``: ``node0``, out = the output the defence gives (for a peer-to-peer strategy,
      honest node 0's); ``all_honest``, out = the mean over the honest nodes i of the output
      node i would keep (`PeerDefence.at`), as the MoNNA authors' attack measures it (for a
      server's rule, which has one output, both are the same);
    - ``delta``, ``budget``: the first step and the number of evaluations.

    Unset (null) options take the strategy's choices (``Strategy.attack_defaults``: the MoNNA
    authors' for ``strategy=monna``), else ByzFL's (`BYZFL_SEARCH`). The chosen strength is
    logged as ``attack/tau``."""

    needs_defence = True

    def __init__(
        self,
        *,
        search: str | None = None,
        objective: str | None = None,
        delta: float | None = None,
        budget: int | None = None,
        ratio: float = 0.8,
        below: bool = False,
    ) -> None:
        if search is not None and search not in SEARCHES:
            raise ConfigError(f"attack.search={search}: choose one of {', '.join(SEARCHES)}")
        if objective is not None and objective not in OBJECTIVES:
            raise ConfigError(f"attack.objective={objective}: choose one of {', '.join(OBJECTIVES)}")
        if budget is not None and budget < 1:
            raise ConfigError(f"attack.budget={budget} must be >= 1")
        if delta is not None and delta <= 0:
            raise ConfigError(f"attack.delta={delta} must be > 0")
        if not 0.0 < ratio < 1.0:
            raise ConfigError(f"attack.ratio={ratio} must be in (0, 1)")
        self.search = search
        self.objective = objective
        self.delta = None if delta is None else float(delta)
        self.budget = None if budget is None else int(budget)
        self.ratio = float(ratio)
        self.below = bool(below)
        self.adopt({})

    def adopt(self, defaults: Mapping[str, Any]) -> None:
        """Fill the unset options from ``defaults`` (a strategy's), then from ByzFL's."""
        given = {k: v for k, v in vars(self).items() if k in BYZFL_SEARCH and v is not None}
        self._resolved = {**BYZFL_SEARCH, **{k: v for k, v in defaults.items() if k in BYZFL_SEARCH}, **given}
        if self.below and self._resolved["search"] != "byzfl":
            raise ConfigError("attack.below=true extends search=byzfl only; drop it or set attack.search=byzfl")

    @property
    def settings(self) -> dict[str, Any]:
        """The search actually used: search, objective, delta, budget (and ratio, below)."""
        return {**self._resolved, "ratio": self.ratio, "below": self.below}

    def direction(self, honest: torch.Tensor, f: int) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    def distortion(self, honest: torch.Tensor, f: int, defence: Defence) -> Callable[[float], float]:
        """tau -> the distortion the search maximises (-1 where it is not finite)."""
        base, step = self.direction(honest, f)
        mean = honest_stats(honest)[0]
        h = honest.shape[0]
        every_node = self._resolved["objective"] == "all_honest" and isinstance(defence, PeerDefence)

        def objective(tau: float) -> float:
            U = torch.cat([honest, _rows(base + tau * step, f)])
            if every_node:
                assert isinstance(defence, PeerDefence)
                out = torch.stack([defence.at(U, i) for i in range(h)]).mean(dim=0)
            else:
                out = defence(U)
            gap = float(torch.linalg.vector_norm(out - mean))
            return gap if np.isfinite(gap) else -1.0

        return objective

    def __call__(self, honest, f, *, info=None, rng=None, state=None, defence=None):
        state = {} if state is None else state
        if f == 0 or honest.shape[0] == 0:
            return honest.new_zeros((f, honest.shape[1])), state
        if defence is None:
            raise ConfigError(f"{type(self).__name__} needs the defence it attacks; this strategy exposes none")
        base, step = self.direction(honest, f)
        objective = self.distortion(honest, f, defence)
        s = self._resolved
        if s["search"] == "monna":
            tau = line_maximize_monna(objective, delta=s["delta"], budget=s["budget"], ratio=self.ratio)
        else:
            tau = line_maximize(objective, delta=s["delta"], budget=s["budget"], ratio=self.ratio, below=self.below)
        state = {**state, "tau": tau}
        return _rows(base + tau * step, f), state

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v}' for k, v in self.settings.items())})"


class OptimalALIE(_Optimal):
    """ALIE with its strength line-searched against the defence (ByzFL ``Optimal_ALIE``; the
    MoNNA repository's "little" attack, whose std is also ddof 1): b = mean + tau * std."""

    def direction(self, honest, f):
        mean, std = honest_stats(honest)
        return mean, std


class OptimalIPM(_Optimal):
    """IPM with its strength line-searched against the defence (ByzFL ``Optimal_IPM``; the MoNNA
    repository's "empire" attack, b = (1 - tau) mean): b = mean - tau * mean."""

    def direction(self, honest, f):
        mean = honest_stats(honest)[0]
        return mean, -mean


class LabelFlip(DataAttack):
    """Data poisoning inside the node: a ``fraction`` of the node's training labels, chosen once
    per node from the stream (seed, "poison", node_id), are replaced before training.

    - ``mapping="reverse"``: y' = (C - 1) - y (ByzFL ``LabelFlipping``; the MoNNA repository's LF).
    - ``mapping="targeted"``: labels ``source`` become ``target``; other labels are untouched.

    Which nodes: by default the Byzantine nodes (``byzantine.num`` of them, seeded); ``nodes="all"``
    or a list of node ids poisons exactly those instead (``byzantine.num`` then stays 0, and the
    defence's ``byzantine.declared`` is set on its own). Whole Byzantine nodes use ``fraction=1``;
    label noise inside otherwise honest nodes uses a smaller fraction. The poisoned labels are
    fixed for the run.
    """

    def __init__(
        self,
        *,
        fraction: float = 1.0,
        mapping: str = "reverse",
        source: int | None = None,
        target: int | None = None,
        nodes: str | list[int] | None = None,
    ) -> None:
        if nodes is not None and nodes != "all":
            ids = list(nodes) if not isinstance(nodes, (str, bytes)) and hasattr(nodes, "__iter__") else None
            if ids is None or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids):
                raise ConfigError(
                    f"label_flip: nodes={nodes!r} must be null (the Byzantine nodes), 'all' or a list of node ids"
                )
            nodes = ids
        self.nodes = nodes
        if not 0.0 <= fraction <= 1.0:
            raise ConfigError(f"label_flip: fraction={fraction} must be in [0, 1]")
        if mapping not in ("reverse", "targeted"):
            raise ConfigError(f"label_flip: mapping={mapping!r} must be 'reverse' or 'targeted'")
        if mapping == "targeted" and (source is None or target is None):
            raise ConfigError("label_flip: mapping=targeted needs source=<class> and target=<class>")
        self.fraction = float(fraction)
        self.mapping = mapping
        self.source = source
        self.target = target

    def poison(self, y: np.ndarray, num_classes: int, rng: np.random.Generator) -> np.ndarray:
        """The poisoned copy of one node's labels ``y``."""
        y = np.asarray(y)
        out = y.copy()
        if self.mapping == "targeted":
            for c in (self.source, self.target):
                if c is None or not 0 <= int(c) < num_classes:
                    raise ConfigError(f"label_flip: class {c} is outside 0..{num_classes - 1}")
            eligible = np.flatnonzero(y == self.source)
        else:
            eligible = np.arange(len(y))
        k = int(round(self.fraction * len(eligible)))
        chosen = np.sort(rng.choice(eligible, size=k, replace=False)) if k < len(eligible) else eligible
        if self.mapping == "targeted":
            out[chosen] = self.target
        else:
            out[chosen] = num_classes - 1 - y[chosen]
        return out

    def __repr__(self) -> str:
        return f"LabelFlip(fraction={self.fraction}, mapping={self.mapping})"
