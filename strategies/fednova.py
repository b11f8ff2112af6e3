"""FedNova (J. Wang, Q. Liu, H. Liang, G. Joshi, H. V. Poor, "Tackling the Objective
Inconsistency Problem in Heterogeneous Federated Optimization", NeurIPS 2020).

Nodes that take different numbers of local steps tau_i pull FedAvg's average towards the nodes
that step most. FedNova normalises: node i sends d_i = (x - y_i) / ||a_i||_1, where a_i holds the
weights of its local gradients in x - y_i (a_i = (1, ..., 1) for plain SGD, so ||a_i||_1 = tau_i;
with heavy-ball momentum rho, ||a_i||_1 = sum_{k=1..tau_i} (1 - rho^k) / (1 - rho)), and the
server steps along tau_eff * sum_i p_i d_i with tau_eff = sum_i p_i ||a_i||_1 and p_i the node
weights (examples, renormalised over the senders). (The paper writes d_i with a further 1 / lr_l
and the step with lr_l; the factors cancel.) With equal tau_i this is FedAvg's step.

In fedsim terms the message declares two vectors: ``update`` (d_i) and ``steps`` (||a_i||_1, one
number sent dense); both are weighted means with the same weights, so the step is linear.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fedsim.contract import Vector, linear_step
from fedsim.errors import ConfigError
from fedsim.params import FlatModel
from fedsim.seeding import torch_rng
from fedsim.types import ClientContext, NodeData, NodeState, RoundInfo, UpdateBatch
from strategies.client import LocalSGD
from strategies.fedavg import FedAvg


class FedNovaClient(LocalSGD):
    """Local SGD that sends its update normalised by ||a_i||_1, and ||a_i||_1 itself."""

    def norm_a(self, num_examples: int) -> float:
        """||a_i||_1 for a node holding ``num_examples``: its number of local steps, or with
        momentum rho, sum over k = 1..tau of (1 - rho^k) / (1 - rho)."""
        tau = self.steps(num_examples)
        rho = self.momentum
        if not rho:
            return float(tau)
        return float(sum((1.0 - rho**k) / (1.0 - rho) for k in range(1, tau + 1)))

    def finish(
        self,
        model: FlatModel,
        delta: torch.Tensor,
        start: torch.Tensor,
        data: NodeData,
        state: NodeState | None,
        ctx: ClientContext,
    ) -> tuple[Mapping[str, torch.Tensor], NodeState | None]:
        a = self.norm_a(len(data))
        steps = torch.tensor([a], dtype=delta.dtype, device=delta.device)
        return {"update": delta / a if a > 0 else delta, "steps": steps}, state


class FedNova(FedAvg):
    """``strategy=fednova``: the server side (see the module). Any aggregator applies to both
    vectors; with the plain mean the step is linear (summed where nodes run)."""

    def __init__(self, *, client: FedNovaClient, **kwargs: Any) -> None:
        if not isinstance(client, FedNovaClient):
            raise ConfigError("strategy=fednova trains with its own client (strategies.fednova.FedNovaClient)")
        super().__init__(client=client, **kwargs)
        self.declare(message=(Vector("update"), Vector("steps", size=1, compress=False)))

    def init(self, params: torch.Tensor, facts: Any) -> dict[str, Any]:
        return {**super().init(params, facts), "steps_aggregator": self.aggregator.init()}

    @linear_step
    def step(
        self, params: torch.Tensor, batch: UpdateBatch, state: dict[str, Any], info: RoundInfo
    ) -> tuple[torch.Tensor, dict[str, Any], dict[str, float]]:
        weights = self.row_weights(batch, state, info)
        rng = torch_rng(info.seed, "preagg", info.round)
        d, agg_state = self.aggregate(batch.vector("update"), weights, state.get("aggregator", {}), rng)
        tau, steps_state = self.aggregate(
            batch.vector("steps"),
            weights,
            state["steps_aggregator"],
            torch_rng(info.seed, "preagg", info.round, "steps"),
        )
        tau_eff = float(tau[0])
        direction = d * tau_eff
        new_params, opt_state = self.server_opt.step(params, direction, state["server_opt"])
        metrics = {"agg/direction_norm": float(direction.norm()), "fednova/tau_eff": tau_eff}
        new_state = {**state, "server_opt": opt_state, "aggregator": agg_state, "steps_aggregator": steps_state}
        return new_params, new_state, metrics
