"""FedAvg-M and SCAFFOLD-M (Z. Cheng, X. Huang, P. Wu, K. Yuan, "Momentum Benefits Non-IID
Federated Learning Simply and Provably", ICLR 2024, arXiv 2306.16504).

The server keeps a momentum direction g (0 at first) and sends it with the model. A node starts
from y = x and takes K local steps

    FedAvg-M:    y <- y - lr (beta g_i(y) + (1 - beta) g)
    SCAFFOLD-M:  y <- y - lr (beta (g_i(y) - c_i + c) + (1 - beta) g)

with g_i(y) its minibatch gradient. The server averages the updates x - y into D, steps the model
x <- x - server_lr D (the server optimiser; SGD lr 1 by default), and sets the next direction to
g <- D / (lr K), the mean update in gradient units. beta = 1 is FedAvg (SCAFFOLD), bit for bit.
(Not FedAvgM of Hsu et al. 2019, which is server-side heavy ball: ``strategy.server_opt.momentum``.)

In fedsim terms a local step is written as a `Correction` with a rescaled step size:

    lr (beta g_i + (1 - beta) g) = (lr beta) (g_i + ((1 - beta) / beta) g),

so the client runs local SGD at lr * beta with the linear term ((1 - beta) / beta) g (plus c - c_i
for SCAFFOLD-M) and keeps the vectorised cohort path. The two sides are equal in exact arithmetic;
in float32 they differ by rounding (lr * beta and (1 - beta) / beta are rounded once each). At
beta = 1 the step size is lr * 1.0 = lr and there is no momentum term, so the client is the parent's.

Variance-reduced forms (``strategy=fedavg_m_vr``, ``scaffold_m_vr``): a local step replaces the
fresh gradient by a STORM/MVR estimate that reuses the step's minibatch xi at the previous
round's global model x_prev, which the server also sends:

    FedAvg-M-VR:    y <- y - lr (g_i(y; xi) + (1 - beta) (g - g_i(x_prev; xi)))
    SCAFFOLD-M-VR:  the same with every gradient corrected by c - c_i, i.e.
                    y <- y - lr (g_i(y; xi) + (1 - beta) (g - g_i(x_prev; xi)) + beta (c - c_i))

Two gradients per step, one node at a time (no cohort path). These rules are reconstructed from
secondary descriptions of the paper, not from its text, which could not be read here
(docs/methods/momentum.md); the first round, which has no x_prev, takes plain steps.

The paper's K is the same on every node. Here K may differ per node (``epochs`` with unequal node
sizes), so nodes also send their K (a one-number vector ``steps``, dense, as FedNova's) and the
server divides by the weighted mean of the senders' K (with the update's weights); with
``strategy.client.steps`` fixed it is the paper's K. docs/methods/momentum.md lists the rules, the
choices the paper leaves open and what could not be checked against its text.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from fedsim.contract import RunFacts, Vector, linear_step
from fedsim.errors import ConfigError
from fedsim.params import FlatModel
from fedsim.seeding import torch_rng
from fedsim.types import ClientContext, ClientResult, NodeData, NodeState, RoundInfo, UpdateBatch
from strategies.client import Correction, LocalSGD, Tally, on_device
from strategies.fedavg import FedAvg
from strategies.scaffold import Scaffold, ScaffoldClient


def check_beta(beta: float) -> float:
    beta = float(beta)
    if not 0.0 < beta <= 1.0:
        raise ConfigError(f"strategy.client.beta={beta} must be in (0, 1] (1: no momentum, the parent method)")
    return beta


def server_direction(ctx: ClientContext) -> torch.Tensor:
    """The server's momentum direction g from the round's broadcast."""
    g = (ctx.broadcast or {}).get("g")
    if g is None:
        raise ValueError("a momentum node needs the server's direction g in the broadcast")
    return g


def steps_vector(k: int, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor([float(k)], dtype=like.dtype, device=like.device)


class MomentumStep:
    """The momentum clients' shared part: the paper's step size eta = ``lr`` and beta, the
    rescaled SGD step size lr * beta they train at, and the per-step term from g."""

    beta: float
    eta: float
    ratio: float

    def momentum_step(self, beta: float, lr: float) -> float:
        """Set beta, eta and (1 - beta) / beta; returns the rescaled step size lr * beta."""
        beta = check_beta(beta)
        if lr <= 0:
            raise ConfigError(f"client lr={lr} must be > 0")
        self.beta, self.eta, self.ratio = beta, float(lr), (1.0 - beta) / beta
        return float(lr) * beta

    def momentum_term(self, ctx: ClientContext) -> torch.Tensor | None:
        """((1 - beta) / beta) g, the per-step term that the rescaled step turns into
        (1 - beta) g; None at beta = 1."""
        if self.beta == 1.0:
            return None
        return server_direction(ctx) * self.ratio


class MomentumClient(MomentumStep, LocalSGD):
    """FedAvg-M's node: local SGD on beta * gradient + (1 - beta) * g, written as SGD at
    lr * beta with the linear correction ((1 - beta) / beta) g (see the module). ``lr`` is the
    paper's local step size eta. Sends its update and its number of local steps."""

    def __init__(self, *, beta: float = 0.1, lr: float = 0.05, **kwargs: Any) -> None:
        super().__init__(lr=self.momentum_step(beta, lr), **kwargs)

    def correction(self, start: torch.Tensor, state: NodeState | None, ctx: ClientContext) -> Correction | None:
        term = self.momentum_term(ctx)
        return None if term is None else Correction(linear=term)

    def finish(
        self,
        model: FlatModel,
        delta: torch.Tensor,
        start: torch.Tensor,
        data: NodeData,
        state: NodeState | None,
        ctx: ClientContext,
    ) -> tuple[Mapping[str, torch.Tensor], NodeState | None]:
        return {"update": delta, "steps": steps_vector(self.steps(len(data)), delta)}, state


