"""MoNNA (Farhadkhani, Guerraoui, Gupta, Hoang, Pinot & Stephan, "Robust Collaborative Learning
with Linear Gradient Overhead", ICML 2023): decentralised D-SGD in which every honest node keeps
its own model, takes a local Polyak-momentum step, and replaces its model by the nearest-neighbour
average (NNA) of the models it receives. Run it with ``strategy=monna server=p2p`` (the loop is
fedsim.server.p2p.P2PServer; method notes: docs/methods/robust_aggregation.md).

The step of member node j at step t (checked against the authors' ``peerToPeer.py`` and
``aggregators/cva.py``):

1. g = minibatch gradient at its own model x_j; m_j <- beta m_j + (1 - beta) g (beta = 0.99);
2. x_j' = x_j - lr_t m_j (the ``WorkerMomentum`` client with ``lr`` set);
3. it receives its own x_j', n - 2f - 1 other members' models drawn at random (fresh each step,
   from the stream (seed, "gossip", step, j)) and all f Byzantine vectors (crafted in parameter
   space from the honest x');
4. NNA: keep the n - 2f received vectors closest to x_j' (its own included) and average them.

Any other rule (trimmed mean, geometric median, mean) can replace NNA at step 4 for the
comparisons of the paper; ``beta = 0`` is its momentum-free ablation.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fedsim.contract import Capabilities, ClientUpdate, Defence, PeerDefence, RunFacts, Strategy
from fedsim.errors import ConfigError
from fedsim.seeding import np_rng
from fedsim.types import RoundInfo, UpdateBatch
from strategies.aggregators import NNA, as_rule
from strategies.client import WorkerMomentum


class MoNNA(Strategy):
    """The peer-to-peer strategy: a client update (``WorkerMomentum`` with a local ``lr``) and a
    per-node mixing rule (``NNA`` for MoNNA, or any aggregator). Its step does the exchange:
    ``mix`` is called once per member with the vectors it received, its own first. The rows it
    gets are the members' models after their local step (rows=model) and the Byzantine vectors."""

    capabilities = Capabilities(servers=frozenset({"p2p"}), needs_all_nodes=True, rows="model")
    attack_defaults = {"search": "monna", "objective": "all_honest", "delta": 1.0, "budget": 16}
    """The authors' attack (``attacks/identical.py`` and ``tools.line_maximize`` of their code)."""

    def __init__(self, *, client: ClientUpdate, aggregator: Any, f: int = 0) -> None:
        if isinstance(client, WorkerMomentum) and client.step_lr is None:
            raise ConfigError("strategy=monna needs a local step size: set strategy.client.lr (e.g. 0.75)")
        self.client = client
        self.aggregator = as_rule(aggregator)
        self.f = int(f)

    def check(self, rows: int) -> None:
        self.aggregator.check(rows)

    @staticmethod
    def others(num_nodes: int, declared_f: int, members: int) -> int:
        """How many other members' vectors each member receives: n - 2f - 1, capped to [0, h - 1]."""
        return int(min(max(num_nodes - 2 * declared_f - 1, 0), members - 1))

    def rows_per_step(self, facts: RunFacts) -> int:
        byzantine = len(facts.byzantine_ids) if facts.attack == "update" else 0
        return 1 + self.others(facts.num_nodes, facts.declared_f, len(facts.members)) + byzantine

    def init(self, params: torch.Tensor, facts: RunFacts) -> dict[str, Any]:
        return {"mix": {i: self.aggregator.init() for i in facts.members}}

    def mix(self, received: torch.Tensor, state: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        """The node's new model from ``received`` (row 0 is its own vector) and its mixing state."""
        if isinstance(self.aggregator, NNA):
            return self.aggregator.around(received, 0), state
        w = torch.ones(received.shape[0], dtype=torch.float64, device=received.device)
        return self.aggregator.aggregate(received, w, state)

    def defence(self, state: dict[str, Any], info: RoundInfo) -> Defence:
        """The mixing as the attacker models it: every honest vector and every Byzantine one
        delivered (as in the authors' attack); with NNA, around each honest node's own vector
        (`PeerDefence`), else the rule's one output."""
        fresh = self.aggregator.init()
        if isinstance(self.aggregator, NNA):
            nna = self.aggregator
            return PeerDefence(at=lambda U, i: nna.around(U, i))
        return lambda U: self.mix(U, fresh)[0]

    def step(
        self, params: torch.Tensor, batch: UpdateBatch, state: dict[str, Any], info: RoundInfo
    ) -> tuple[torch.Tensor, dict[str, Any], dict[str, Any]]:
        mix_states = dict(state["mix"])
        members = list(mix_states)
        order = torch.argsort(batch.node_ids)
        ids, rows = batch.node_ids[order], batch.messages.index_select(0, order.to(batch.messages.device))
        is_member = torch.from_numpy(np.isin(ids.cpu().numpy(), members)).to(rows.device)
        models, byzantine = rows[is_member], rows[~is_member]
        h = len(members)
        k = self.others(info.num_nodes, info.declared_f, h)
        new = torch.empty_like(params)
        for r, i in enumerate(members):
            pool = np.delete(np.arange(h), r)
            picks = np.sort(np_rng(info.seed, "gossip", info.round, i).choice(pool, size=k, replace=False))
            received = torch.cat([models[r : r + 1], models[torch.from_numpy(picks).to(models.device)], byzantine])
            new[r], mix_states[i] = self.mix(received, mix_states[i])
        metrics = {
            "agg/honest_spread": float(torch.linalg.vector_norm(new - new.mean(dim=0), dim=1).max()),
            "p2p/vectors_sent": h * (1 + k) + h * int(byzantine.shape[0]),
        }
        return new, {**state, "mix": mix_states}, metrics
