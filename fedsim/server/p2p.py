"""The peer-to-peer loop (MoNNA's setting; docs/methods/robust_aggregation.md, "Peer to peer").

Every member node (every node but the Byzantine senders of an update attack) keeps its own
model: the state's parameters are the (members, d) matrix, row r belonging to ``members[r]``.
Each step:

1. every member gets its own row and takes its local step (any client update whose message is
   ``start - new``, e.g. ``WorkerMomentum`` with ``lr`` set), persisting its state;
2. the shared pipeline turns the messages into the members' post-step models (rows=model), the
   update attack crafts the f Byzantine vectors from the honest ones (parameter space) with the
   stream (seed, "attack", step), and the strategy's step does the exchange: each member receives
   vectors and mixes them into its new model (MoNNA: its own, n - 2f - 1 random other members',
   every Byzantine one; see strategies/monna.py).

Evaluation reports honest member 0 (the first member that is not faulty) as ``eval/*``, as the
MoNNA code does, and every ``eval_all_every`` steps (and at the end) the accuracy of every honest
member's model: ``eval/honest_acc_mean``, ``_min`` and ``_max``. Every node acts in every step
(strategies declare ``needs_all_nodes``).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedsim.contract import RunFacts, Server, Strategy
from fedsim.errors import ConfigError
from fedsim.execution.worker import NodeTask
from fedsim.server.pipeline import Pipeline, add_totals, merge_node_states
from fedsim.state import RunState
from fedsim.types import RoundInfo


def _same(models: torch.Tensor, batch: object) -> torch.Tensor:
    """Every member's row of the batch started from its own row of ``models``."""
    return models


@dataclass
class P2PServer(Server):
    rounds: int
    num_nodes: int
    seed: int
    eval_every: int = 1
    eval_all_every: int = 0

    kind = "p2p"

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ConfigError(f"rounds={self.rounds} must be >= 1")
        if self.eval_every < 0 or self.eval_all_every < 0:
            raise ConfigError("server.eval_every and server.eval_all_every must be >= 0")

    def initial(self, params: torch.Tensor, strategy: Strategy, facts: RunFacts) -> RunState:
        """Every member starts from the same model."""
        if not facts.members:
            raise ConfigError("every node is Byzantine; lower byzantine.num")
        X = params.unsqueeze(0).repeat(len(facts.members), 1)
        return RunState(0, 0, X, strategy.init(X, facts))

    def rows_per_step(self, strategy: Strategy, facts: RunFacts, nodes_per_round: int) -> int:
        rows = strategy.rows_per_step(facts)
        return len(facts.members) if rows is None else int(rows)

    def is_eval_round(self, t: int, every: int) -> bool:
        return t == self.rounds - 1 or (every > 0 and (t + 1) % every == 0)

    def run(self, state: RunState, pipeline: Pipeline) -> tuple[RunState, dict[str, Any]]:
        byzantine, facts = pipeline.byzantine, pipeline.facts
        members = list(facts.members)
        honest = [r for r, i in enumerate(members) if i not in byzantine.ids] or [0]
        faulty = sorted(byzantine.ids) if byzantine.is_update_attack else []
        last_eval: dict[str, object] = {}
        pipeline.begin(state)
        while state.round < self.rounds:
            t = state.round
            t0 = time.perf_counter()
            X = state.params
            tasks = [NodeTask(i, state.node_states.get(i), X[r]) for r, i in enumerate(members)]
            result = pipeline.train(None, t, tasks, dim=int(X.shape[1]))
            train_s = time.perf_counter() - t0
            info = RoundInfo(t, state.version, self.seed, self.num_nodes, tuple(members), byzantine.declared)
            stepped = pipeline.step(state, result, info, faulty=faulty, starts=functools.partial(_same, X))
            assert stepped is not None
            state, metrics = stepped
            sent = int(metrics.pop("p2p/vectors_sent", 0))
            totals = add_totals(state.totals, bytes_p2p=sent * int(X.shape[1]) * X.element_size())
            state = state.replace(node_states=merge_node_states(state.node_states, result), totals=totals)
            new = state.params
            metrics.update({"comm/bytes_p2p_total": totals["bytes_p2p"], "time/train_s": train_s})
            if self.is_eval_round(t, self.eval_every):
                t2 = time.perf_counter()
                last_eval = pipeline.evaluate(new[honest[0]])
                metrics.update(last_eval)
                if self.is_eval_round(t, self.eval_all_every):
                    accs = [float(pipeline.evaluate(new[r])["eval/acc"]) for r in honest]  # type: ignore[arg-type]
                    extra = {
                        "eval/honest_acc_mean": float(np.mean(accs)),
                        "eval/honest_acc_min": float(np.min(accs)),
                        "eval/honest_acc_max": float(np.max(accs)),
                    }
                    metrics.update(extra)
                    last_eval = {**last_eval, **extra}
                metrics["time/eval_s"] = time.perf_counter() - t2
            pipeline.end_round(state, t, metrics, t0=t0)
        return state, pipeline.summary(state, last_eval, **{"comm/bytes_p2p_total": state.totals.get("bytes_p2p", 0)})
