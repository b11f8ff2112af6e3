"""FedAMD: anchor sampling for partial participation (F. Wu, S. Guo, Z. Qu, S. He, Z. Liu, J. Gao,
"Anchor Sampling for Federated Learning with Partial Client Participation", ICML 2023, arXiv
2206.05891; the rules below were read from the authors' code, github.com/HarliWu/FedAMD,
``algo/fedamd.py`` and the FedAMD branch of ``main_fmnist.py``; docs/methods/fedamd.md).

Each round's participants split into **anchors** and **miners**. The split is drawn per node from
the stream (seed, "anchor", round, node): node i is an anchor with probability ``anchor_prob``
(the paper's constant probability), or, with ``anchor_period`` r set (the sequential setting),
every participant of the rounds t with t mod r = 0 is an anchor and nobody else. A node that has
never sent a bullseye is an anchor whatever the draw (the authors compute every node's bullseye
before the first round; here a node computes its first one the first time it takes part).

- An **anchor** computes its "bullseye" g_i = grad F_i(x) at the model it received, on its whole
  local data (``anchor_batch`` null, the code's default) or on ``anchor_batch`` examples drawn from
  its stream, and sends it (vector ``bullseye``).
- A **miner** starts from x_0 = x and v_0 = v, the mean of the latest bullseyes of all nodes
  (the broadcast), and takes K = ``client.steps`` steps of the SARAH/PAGE recursion

      v_k = v_{k-1} + grad f_i(x_k; xi_k) - grad f_i(x_{k-1}; xi_k)   (k >= 1; v_0 as received)
      x_{k+1} = x_k - lr v_k,

  with both gradients of step k on the same minibatch xi_k; it sends x_0 - x_K (vector ``update``).
- The **server** steps x <- x - lr_g * mean over miners of their updates (``server_opt``, SGD with
  lr_g = 1 by default; any aggregator applies to the miners' rows), and keeps every node's latest
  bullseye with their running sum, so that v = sum / (nodes holding one) costs O(anchors d) per
  round. A round without miners leaves the model where it is (the code skips the step too).

In fedsim terms: the message declares two model-sized vectors, ``update`` and ``bullseye``; each
node fills the one of its role and sends zeros in the other (the row bytes count one vector when
the uplink is uncompressed: only the filled one carries anything). The server recomputes every
row's role from the same seeded draw, so the split depends on (seed, round, node) only, never on
the executor or on who else takes part. v travels in the broadcast (``broadcast="vectors"``); the
node state holds one flag (whether the node has sent a bullseye). The recursion takes two
gradients per step, at x_k and at x_{k-1} on the same minibatch, which the vectorised cohort loop
of `strategies.client.LocalSGD` does not compute: the client trains one node at a time
(``not_vectorized``). FedAMD runs on ``server=sync`` only: a bullseye is the gradient at the
round's global model and v the mean at the round's start, which stale asynchronous jobs do not
have.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedsim.contract import RunFacts, Vector
from fedsim.errors import ConfigError
from fedsim.params import FlatModel
from fedsim.seeding import np_rng, torch_rng
from fedsim.state import PersistentMap
from fedsim.types import ClientContext, ClientResult, NodeData, NodeState, RoundInfo, UpdateBatch
from strategies.client import LocalSGD, Tally
from strategies.fedavg import FedAvg


@dataclass(frozen=True)
class AnchorSchedule:
    """Who is an anchor: a pure function of (seed, round, node) and whether the node already holds
    a bullseye (the same answer at the node and at the server)."""

    prob: float = 0.2
    period: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 <= self.prob <= 1.0:
            raise ConfigError(f"strategy.anchor_prob={self.prob} must be in [0, 1]")
        if self.period is not None and int(self.period) < 1:
            raise ConfigError(f"strategy.anchor_period={self.period} must be >= 1 (or null: anchor_prob)")

    def drawn(self, seed: int, round_: int, node: int) -> bool:
        """The round's draw for this node (before the first-bullseye rule)."""
        if self.period is not None:
            return round_ % int(self.period) == 0
        if self.prob >= 1.0:
            return True
        if self.prob <= 0.0:
            return False
        return bool(np_rng(seed, "anchor", round_, node).random() < self.prob)

    def is_anchor(self, seed: int, round_: int, node: int, has_bullseye: bool) -> bool:
        return (not has_bullseye) or self.drawn(seed, round_, node)


