"""FedDyn (D. A. E. Acar, Y. Zhao, R. Matas, M. Mattina, P. Whatmough, V. Saligrama, "Federated
Learning Based on Dynamic Regularization", ICLR 2021, Algorithm 1).

Node i keeps g_i (the gradient of its local loss at its last local model; 0 at first). From the
server model x it approximately minimises

    L_i(theta) - <g_i, theta> + (alpha / 2) ||theta - x||^2

by local SGD (every step adds -g_i + alpha (theta - x) to the gradient: a `Correction` with
prox = alpha and linear = -g_i), then updates g_i <- g_i - alpha (theta_i - x) and sends
x - theta_i. The server keeps h (0 at first):

    h <- h - (alpha / N) sum_S (theta_i - x),    x <- mean_S(theta_i) - h / alpha,

i.e. the server optimiser (SGD lr 1 by default) steps along mean_S(x - theta_i) + h / alpha.
Means are unweighted, as in the paper; the step is linear (summed where nodes run).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fedsim.contract import RunFacts, linear_step
from fedsim.errors import ConfigError
from fedsim.params import FlatModel
from fedsim.seeding import torch_rng
from fedsim.types import ClientContext, NodeData, NodeState, RoundInfo, UpdateBatch
from strategies.client import Correction, LocalSGD
from strategies.fedavg import FedAvg


class FedDynClient(LocalSGD):
    """FedDyn's node (see the module): ``alpha`` is the regularisation strength."""

    def __init__(self, *, alpha: float = 0.01, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if alpha <= 0:
            raise ConfigError(f"strategy.client.alpha={alpha} must be > 0 (FedDyn's regulariser)")
        self.alpha = float(alpha)

    def correction(self, start: torch.Tensor, state: NodeState | None, ctx: ClientContext) -> Correction:
        g = None if state is None else state.get("g")
        return Correction(prox=self.alpha, linear=None if g is None else -g)

    def finish(
        self,
        model: FlatModel,
        delta: torch.Tensor,
        start: torch.Tensor,
        data: NodeData,
        state: NodeState | None,
        ctx: ClientContext,
    ) -> tuple[torch.Tensor | Mapping[str, torch.Tensor], NodeState | None]:
        if len(data) == 0:
            return delta, state
        g = None if state is None else state.get("g")
        new = delta * self.alpha if g is None else g + delta * self.alpha  # g_i - alpha (theta_i - x)
        return delta, {"g": new}


class FedDyn(FedAvg):
    """``strategy=feddyn``: the server side (see the module)."""

    def __init__(self, *, client: FedDynClient, **kwargs: Any) -> None:
        if not isinstance(client, FedDynClient):
            raise ConfigError("strategy=feddyn trains with its own client (strategies.feddyn.FedDynClient)")
        kwargs.setdefault("weighted", False)
        super().__init__(client=client, **kwargs)
        self.alpha = client.alpha

    def init(self, params: torch.Tensor, facts: RunFacts) -> dict[str, Any]:
        return {**super().init(params, facts), "h": torch.zeros_like(params), "num_nodes": int(facts.num_nodes)}

    @linear_step
    def step(
        self, params: torch.Tensor, batch: UpdateBatch, state: dict[str, Any], info: RoundInfo
    ) -> tuple[torch.Tensor, dict[str, Any], dict[str, float]]:
        weights = self.row_weights(batch, state, info)
        rng = torch_rng(info.seed, "preagg", info.round)
        mean, agg_state = self.aggregate(batch.messages, weights, state.get("aggregator", {}), rng)
        h = state["h"] + mean * (self.alpha * batch.senders() / state["num_nodes"])
        direction = mean + h / self.alpha
        new_params, opt_state = self.server_opt.step(params, direction, state["server_opt"])
        metrics = {"agg/direction_norm": float(direction.norm()), "feddyn/h_norm": float(h.norm())}
        return new_params, {**state, "server_opt": opt_state, "aggregator": agg_state, "h": h}, metrics
