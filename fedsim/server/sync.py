"""The synchronous server loop: sample -> broadcast -> run nodes -> gather -> strategy step ->
evaluate every k rounds -> callbacks. (Attacks and compression plug in between gather and step.)"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedsim.errors import ConfigError, FedsimError
from fedsim.execution.worker import NodeTask, RoundResult
from fedsim.logging import Callback
from fedsim.seeding import np_rng
from fedsim.server.state import ServerState
from fedsim.types import RoundInfo, UpdateBatch


def to_batch(result: RoundResult, *, version: int) -> UpdateBatch:
    """The struct-of-arrays view of a round's node results (rows already sorted by node id)."""
    k, d = result.messages.shape
    keys = sorted({key for m in result.metrics for key in m})
    return UpdateBatch(
        node_ids=torch.tensor(result.node_ids, dtype=torch.int64),
        messages=result.messages,
        num_examples=torch.tensor(result.num_examples, dtype=torch.int64),
        base_version=torch.full((k,), version, dtype=torch.int64),
        bytes_up=torch.full((k,), d * result.messages.element_size(), dtype=torch.int64),
        metrics={key: torch.tensor([m.get(key, float("nan")) for m in result.metrics], dtype=torch.float64) for key in keys},
    )


def _weighted_node_metrics(batch: UpdateBatch) -> dict[str, float]:
    w = batch.num_examples.to(torch.float64)
    out = {}
    for key, values in batch.metrics.items():
        ok = torch.isfinite(values) & (w > 0)
        if ok.any():
            out[key] = float((values[ok] * w[ok]).sum() / w[ok].sum())
    return out


@dataclass
class SyncServer:
    rounds: int
    nodes_per_round: int
    num_nodes: int
    seed: int
    eval_every: int = 1

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ConfigError(f"rounds={self.rounds} must be >= 1")
        if self.eval_every < 0:
            raise ConfigError(f"eval_every={self.eval_every} must be >= 0 (0: evaluate only at the end)")

    def is_eval_round(self, t: int) -> bool:
        return t == self.rounds - 1 or (self.eval_every > 0 and (t + 1) % self.eval_every == 0)

    def run(
        self,
        state: ServerState,
        *,
        strategy: Any,
        executor: Any,
        participation: Callable[..., np.ndarray],
        evaluator: Callable[[torch.Tensor], dict[str, object]] | None,
        callbacks: Sequence[Callback] = (),
    ) -> tuple[ServerState, dict[str, object]]:
        start = time.perf_counter()
        last_eval: dict[str, object] = {}
        while state.round < self.rounds:
            t = state.round
            t0 = time.perf_counter()
            ids = participation(t, self.num_nodes, self.nodes_per_round, np_rng(self.seed, "sample", t))
            tasks = [NodeTask(int(i), state.node_states.get(int(i))) for i in ids]
            result = executor.run_round(state.params, t, tasks)
            train_s = time.perf_counter() - t0
            batch = to_batch(result, version=state.version)
            info = RoundInfo(t, state.version, self.seed, self.num_nodes, tuple(int(i) for i in ids))
            params, strategy_state, agg = strategy.step(state.params, batch, state.strategy_state, info)
            if not torch.isfinite(params).all():
                raise FedsimError(f"server parameters became NaN or Inf in round {t}; lower the learning rates")
            node_states = dict(state.node_states)
            for nid, s in zip(result.node_ids, result.states):
                if s is not None:
                    node_states[nid] = s
            d = int(params.numel())
            totals = dict(state.totals)
            up = int(batch.bytes_up.sum())
            down = len(tasks) * d * params.element_size()
            totals["bytes_up"] = totals.get("bytes_up", 0) + up
            totals["bytes_down"] = totals.get("bytes_down", 0) + down
            samples = sum(strategy.client.work(n) for n in result.num_examples)
            totals["samples"] = totals.get("samples", 0) + samples
            state = ServerState(t + 1, state.version + 1, params, strategy_state, node_states, totals)
            metrics: dict[str, object] = {
                "round": t,
                **_weighted_node_metrics(batch),
                **agg,
                "train/samples": samples,
                "comm/bytes_up": up,
                "comm/bytes_down": down,
                "comm/bytes_up_total": totals["bytes_up"],
                "comm/bytes_down_total": totals["bytes_down"],
                "time/train_s": train_s,
            }
            if evaluator is not None and self.is_eval_round(t):
                t1 = time.perf_counter()
                last_eval = evaluator(params)
                metrics.update(last_eval)
                metrics["time/eval_s"] = time.perf_counter() - t1
            metrics["time/round_s"] = time.perf_counter() - t0
            metrics["time/elapsed_s"] = time.perf_counter() - start
            for cb in callbacks:
                cb.on_round_end(t, metrics)
        summary = {
            "rounds": state.round,
            **{k: v for k, v in last_eval.items() if not isinstance(v, list)},
            "comm/bytes_up_total": state.totals.get("bytes_up", 0),
            "comm/bytes_down_total": state.totals.get("bytes_down", 0),
            "time/elapsed_s": time.perf_counter() - start,
        }
        return state, summary
