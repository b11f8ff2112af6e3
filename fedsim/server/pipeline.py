"""The round pipeline that all three servers share.

A server decides *who* runs and *when* (sampling, the asynchronous clock, peer-to-peer members)
and hands every step to `Pipeline.step`, which does the rest in one order for everyone:

1. **collect**: the honest nodes' results become an `UpdateBatch` (rows sorted by node id);
2. **uplink**: per-node decoding of error-feedback estimates (``fedsim/uplink.py``);
3. **rows**: the strategy's declared row space (`Capabilities.rows`): messages as sent, x_now - y,
   or the nodes' models after their step;
4. **Byzantine rows**: the update attack writes the faulty senders' rows from the honest ones,
   and every step of a run with faulty nodes shuffles its rows with (seed, "shuffle", round);
5. **strategy step** (after the uplink mirror, for linear strategies), then a divergence check;
6. **accounting**: uplink bytes, samples, the step's metrics.

Evaluation and callbacks (`evaluate`, `end_round`) are shared too; the servers only choose the
rounds that evaluate.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from fedsim.contract import RunFacts, Strategy, is_linear, message_layout
from fedsim.errors import ConfigError, Diverged
from fedsim.execution.worker import SHIP_ROWS_UP_TO, NodeTask, PreSum, RoundResult
from fedsim.faults.byzantine import Byzantine, inject
from fedsim.logging import Callback
from fedsim.state import PersistentMap, RunState
from fedsim.types import Layout, RoundInfo, UpdateBatch
from fedsim.uplink import Uplink

Starts = Callable[[UpdateBatch], torch.Tensor]
"""The model each row of a batch started from: (k, d), or (d,) when all started from the same."""


def to_batch(
    result: RoundResult, *, version: int, layout: Layout | None = None, device: torch.device | None = None
) -> UpdateBatch:
    """The struct-of-arrays view of a round's node results (rows already sorted by node id), on
    ``device`` (the server's; default: where the rows are). The per-node metrics stay on the CPU
    (they are only logged)."""
    k = len(result.node_ids)
    keys = sorted({key for m in result.metrics for key in m})
    dev = result.messages.device if device is None else device
    return UpdateBatch(
        node_ids=torch.tensor(result.node_ids, dtype=torch.int64, device=dev),
        messages=result.messages.to(dev),
        num_examples=torch.tensor(result.num_examples, dtype=torch.int64, device=dev),
        base_version=torch.full((k,), version, dtype=torch.int64, device=dev),
        bytes_up=torch.tensor(result.row_bytes(), dtype=torch.int64, device=dev).reshape(k),
        metrics={
            key: torch.tensor([m.get(key, float("nan")) for m in result.metrics], dtype=torch.float64, device="cpu")
            for key in keys
        },
        report=result.report,
        layout=None if result.report else layout,
    )


def weighted_node_metrics(batch: UpdateBatch) -> dict[str, float]:
    """Every per-node metric (train/loss, train/acc, ...) as its example-weighted mean."""
    w = batch.num_examples.to("cpu", torch.float64)  # the metrics are on the CPU
    out = {}
    for key, values in batch.metrics.items():
        ok = torch.isfinite(values) & (w > 0)
        if ok.any():
            out[key] = float((values[ok] * w[ok]).sum() / w[ok].sum())
    return out


def broadcast_bytes(broadcast: Mapping[str, Any] | None) -> int:
    """Downlink bytes of a strategy's broadcast: 4 per number (float32), 1 per other entry."""
    if not broadcast:
        return 0
    total = 0
    for value in broadcast.values():
        if value is None:
            continue
        if isinstance(value, torch.Tensor):  # on any device: counted, never copied to the host
            total += 4 * value.numel()
            continue
        arr = np.asarray(value)
        total += 4 * arr.size if arr.dtype.kind in "biuf" else 1
    return total


def merge_node_states(old: Mapping[int, Any], result: RoundResult) -> PersistentMap:
    """The per-node states after a round: the nodes that ran replace theirs (the old map is
    kept as it was; the cost is the round's nodes, not all nodes)."""
    return PersistentMap.of(old).updated({nid: s for nid, s in zip(result.node_ids, result.states) if s is not None})


def add_totals(totals: dict[str, float], **amounts: float) -> dict[str, float]:
    out = dict(totals)
    for key, value in amounts.items():
        out[key] = out.get(key, 0) + value
    return out


class Pipeline:
    """One run's pipeline: the strategy, the executor, the faults, the uplink, the evaluator and
    the callbacks, as the servers use them."""

    def __init__(
        self,
        *,
        strategy: Strategy,
        executor: Any,
        byzantine: Byzantine,
        uplink: Uplink,
        evaluator: Callable[[torch.Tensor], dict[str, object]] | None,
        callbacks: Sequence[Callback],
        facts: RunFacts,
        participation: Any,
        latency: Any,
        nodes_per_round: int,
        divergence: float | None = None,
        on_boundary: Callable[[RunState], None] | None = None,
    ) -> None:
        self.strategy = strategy
        self.executor = executor
        self.byzantine = byzantine
        self.uplink = uplink
        self.uplink_mode = uplink.mode(strategy)
        self.evaluator = evaluator
        self.callbacks = list(callbacks)
        self.facts = facts
        self.participation = participation
        self.latency = latency
        self.nodes_per_round = int(nodes_per_round)
        self.divergence = divergence
        self.on_boundary = on_boundary
        caps = strategy.capabilities
        self.layouts: dict[int, Layout] = {}
        self.presum = (
            PreSum(weighted=caps.weighted)
            if facts.server == "sync"
            and is_linear(strategy)
            and caps.rows == "update"
            and not byzantine.num
            and self.uplink_mode == "none"
            else None
        )
        """How a large step is summed where the nodes run (`PreSum`), decided from the contract:
        a linear strategy (`fedsim.contract.is_linear`; every vector of its message is then
        summed with the same weights) at the synchronous server, without faulty nodes (attacks
        need the rows) or an uplink estimate; None: rows are shipped."""
        self.skips: list[tuple[int, str]] = []
        """(rows, why) of every step of this process that was skipped for too few rows."""
        self.boundary: RunState | None = None
        """The state after the last complete step (or the starting state): what a checkpoint on
        failure saves. Servers never mutate a state object once a step has produced it."""
        self.start = time.perf_counter()

    def layout(self, dim: int) -> Layout:
        """The strategy's message layout for a model of ``dim`` parameters."""
        if dim not in self.layouts:
            self.layouts[dim] = message_layout(self.strategy, dim)
        return self.layouts[dim]

    def broadcast(self, strategy_state: dict[str, Any]) -> dict[str, Any] | None:
        """The strategy's broadcast for the next step, held to its declaration."""
        out = self.strategy.broadcast(strategy_state)
        if out is not None and self.strategy.capabilities.broadcast == "none":
            raise ConfigError(
                f"{type(self.strategy).__name__}.broadcast returned a value, but its capabilities declare "
                'broadcast="none"; declare broadcast="scalars" or "vectors"'
            )
        return out

    # -- 1. collect ---------------------------------------------------------------------------

    def train(
        self,
        params: torch.Tensor | None,
        round_: int,
        tasks: list[NodeTask],
        broadcast: dict[str, Any] | None = None,
        *,
        dim: int,
    ) -> RoundResult:
        """Run the nodes' client updates (and their uplink encoding) on the executor; steps of
        more than `SHIP_ROWS_UP_TO` rows are summed where they run when `reduce` allows it.
        ``dim``: the model's size."""
        if not tasks:
            return RoundResult([], torch.zeros(0, self.layout(dim).width, device="cpu"), [], [], [])  # as results are
        if self.presum is not None and len(tasks) > SHIP_ROWS_UP_TO:
            return self.executor.run_round(params, round_, tasks, broadcast, self.presum)
        return self.executor.run_round(params, round_, tasks, broadcast)

    # -- 2-6. one step ------------------------------------------------------------------------

    def step(
        self,
        state: RunState,
        result: RoundResult,
        info: RoundInfo,
        *,
        faulty: list[int],
        base_version: torch.Tensor | None = None,
        starts: Starts | None = None,
        skip_empty: bool = False,
    ) -> tuple[RunState, dict[str, Any]] | None:
        """Aggregate one step's rows into a new state; returns the state and the step's metrics,
        or None when ``skip_empty`` and there is nothing to aggregate. ``faulty``: the faulty
        senders of this step (the attack writes rows for them); ``starts``: the model each row
        started from (needed for the ``current`` and ``model`` row spaces)."""
        strategy, caps = self.strategy, self.strategy.capabilities
        dev = state.params.device
        batch = to_batch(result, version=state.version, layout=self.layout(int(state.params.shape[-1])), device=dev)
        if base_version is not None:
            batch.base_version = base_version.to(dev)
        node_metrics = weighted_node_metrics(batch)
        uplink_state = state.uplink_state
        if self.uplink_mode == "per_node":
            batch, uplink_state = self.uplink.decode(batch, uplink_state)
        batch = self.rows(batch, state.params, starts)
        attack_state, attack_metrics = state.attack_state, dict[str, Any]()
        if self.byzantine.num:
            attack = self.byzantine.attack
            needs = attack is not None and attack.needs_defence and self.byzantine.is_update_attack and faulty
            defence = strategy.defence(state.strategy_state, info) if needs else None
            injected = inject(
                batch,
                faulty,
                byzantine=self.byzantine,
                info=info,
                state=attack_state,
                defence=defence,
                sizes=self.facts.sizes,
            )
            batch, attack_state = injected.batch, injected.attack_state
            attack_metrics = {"attack/byzantine_rows": injected.num_byzantine, "attack/byzantine_sampled": len(faulty)}
            if "tau" in attack_state:
                attack_metrics["attack/tau"] = float(attack_state["tau"])
        if skip_empty and len(batch) == 0:
            return None
        too_few = self.too_few_rows(len(batch))
        if too_few:
            self.skips.append((len(batch), too_few))
        if (len(batch) == 0 and not caps.accepts_empty) or too_few:
            # nobody took part (availability models), every sampled node is silent, or fewer rows
            # arrived than the rule needs (partial participation): the model stays; strategies
            # that count absences (FedAU) still see empty rounds
            params, strategy_state, agg = state.params, state.strategy_state, {}
            if too_few:
                agg = {"agg/skipped": 1}
        else:
            rows = batch
            if result.sums is not None:  # summed where the nodes ran: the weighted mean is the one row
                one = torch.ones(1, dtype=torch.int64, device=dev)
                mean = result.weighted_mean().to(dev).unsqueeze(0)
                rows = UpdateBatch(
                    batch.node_ids[:1],
                    mean,
                    one,
                    batch.base_version[:1],
                    batch.bytes_up[:1],
                    layout=batch.layout,
                    summed=sum(part.weight for part in result.sums),
                )
            elif self.uplink_mode == "mirror":
                rows, uplink_state = self.uplink.fold(batch, uplink_state)
            params, strategy_state, agg = strategy.step(state.params, rows, state.strategy_state, info)
        attacked = bool(self.byzantine.num) and self.byzantine.is_update_attack
        self.check_finite(params, info, attacked=attacked)
        samples = sum(strategy.client.work(n) for n in result.num_examples)
        metrics: dict[str, Any] = {
            "round": state.round,
            **node_metrics,
            **agg,
            **attack_metrics,
            "train/samples": samples,
        }
        counts = {"samples": samples, **({"skipped": 1} if too_few else {})}
        if self.facts.server == "p2p":  # no uplink: members exchange models (the server counts them)
            totals = add_totals(state.totals, **counts)
        else:
            up = int(batch.bytes_up.sum())
            totals = add_totals(state.totals, bytes_up=up, **counts)
            metrics.update({"comm/bytes_up": up, "comm/bytes_up_total": totals["bytes_up"]})
        self.check_divergence(state, params, node_metrics.get("train/loss"), totals, info, attacked=attacked)
        new = state.replace(
            round=state.round + 1,
            version=state.version + 1,
            params=params,
            strategy_state=strategy_state,
            totals=totals,
            attack_state=attack_state,
            uplink_state=uplink_state,
        )
        return new, metrics

    def too_few_rows(self, rows: int) -> str | None:
        """Why this step has fewer rows than the strategy's rule needs (None when it has enough;
        possible only when the number of senders varies: availability models, asynchronous
        buffers)."""
        if rows == 0:
            return None
        declared = self.strategy.rows_per_step(self.facts)
        try:
            self.strategy.check(rows if declared is None else int(declared))
        except ConfigError as exc:
            return str(exc)
        return None

    def rows(self, batch: UpdateBatch, params: torch.Tensor, starts: Starts | None) -> UpdateBatch:
        """The batch in the strategy's row space (`Capabilities.rows`), which applies to the
        message's first vector (its update)."""
        space = self.strategy.capabilities.rows
        if space == "update" or batch.report or len(batch) == 0:
            return batch
        if starts is None:
            raise ValueError(f"rows={space} needs the models the rows started from")
        S = starts(batch)
        lay = batch.layout
        update = batch.messages if lay is None or lay.single else batch.messages[:, lay.columns(lay.names[0])]
        if space == "current":
            rows = update + (params.unsqueeze(0) - S)  # x_sent - y  ->  x_now - y
        else:
            rows = S - update  # the node's model after its step
        if lay is not None and not lay.single:
            rows = torch.cat([rows, batch.messages[:, lay.size(lay.vectors[0]) :]], dim=1)
        return replace(batch, messages=rows)

    @staticmethod
    def cause(attacked: bool) -> str:
        if attacked:
            return "the Byzantine rows got through the aggregation (use a robust aggregator)"
        return "the learning rates are too large for this model (lower strategy.client.lr or the server lr)"

    def check_finite(self, params: torch.Tensor, info: RoundInfo, *, attacked: bool) -> None:
        if bool(torch.isfinite(params).all()):
            return
        raise Diverged(f"the model became NaN or Inf in step {info.round}; likely cause: {self.cause(attacked)}")

    def check_divergence(
        self,
        before: RunState,
        params: torch.Tensor,
        loss: float | None,
        totals: dict[str, float],
        info: RoundInfo,
        *,
        attacked: bool,
    ) -> None:
        """Stop when the training loss is non-finite, or (``divergence`` = factor) when it or the
        parameters' norm exceeds factor times its first value (references kept in the totals)."""
        if loss is not None and not math.isfinite(loss):
            raise Diverged(
                f"the training loss became {loss} in step {info.round}; likely cause: {self.cause(attacked)}"
            )
        if not self.divergence:
            return
        factor = float(self.divergence)
        if "norm_ref" not in totals:
            totals["norm_ref"] = float(torch.linalg.vector_norm(before.params))
        if loss is not None and "loss_ref" not in totals:
            totals["loss_ref"] = float(loss)
        norm = float(torch.linalg.vector_norm(params))
        if loss is not None and loss > factor * max(totals["loss_ref"], 1.0):
            raise Diverged(
                f"the training loss exploded in step {info.round} ({loss:.4g}, over {factor:g}x its first value "
                f"{totals['loss_ref']:.4g}); likely cause: {self.cause(attacked)}"
            )
        if norm > factor * max(totals["norm_ref"], 1.0):
            raise Diverged(
                f"the parameters' norm exploded in step {info.round} ({norm:.4g}, over {factor:g}x its start "
                f"{totals['norm_ref']:.4g}); likely cause: {self.cause(attacked)}"
            )

    # -- evaluation and callbacks --------------------------------------------------------------

    def evaluate(self, params: torch.Tensor) -> dict[str, object]:
        return self.evaluator(params) if self.evaluator is not None else {}

    def begin(self, state: RunState) -> None:
        """The run (or its resumption) starts from ``state``."""
        self.boundary = state

    def end_round(self, state: RunState, t: int, metrics: dict[str, Any], *, t0: float) -> None:
        """Stamp the step's timings, hand its metrics to every callback, and mark ``state`` as the
        last complete one (checkpoints and signal stops happen here, between steps)."""
        metrics["time/round_s"] = time.perf_counter() - t0
        metrics["time/elapsed_s"] = time.perf_counter() - self.start
        warnings = metrics.pop("warnings", None) or []
        for cb in self.callbacks:
            cb.on_round_end(t, metrics)
            for message in warnings:
                cb.on_warning(t, str(message))
        self.boundary = state
        if self.on_boundary is not None:
            self.on_boundary(state)

    def summary(self, state: RunState, last_eval: dict[str, object], **extra: object) -> dict[str, object]:
        """The end-of-run summary: rounds, the last evaluation's scalars, totals (skipped steps
        among them), wall time."""
        return {
            "rounds": state.round,
            **{k: v for k, v in last_eval.items() if not isinstance(v, list)},
            **extra,
            "agg/skipped_total": int(state.totals.get("skipped", 0)),
            **({"agg/skip_cause": self.skip_cause()} if state.totals.get("skipped") else {}),
            "time/elapsed_s": time.perf_counter() - self.start,
        }

    def skip_cause(self) -> str:
        """Why steps were skipped, for the run's last line: the rule's own words for the step
        with the most rows that was still skipped."""
        if not self.skips:
            return "too few rows arrived for the aggregation rule"
        rows, why = max(self.skips, key=lambda s: s[0])
        varies = not getattr(self.participation, "uses_nodes_per_round", True)
        hint = "; the participation model ignores nodes_per_round: raise participation.p or num_nodes" if varies else ""
        return f"{why} (at most {rows} rows arrived in a skipped step){hint}"
