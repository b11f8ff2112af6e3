"""FedAvg (McMahan et al. 2017) and FedAvgM (Hsu et al. 2019) as aggregator + server optimizer."""

from __future__ import annotations

from typing import Any

import torch

from fedsim.types import RoundInfo, UpdateBatch
from strategies.aggregators import Mean
from strategies.protocols import Aggregator, ClientUpdate, ServerOptimizer
from strategies.server_opt import ServerSGD


class FedAvg:
    """Nodes run ``client`` (local SGD by default) and send ``start - local``; the server
    aggregates the messages (sample-weighted ``Mean`` by default, weights = examples per node)
    and hands the result to ``server_opt`` (SGD, lr 1: the new model is the weighted average of
    the local models; momentum > 0 gives FedAvgM)."""

    def __init__(
        self,
        *,
        client: ClientUpdate,
        aggregator: Aggregator | None = None,
        server_opt: ServerOptimizer | None = None,
        weighted: bool = True,
    ) -> None:
        self.client = client
        self.aggregator = aggregator if aggregator is not None else Mean()
        self.server_opt = server_opt if server_opt is not None else ServerSGD()
        self.weighted = bool(weighted)

    def init(self, params: torch.Tensor) -> dict[str, Any]:
        return {"server_opt": self.server_opt.init(params)}

    def step(
        self, params: torch.Tensor, batch: UpdateBatch, state: dict[str, Any], info: RoundInfo
    ) -> tuple[torch.Tensor, dict[str, Any], dict[str, float]]:
        weights = batch.num_examples.to(torch.float64)
        if not self.weighted:
            weights = (weights > 0).to(torch.float64)
        direction = self.aggregator(batch.messages, weights)
        new_params, opt_state = self.server_opt.step(params, direction, state["server_opt"])
        metrics = {"agg/direction_norm": float(direction.norm())}
        return new_params, {**state, "server_opt": opt_state}, metrics
