"""The asynchronous server: a discrete-event simulation on a virtual clock (DESIGN.md section 6,
shared/specs/async.md).

``concurrency`` nodes are in flight at any time. A dispatched node receives the current model
and its version; it arrives after its latency (config group ``latency``), ties broken by node
id, then dispatch order. When the server aggregates is the strategy's ``trigger``:

- ``buffer`` (FedBuff, FedAsync, asynchronous FedAvg: buffer 1): every arrival joins the
  buffer and the node is replaced at once by a node drawn uniformly from the idle available
  ones (possibly itself), with the current model; when the buffer holds ``strategy.buffer``
  rows the strategy steps;
- ``period`` (FedFix): the server steps at the times n dt over what arrived since; arrived
  nodes wait for that step and are then re-dispatched with the new model;
- ``barrier`` (synchronous FedAvg on the clock, and any strategy without a trigger): wait for
  every node in flight, step, dispatch again.

Staleness of a row = server version at the step - version the node started from. Every step
sees an ``UpdateBatch`` whose ``base_version`` holds the start versions; Byzantine update attacks
see the honest rows of the buffer, robust aggregators aggregate it. With
``strategy.direction=current`` (FedAsync) rows are rewritten to x_now - y.

Training is *lazy and batched*: a node's result depends only on its start model, its state and
its own stream (seed, "train", k, node) (k = the node's job index, so that a synchronous run on
the clock trains exactly like ``server=sync`` with every node in every round), so the server
trains all not-yet-trained jobs in flight in one executor call when a step needs results
(a node's next job waits for its previous one, so node state stays sequential). Results
therefore do not depend on how Ray schedules work: event order is fixed by the virtual clock.
The models that in-flight nodes started from are kept by version until their last user
arrives.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedsim.errors import ConfigError, FedsimError
from fedsim.execution.worker import NodeTask, RoundResult
from fedsim.faults.byzantine import Byzantine, inject
from fedsim.logging import Callback
from fedsim.seeding import np_rng
from fedsim.server.state import ServerState
from fedsim.server.sync import _weighted_node_metrics, end_round, run_summary, to_batch
from fedsim.types import RoundInfo


@dataclass
class Job:
    seq: int
    node: int
    k: int  # the node's job index: its training stream is (seed, "train", k, node)
    base_version: int
    finish: float
    message: torch.Tensor | None = None
    num_examples: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    nbytes: int = 0
    trained: bool = False


@dataclass
class AsyncServer:
    rounds: int
    num_nodes: int
    seed: int
    concurrency: int | None = None
    duration: float | None = None
    eval_every: int = 1
    eval_interval: float | None = None
    peer_to_peer = False
    uses_latency = True

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ConfigError(f"rounds={self.rounds} must be >= 1")
        if self.concurrency is not None and not 1 <= self.concurrency <= self.num_nodes:
            raise ConfigError(f"server.concurrency={self.concurrency} must be in [1, num_nodes={self.num_nodes}] (null: all)")
        if self.duration is not None and self.duration <= 0:
            raise ConfigError(f"server.duration={self.duration} must be > 0 (simulated time), or null")
        if self.eval_interval is not None and self.eval_interval <= 0:
            raise ConfigError(f"server.eval_interval={self.eval_interval} must be > 0, or null")

    def received(self, byzantine: Byzantine) -> int:  # pragma: no cover - p2p only
        raise NotImplementedError

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
        latency: Any = None,
    ) -> tuple[ServerState, dict[str, object]]:
        if latency is None:
            raise ConfigError("server=async needs a latency model (config group latency)")
        return _Loop(self, state, strategy, executor, participation, evaluator, callbacks,
                     byzantine if byzantine is not None else Byzantine(), sizes, latency).run()


class _Loop:
    """One asynchronous run; all mutable bookkeeping of the event loop lives here."""

    def __init__(self, server: AsyncServer, state: ServerState, strategy: Any, executor: Any, participation: Any,
                 evaluator: Any, callbacks: Sequence[Callback], byzantine: Byzantine, sizes: np.ndarray | None,
                 latency: Any) -> None:
        self.s, self.state, self.strategy, self.executor = server, state, strategy, executor
        self.participation, self.evaluator, self.callbacks = participation, evaluator, callbacks
        self.byzantine, self.latency = byzantine, latency
        self.sizes = sizes if sizes is not None else np.zeros(server.num_nodes, dtype=np.int64)
        self.N = server.num_nodes
        self.concurrency = server.concurrency or self.N
        self.trigger = getattr(strategy, "trigger", "barrier")
        self.buffer_size = int(getattr(strategy, "buffer", 1)) if self.trigger == "buffer" else None
        self.period = getattr(strategy, "period", None)
        self.direction = getattr(strategy, "direction", "sent")
        self.clock = 0.0
        self.seq = 0
        self.jobs_of_node = np.zeros(self.N, dtype=np.int64)
        self.heap: list[tuple[float, int, int]] = []
        self.jobs: dict[int, Job] = {}
        self.busy: set[int] = set()
        self.waiting: set[int] = set()
        self.buffer: list[Job] = []
        self.models: dict[int, torch.Tensor] = {state.version: state.params}
        self.next_eval = server.eval_interval
        self.train_s = 0.0
        self.bytes_down = 0
        self.idle_steps = 0
        self.unit = float(np.mean(latency.mean_times()))

    # ---- dispatch -------------------------------------------------------------------------
    def availability_round(self) -> int:
        """Participation models are indexed by round; on the clock, round r is the window
        [r u, (r + 1) u) with u the nodes' mean latency (a synchronous run's round length)."""
        return int(np.floor(self.clock / self.unit + 1e-9))

    def available(self) -> list[int]:
        active = getattr(self.participation, "active", None)
        mask = active(self.availability_round()) if active is not None else np.ones(self.N, dtype=bool)
        return [i for i in range(self.N) if mask[i] and i not in self.busy and i not in self.waiting]

    def dispatch(self, count: int) -> None:
        for _ in range(max(0, count)):
            cands = self.available()
            if not cands:
                return
            node = cands[int(np_rng(self.s.seed, "dispatch", self.seq).integers(len(cands)))]
            duration = float(self.latency.time(node, int(self.jobs_of_node[node])))
            self.jobs_of_node[node] += 1
            job = Job(self.seq, node, int(self.jobs_of_node[node]) - 1, self.state.version, self.clock + duration)
            self.jobs[job.seq] = job
            heapq.heappush(self.heap, (job.finish, node, job.seq))
            self.busy.add(node)
            self.bytes_down += 4 * int(self.state.params.numel())
            self.seq += 1

    def pop(self) -> Job:
        _, _, seq = heapq.heappop(self.heap)
        job = self.jobs.pop(seq)
        self.clock = max(self.clock, job.finish)
        self.busy.discard(job.node)
        return job

    # ---- training -------------------------------------------------------------------------
    def train_pending(self) -> None:
        """Train every untrained job (in the buffer or in flight), in waves so that a node's
        jobs run in dispatch order and each sees the state its previous job left."""
        pending = sorted([j for j in [*self.buffer, *self.jobs.values()] if not j.trained], key=lambda j: j.seq)
        t0 = time.perf_counter()
        while pending:
            wave, later, seen = [], [], set()
            for j in pending:
                (later if j.node in seen else wave).append(j)
                seen.add(j.node)
            honest = [j for j in wave if self.byzantine.trains(j.node)]
            for j in wave:
                j.trained = True
            if honest:
                tasks = [NodeTask(j.node, self.state.node_states.get(j.node), self.models[j.base_version], j.k)
                         for j in sorted(honest, key=lambda j: (j.node, j.seq))]
                result = self.executor.run_round(None, self.state.round, tasks)
                by_node = {j.node: j for j in honest}
                node_states = dict(self.state.node_states)
                row_bytes = result.row_bytes()
                for i, nid in enumerate(result.node_ids):
                    job = by_node[nid]
                    job.message = result.messages[i]
                    job.num_examples = result.num_examples[i]
                    job.metrics = result.metrics[i]
                    job.nbytes = row_bytes[i]
                    if result.states[i] is not None:
                        node_states[nid] = result.states[i]
                self.state.node_states = node_states
            pending = later
        self.train_s += time.perf_counter() - t0

    # ---- one server step -------------------------------------------------------------------
    def flush(self) -> dict[str, object] | None:
        """Aggregate the buffer (if it has rows) and return the step's metrics."""
        self.train_pending()
        arrived = sorted(self.buffer, key=lambda j: (j.node, j.seq))
        self.buffer = []
        state = self.state
        honest = [j for j in arrived if j.message is not None]
        byz_ids = [j.node for j in arrived if j.node in self.byzantine.ids]
        d = int(state.params.numel())
        if honest:
            messages = torch.stack([j.message for j in honest])  # type: ignore[misc]
            if self.direction == "current":
                shift = torch.stack([state.params - self.models[j.base_version] for j in honest])
                messages = messages + shift  # x_sent - y  ->  x_now - y
        else:
            messages = torch.zeros(0, d, dtype=state.params.dtype)
        result = RoundResult([j.node for j in honest], messages, [j.num_examples for j in honest],
                             [j.metrics for j in honest], [None] * len(honest), bytes_up=[j.nbytes for j in honest])
        batch = to_batch(result, version=state.version)
        batch.base_version = torch.tensor([j.base_version for j in honest], dtype=torch.int64)
        info = RoundInfo(state.round, state.version, self.s.seed, self.N, tuple(j.node for j in arrived),
                         self.byzantine.declared)
        attack_state, attack_metrics = state.attack_state, {}
        if self.byzantine.num and byz_ids:
            defence_of = getattr(self.strategy, "defence", None)
            defence = defence_of(state.strategy_state, info) if defence_of is not None else None
            injected = inject(batch, byz_ids, byzantine=self.byzantine, info=info, state=attack_state,
                              defence=defence, sizes=self.sizes)
            batch, attack_state = injected.batch, injected.attack_state
            attack_metrics = {"attack/byzantine_rows": injected.num_byzantine}
        if len(batch) == 0:
            return None
        staleness = (state.version - batch.base_version).tolist()
        params, strategy_state, agg = self.strategy.step(state.params, batch, state.strategy_state, info)
        if not torch.isfinite(params).all():
            raise FedsimError(f"server parameters became NaN or Inf at step {state.round}; lower the learning rates")
        up = int(batch.bytes_up.sum())
        totals = dict(state.totals)
        totals["bytes_up"] = totals.get("bytes_up", 0) + up
        samples = sum(self.strategy.client.work(n) for n in result.num_examples)
        totals["samples"] = totals.get("samples", 0) + samples
        self.state = ServerState(state.round + 1, state.version + 1, params, strategy_state, state.node_states,
                                 totals, attack_state)
        self.models[self.state.version] = params
        self.release()
        return {
            "round": state.round,
            **_weighted_node_metrics(batch),
            **agg,
            **attack_metrics,
            "train/samples": samples,
            "train/participants": len(arrived),
            "async/buffer": len(batch),
            "async/staleness_mean": float(np.mean(staleness)),
            "async/staleness_max": float(np.max(staleness)),
            "async/staleness": [int(x) for x in staleness],
            "async/in_flight": len(self.jobs),
            "time/simulated": self.clock,
            "comm/bytes_up": up,
            "comm/bytes_up_total": totals["bytes_up"],
            "comm/bytes_down_total": self.bytes_down,
        }

    def release(self) -> None:
        """Forget models no job in flight started from (the newest is always kept)."""
        used = {j.base_version for j in self.jobs.values()} | {j.base_version for j in self.buffer}
        used.add(self.state.version)
        for v in [v for v in self.models if v not in used]:
            del self.models[v]

    # ---- the loop -------------------------------------------------------------------------
    def done(self) -> bool:
        return self.state.round >= self.s.rounds or (self.s.duration is not None and self.clock >= self.s.duration)

    def is_eval(self) -> bool:
        if self.s.eval_interval is not None:
            assert self.next_eval is not None
            if self.clock >= self.next_eval:
                while self.next_eval <= self.clock:
                    self.next_eval += self.s.eval_interval
                return True
            return self.done()
        return self.done() or (self.s.eval_every > 0 and self.state.round % self.s.eval_every == 0)

    def advance(self) -> dict[str, object] | None:
        """Move the clock to the next server step and take it (None: nothing to aggregate)."""
        if self.trigger == "buffer":
            self.wait_for_nodes()
            job = self.pop()
            self.buffer.append(job)
            out = self.flush() if len(self.buffer) >= (self.buffer_size or 1) else None
            self.dispatch(self.concurrency - len(self.busy))
            return out
        if self.trigger == "period":
            step = float(self.period)
            target = (np.floor(self.clock / step + 1e-9) + 1) * step
            while self.heap and self.heap[0][0] <= target:
                job = self.pop()
                self.buffer.append(job)
                self.waiting.add(job.node)
            self.clock = float(target)
        else:  # barrier
            self.wait_for_nodes()
            while self.heap:
                self.buffer.append(self.pop())
        out = self.flush()
        self.waiting.clear()
        self.dispatch(self.concurrency - len(self.busy))
        return out

    def wait_for_nodes(self) -> None:
        """With nobody in flight, let time pass (one participation window at a time) until some
        node is available, and dispatch."""
        for _ in range(100_000):
            if self.heap:
                return
            self.dispatch(self.concurrency - len(self.busy))
            if not self.heap:
                self.clock = (self.availability_round() + 1) * self.unit
        raise FedsimError("no node became available in 100,000 participation windows; check the participation model")

    def run(self) -> tuple[ServerState, dict[str, object]]:
        start = time.perf_counter()
        last_eval: dict[str, object] = {}
        self.dispatch(self.concurrency)
        while not self.done():
            t0 = time.perf_counter()
            metrics = self.advance()
            if metrics is None:
                self.idle_steps += 1
                if self.idle_steps > 100_000:
                    raise FedsimError("100,000 aggregation times passed without any update; check participation and latency")
                continue
            self.idle_steps = 0
            if self.evaluator is not None and self.is_eval():
                t1 = time.perf_counter()
                last_eval = self.evaluator(self.state.params)
                metrics.update(last_eval)
                metrics["time/eval_s"] = time.perf_counter() - t1
            end_round(self.state.round - 1, metrics, t0=t0, start=start, callbacks=self.callbacks)
        summary = run_summary(self.state, last_eval, start, **{
            "comm/bytes_up_total": self.state.totals.get("bytes_up", 0), "comm/bytes_down_total": self.bytes_down,
            "time/simulated": self.clock,
            "time/train_s": self.train_s})
        return self.state, summary
