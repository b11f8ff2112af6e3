"""MoNNA (Farhadkhani, Guerraoui, Gupta, Hoang, Pinot & Stephan, "Robust Collaborative Learning
with Linear Gradient Overhead", ICML 2023): decentralised D-SGD in which every honest node keeps
its own model, takes a local Polyak-momentum step, and replaces its model by the nearest-neighbour
average (NNA) of the models it receives. Run it with ``strategy=monna server=p2p`` (the loop is
fedsim.server.p2p.P2PServer).

The step of honest node j at step t (shared/specs/robust_aggregation.md section 1b, checked
against the authors' ``peerToPeer.py`` and ``aggregators/cva.py``):

1. g = minibatch gradient at its own model x_j; m_j <- beta m_j + (1 - beta) g (beta = 0.99);
2. x_j' = x_j - lr_t m_j (the ``WorkerMomentum`` client with ``lr`` set);
3. it receives its own x_j', n - 2f - 1 other honest models drawn at random (fresh each step) and
   all f Byzantine vectors (crafted in parameter space from the honest x');
4. NNA: keep the n - 2f received vectors closest to x_j' (its own included) and average them.

Any other rule (trimmed mean, geometric median, mean) can replace NNA at step 4 for the
comparisons of the paper; ``beta = 0`` is its momentum-free ablation.
"""

from __future__ import annotations

from typing import Any

import torch

from fedsim.errors import ConfigError
from strategies.aggregators import Rule, _check_matrix, _need_f
from strategies.protocols import ClientUpdate


class NNA(Rule):
    """Nearest-neighbour averaging around row ``center`` (ByzFL ``MoNNA(f, idx)``; the MoNNA
    code's "CVA"): the mean of the n - f rows closest to U[center] in l2, that row included (it is
    at distance 0). Ties go to the lower row index; non-finite rows are infinitely far. Needs
    f < n. Unlike the other rules it is *not* permutation invariant: it is defined relative to
    the centre row (a node's own model in the P2P loop)."""

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


class Decentralized:
    """The peer-to-peer strategy: a client update (``WorkerMomentum`` with a local ``lr``) and a
    per-node mixing rule (``NNA`` for MoNNA, or any aggregator). ``mix`` is called once per honest
    node with the vectors it received, its own first."""

    peer_to_peer = True

    def __init__(self, *, client: ClientUpdate, aggregator: Any, f: int = 0) -> None:
        if getattr(client, "step_lr", 0.0) is None:
            raise ConfigError("strategy=monna needs a local step size: set strategy.client.lr (e.g. 0.75)")
        self.client = client
        self.aggregator = aggregator
        self.f = int(f)

    def check(self, n: int) -> None:
        if hasattr(self.aggregator, "check"):
            self.aggregator.check(n)

    def init(self, params: torch.Tensor) -> dict[str, Any]:
        return {}

    def node_init(self) -> dict[str, Any]:
        init = getattr(self.aggregator, "init", None)
        return init() if init else {}

    def mix(self, received: torch.Tensor, state: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        """The node's new model from ``received`` (row 0 is its own vector) and its mixing state."""
        if isinstance(self.aggregator, NNA):
            return self.aggregator.around(received, 0), state
        w = torch.ones(received.shape[0], dtype=torch.float64)
        if hasattr(self.aggregator, "aggregate"):
            return self.aggregator.aggregate(received, w, state)
        return self.aggregator(received, w), state
