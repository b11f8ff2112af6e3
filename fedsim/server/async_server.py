"""The asynchronous server: a discrete-event simulation on a virtual clock (docs/design.md,
"Servers"; method notes: docs/methods/async.md).

``concurrency`` nodes are in flight at any time. A dispatched node receives the current model
and its version; it arrives after its latency (config group ``latency``), ties broken by node
id, then dispatch order. When the server aggregates is the strategy's declared ``trigger``
(`Capabilities.trigger`):

- ``buffer`` (FedBuff, FedAsync, asynchronous FedAvg: buffer 1): every arrival joins the
  buffer and the node is replaced at once by a node drawn uniformly from the idle available
  ones (possibly itself), with the current model; when the buffer holds ``strategy.buffer``
  rows the strategy steps;
- ``period`` (FedFix): the server steps at the times n dt over what arrived since; arrived
  nodes wait for that step and are then re-dispatched with the new model;
- ``barrier`` (synchronous FedAvg on the clock, and any strategy without a trigger): wait for
  every node in flight, step, dispatch again.

Staleness of a row = server version at the step - version the node started from. Every step
goes through the shared pipeline with an ``UpdateBatch`` whose ``base_version`` holds the start
versions; Byzantine update attacks see the honest rows of the buffer, robust aggregators
aggregate it. With rows=current (FedAsync) rows are rewritten to x_now - y.

Training is *lazy and batched*: a node's result depends only on its start model, its state and
its own stream (seed, "train", k, node) (k = the node's job index, so that a synchronous run on
the clock trains exactly like ``server=sync`` with every node in every round), so the server
trains all not-yet-trained jobs in flight in one executor call when a step needs results
(a node's next job waits for its previous one, so node state stays sequential). Results
therefore do not depend on how Ray schedules work: event order is fixed by the virtual clock.
The models that in-flight nodes started from are kept by version until their last user
arrives. The whole loop state (clock, event queue, jobs in flight with their results, start
models, buffer) is `AsyncState`, part of the run's explicit state.
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from fedsim.contract import RunFacts, Server, Strategy
from fedsim.errors import ConfigError, FedsimError
from fedsim.execution.worker import NodeTask, RoundResult
from fedsim.seeding import np_rng
from fedsim.server.pipeline import Pipeline, add_totals, broadcast_bytes, merge_node_states
from fedsim.state import RunState
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
class AsyncState:
    """The event loop's state: the virtual clock, the queue of jobs in flight (finish time, node,
    dispatch number), the jobs themselves (with their results once trained), the models they
    started from (by version), the buffer of arrived jobs, idle and waiting nodes."""

    clock: float = 0.0
    seq: int = 0
    jobs_of_node: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    heap: list[tuple[float, int, int]] = field(default_factory=list)
    jobs: dict[int, Job] = field(default_factory=dict)
    busy: set[int] = field(default_factory=set)
    waiting: set[int] = field(default_factory=set)
    buffer: list[Job] = field(default_factory=list)
    models: dict[int, torch.Tensor] = field(default_factory=dict)
    next_eval: float | None = None
    idle_steps: int = 0
    started: bool = False
    broadcasts: dict[int, Any] = field(default_factory=dict)
    """The strategy's broadcast of each model version kept in ``models`` (strategies that
    declare one): a node gets the broadcast its start model came with."""

    def fork(self) -> AsyncState:
        """A copy to advance, leaving this one (a step boundary's) intact: new containers and job
        records; tensors are shared (never written in place)."""
        jobs = {seq: replace(job) for seq, job in self.jobs.items()}
        return AsyncState(
            self.clock,
            self.seq,
            self.jobs_of_node.copy(),
            list(self.heap),
            jobs,
            set(self.busy),
            set(self.waiting),
            [replace(job) for job in self.buffer],
            dict(self.models),
            self.next_eval,
            self.idle_steps,
            self.started,
            dict(self.broadcasts),
        )


@dataclass
class AsyncServer(Server):
    rounds: int
    num_nodes: int
    seed: int
    concurrency: int | None = None
    duration: float | None = None
    eval_every: int = 1
    eval_interval: float | None = None

    kind = "async"

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ConfigError(f"rounds={self.rounds} must be >= 1")
        if self.concurrency is not None and not 1 <= self.concurrency <= self.num_nodes:
            raise ConfigError(
                f"server.concurrency={self.concurrency} must be in [1, num_nodes={self.num_nodes}] (null: all)"
            )
        if self.duration is not None and self.duration <= 0:
            raise ConfigError(f"server.duration={self.duration} must be > 0 (simulated time), or null")
        if self.eval_interval is not None and self.eval_interval <= 0:
            raise ConfigError(f"server.eval_interval={self.eval_interval} must be > 0, or null")

    def initial(self, params: torch.Tensor, strategy: Strategy, facts: RunFacts) -> RunState:
        loop = AsyncState(
            jobs_of_node=np.zeros(self.num_nodes, dtype=np.int64), models={0: params}, next_eval=self.eval_interval
        )
        strategy_state = strategy.init(params, facts)
        if strategy.capabilities.broadcast != "none":
            loop.broadcasts[0] = strategy.broadcast(strategy_state)
        return RunState(0, 0, params, strategy_state, server_state=loop)

    def rows_per_step(self, strategy: Strategy, facts: RunFacts, nodes_per_round: int) -> int:
        caps = strategy.capabilities
        return int(caps.buffer) if caps.trigger == "buffer" else (self.concurrency or self.num_nodes)

    def total_rounds(self, strategy: Strategy) -> int:
        return int(self.rounds)

    def run(self, state: RunState, pipeline: Pipeline) -> tuple[RunState, dict[str, Any]]:
        return _Loop(self, state, pipeline).run()


class _Loop:
    """One asynchronous run: the rules of the event loop over the explicit `AsyncState`."""

    def __init__(self, server: AsyncServer, state: RunState, pipeline: Pipeline) -> None:
        self.s, self.state, self.pipe = server, state, pipeline
        self.strategy, self.byzantine = pipeline.strategy, pipeline.byzantine
        caps = self.strategy.capabilities
        self.N = server.num_nodes
        self.concurrency = server.concurrency or self.N
        self.trigger = caps.trigger
        self.buffer_size = int(caps.buffer) if self.trigger == "buffer" else None
        self.period = caps.period
        self.train_s = 0.0
        self.unit = float(np.mean(pipeline.latency.mean_times()))

    @property
    def a(self) -> AsyncState:
        loop = self.state.server_state
        assert isinstance(loop, AsyncState)
        return loop

    # ---- dispatch -------------------------------------------------------------------------
    def availability_round(self) -> int:
        """Participation models are indexed by round; on the clock, round r is the window
        [r u, (r + 1) u) with u the nodes' mean latency (a synchronous run's round length)."""
        return int(np.floor(self.a.clock / self.unit + 1e-9))

    def available(self) -> list[int]:
        mask = self.pipe.participation.active(self.availability_round())
        a = self.a
        return [i for i in range(self.N) if mask[i] and i not in a.busy and i not in a.waiting]

    def dispatch(self, count: int) -> None:
        a = self.a
        for _ in range(max(0, count)):
            cands = self.available()
            if not cands:
                return
            node = cands[int(np_rng(self.s.seed, "dispatch", a.seq).integers(len(cands)))]
            duration = float(self.pipe.latency.time(node, int(a.jobs_of_node[node])))
            a.jobs_of_node[node] += 1
            job = Job(a.seq, node, int(a.jobs_of_node[node]) - 1, self.state.version, a.clock + duration)
            a.jobs[job.seq] = job
            heapq.heappush(a.heap, (job.finish, node, job.seq))
            a.busy.add(node)
            down = 4 * int(self.state.params.numel()) + broadcast_bytes(a.broadcasts.get(self.state.version))
            self.state.totals = add_totals(self.state.totals, bytes_down=down)
            # (self.state is this step's fresh copy, see run(); boundary states are never written)
            a.seq += 1

    def pop(self) -> Job:
        a = self.a
        _, _, seq = heapq.heappop(a.heap)
        job = a.jobs.pop(seq)
        a.clock = max(a.clock, job.finish)
        a.busy.discard(job.node)
        return job

    # ---- training -------------------------------------------------------------------------
    def train_pending(self) -> None:
        """Train every untrained job (in the buffer or in flight), in waves so that a node's
        jobs run in dispatch order and each sees the state its previous job left."""
        a = self.a
        pending = sorted([j for j in [*a.buffer, *a.jobs.values()] if not j.trained], key=lambda j: j.seq)
        t0 = time.perf_counter()
        d = int(self.state.params.numel())
        while pending:
            wave: list[Job] = []
            later: list[Job] = []
            seen: set[int] = set()
            for j in pending:
                (later if j.node in seen else wave).append(j)
                seen.add(j.node)
            honest = [j for j in wave if self.byzantine.trains(j.node)]
            for j in wave:
                j.trained = True
            if honest:
                tasks = [
                    NodeTask(
                        j.node,
                        self.state.node_states.get(j.node),
                        a.models[j.base_version],
                        j.k,
                        broadcast=a.broadcasts.get(j.base_version),
                    )
                    for j in sorted(honest, key=lambda j: (j.node, j.seq))
                ]
                result = self.pipe.train(None, self.state.round, tasks, dim=d)
                by_node = {j.node: j for j in honest}
                row_bytes = result.row_bytes()
                for i, nid in enumerate(result.node_ids):
                    job = by_node[nid]
                    job.message = result.messages[i]
                    job.num_examples = result.num_examples[i]
                    job.metrics = result.metrics[i]
                    job.nbytes = row_bytes[i]
                self.state.node_states = merge_node_states(self.state.node_states, result)
            pending = later
        self.train_s += time.perf_counter() - t0

    # ---- one server step -------------------------------------------------------------------
    def flush(self) -> dict[str, Any] | None:
        """Aggregate the buffer (if it has rows) and return the step's metrics."""
        self.train_pending()
        a = self.a
        arrived = sorted(a.buffer, key=lambda j: (j.node, j.seq))
        a.buffer = []
        state = self.state
        honest = [j for j in arrived if j.message is not None]
        faulty = [j.node for j in arrived if j.node in self.byzantine.ids]
        d = int(state.params.numel())
        messages = (
            torch.stack([j.message for j in honest if j.message is not None])
            if honest
            else torch.zeros(0, d, dtype=state.params.dtype, device=state.params.device)
        )
        result = RoundResult(
            [j.node for j in honest],
            messages,
            [j.num_examples for j in honest],
            [j.metrics for j in honest],
            [None] * len(honest),
            bytes_up=[j.nbytes for j in honest],
        )
        base = torch.tensor([j.base_version for j in honest], dtype=torch.int64, device=state.params.device)
        info = RoundInfo(
            state.round, state.version, self.s.seed, self.N, tuple(j.node for j in arrived), self.byzantine.declared
        )
        models = a.models
        stepped = self.pipe.step(
            state,
            result,
            info,
            faulty=faulty,
            base_version=base,
            skip_empty=True,
            starts=lambda batch: torch.stack([models[int(v)] for v in batch.base_version]),
        )
        if stepped is None:
            return None
        self.state, metrics = stepped
        staleness = (state.version - base).tolist() + [0] * (metrics.get("attack/byzantine_rows", 0) or 0)
        a.models[self.state.version] = self.state.params
        if self.strategy.capabilities.broadcast != "none":
            a.broadcasts[self.state.version] = self.strategy.broadcast(self.state.strategy_state)
        self.release()
        metrics.update(
            {
                "train/participants": len(arrived),
                "async/buffer": len(staleness),
                "async/staleness_mean": float(np.mean(staleness)),
                "async/staleness_max": float(np.max(staleness)),
                "async/staleness": [int(x) for x in staleness],
                "async/in_flight": len(a.jobs),
                "time/simulated": a.clock,
                "comm/bytes_down_total": self.state.totals.get("bytes_down", 0),
            }
        )
        return metrics

    def release(self) -> None:
        """Forget models no job in flight started from (the newest is always kept)."""
        a = self.a
        used = {j.base_version for j in a.jobs.values()} | {j.base_version for j in a.buffer}
        used.add(self.state.version)
        for v in [v for v in a.models if v not in used]:
            del a.models[v]
            a.broadcasts.pop(v, None)

    # ---- the loop -------------------------------------------------------------------------
    def done(self) -> bool:
        return self.state.round >= self.s.rounds or (self.s.duration is not None and self.a.clock >= self.s.duration)

    def is_eval(self) -> bool:
        a = self.a
        if self.s.eval_interval is not None:
            assert a.next_eval is not None
            if a.clock >= a.next_eval:
                while a.next_eval <= a.clock:
                    a.next_eval += self.s.eval_interval
                return True
            return self.done()
        return self.done() or (self.s.eval_every > 0 and self.state.round % self.s.eval_every == 0)

    def advance(self) -> dict[str, Any] | None:
        """Move the clock to the next server step and take it (None: nothing to aggregate)."""
        a = self.a
        if self.trigger == "buffer":
            self.wait_for_nodes()
            job = self.pop()
            a.buffer.append(job)
            out = self.flush() if len(a.buffer) >= (self.buffer_size or 1) else None
            self.dispatch(self.concurrency - len(a.busy))
            return out
        if self.trigger == "period":
            assert self.period is not None
            step = float(self.period)
            target = (np.floor(a.clock / step + 1e-9) + 1) * step
            while a.heap and a.heap[0][0] <= target:
                job = self.pop()
                a.buffer.append(job)
                a.waiting.add(job.node)
            a.clock = float(target)
        else:  # barrier
            self.wait_for_nodes()
            while a.heap:
                a.buffer.append(self.pop())
        out = self.flush()
        a = self.a
        a.waiting.clear()
        self.dispatch(self.concurrency - len(a.busy))
        return out

    def wait_for_nodes(self) -> None:
        """With nobody in flight, let time pass (one participation window at a time) until some
        node is available, and dispatch."""
        a = self.a
        for _ in range(100_000):
            if a.heap:
                return
            self.dispatch(self.concurrency - len(a.busy))
            if not a.heap:
                a.clock = (self.availability_round() + 1) * self.unit
        raise FedsimError("no node became available in 100,000 participation windows; check the participation model")

    def run(self) -> tuple[RunState, dict[str, Any]]:
        last_eval: dict[str, object] = {}
        self.pipe.begin(self.state)
        if not self.a.started:
            self.state = self.state.replace(server_state=self.a.fork())
            self.a.started = True
            self.dispatch(self.concurrency)
        while not self.done():
            t0 = time.perf_counter()
            self.state = self.state.replace(server_state=self.a.fork())
            metrics = self.advance()
            a = self.a
            if metrics is None:
                a.idle_steps += 1
                if a.idle_steps > 100_000:
                    raise FedsimError(
                        "100,000 aggregation times passed without any update; check participation and latency"
                    )
                continue
            a.idle_steps = 0
            if self.is_eval():
                t1 = time.perf_counter()
                last_eval = self.pipe.evaluate(self.state.params)
                metrics.update(last_eval)
                metrics["time/eval_s"] = time.perf_counter() - t1
            self.pipe.end_round(self.state, self.state.round - 1, metrics, t0=t0)
        summary = self.pipe.summary(
            self.state,
            last_eval,
            **{
                "comm/bytes_up_total": self.state.totals.get("bytes_up", 0),
                "comm/bytes_down_total": self.state.totals.get("bytes_down", 0),
                "time/simulated": self.a.clock,
                "time/train_s": self.train_s,
            },
        )
        return self.state, summary