class FedAMDClient(LocalSGD):
    """A FedAMD node: an anchor sends its bullseye, a miner its update after K steps of the
    SARAH recursion from the broadcast v (see the module). ``steps`` is K, ``batch_size`` the
    miners' minibatch, ``anchor_batch`` the anchors' large batch (null: all local data). Weight
    decay, if any, is added to every gradient (the bullseye's too); momentum is not part of the
    method. The anchor schedule is set by the strategy (`FedAMD`)."""

    def __init__(
        self,
        *,
        lr: float = 0.01,
        steps: int = 10,
        batch_size: int = 64,
        anchor_batch: int | None = None,
        weight_decay: float = 0.0,
        objective: str = "cross_entropy",
        momentum: float = 0.0,
    ) -> None:
        if momentum:
            raise ConfigError(
                f"strategy.client.momentum={momentum}: FedAMD's miners run the SARAH recursion, no momentum"
            )
        if steps is None:
            raise ConfigError("strategy.client.steps must be set for FedAMD (K, the miners' local steps)")
        if anchor_batch is not None and int(anchor_batch) < 1:
            raise ConfigError(f"strategy.client.anchor_batch={anchor_batch} must be >= 1 (or null: all local data)")
        super().__init__(lr=lr, steps=steps, batch_size=batch_size, weight_decay=weight_decay, objective=objective)
        self.anchor_batch = None if anchor_batch is None else int(anchor_batch)
        self.schedule = AnchorSchedule()

    @property
    def not_vectorized(self) -> str:
        return (
            "FedAMD's miners take two gradients per step (at x_k and x_(k-1) on the same minibatch), "
            "which the cohort loop does not compute"
        )

    def work(self, num_examples: int) -> int:
        if num_examples == 0:
            return 0
        anchor = num_examples if self.anchor_batch is None else min(self.anchor_batch, num_examples)
        miner = (2 * max(int(self.local_steps or 1) - 1, 0) + 1) * min(self.batch_size, num_examples)
        return max(anchor, miner)

    def gradient(
        self,
        model: FlatModel,
        at: torch.Tensor,
        xb: torch.Tensor,
        yb: torch.Tensor,
        state: NodeState | None,
        decay: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gradient of the mean loss on (xb, yb) at ``at``, plus weight decay when ``decay``,
        loss, logits); ``model`` is left loaded with ``at``."""
        model.load(at)
        model.flat_grad.zero_()
        logits = model.module(xb)
        loss = self.loss(logits, yb, state)
        loss.backward()
        g = model.flat_grad.clone()
        if decay and self.weight_decay:
            g.add_(at, alpha=self.weight_decay)
        return g, loss.detach(), logits.detach()

    def bullseye(
        self, model: FlatModel, start: torch.Tensor, data: NodeData, state: NodeState | None, ctx: ClientContext
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The anchor's large-batch gradient at ``start``: the mean over all local data (in chunks
        of 1,024, each weighted by its share) or over ``anchor_batch`` examples of the node's
        stream (seed, "train", round, node)."""
        n = len(data)
        if self.anchor_batch is not None and self.anchor_batch < n:
            data = data.subset(torch.randperm(n, generator=ctx.generator())[: self.anchor_batch])
            n = len(data)
        out = torch.zeros_like(start)
        tally = Tally(start.device)
        for i in range(0, n, 1024):
            idx = torch.arange(i, min(n, i + 1024), device=start.device)
            xb, yb = data.take(idx)
            g, loss, logits = self.gradient(model, start, xb, yb, state, decay=False)
            out.add_(g, alpha=len(idx) / n)
            tally.add(loss, logits, yb)
        if self.weight_decay:  # once, not once per chunk
            out.add_(start, alpha=self.weight_decay)
        return out, tally.metrics()

    def mine(
        self,
        model: FlatModel,
        start: torch.Tensor,
        v0: torch.Tensor,
        data: NodeData,
        state: NodeState | None,
        ctx: ClientContext,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The miner's K steps of the recursion from (start, v0); returns (start - x_K, metrics).
        Step 0 moves along v0 itself (its minibatch only enters the logged loss)."""
        tally = Tally(start.device)
        x = start.clone()
        x_prev = start
        v = v0.to(device=start.device, dtype=start.dtype).clone()
        for k, idx in enumerate(self._batches(len(data), ctx.generator())):
            xb, yb = data.take(idx)
            if k == 0:
                model.load(x)
                with torch.no_grad():
                    logits = model.module(xb)
                    loss = self.loss(logits, yb, state)
            else:
                g_old, _, _ = self.gradient(model, x_prev, xb, yb, state)
                g_new, loss, logits = self.gradient(model, x, xb, yb, state)
                v.sub_(g_old).add_(g_new)  # v - grad f(x_{k-1}) + grad f(x_k), the code's order
            tally.add(loss, logits, yb)
            x_prev = x.clone()
            x.sub_(v, alpha=self.lr)
        return start - x, tally.metrics()

    def __call__(
        self, model: FlatModel, start: torch.Tensor, data: NodeData, state: NodeState | None, ctx: ClientContext
    ) -> ClientResult:
        held = bool(state and state.get("bullseye"))
        anchor = self.schedule.is_anchor(ctx.seed, ctx.round, ctx.node_id, held)
        zero = torch.zeros_like(start)
        nbytes = start.numel() * start.element_size()  # one vector carries the message, the other is empty
        n = len(data)
        if anchor:
            metrics: dict[str, float] = {}
            g = zero
            if n > 0:
                with torch.enable_grad():
                    g, metrics = self.bullseye(model, start, data, state, ctx)
            new_state = {**(state or {}), "bullseye": True}
            return ClientResult({"update": zero, "bullseye": g}, new_state, metrics, n, nbytes=nbytes)
        v0 = (ctx.broadcast or {}).get("v")
        if v0 is None:
            raise ValueError("a FedAMD miner needs the global direction v in the broadcast")
        if n == 0:
            return ClientResult({"update": zero, "bullseye": zero}, state, {}, 0, nbytes=nbytes)
        with torch.enable_grad():
            delta, metrics = self.mine(model, start, v0, data, state, ctx)
        return ClientResult({"update": delta, "bullseye": zero}, state, metrics, n, nbytes=nbytes)


class FedAMD(FedAvg):
    """``strategy=fedamd``: the server side (see the module). The miners' updates go through the
    strategy's aggregator (and pre-aggregators; plain unweighted mean by default, as in the
    authors' code) and the server optimiser; the bullseyes are kept per node (N d floats once
    every node has sent one, like MIFA's stored updates) and v is their plain mean."""

    def __init__(
        self,
        *,
        client: FedAMDClient,
        anchor_prob: float = 0.2,
        anchor_period: int | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(client, FedAMDClient):
            raise ConfigError("strategy=fedamd trains with its own client (strategies.fedamd.FedAMDClient)")
        kwargs.setdefault("weighted", False)
        super().__init__(client=client, **kwargs)
        self.schedule = AnchorSchedule(float(anchor_prob), None if anchor_period is None else int(anchor_period))
        client.schedule = self.schedule  # the nodes draw the same split as the server
        self.declare(
            servers=frozenset({"sync"}),
            message=(Vector("update"), Vector("bullseye")),
            broadcast="vectors",
            linear=False,  # the step reads the rows by role, not through their mean
        )

    def init(self, params: torch.Tensor, facts: RunFacts) -> dict[str, Any]:
        state = super().init(params, facts)
        state["bullseyes"] = PersistentMap()
        state["bullseye_sum"] = params.new_zeros(params.numel(), dtype=torch.float64)
        return state

    @staticmethod
    def direction(state: dict[str, Any]) -> torch.Tensor:
        """v: the mean of the latest bullseyes of the nodes that hold one (zeros before any)."""
        held = len(state["bullseyes"])
        total = state["bullseye_sum"]
        return (total / max(held, 1)).to(torch.float32)

    def broadcast(self, state: dict[str, Any]) -> dict[str, Any]:
        return {"v": self.direction(state)}

    def roles(self, batch: UpdateBatch, state: dict[str, Any], info: RoundInfo) -> np.ndarray:
        """Whether each row of the batch is an anchor's (the nodes' own draw, recomputed)."""
        store = state["bullseyes"]
        ids = batch.node_ids.tolist()
        if len(set(ids)) != len(ids):
            raise ValueError("FedAMD needs at most one message per node and round")
        return np.array([self.schedule.is_anchor(info.seed, info.round, i, i in store) for i in ids], dtype=bool)

    def step(
        self, params: torch.Tensor, batch: UpdateBatch, state: dict[str, Any], info: RoundInfo
    ) -> tuple[torch.Tensor, dict[str, Any], dict[str, float]]:
        anchors = self.roles(batch, state, info)
        dev = batch.messages.device
        anchor_rows = torch.from_numpy(np.flatnonzero(anchors)).to(dev)
        miner_rows = torch.from_numpy(np.flatnonzero(~anchors)).to(dev)
        metrics: dict[str, float] = {"fedamd/anchors": int(anchors.sum()), "fedamd/miners": int((~anchors).sum())}

        # the model: miners' updates only
        new_params, opt_state, agg_state = params, state["server_opt"], state.get("aggregator", {})
        mined = len(miner_rows) > 0
        if mined:
            try:
                self.check(len(miner_rows))
            except ConfigError:
                mined = False
                metrics["agg/skipped"] = 1
        if mined:
            U = batch.vector("update").index_select(0, miner_rows)
            weights = self.row_weights(batch, state, info).index_select(0, miner_rows.to(batch.num_examples.device))
            rng = torch_rng(info.seed, "preagg", info.round)
            direction, agg_state = self.aggregate(U, weights, agg_state, rng)
            new_params, opt_state = self.server_opt.step(params, direction, opt_state)
            metrics["agg/direction_norm"] = float(direction.norm())

        # the bullseyes: anchors replace theirs, the running sum follows (O(anchors d))
        store, total = PersistentMap.of(state["bullseyes"]), state["bullseye_sum"]
        if len(anchor_rows):
            B = batch.vector("bullseye").index_select(0, anchor_rows)
            nodes = batch.node_ids.index_select(0, anchor_rows.to(batch.node_ids.device)).tolist()
            old = torch.stack([store.get(i, torch.zeros_like(B[0])) for i in nodes])
            total = total + (B - old).to(torch.float64).sum(0)
            store = store.updated({i: B[r].clone() for r, i in enumerate(nodes)})
        new_state = {
            **state,
            "server_opt": opt_state,
            "aggregator": agg_state,
            "bullseyes": store,
            "bullseye_sum": total,
        }
        metrics["fedamd/bullseyes"] = len(store)
        metrics["fedamd/v_norm"] = float(self.direction(new_state).norm())
        return new_params, new_state, metrics
