"""The synchronous server loop: sample -> broadcast -> run honest nodes -> gather -> Byzantine
rows (attack) -> shuffle -> strategy step -> evaluate every k rounds -> callbacks."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedsim.errors import ConfigError, FedsimError
from fedsim.execution.worker import NodeTask, RoundResult
from fedsim.faults.byzantine import Byzantine, inject
from fedsim.logging import Callback
from fedsim.seeding import np_rng
from fedsim.server.state import ServerState
from fedsim.types import RoundInfo, UpdateBatch


def to_batch(result: RoundResult, *, version: int) -> UpdateBatch:
    """The struct-of-arrays view of a round's node results (rows already sorted by node id)."""
    k = len(result.node_ids)
    keys = sorted({key for m in result.metrics for key in m})
    return UpdateBatch(
        node_ids=torch.tensor(result.node_ids, dtype=torch.int64),
        messages=result.messages,
        num_examples=torch.tensor(result.num_examples, dtype=torch.int64),
        base_version=torch.full((k,), version, dtype=torch.int64),
        bytes_up=torch.tensor(result.row_bytes(), dtype=torch.int64).reshape(k),
        metrics={key: torch.tensor([m.get(key, float("nan")) for m in result.metrics], dtype=torch.float64) for key in keys},
    )


def broadcast_bytes(extra: dict[str, Any] | None) -> int:
    """Downlink bytes of a strategy's broadcast: 4 per number (float32), 1 per other entry."""
    if not extra:
        return 0
    total = 0
    for value in extra.values():
        if value is None:
            continue
        arr = np.asarray(value)
        total += 4 * arr.size if arr.dtype.kind in "biuf" else 1
    return total


def _weighted_node_metrics(batch: UpdateBatch) -> dict[str, float]:
    w = batch.num_examples.to(torch.float64)
    out = {}
    for key, values in batch.metrics.items():
        ok = torch.isfinite(values) & (w > 0)
        if ok.any():
            out[key] = float((values[ok] * w[ok]).sum() / w[ok].sum())
    return out


def merge_node_states(old: dict[int, Any], result: RoundResult) -> dict[int, Any]:
    """The per-node states after a round: the nodes that ran replace theirs."""
    node_states = dict(old)
    for nid, s in zip(result.node_ids, result.states):
        if s is not None:
            node_states[nid] = s
    return node_states


def end_round(t: int, metrics: dict[str, object], *, t0: float, start: float, callbacks: Sequence[Callback]) -> None:
    """Stamp the round's timings and hand its metrics to every callback."""
    metrics["time/round_s"] = time.perf_counter() - t0
    metrics["time/elapsed_s"] = time.perf_counter() - start
    for cb in callbacks:
        cb.on_round_end(t, metrics)


