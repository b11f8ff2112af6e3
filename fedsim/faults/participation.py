"""Participation models (config group ``participation``): which nodes take part in round t.

A model is called as ``model(round, num_nodes, nodes_per_round, rng)`` and returns the sorted node
ids of the round; ``rng`` is the round's stream (seed, "sample", round). ``Uniform`` uses it
directly. The availability models (``Full``, ``Bernoulli``, ``Markov``, ``Cyclic``) ignore
``nodes_per_round``: how many nodes take part follows from their probabilities, and a round may
have no node at all. Before use they are bound to the run with
``bind(num_nodes=, seed=, label_counts=)``, which fixes every node's long-run participation rate
p_n (``probabilities()``); their randomness comes from (seed, "participation", ...).

Heterogeneous rates (docs/methods/fedau.md, "Participation", after the FedAU code's ``util.py``): ``rates=label`` draws m ~ Dirichlet(alpha 1_C) once and sets
p_n = clip(max(p_min, C * p * <d_n, m>), 0, 1), with d_n node n's label distribution, so that
participation is correlated with the labels a node holds (mean about ``p``). ``rates=constant``
gives every node p.

Markov and cyclic participation are processes in time. The bound model keeps its state for the
last round it produced and advances from there; asking for an earlier round (a resumed run)
replays the process from round 0, so round t's set is a function of (seed, t) alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from fedsim.contract import Participation
from fedsim.errors import ConfigError
from fedsim.seeding import np_rng


class Uniform(Participation):
    """``nodes_per_round`` nodes drawn uniformly without replacement, independently each round
    (the sampling of McMahan et al. 2017). Every node is always available (``active``)."""

    uses_nodes_per_round = True

    def __init__(self) -> None:
        self.num_nodes = 0

    def bind(self, *, num_nodes: int, seed: int, label_counts: np.ndarray | None = None) -> Uniform:
        out = Uniform()
        out.num_nodes = int(num_nodes)
        return out

    def __call__(self, round_: int, num_nodes: int, nodes_per_round: int, rng: np.random.Generator) -> np.ndarray:
        if nodes_per_round >= num_nodes:
            return np.arange(num_nodes)
        return np.sort(rng.choice(num_nodes, size=nodes_per_round, replace=False))

    def probabilities(self, num_nodes: int | None = None, nodes_per_round: int | None = None) -> np.ndarray:
        n = self.num_nodes if num_nodes is None else num_nodes
        return np.full(n, min(1.0, (nodes_per_round or n) / n))

    def active(self, t: int) -> np.ndarray:
        return np.ones(self.num_nodes, dtype=bool)


def label_rates(
    label_counts: np.ndarray, *, p: float, alpha: float, p_min: float, rng: np.random.Generator
) -> np.ndarray:
    """FedAU's label-correlated rates: p_n = clip(max(p_min, C p <d_n, m>), 0, 1), m ~ Dir(alpha)."""
    counts = np.asarray(label_counts, dtype=np.float64)
    num_classes = counts.shape[1]
    totals = counts.sum(1, keepdims=True)
    dist = np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)
    m = rng.dirichlet(alpha * np.ones(num_classes))
    return np.clip(np.maximum(p_min, num_classes * p * dist @ m), 0.0, 1.0)


@dataclass
class _Availability(Participation):
    """Shared by the availability models: options of the per-node rates, binding, replay."""

    p: float = 0.1
    rates: str = "label"
    alpha: float = 0.1
    p_min: float = 0.02
    probs: np.ndarray | None = field(default=None, repr=False)
    seed: int = 0
    _state: object = field(default=None, init=False, repr=False)
    _last: int = field(default=-1, init=False, repr=False)

    def __post_init__(self) -> None:
        if not 0.0 < float(self.p) <= 1.0:
            raise ConfigError(f"participation.p={self.p} must be in (0, 1]")
        if self.rates not in ("label", "constant"):
            raise ConfigError(
                f"participation.rates={self.rates!r} must be 'label' (FedAU's label-correlated rates) or 'constant'"
            )
        if self.alpha <= 0:
            raise ConfigError(f"participation.alpha={self.alpha} must be > 0")
        if not 0.0 <= float(self.p_min) <= 1.0:
            raise ConfigError(f"participation.p_min={self.p_min} must be in [0, 1]")

    def bind(self, *, num_nodes: int, seed: int, label_counts: np.ndarray | None = None) -> _Availability:
        """A copy of this model with every node's rate fixed for the run."""
        if self.rates == "label" and label_counts is not None:
            probs = label_rates(
                label_counts, p=self.p, alpha=self.alpha, p_min=self.p_min, rng=np_rng(seed, "participation", "rates")
            )
        else:
            probs = np.full(num_nodes, float(self.p))
        return replace(self, probs=probs, seed=int(seed))

    def probabilities(self, num_nodes: int | None = None, nodes_per_round: int | None = None) -> np.ndarray:
        if self.probs is None:
            raise RuntimeError("participation model is not bound to a run; call bind() first")
        return self.probs

    # a process: _start() -> state; _advance(state, t) -> (state, active mask)
    def _start(self) -> object:
        return None

    def _advance(self, state: object, t: int) -> tuple[object, np.ndarray]:
        raise NotImplementedError

    def active(self, t: int) -> np.ndarray:
        """The boolean availability mask of round t."""
        probs = self.probabilities()
        if t <= self._last or self._state is None:
            self._state, self._last = self._start(), -1
        mask = np.zeros(len(probs), dtype=bool)
        while self._last < t:
            self._last += 1
            self._state, mask = self._advance(self._state, self._last)
        return mask

    def __call__(self, round_: int, num_nodes: int, nodes_per_round: int, rng: np.random.Generator) -> np.ndarray:
        if len(self.probabilities()) != num_nodes:
            raise ConfigError(f"participation bound to {len(self.probabilities())} nodes, the run has {num_nodes}")
        return np.flatnonzero(self.active(round_))


