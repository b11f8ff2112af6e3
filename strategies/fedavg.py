"""FedAvg (McMahan et al. 2017) and FedAvgM (Hsu et al. 2019): the server aggregates the nodes'
messages (any aggregator, optionally behind a chain of pre-aggregators) and hands the result to
a server optimiser. Most server strategies build on it (strategies/robust.py, fedprox.py,
floral.py, asynchronous.py, vrls.py)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from fedsim.contract import Capabilities, ClientUpdate, Defence, RunFacts, ServerOptimizer, Strategy, linear_step
from fedsim.seeding import torch_rng
from fedsim.types import RoundInfo, UpdateBatch
from strategies.aggregators import Mean, as_rule
from strategies.preaggregators import build_chain
from strategies.server_opt import ServerSGD


class FedAvg(Strategy):
    """Nodes run ``client`` (local SGD by default) and send ``start - local``; the server
    aggregates the messages (sample-weighted ``Mean`` by default, weights = examples per node)
    and hands the result to ``server_opt`` (SGD, lr 1: the new model is the weighted average of
    the local models; momentum > 0 gives FedAvgM).

    ``preaggregators`` (names or configs, see strategies.preaggregators.build_chain) run before
    the aggregator, with the stream (seed, "preagg", round) for the random ones (bucketing). An
    aggregator with explicit state (centered clipping) keeps it in ``state["aggregator"]``.
    With the plain mean and no pre-aggregator the step is ``linear`` (`Capabilities`); a subclass
    that overrides `step` is linear only if it marks its own with `fedsim.contract.linear_step`.
    """

    def __init__(
        self,
        *,
        client: ClientUpdate,
        aggregator: Any = None,
        server_opt: ServerOptimizer | None = None,
        weighted: bool = True,
        preaggregators: Sequence[Any] | None = None,
        f: int = 0,
    ) -> None:
        self.client = client
        self.aggregator = as_rule(aggregator) if aggregator is not None else Mean()
        self.server_opt: ServerOptimizer = server_opt if server_opt is not None else ServerSGD()
        self.weighted = bool(weighted)
        self.f = int(f)
        self.preaggregators = build_chain(preaggregators, f=self.f)
        linear = isinstance(self.aggregator, Mean) and not self.preaggregators
        self.capabilities = Capabilities(linear=linear, weighted=self.weighted)

    def declare(self, **changes: Any) -> None:
        """Change some of this strategy's declared capabilities (subclasses)."""
        self.capabilities = replace(self.capabilities, **changes)

    def check(self, rows: int) -> None:
        """Raise ConfigError if the pre-aggregators and aggregator cannot take this many rows."""
        n = rows
        for pre in self.preaggregators:
            pre.check(n)
            n = pre.out_rows(n)
        self.aggregator.check(n)

    def init(self, params: torch.Tensor, facts: RunFacts) -> dict[str, Any]:
        return {"server_opt": self.server_opt.init(params), "aggregator": self.aggregator.init()}

    def aggregate(
        self, U: torch.Tensor, weights: torch.Tensor, state: dict[str, Any], rng: torch.Generator | None
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """Pre-aggregator chain, then the aggregator: ``(U, weights, state) -> (vector, state)``."""
        for pre in self.preaggregators:
            U, weights = pre(U, weights, rng=rng)
        return self.aggregator.aggregate(U, weights, state)

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

    def defence(self, state: dict[str, Any], info: RoundInfo) -> Defence:
        """The aggregation as the attacker sees it (for optimal attacks): same chain, same state,
        same round stream, equal weights; it never changes the strategy's state."""
        agg_state = state.get("aggregator", {})

        def run(U: torch.Tensor) -> torch.Tensor:
            w = torch.ones(U.shape[0], dtype=torch.float64, device=U.device)
            return self.aggregate(U, w, agg_state, torch_rng(info.seed, "preagg", info.round))[0]

        return run

    @linear_step
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
