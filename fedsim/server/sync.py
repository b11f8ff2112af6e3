"""The synchronous server: each round, sample the round's nodes, broadcast the model (and the
strategy's broadcast), run the honest ones, hand the round to the pipeline, evaluate every k
rounds."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from fedsim.contract import RunFacts, Server, Strategy
from fedsim.errors import ConfigError
from fedsim.execution.worker import NodeTask
from fedsim.seeding import np_rng
from fedsim.server.pipeline import Pipeline, add_totals, broadcast_bytes, merge_node_states
from fedsim.state import RunState
from fedsim.types import RoundInfo


@dataclass
class SyncServer(Server):
    rounds: int
    nodes_per_round: int
    num_nodes: int
    seed: int
    eval_every: int = 1

    kind = "sync"

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ConfigError(f"rounds={self.rounds} must be >= 1")
        if self.eval_every < 0:
            raise ConfigError(f"eval_every={self.eval_every} must be >= 0 (0: evaluate only at the end)")

    def initial(self, params: torch.Tensor, strategy: Strategy, facts: RunFacts) -> RunState:
        return RunState(0, 0, params, strategy.init(params, facts))

    def rows_per_step(self, strategy: Strategy, facts: RunFacts, nodes_per_round: int) -> int:
        return int(nodes_per_round)

    def is_eval_round(self, t: int, total: int) -> bool:
        return t == total - 1 or (self.eval_every > 0 and (t + 1) % self.eval_every == 0)

    def run(self, state: RunState, pipeline: Pipeline) -> tuple[RunState, dict[str, Any]]:
        strategy, byzantine = pipeline.strategy, pipeline.byzantine
        last_eval: dict[str, object] = {}
        total = self.total_rounds(strategy)
        d = int(state.params.numel())
        pipeline.begin(state)
        while state.round < total:
            t = state.round
            t0 = time.perf_counter()
            ids = pipeline.participation(t, self.num_nodes, self.nodes_per_round, np_rng(self.seed, "sample", t))
            ids = [int(i) for i in ids]
            faulty = [i for i in ids if i in byzantine.ids]
            tasks = [NodeTask(i, state.node_states.get(i)) for i in ids if byzantine.trains(i)]
            broadcast = pipeline.broadcast(state.strategy_state)
            result = pipeline.train(state.params, t, tasks, broadcast, dim=d)
            train_s = time.perf_counter() - t0
            info = RoundInfo(t, state.version, self.seed, self.num_nodes, tuple(ids), byzantine.declared)
            stepped = pipeline.step(state, result, info, faulty=faulty)
            assert stepped is not None
            state, metrics = stepped
            down = len(tasks) * (d * state.params.element_size() + broadcast_bytes(broadcast))
            totals = add_totals(state.totals, bytes_down=down)
            state = state.replace(node_states=merge_node_states(state.node_states, result), totals=totals)
            metrics.update(
                {
                    "train/participants": len(ids),
                    "comm/bytes_down": down,
                    "comm/bytes_down_total": totals["bytes_down"],
                    "time/train_s": train_s,
                }
            )
            if self.is_eval_round(t, total):
                t1 = time.perf_counter()
                last_eval = pipeline.evaluate(state.params)
                metrics.update(last_eval)
                metrics["time/eval_s"] = time.perf_counter() - t1
            pipeline.end_round(state, t, metrics, t0=t0)
        summary = pipeline.summary(
            state,
            last_eval,
            **{
                "comm/bytes_up_total": state.totals.get("bytes_up", 0),
                "comm/bytes_down_total": state.totals.get("bytes_down", 0),
            },
        )
        return state, summary