class ScaffoldMomentumClient(MomentumStep, ScaffoldClient):
    """SCAFFOLD-M's node: local SGD on beta * (gradient - c_i + c) + (1 - beta) * g, i.e. SGD at
    lr * beta with the linear correction c - c_i + ((1 - beta) / beta) g. Its new control variate:
    option I, the full local gradient at x (as SCAFFOLD's); option II, the mean of its minibatch
    gradients over the local steps, recovered from the update:
    c_i+ = c_i - c + ((x - y) / (K lr) - (1 - beta) g) / beta, which is SCAFFOLD's option II at
    beta = 1. Sends the update, the control change and its number of local steps."""

    def __init__(self, *, beta: float = 0.1, lr: float = 0.05, option: str = "II", **kwargs: Any) -> None:
        super().__init__(option=option, lr=self.momentum_step(beta, lr), **kwargs)

    def correction(self, start: torch.Tensor, state: NodeState | None, ctx: ClientContext) -> Correction:
        c, c_i = self.controls(start, state, ctx)
        term = self.momentum_term(ctx)
        return Correction(linear=c - c_i if term is None else c - c_i + term)

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
        steps = self.steps(len(data))
        if len(data) == 0:
            return {"update": delta, "control": torch.zeros_like(delta), "steps": steps_vector(0, delta)}, state
        if self.option == "I":
            new = self.full_control(model, start, data, state)
        else:
            mean = delta / (steps * self.eta)  # the mean local direction
            if self.beta != 1.0:
                mean = (mean - server_direction(ctx) * (1.0 - self.beta)) / self.beta
            new = c_i - c + mean
        return {"update": delta, "control": new - c_i, "steps": steps_vector(steps, delta)}, {"c": new}


