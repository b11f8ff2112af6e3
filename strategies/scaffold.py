"""SCAFFOLD (S. P. Karimireddy, S. Kale, M. Mohri, S. J. Reddi, S. U. Stich, A. T. Suresh,
"SCAFFOLD: Stochastic Controlled Averaging for Federated Learning", ICML 2020, Algorithm 1).

The server keeps the model x and a control variate c; node i keeps its own c_i (both start at 0).
A sampled node starts from y = x and takes K local steps

    y <- y - lr_l (g_i(y) - c_i + c),

then computes its new control variate, option I: c_i+ = grad f_i(x) (the gradient of its whole
local loss at the model it received), or option II: c_i+ = c_i - c + (x - y) / (K lr_l). It sends
two vectors, the update x - y and the control change c_i+ - c_i, and keeps c_i <- c_i+. The server
steps the model with the mean update (server optimiser, SGD lr 1 by default: x <- x - mean(x - y))
and sets c <- c + (1/N) sum_S (c_i+ - c_i), so that c stays the mean of all N nodes' c_i.

In fedsim terms: the message declares two vectors, ``update`` and ``control``; c travels in the
broadcast; the per-step term c - c_i is the client's `Correction` (so nodes still train in
vectorised cohorts). The control vector is sent dense by default (``control_uplink=dense``): under a
compressed uplink the server then knows every c_i exactly and c = mean_i c_i holds to rounding;
``control_uplink=compressed`` sends it through its own compressor and error-feedback stage.
With momentum the local steps are heavy-ball steps; option II's formula is kept as published.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fedsim.contract import RunFacts, Vector, linear_step
from fedsim.errors import ConfigError
from fedsim.params import FlatModel
from fedsim.seeding import torch_rng
from fedsim.types import ClientContext, NodeData, NodeState, RoundInfo, UpdateBatch
from strategies.client import Correction, LocalSGD, full_gradient
from strategies.fedavg import FedAvg

OPTIONS = ("I", "II")


class ScaffoldClient(LocalSGD):
    """SCAFFOLD's node: local SGD corrected by c - c_i at every step; sends the update and the
    change of its control variate (option I or II, see the module)."""

    def __init__(self, *, option: str = "II", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        option = str(option).upper()
        if option not in OPTIONS:
            raise ConfigError(f"strategy.client.option={option!r} must be I or II (SCAFFOLD's control variate)")
        self.option = option

    @staticmethod
    def controls(start: torch.Tensor, state: NodeState | None, ctx: ClientContext) -> tuple[torch.Tensor, torch.Tensor]:
        """(c, c_i): the server's control variate from the broadcast, the node's own (0 at first)."""
        c = (ctx.broadcast or {}).get("c")
        if c is None:
            raise ValueError("SCAFFOLD's node needs the server's control variate c in the broadcast")
        own = None if state is None else state.get("c")
        return c, torch.zeros_like(start) if own is None else own

    def correction(self, start: torch.Tensor, state: NodeState | None, ctx: ClientContext) -> Correction:
        c, c_i = self.controls(start, state, ctx)
        return Correction(linear=c - c_i)

    def finish(
        self,
        model: FlatModel,
        delta: torch.Tensor,
        start: torch.Tensor,
        data: NodeData,
        state: NodeState | None,
        ctx: ClientContext,
    ) -> tuple[Mapping[str, torch.Tensor], NodeState | None]:
        c, c_i = self.controls(start, state, ctx)
        if len(data) == 0:
            return {"update": delta, "control": torch.zeros_like(delta)}, state
        if self.option == "I":
            new = self.full_control(model, start, data, state)
        else:
            new = c_i - c + delta / (self.steps(len(data)) * self.lr)
        return {"update": delta, "control": new - c_i}, {"c": new}

    def full_control(
        self, model: FlatModel, start: torch.Tensor, data: NodeData, state: NodeState | None
    ) -> torch.Tensor:
        """Option I's new control variate: the node's full local gradient at the model it received."""
        with torch.enable_grad():
            return full_gradient(model, start, data, lambda logits, y: self.loss(logits, y, state))


class Scaffold(FedAvg):
    """``strategy=scaffold``: the server side (see the module). The update and the control
    change are each aggregated with the strategy's aggregator (and pre-aggregators), so a
    robust rule applies to both; the control variate moves by (senders / N) times the
    aggregated change. Unweighted by default, as in the paper (``weighted=true`` weights the
    update by examples; the control change stays unweighted so that c = mean_i c_i)."""

    def __init__(self, *, client: ScaffoldClient, control_uplink: str = "dense", **kwargs: Any) -> None:
        if not isinstance(client, ScaffoldClient):
            raise ConfigError("strategy=scaffold trains with its own client (strategies.scaffold.ScaffoldClient)")
        if control_uplink not in ("dense", "compressed"):
            raise ConfigError(f"strategy.control_uplink={control_uplink!r} must be dense or compressed")
        kwargs.setdefault("weighted", False)
        super().__init__(client=client, **kwargs)
        self.control_uplink = control_uplink
        self.declare(
            message=(Vector("update"), Vector("control", compress=control_uplink == "compressed")),
            broadcast="vectors",
            # one weighting for both vectors: summing where nodes run needs it
            linear=self.capabilities.linear and not self.weighted,
        )

    def init(self, params: torch.Tensor, facts: RunFacts) -> dict[str, Any]:
        state = super().init(params, facts)
        state["c"] = torch.zeros_like(params)
        state["control_aggregator"] = self.aggregator.init()
        state["num_nodes"] = int(facts.num_nodes)
        return state

    def broadcast(self, state: dict[str, Any]) -> dict[str, Any]:
        return {"c": state["c"]}

    @linear_step
    def step(
        self, params: torch.Tensor, batch: UpdateBatch, state: dict[str, Any], info: RoundInfo
    ) -> tuple[torch.Tensor, dict[str, Any], dict[str, float]]:
        new_params, new_state, metrics, _, _ = self.scaffold_step(params, batch, state, info)
        return new_params, new_state, metrics

    def scaffold_step(
        self, params: torch.Tensor, batch: UpdateBatch, state: dict[str, Any], info: RoundInfo
    ) -> tuple[torch.Tensor, dict[str, Any], dict[str, float], torch.Tensor, torch.Tensor]:
        """`step`, also returning the aggregated update and the rows' weights (for strategies
        built on SCAFFOLD's server step, such as SCAFFOLD-M)."""
        weights = self.row_weights(batch, state, info)
        rng = torch_rng(info.seed, "preagg", info.round)
        update, agg_state = self.aggregate(batch.vector("update"), weights, state.get("aggregator", {}), rng)
        senders = (batch.num_examples > 0).to(torch.float64)
        control, control_state = self.aggregate(
            batch.vector("control"),
            senders,
            state["control_aggregator"],
            torch_rng(info.seed, "preagg", info.round, "control"),
        )
        new_params, opt_state = self.server_opt.step(params, update, state["server_opt"])
        c = state["c"] + control * (batch.senders() / state["num_nodes"])
        metrics = {"agg/direction_norm": float(update.norm()), "scaffold/c_norm": float(c.norm())}
        new_state = {
            **state,
            "server_opt": opt_state,
            "aggregator": agg_state,
            "control_aggregator": control_state,
            "c": c,
        }
        return new_params, new_state, metrics, update, weights
