"""Server-side aggregation strategies: FedAvg (McMahan et al. 2017), FedAvgM (Hsu et al. 2019),
and robust D-SGD (a robust aggregator, optionally behind a chain of pre-aggregators, applied to
the nodes' messages; with the ``WorkerMomentum`` client this is the worker-momentum D-SGD that
ByzFL benchmarks, shared/specs/robust_aggregation.md section 1a)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from fedsim.seeding import torch_rng
from fedsim.types import RoundInfo, UpdateBatch
from strategies.aggregators import Mean
from strategies.preaggregators import build_chain
from strategies.protocols import Aggregator, ClientUpdate, ServerOptimizer
from strategies.server_opt import ServerSGD


class FedAvg:
    """Nodes run ``client`` (local SGD by default) and send ``start - local``; the server
    aggregates the messages (sample-weighted ``Mean`` by default, weights = examples per node)
    and hands the result to ``server_opt`` (SGD, lr 1: the new model is the weighted average of
    the local models; momentum > 0 gives FedAvgM).

    ``preaggregators`` (names or configs, see strategies.preaggregators.build_chain) run before
    the aggregator, with the stream (seed, "preagg", round) for the random ones (bucketing). An
    aggregator with explicit state (centered clipping) keeps it in ``state["aggregator"]``.
    """

    def __init__(
        self,
        *,
        client: ClientUpdate,
        aggregator: Aggregator | None = None,
        server_opt: ServerOptimizer | None = None,
        weighted: bool = True,
        preaggregators: Sequence[Any] | None = None,
        f: int = 0,
    ) -> None:
        self.client = client
        self.aggregator = aggregator if aggregator is not None else Mean()
        self.server_opt = server_opt if server_opt is not None else ServerSGD()
        self.weighted = bool(weighted)
        self.f = int(f)
        self.preaggregators = build_chain(preaggregators, f=self.f)

    def check(self, n: int) -> None:
        """Raise ConfigError if the pre-aggregators and aggregator cannot take n rows."""
        for pre in self.preaggregators:
            if hasattr(pre, "check"):
                pre.check(n)
            n = pre.out_rows(n) if hasattr(pre, "out_rows") else n
        if hasattr(self.aggregator, "check"):
            self.aggregator.check(n)

    def init(self, params: torch.Tensor) -> dict[str, Any]:
        agg_init = getattr(self.aggregator, "init", None)
        return {"server_opt": self.server_opt.init(params), "aggregator": agg_init() if agg_init else {}}

    def aggregate(
        self, U: torch.Tensor, weights: torch.Tensor, state: dict[str, Any], rng: torch.Generator | None
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Pre-aggregator chain, then the aggregator: ``(U, weights, state) -> (vector, state)``."""
        for pre in self.preaggregators:
            U, weights = pre(U, weights, rng=rng)
        if hasattr(self.aggregator, "aggregate"):
            return self.aggregator.aggregate(U, weights, state)
        return self.aggregator(U, weights), state

    def _weights(self, batch: UpdateBatch) -> torch.Tensor:
        weights = batch.num_examples.to(torch.float64)
        return weights if self.weighted else (weights > 0).to(torch.float64)

    def row_weights(self, batch: UpdateBatch, state: dict[str, Any], info: RoundInfo) -> torch.Tensor:
        """The weights the aggregator gets for the batch's rows (examples, or 1 per sender)."""
        return self._weights(batch)

    def scale(self, weights: torch.Tensor) -> float | None:
        """A factor applied to the aggregate (None: none). The aggregate of a weighted mean is
        normalised; subclasses whose step is an unnormalised weighted sum scale it back."""
        return None

    def defence(self, state: dict[str, Any], info: RoundInfo) -> Callable[[torch.Tensor], torch.Tensor]:
        """The aggregation as the attacker sees it (for optimal attacks): same chain, same state,
        same round stream, equal weights; it never changes the strategy's state."""
        agg_state = state.get("aggregator", {})

        def run(U: torch.Tensor) -> torch.Tensor:
            w = torch.ones(U.shape[0], dtype=torch.float64)
            return self.aggregate(U, w, agg_state, torch_rng(info.seed, "preagg", info.round))[0]

        return run

    def step(
        self, params: torch.Tensor, batch: UpdateBatch, state: dict[str, Any], info: RoundInfo
    ) -> tuple[torch.Tensor, dict[str, Any], dict[str, float]]:
        rng = torch_rng(info.seed, "preagg", info.round)
        weights = self.row_weights(batch, state, info)
        direction, agg_state = self.aggregate(batch.messages, weights, state.get("aggregator", {}), rng)
        factor = self.scale(weights)
        if factor is not None:
            direction = direction * factor
        new_params, opt_state = self.server_opt.step(params, direction, state["server_opt"])
        metrics = {"agg/direction_norm": float(direction.norm())}
        if factor is not None:  # an unnormalised step: how much weight it carried
            metrics["agg/weight_sum"] = float(weights.sum())
        return new_params, {**state, "server_opt": opt_state, "aggregator": agg_state}, metrics


class RobustDSGD(FedAvg):
    """Byzantine-robust D-SGD: FedAvg's loop with unweighted robust aggregation by default (robust
    rules treat every row alike, as in ByzFL). Configure with ``strategy=robust``."""

    def __init__(self, *, weighted: bool = False, **kwargs: Any) -> None:
        super().__init__(weighted=weighted, **kwargs)
