"""The peer-to-peer loop (MoNNA's setting, shared/specs/robust_aggregation.md section 1b).

Every honest node keeps its own model: the server only simulates the network. It holds the
(h, d) matrix of honest models (row r is honest node ``honest_ids[r]``) and each step:

1. sends every honest node its own row; the node takes its local step (any client update whose
   message is ``start - new``, e.g. ``WorkerMomentum`` with ``lr`` set) and persists its state;
2. the update attack crafts the f Byzantine vectors from the honest post-step models (parameter
   space), with the stream (seed, "attack", step);
3. each honest node j receives its own vector, n - 2f - 1 other honest vectors drawn uniformly
   from the stream (seed, "gossip", step, j) (f = byzantine.declared; capped by the honest nodes
   there are) and every Byzantine vector, and the strategy's rule mixes them into its new model.

Evaluation reports honest node 0 (the first honest id) as ``eval/*``, as the MoNNA code does, and
every ``eval_all_every`` steps (and at the end) the accuracy of every honest model:
``eval/honest_acc_mean``, ``_min`` and ``_max``. Participation is full: every node acts each step.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedsim.errors import ConfigError, FedsimError
from fedsim.execution.worker import NodeTask
from fedsim.faults.byzantine import Byzantine
from fedsim.logging import Callback
from fedsim.seeding import np_rng, torch_rng
from fedsim.server.state import ServerState
from fedsim.server.sync import (
    _weighted_node_metrics,
    end_round,
    merge_node_states,
    run_summary,
    to_batch,
)
from fedsim.types import RoundInfo


@dataclass
class P2PServer:
    rounds: int
    num_nodes: int
    seed: int
    eval_every: int = 1
    eval_all_every: int = 0

    peer_to_peer = True

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ConfigError(f"rounds={self.rounds} must be >= 1")
        if self.eval_every < 0 or self.eval_all_every < 0:
            raise ConfigError("server.eval_every and server.eval_all_every must be >= 0")

    def honest_ids(self, byzantine: Byzantine) -> list[int]:
        return [i for i in range(self.num_nodes) if i not in byzantine.ids]

    def others(self, byzantine: Byzantine, h: int) -> int:
        """How many other honest vectors each honest node receives: n - 2f - 1, capped to [0, h-1]."""
        return int(min(max(self.num_nodes - 2 * byzantine.declared - 1, 0), h - 1))

    def received(self, byzantine: Byzantine) -> int:
        h = self.num_nodes - byzantine.num
        return 1 + self.others(byzantine, h) + (byzantine.num if byzantine.is_update_attack else 0)

    def initial(self, params: torch.Tensor, byzantine: Byzantine, strategy: Any) -> ServerState:
        """Every honest node starts from the same model; mixing states start fresh per node."""
        ids = self.honest_ids(byzantine)
        if not ids:
            raise ConfigError("every node is Byzantine; lower byzantine.num")
        state = {"mix": {i: strategy.node_init() for i in ids}}
        return ServerState(0, 0, params.unsqueeze(0).repeat(len(ids), 1), state)

    def is_eval_round(self, t: int, every: int) -> bool:
        return t == self.rounds - 1 or (every > 0 and (t + 1) % every == 0)

    def run(
        self,
        state: ServerState,
        *,
        strategy: Any,
        executor: Any,
        participation: Any,
        evaluator: Callable[[torch.Tensor], dict[str, object]] | None,
        callbacks: Sequence[Callback] = (),
        byzantine: Byzantine | None = None,
        sizes: np.ndarray | None = None,
    ) -> tuple[ServerState, dict[str, object]]:
        byzantine = byzantine if byzantine is not None else Byzantine()
        if byzantine.is_data_attack:
            raise ConfigError("server=p2p takes update attacks (crafted models); run label_flip with server=sync")
        ids = self.honest_ids(byzantine)
        byz = sorted(byzantine.ids) if byzantine.is_update_attack else []
        h = len(ids)
        k_others = self.others(byzantine, h)
        start = time.perf_counter()
        last_eval: dict[str, object] = {}
        while state.round < self.rounds:
            t = state.round
            t0 = time.perf_counter()
            X = state.params
            tasks = [NodeTask(i, state.node_states.get(i), X[r]) for r, i in enumerate(ids)]
            result = executor.run_round(None, t, tasks)
            train_s = time.perf_counter() - t0
            half = X - result.messages  # rows follow ids (results are sorted by node id)
            info = RoundInfo(t, state.version, self.seed, self.num_nodes, tuple(ids), byzantine.declared)
            attack_state = state.attack_state
            metrics: dict[str, object] = {"round": t}
            if byz:

                def defence(U: torch.Tensor) -> torch.Tensor:
                    # The attacker's objective: honest node 0's rule with every message delivered.
                    return strategy.mix(U, strategy.node_init())[0]

                rows, attack_state = byzantine.attack(
                    half, len(byz), info=info, rng=torch_rng(self.seed, "attack", t), state=attack_state, defence=defence
                )
                rows = rows.to(half.dtype)
                if "tau" in attack_state:
                    metrics["attack/tau"] = float(attack_state["tau"])
            else:
                rows = half.new_zeros((0, half.shape[1]))
            t1 = time.perf_counter()
            mix_states = dict(state.strategy_state["mix"])
            new = torch.empty_like(X)
            for r, i in enumerate(ids):
                pool = np.delete(np.arange(h), r)
                picks = np.sort(np_rng(self.seed, "gossip", t, i).choice(pool, size=k_others, replace=False))
                received = torch.cat([half[r : r + 1], half[torch.from_numpy(picks)], rows])
                new[r], mix_states[i] = strategy.mix(received, mix_states[i])
            if not torch.isfinite(new).all():
                bad = [ids[r] for r in range(h) if not torch.isfinite(new[r]).all()]
                raise FedsimError(f"honest models became NaN or Inf in step {t} (nodes {bad[:5]}); lower the learning rate")
            node_states = merge_node_states(state.node_states, result)
            totals = dict(state.totals)
            d = int(X.shape[1])
            sent = h * (1 + k_others) + len(ids) * len(byz)
            totals["bytes_p2p"] = totals.get("bytes_p2p", 0) + sent * d * X.element_size()
            samples = sum(strategy.client.work(n) for n in result.num_examples)
            totals["samples"] = totals.get("samples", 0) + samples
            state = ServerState(
                t + 1, state.version + 1, new, {**state.strategy_state, "mix": mix_states}, node_states, totals, attack_state
            )
            batch = to_batch(result, version=t)
            metrics.update(
                {
                    **_weighted_node_metrics(batch),
                    "train/samples": samples,
                    "comm/bytes_p2p_total": totals["bytes_p2p"],
                    "agg/honest_spread": float(torch.linalg.vector_norm(new - new.mean(dim=0), dim=1).max()),
                    "time/train_s": train_s,
                    "time/mix_s": time.perf_counter() - t1,
                }
            )
            if evaluator is not None and self.is_eval_round(t, self.eval_every):
                t2 = time.perf_counter()
                last_eval = evaluator(new[0])
                metrics.update(last_eval)
                if self.is_eval_round(t, self.eval_all_every):
                    accs = [float(evaluator(new[r])["eval/acc"]) for r in range(h)]
                    extra = {
                        "eval/honest_acc_mean": float(np.mean(accs)),
                        "eval/honest_acc_min": float(np.min(accs)),
                        "eval/honest_acc_max": float(np.max(accs)),
                    }
                    metrics.update(extra)
                    last_eval = {**last_eval, **extra}
                metrics["time/eval_s"] = time.perf_counter() - t2
            end_round(t, metrics, t0=t0, start=start, callbacks=callbacks)
        return state, run_summary(state, last_eval, start, **{"comm/bytes_p2p_total": state.totals.get("bytes_p2p", 0)})