class VarianceReduced:
    """The variance-reduced local loop shared by FedAvg-M-VR and SCAFFOLD-M-VR (see the module):
    each step takes the minibatch gradient at the current model y and at the previous round's
    global model x_prev (from the broadcast), and descends
    g_i(y) + (1 - beta) (g - g_i(x_prev)) + beta * ``linear``. Without x_prev (the first round)
    or at beta = 1 the step is plain SGD on g_i(y) + beta * ``linear``. Each client builds its
    result from the tally and the sum of the fresh gradients (``vr_result``)."""

    beta: float
    eta: float
    vr = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if getattr(self, "weight_decay", 0.0) or getattr(self, "momentum", 0.0):
            raise ConfigError(
                "the variance-reduced momentum clients take no strategy.client.weight_decay or "
                "strategy.client.momentum (the paper's step has neither)"
            )

    def __call__(
        self, model: FlatModel, start: torch.Tensor, data: NodeData, state: NodeState | None, ctx: ClientContext
    ) -> ClientResult:
        client: Any = self
        if len(data) == 0:
            return client.empty(model, start, state, ctx)
        return self.vr_result(model, start, data, state, ctx, lambda logits, y: client.loss(logits, y, state))

    def vr_result(
        self,
        model: FlatModel,
        start: torch.Tensor,
        data: NodeData,
        state: NodeState | None,
        ctx: ClientContext,
        loss_fn: Any,
    ) -> ClientResult:
        raise NotImplementedError

    def vr_train(
        self,
        model: FlatModel,
        start: torch.Tensor,
        data: NodeData,
        ctx: ClientContext,
        linear: torch.Tensor | None,
        loss_fn: Any,
    ) -> tuple[Tally, torch.Tensor]:
        """Runs the local steps (``model`` ends at the local model y); (the tally, the sum of the
        fresh minibatch gradients)."""
        sgd: Any = self
        prev = (ctx.broadcast or {}).get("x_prev")
        g = server_direction(ctx)
        storm = prev is not None and self.beta < 1.0
        gen = ctx.generator()
        model.load(start)
        flat, grad, module = model.flat, model.flat_grad, model.module
        fresh_sum = torch.zeros_like(start)
        tally = Tally(flat.device)
        here = torch.empty_like(start) if storm else None
        for idx in on_device(sgd._batches(len(data), gen), flat.device):
            xb, yb = data.take(idx)
            grad.zero_()
            logits = module(xb)
            loss = loss_fn(logits, yb)
            loss.backward()
            with torch.no_grad():
                direction = grad.clone()
                fresh_sum.add_(direction)
                tally.add(loss, logits, yb)
            if storm:
                assert here is not None and prev is not None
                with torch.no_grad():
                    here.copy_(flat)
                    flat.copy_(prev)
                grad.zero_()
                loss_fn(module(xb), yb).backward()
                with torch.no_grad():
                    flat.copy_(here)
                    direction.add_(g - grad, alpha=1.0 - self.beta)
            with torch.no_grad():
                if linear is not None:
                    direction.add_(linear, alpha=self.beta)
                flat.add_(direction, alpha=-self.eta)
        return tally, fresh_sum


class MomentumVRClient(VarianceReduced, MomentumClient):
    """FedAvg-M-VR's node (see the module): local steps on g_i(y) + (1 - beta) (g - g_i(x_prev)),
    at the step size ``lr`` itself. Sends its update and its number of local steps."""

    def vr_result(
        self,
        model: FlatModel,
        start: torch.Tensor,
        data: NodeData,
        state: NodeState | None,
        ctx: ClientContext,
        loss_fn: Any,
    ) -> ClientResult:
        tally, _ = self.vr_train(model, start, data, ctx, None, loss_fn)
        message, new_state = self.finish(model, start - model.flat, start, data, state, ctx)
        return ClientResult(message, new_state, tally.metrics(), len(data))


class ScaffoldMomentumVRClient(VarianceReduced, ScaffoldMomentumClient):
    """SCAFFOLD-M-VR's node (see the module): local steps on
    g_i(y) + (1 - beta) (g - g_i(x_prev)) + beta (c - c_i), at the step size ``lr``. Its new
    control variate is the mean of its fresh minibatch gradients over the local steps (option
    II; option I: the full local gradient at x, as SCAFFOLD's)."""

    def vr_result(
        self,
        model: FlatModel,
        start: torch.Tensor,
        data: NodeData,
        state: NodeState | None,
        ctx: ClientContext,
        loss_fn: Any,
    ) -> ClientResult:
        c, c_i = self.controls(start, state, ctx)
        tally, fresh_sum = self.vr_train(model, start, data, ctx, c - c_i, loss_fn)
        delta = start - model.flat
        steps = self.steps(len(data))
        new = self.full_control(model, start, data, state) if self.option == "I" else fresh_sum / steps
        message = {"update": delta, "control": new - c_i, "steps": steps_vector(steps, delta)}
        return ClientResult(message, {"c": new}, tally.metrics(), len(data))


def next_direction(
    strategy: FedAvg,
    eta: float,
    update: torch.Tensor,
    batch: UpdateBatch,
    weights: torch.Tensor,
    state: dict[str, Any],
    info: RoundInfo,
) -> tuple[torch.Tensor, dict[str, Any], dict[str, float]]:
    """The server's next direction g = D / (eta K) from the aggregated update D and the senders'
    mean step count K (the ``steps`` vector through the strategy's aggregation, with the update's
    weights): (g, the steps aggregator's state, metrics). A mean step count that is not positive
    and finite (only forged rows can make one) keeps the previous g."""
    tau, steps_state = strategy.aggregate(
        batch.vector("steps"),
        weights,
        state["steps_aggregator"],
        torch_rng(info.seed, "preagg", info.round, "steps"),
    )
    k = float(tau[0])
    g = update / (eta * k) if k > 0 and math.isfinite(k) else state["g"]
    return g, steps_state, {"momentum/g_norm": float(g.norm()), "momentum/steps": k}


def uses_prev(client: Any) -> bool:
    """Whether the nodes' steps need the previous round's model (the variance-reduced forms)."""
    return bool(getattr(client, "vr", False))