def run_summary(state: ServerState, last_eval: dict[str, object], start: float, **extra: object) -> dict[str, object]:
    """The end-of-run summary: rounds, the last evaluation's scalars, totals passed in, wall time."""
    return {
        "rounds": state.round,
        **{k: v for k, v in last_eval.items() if not isinstance(v, list)},
        **extra,
        "time/elapsed_s": time.perf_counter() - start,
    }


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

    def is_eval_round(self, t: int, total: int | None = None) -> bool:
        last = (self.rounds if total is None else total) - 1
        return t == last or (self.eval_every > 0 and (t + 1) % self.eval_every == 0)

    def run(
        self,
        state: ServerState,
        *,
        strategy: Any,
        executor: Any,
        participation: Callable[..., np.ndarray],
        evaluator: Callable[[torch.Tensor], dict[str, object]] | None,
        callbacks: Sequence[Callback] = (),
        byzantine: Byzantine | None = None,
        sizes: np.ndarray | None = None,
    ) -> tuple[ServerState, dict[str, object]]:
        start = time.perf_counter()
        byzantine = byzantine if byzantine is not None else Byzantine()
        defence_of = getattr(strategy, "defence", None)
        last_eval: dict[str, object] = {}
        # a phased strategy (VRLS) runs its earlier phases before the `rounds` training rounds
        total = self.rounds + int(getattr(strategy, "pre_rounds", 0))
        while state.round < total:
            t = state.round
            t0 = time.perf_counter()
            ids = participation(t, self.num_nodes, self.nodes_per_round, np_rng(self.seed, "sample", t))
            ids = [int(i) for i in ids]
            byz_ids = [i for i in ids if i in byzantine.ids]
            tasks = [NodeTask(i, state.node_states.get(i)) for i in ids if byzantine.trains(i)]
            extra = strategy.broadcast(state.strategy_state) if hasattr(strategy, "broadcast") else None
            if tasks:
                result = executor.run_round(state.params, t, tasks, extra)
            else:
                d0 = int(state.params.numel())
                result = RoundResult([], torch.zeros(0, d0, dtype=state.params.dtype), [], [], [])
            train_s = time.perf_counter() - t0
            batch = to_batch(result, version=state.version)
            info = RoundInfo(t, state.version, self.seed, self.num_nodes, tuple(ids), byzantine.declared)
            attack_metrics: dict[str, object] = {}
            attack_state = state.attack_state
            if byzantine.num:
                defence = defence_of(state.strategy_state, info) if defence_of is not None else None
                injected = inject(
                    batch, byz_ids, byzantine=byzantine, info=info, state=attack_state,
                    defence=defence, sizes=sizes if sizes is not None else np.zeros(self.num_nodes, dtype=np.int64),
                )
                batch = injected.batch
                attack_state = injected.attack_state
                attack_metrics = {"attack/byzantine_rows": injected.num_byzantine, "attack/byzantine_sampled": len(byz_ids)}
                if "tau" in injected.attack_state:
                    attack_metrics["attack/tau"] = float(injected.attack_state["tau"])
            if len(batch) == 0 and not getattr(strategy, "accepts_empty", False):
                # nobody took part (availability models) or every sampled node is silent: the
                # model stays; strategies that count absences (FedAU) still see the round
                params, strategy_state, agg = state.params, state.strategy_state, {}
            else:
                params, strategy_state, agg = strategy.step(state.params, batch, state.strategy_state, info)
            if not torch.isfinite(params).all():
                raise FedsimError(f"server parameters became NaN or Inf in round {t}; lower the learning rates")
            node_states = merge_node_states(state.node_states, result)
            d = int(params.numel())
            totals = dict(state.totals)
            up = int(batch.bytes_up.sum())
            down = len(tasks) * (d * params.element_size() + broadcast_bytes(extra))
            totals["bytes_up"] = totals.get("bytes_up", 0) + up
            totals["bytes_down"] = totals.get("bytes_down", 0) + down
            samples = sum(strategy.client.work(n) for n in result.num_examples)
            totals["samples"] = totals.get("samples", 0) + samples
            state = ServerState(t + 1, state.version + 1, params, strategy_state, node_states, totals, attack_state)
            metrics: dict[str, object] = {
                "round": t,
                **_weighted_node_metrics(batch),
                **agg,
                **attack_metrics,
                "train/samples": samples,
                "train/participants": len(ids),
                "comm/bytes_up": up,
                "comm/bytes_down": down,
                "comm/bytes_up_total": totals["bytes_up"],
                "comm/bytes_down_total": totals["bytes_down"],
                "time/train_s": train_s,
            }
            if evaluator is not None and self.is_eval_round(t, total):
                t1 = time.perf_counter()
                last_eval = evaluator(params)
                metrics.update(last_eval)
                metrics["time/eval_s"] = time.perf_counter() - t1
            end_round(t, metrics, t0=t0, start=start, callbacks=callbacks)
        summary = run_summary(
            state, last_eval, start,
            **{"comm/bytes_up_total": state.totals.get("bytes_up", 0), "comm/bytes_down_total": state.totals.get("bytes_down", 0)},
        )
        return state, summary