@dataclass
class Full(_Availability):
    """Every node in every round (p_n = 1)."""

    def bind(self, *, num_nodes: int, seed: int, label_counts: np.ndarray | None = None) -> Full:
        return replace(self, p=1.0, rates="constant", probs=np.ones(num_nodes), seed=int(seed))

    def _advance(self, state: object, t: int) -> tuple[object, np.ndarray]:
        return state, np.ones(len(self.probabilities()), dtype=bool)


@dataclass
class Bernoulli(_Availability):
    """Node n takes part in round t with probability p_n, independently across nodes and rounds;
    round t's draws come from (seed, "participation", t)."""

    def _advance(self, state: object, t: int) -> tuple[object, np.ndarray]:
        probs = self.probabilities()
        return state, np_rng(self.seed, "participation", t).random(len(probs)) < probs

    def active(self, t: int) -> np.ndarray:  # memoryless: no replay needed
        return self._advance(None, t)[1]


@dataclass
class Markov(_Availability):
    """A two-state chain per node (FedAU's ``markov-x``): P(inactive -> active) = a = x,
    P(active -> inactive) = b = x (1/p_n - 1), so the stationary rate is p_n; when b > 1, a <- a/b
    and b = 1. The initial state is Bernoulli(p_n); each round the chain moves first, then is read."""

    transition: float = 0.05

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < float(self.transition) <= 1.0:
            raise ConfigError(f"participation.transition={self.transition} must be in (0, 1]")

    def rates_ab(self) -> tuple[np.ndarray, np.ndarray]:
        probs = self.probabilities()
        a = np.full(len(probs), float(self.transition))
        b = a * (1.0 / np.maximum(probs, 1e-12) - 1.0)
        over = b > 1.0
        a[over] = a[over] / b[over]
        b[over] = 1.0
        return a, b

    def _start(self) -> object:
        probs = self.probabilities()
        return np_rng(self.seed, "participation", "init").random(len(probs)) < probs

    def _advance(self, state: object, t: int) -> tuple[object, np.ndarray]:
        on = np.asarray(state, dtype=bool)
        a, b = self.rates_ab()
        u = np_rng(self.seed, "participation", t).random(len(on))
        on = np.where(on, u >= b, u < a)
        return on, on.copy()


@dataclass
class Cyclic(_Availability):
    """FedAU's ``cyclic-L``: node n is active for A = max(1, round(L p_n)) rounds, then inactive for
    B = max(1, L - A), repeating; it starts inactive with rounds-to-switch uniform on {0..B-1}
    from (seed, "participation", "init"). Each round: toggle (and reload A or B) when the counter
    is 0, then count down, then read. Long-run rate A / (A + B)."""

    period: int = 100

    def __post_init__(self) -> None:
        super().__post_init__()
        if int(self.period) < 2:
            raise ConfigError(f"participation.period={self.period} must be >= 2")

    def lengths(self) -> tuple[np.ndarray, np.ndarray]:
        L = int(self.period)
        active = np.maximum(1, np.round(L * self.probabilities())).astype(np.int64)
        return active, np.maximum(1, L - active)

    def _start(self) -> object:
        _, inactive = self.lengths()
        to_switch = np_rng(self.seed, "participation", "init").integers(0, inactive)
        return np.zeros(len(inactive), dtype=bool), to_switch

    def _advance(self, state: object, t: int) -> tuple[object, np.ndarray]:
        assert isinstance(state, tuple)
        on: np.ndarray = state[0]
        to_switch: np.ndarray = state[1]
        active, inactive = self.lengths()
        switch = to_switch == 0
        on = np.where(switch, ~on, on)
        to_switch = np.where(switch, np.where(on, active, inactive), to_switch) - 1
        return (on, to_switch), on.copy()