def momentum_broadcast(state: dict[str, Any]) -> dict[str, Any]:
    """g, and x_prev once there is one (the variance-reduced forms keep it; size 0 at first)."""
    prev = state.get("x_prev")
    return {"g": state["g"], **({"x_prev": prev} if prev is not None and prev.numel() else {})}


def momentum_state(params: torch.Tensor, vr: bool) -> dict[str, Any]:
    return {"g": torch.zeros_like(params), **({"x_prev": params.new_zeros(0)} if vr else {})}


class FedAvgMomentum(FedAvg):
    """``strategy=fedavg_m``: FedAvg (any aggregator, pre-aggregators and server optimiser) with
    `MomentumClient` nodes and the server direction g (see the module). Weighted by examples by
    default, as fedsim's FedAvg, so that beta = 1 is ``strategy=fedavg`` exactly;
    ``weighted=false`` gives the plain mean over the senders (1/|S|, the form we could not check)."""

    def __init__(self, *, client: MomentumClient, **kwargs: Any) -> None:
        if not isinstance(client, MomentumClient):
            raise ConfigError("strategy=fedavg_m trains with its own client (strategies.momentum.MomentumClient)")
        super().__init__(client=client, **kwargs)
        self.eta = client.eta
        self.vr = uses_prev(client)
        self.declare(message=(Vector("update"), Vector("steps", size=1, compress=False)), broadcast="vectors")

    def init(self, params: torch.Tensor, facts: RunFacts) -> dict[str, Any]:
        state = super().init(params, facts)
        return {**state, **momentum_state(params, self.vr), "steps_aggregator": self.aggregator.init()}

    def broadcast(self, state: dict[str, Any]) -> dict[str, Any]:
        return momentum_broadcast(state)

    @linear_step
    def step(
        self, params: torch.Tensor, batch: UpdateBatch, state: dict[str, Any], info: RoundInfo
    ) -> tuple[torch.Tensor, dict[str, Any], dict[str, float]]:
        weights = self.row_weights(batch, state, info)
        rng = torch_rng(info.seed, "preagg", info.round)
        update, agg_state = self.aggregate(batch.vector("update"), weights, state.get("aggregator", {}), rng)
        new_params, opt_state = self.server_opt.step(params, update, state["server_opt"])
        g, steps_state, extra = next_direction(self, self.eta, update, batch, weights, state, info)
        metrics = {"agg/direction_norm": float(update.norm()), **extra}
        new_state = {
            **state,
            "server_opt": opt_state,
            "aggregator": agg_state,
            "steps_aggregator": steps_state,
            "g": g,
            **({"x_prev": params} if self.vr else {}),
        }
        return new_params, new_state, metrics


class ScaffoldMomentum(Scaffold):
    """``strategy=scaffold_m``: SCAFFOLD (control variates, the dense control vector, the
    unweighted mean) with `ScaffoldMomentumClient` nodes and the server direction g, formed from
    the aggregated update as in FedAvg-M. beta = 1 is ``strategy=scaffold`` exactly."""

    def __init__(self, *, client: ScaffoldMomentumClient, **kwargs: Any) -> None:
        if not isinstance(client, ScaffoldMomentumClient):
            raise ConfigError(
                "strategy=scaffold_m trains with its own client (strategies.momentum.ScaffoldMomentumClient)"
            )
        super().__init__(client=client, **kwargs)
        self.eta = client.eta
        self.vr = uses_prev(client)
        control = self.capabilities.message[1]
        self.declare(message=(Vector("update"), control, Vector("steps", size=1, compress=False)))

    def init(self, params: torch.Tensor, facts: RunFacts) -> dict[str, Any]:
        state = super().init(params, facts)
        return {**state, **momentum_state(params, self.vr), "steps_aggregator": self.aggregator.init()}

    def broadcast(self, state: dict[str, Any]) -> dict[str, Any]:
        return {"c": state["c"], **momentum_broadcast(state)}

    @linear_step
    def step(
        self, params: torch.Tensor, batch: UpdateBatch, state: dict[str, Any], info: RoundInfo
    ) -> tuple[torch.Tensor, dict[str, Any], dict[str, float]]:
        new_params, new_state, metrics, update, weights = self.scaffold_step(params, batch, state, info)
        g, steps_state, extra = next_direction(self, self.eta, update, batch, weights, state, info)
        prev = {"x_prev": params} if self.vr else {}
        return new_params, {**new_state, "steps_aggregator": steps_state, "g": g, **prev}, {**metrics, **extra}
