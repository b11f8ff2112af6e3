"""The node worker: hosts many virtual nodes and runs their client updates one after another,
reusing one model object. The local executor and every Ray actor run this same code."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
from torch import nn

from fedsim import devices
from fedsim.errors import ConfigError, NodeError
from fedsim.execution.malloc import retain_freed_memory
from fedsim.params import FlatModel
from fedsim.types import UPDATE, ClientContext, ClientResult, Layout, NodeData, NodeState, Vector
from fedsim.uplink import Uplink


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs besides data: how to build the model and what nodes do."""

    model_factory: Callable[..., nn.Module]
    input_shape: tuple[int, ...]
    num_classes: int
    client_update: Any
    seed: int
    threads: int = 1
    uplink: Uplink | None = None
    """The compressed uplink's node side, run after the client update (None: messages as they are)."""
    vectorize: bool = False
    """Train the nodes of a block together (`ClientUpdate.cohort`) when the client supports it."""
    cohort: int = 64
    """Nodes per block when vectorised."""
    message: tuple[Vector, ...] = UPDATE
    """The vectors of a node's message (the strategy's `fedsim.contract.Capabilities.message`)."""
    model_not_vectorized: str = ""
    """Why the model cannot train in cohorts ("" when it can): then nodes train one at a time."""
    device: str = "cpu"
    """Where the worker keeps its data and model and trains (``cluster.device``, resolved)."""
    gpu_share: float = 1.0
    """The share of its GPU's memory a worker may take (``cluster.gpus_per_actor``; 1: no cap)."""
    retain_memory: bool = True
    """Keep freed memory in the worker's process (``cluster.retain_memory``, `fedsim.execution.malloc`)."""

    @property
    def block_size(self) -> int:
        """Tasks per block (blocks stay on one worker): the cohort size when vectorised, else `BLOCK`."""
        return self.cohort if self.blocked else BLOCK

    @property
    def blocked(self) -> bool:
        """Whether every round is cut into blocks (vectorised cohorts), not only summed ones."""
        return self.vectorize and bool(self.client_update.vectorizable) and not self.model_not_vectorized

    @property
    def unlabelled(self) -> bool:
        """Whether nodes also get their own test inputs, without labels (``NodeData.x_unlabelled``)."""
        return bool(self.client_update.needs_unlabelled)


SHIP_ROWS_UP_TO = 64
"""Steps with at most this many rows ship every row to the server, whatever the strategy."""
BLOCK = 16
"""Rows per block when a linear step is summed where the nodes run (`PreSum`)."""


@dataclass(frozen=True)
class PreSum:
    """Sum the rows where they are produced instead of shipping them, for a step that depends on
       them only through their weighted mean (a ``linear`` strategy, see `fedsim.contract.Capabilities`).

       The round's tasks, sorted by node id, are cut into blocks of `WorkerSpec.block_size` consecutive
       tasks (`BLOCK`, or the cohort size when vectorised; see `round_tasks`); each block runs on one worker,
    which returns the block's
       sum of w_i m_i (float32, accumulated in node order) and of w_i, with w_i the node's examples
       (``weighted``) or 1 per node with data. The server adds the block sums in block order. The
       blocks do not depend on how many workers there are, so neither do the results."""

    weighted: bool

    def weight(self, num_examples: int) -> float:
        return float(num_examples) if self.weighted else float(num_examples > 0)


@dataclass(frozen=True)
class BlockSum:
    """One block's sum of w_i m_i and of w_i (see `PreSum`)."""

    block: int
    total: torch.Tensor
    weight: float


@dataclass(frozen=True)
class NodeTask:
    """One node's work in a round: its id, its persistent state (``{"client": ..., "uplink":
    ...}``) and, when nodes hold models of their own (peer to peer) or started from an older model
    (asynchronous), the model it starts from instead of the broadcast one; ``round`` replaces the
    call's round in the node's streams (the asynchronous server passes the node's job index)."""

    node_id: int
    state: NodeState | None = None
    start: torch.Tensor | None = None
    round: int | None = None
    block: int = 0
    """Its block (an index), when the round is cut into blocks (`PreSum`, vectorised cohorts)."""
    broadcast: dict | None = None
    """The strategy's broadcast this node gets instead of the call's (the asynchronous server:
    the broadcast of the model version the node starts from)."""


@dataclass
class RoundResult:
    """Results of the nodes of one round, rows sorted by node id."""

    node_ids: list[int]
    messages: torch.Tensor
    num_examples: list[int]
    metrics: list[dict[str, float]]
    states: list[NodeState | None]
    busy_s: list[float] = field(default_factory=list)
    bytes_up: list[int] | None = None
    """Per-row uplink bytes (None: 4 d per row, the dense float32 message)."""
    report: bool = False
    """The rows are small reports (`ClientResult.report`), not model updates."""
    sums: list[BlockSum] | None = None
    """With `PreSum`: the blocks' sums, in block order; ``messages`` is then empty."""

    def to_cpu(self) -> RoundResult:
        """This result with its tensors (rows, node states, block sums) on the CPU."""
        return replace(
            self,
            messages=self.messages.cpu(),
            states=[devices.to_cpu(s) for s in self.states],
            sums=None if self.sums is None else [replace(b, total=b.total.cpu()) for b in self.sums],
        )

    def row_bytes(self) -> list[int]:
        if self.bytes_up is not None:
            return list(self.bytes_up)
        d = int(self.messages.shape[1]) if self.messages.dim() == 2 else 0
        return [d * self.messages.element_size()] * len(self.node_ids)

    def weighted_mean(self) -> torch.Tensor:
        """With `PreSum`: sum over blocks (in block order) of sum w_i m_i, over the sum of w_i."""
        assert self.sums
        total = self.sums[0].total.clone()
        for part in self.sums[1:]:
            total.add_(part.total)
        weight = sum(part.weight for part in self.sums)
        return total.div_(weight) if weight > 0 else total.zero_()

    @staticmethod
    def merge(parts: Sequence[RoundResult]) -> RoundResult:
        rows = sorted((nid, part, i) for part in parts for i, nid in enumerate(part.node_ids))
        if not rows:
            raise ValueError("no node results to merge")
        if len(parts) == 1 and [nid for nid, _, _ in rows] == parts[0].node_ids:
            return parts[0]  # one worker, rows already in order
        row_bytes = {id(part): part.row_bytes() for part in parts}
        reduced = [part.sums for part in parts if part.sums is not None]
        if reduced and len(reduced) != len(parts):
            raise ValueError("a round mixes summed blocks and rows")
        d = parts[0].messages.shape[1] if parts[0].messages.dim() == 2 else 0
        return RoundResult(
            node_ids=[nid for nid, _, _ in rows],
            messages=torch.zeros(0, d) if reduced else torch.stack([part.messages[i] for _, part, i in rows]),
            num_examples=[part.num_examples[i] for _, part, i in rows],
            metrics=[part.metrics[i] for _, part, i in rows],
            states=[part.states[i] for _, part, i in rows],
            busy_s=[b for part in parts for b in part.busy_s],
            bytes_up=[row_bytes[id(part)][i] for _, part, i in rows],
            report=any(part.report for part in parts),
            sums=sorted((s for sums in reduced for s in sums), key=lambda s: s.block) if reduced else None,
        )


def _as_tensor(array: np.ndarray) -> torch.Tensor:
    # Arrays from Ray's object store are read-only views of shared memory; fedsim never writes
    # to them (batches are gathered copies), so the non-writable warning does not apply.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(array)


def _index(index: Sequence[np.ndarray]) -> list[torch.Tensor]:
    return [torch.from_numpy(np.ascontiguousarray(ix, dtype=np.int64)) for ix in index]


class NodeWorker:
    """Hosts nodes whose training data are rows ``index[node]`` of shared arrays ``x``, ``y``,
    and, when the spec asks for them, whose unlabelled test inputs are rows
    ``test_index[node]`` of ``x_test`` (test labels are never shipped to a worker)."""

    def __init__(
        self,
        spec: WorkerSpec,
        x: np.ndarray,
        y: np.ndarray,
        index: Sequence[np.ndarray],
        x_test: np.ndarray | None = None,
        test_index: Sequence[np.ndarray] | None = None,
    ) -> None:
        self.spec = spec
        if spec.retain_memory:
            retain_freed_memory()
        self.device = devices.resolve(spec.device)
        if self.device.type == "cuda":
            devices.deterministic(self.device)
            devices.cap_memory(self.device, spec.gpu_share)
        try:  # the data go to the device once; minibatches are index selects there
            self.x = _as_tensor(x).to(self.device)
            self.y = _as_tensor(y).to(self.device)
            self.index = [ix.to(self.device) for ix in _index(index)]
            self.x_test = _as_tensor(x_test).to(self.device) if x_test is not None else None
            self.test_index = [ix.to(self.device) for ix in _index(test_index)] if test_index is not None else None
        except torch.cuda.OutOfMemoryError:
            need = (x.nbytes + y.nbytes + (x_test.nbytes if x_test is not None else 0)) / 2**30
            raise ConfigError(
                f"the training data ({need:.2f} GiB) do not fit in this worker's share of {devices.name_of(self.device)} "
                f"(cluster.gpus_per_actor={spec.gpu_share:g}); raise cluster.gpus_per_actor (fewer actors per GPU), "
                "or use cluster.device=cpu"
            ) from None
        self.model = FlatModel(spec.model_factory(tuple(spec.input_shape), int(spec.num_classes))).to(self.device)
        self.layer_sizes = [int(p.numel()) for p in self.model.module.parameters()]
        self.layout = Layout(tuple(spec.message), self.model.dim)

    def ready(self) -> str:
        """Called once after start; returns this worker's Ray node id (or "local")."""
        try:
            import ray

            if ray.is_initialized():
                return ray.get_runtime_context().get_node_id()
        except ImportError:  # pragma: no cover - ray is a hard dependency
            pass
        return "local"

    def node_data(self, node_id: int) -> NodeData:
        test_ix = self.test_index[node_id] if self.test_index is not None else None
        return NodeData.rows(self.x, self.y, self.index[node_id], self.x_test, test_ix)

    def context(self, task: NodeTask, round_: int, broadcast: dict | None) -> ClientContext:
        node_round = round_ if task.round is None else task.round
        if task.broadcast is not None:
            broadcast = task.broadcast
        return ClientContext(node_round, task.node_id, self.spec.seed, self.spec.num_classes, broadcast)

    def train(
        self, params: torch.Tensor | None, round_: int, tasks: Sequence[NodeTask], broadcast: dict | None
    ) -> Iterator[tuple[NodeTask, ClientContext, ClientResult]]:
        """The tasks' client results, in task order: one node after another, or with
        ``spec.vectorize`` the nodes of each block in cohorts (`ClientUpdate.cohort`)."""
        update = self.spec.client_update
        if self.spec.blocked:
            yield from self.train_cohorts(params, round_, tasks, broadcast)
            return
        for task in tasks:
            ctx = self.context(task, round_, broadcast)
            start = self.start_of(task, params)
            self.model.load(start)
            old = task.state or {}
            try:
                result = update(self.model, start, self.node_data(task.node_id), old.get("client"), ctx)
            except Exception as exc:  # reported with the node id, not swallowed
                raise NodeError(task.node_id, round_, f"{type(exc).__name__}: {exc}") from exc
            yield task, ctx, result

    @staticmethod
    def start_of(task: NodeTask, params: torch.Tensor | None) -> torch.Tensor:
        start = task.start if task.start is not None else params
        if start is None:
            raise ValueError(f"node {task.node_id} has no model: pass params or a per-task start")
        return start

    def train_cohorts(
        self, params: torch.Tensor | None, round_: int, tasks: Sequence[NodeTask], broadcast: dict | None
    ) -> Iterator[tuple[NodeTask, ClientContext, ClientResult]]:
        """Each block's nodes trained together, grouped by their number of steps (a cohort).
        Cohorts never cross blocks, and blocks never cross workers, so a node's result does not
        depend on how many workers there are."""
        update = self.spec.client_update
        start_at = 0
        while start_at < len(tasks):
            end = start_at
            while end < len(tasks) and tasks[end].block == tasks[start_at].block:
                end += 1
            block = list(tasks[start_at:end])
            start_at = end
            ctxs = [self.context(t, round_, broadcast) for t in block]
            datas = [self.node_data(t.node_id) for t in block]
            results: list[ClientResult | None] = [None] * len(block)
            cohorts: dict[int, list[int]] = {}
            for i, data in enumerate(datas):
                cohorts.setdefault(update.steps(len(data)), []).append(i)
            for members in cohorts.values():
                if params is not None and all(block[i].start is None for i in members):
                    starts = params.expand(len(members), -1)  # one model for all: no copies
                else:
                    starts = torch.stack([self.start_of(block[i], params) for i in members])

                try:
                    out = update.cohort(
                        self.model,
                        starts,
                        [datas[i] for i in members],
                        [(block[i].state or {}).get("client") for i in members],
                        [ctxs[i] for i in members],
                    )
                except Exception as exc:  # a cohort fails as a whole; name its first node
                    ids = [block[i].node_id for i in members]
                    raise NodeError(
                        ids[0], round_, f"in a cohort with nodes {ids[:8]}: {type(exc).__name__}: {exc}"
                    ) from exc
                for i, result in zip(members, out):
                    results[i] = result
            for task, ctx, result in zip(block, ctxs, results):
                assert result is not None
                yield task, ctx, result

    def run(
        self,
        params: torch.Tensor | None,
        round_: int,
        tasks: Sequence[NodeTask],
        broadcast: dict | None = None,
        presum: PreSum | None = None,
        *,
        to_cpu: bool = True,
    ) -> RoundResult:
        """Run ``tasks`` (sorted by node id); with ``presum``, return their blocks' sums instead
        of their rows (reports are always returned as rows). Inputs may be on any device; the
        result is on the CPU (``to_cpu``, what crosses processes), or where it was computed."""
        torch.set_num_threads(self.spec.threads)
        if self.device.type != "cpu":  # what crosses processes is on the CPU; the work is here
            params, broadcast = devices.to(params, self.device), devices.to(broadcast, self.device)
            tasks = [task_on(t, self.device) for t in tasks]
        try:
            out = self.run_here(params, round_, tasks, broadcast, presum)
        except torch.cuda.OutOfMemoryError:
            share = f"{self.spec.gpu_share:g} of " if self.spec.gpu_share < 1 else ""
            raise NodeError(
                tasks[0].node_id if tasks else -1,
                round_,
                f"out of GPU memory ({share}{devices.name_of(self.device)}) while training nodes "
                f"{[t.node_id for t in tasks[:8]]}: lower cluster.cohort or the batch size, or give each actor more "
                "of the GPU (cluster.gpus_per_actor)",
            ) from None
        return out if self.device.type == "cpu" or not to_cpu else out.to_cpu()

    def run_here(
        self,
        params: torch.Tensor | None,
        round_: int,
        tasks: Sequence[NodeTask],
        broadcast: dict | None,
        presum: PreSum | None,
    ) -> RoundResult:
        """`run` with every input on this worker's device."""
        import time

        uplink = self.spec.uplink if self.spec.uplink is not None and self.spec.uplink.active else None
        messages, counts, metrics, states, nbytes = [], [], [], [], []
        sums: dict[int, list[Any]] = {}
        pending: list[tuple[NodeTask, torch.Tensor, float]] = []  # the current summed block's rows

        reports: set[bool] = set()
        t0 = time.perf_counter()
        for task, ctx, result in self.train(params, round_, tasks, broadcast):
            old = task.state or {}
            try:
                message = self.layout.pack(result.message) if not result.report else result.message
                assert isinstance(message, torch.Tensor), "a report is one vector"
                row_bytes, node_metrics = result.nbytes, dict(result.metrics)
                uplink_state = old.get("uplink")
                if uplink is not None and not result.report:
                    if message._base is not None:  # a row of a cohort's matrix: an encoder may keep it
                        message = message.clone()

                    message, row_bytes, uplink_state, extra = uplink.encode(
                        message, uplink_state, ctx, self.layer_sizes, self.layout
                    )
                    node_metrics.update(extra)
            except Exception as exc:  # reported with the node id, not swallowed
                raise NodeError(task.node_id, round_, f"{type(exc).__name__}: {exc}") from exc

            if presum is not None and not result.report:
                # summed: a block's rows are added up when the block is complete
                if pending and pending[-1][0].block != task.block:
                    sums[pending[-1][0].block] = block_sum(pending, round_)
                    pending = []
                pending.append((task, message, presum.weight(int(result.num_examples))))
            else:
                check_row(task, message, round_)
                messages.append(message)
            counts.append(int(result.num_examples))
            metrics.append(node_metrics)
            states.append(node_state(result.state, uplink_state))
            nbytes.append(int(row_bytes) if row_bytes is not None else message.numel() * message.element_size())
            reports.add(bool(result.report))
        if pending:
            sums[pending[-1][0].block] = block_sum(pending, round_)
        if len(reports) > 1:
            raise ValueError(f"round {round_} mixes reports and model updates; a strategy sends one kind per round")
        summed = presum is not None and reports != {True}
        return RoundResult(
            node_ids=[t.node_id for t in tasks],
            messages=torch.stack(messages) if messages else torch.zeros(0, self.layout.width, device=self.device),
            num_examples=counts,
            metrics=metrics,
            states=states,
            busy_s=[time.perf_counter() - t0],
            bytes_up=nbytes,
            report=reports == {True},
            sums=[BlockSum(b, total, w) for b, (total, w) in sorted(sums.items())] if summed else None,
        )


def task_on(task: NodeTask, device: torch.device) -> NodeTask:
    """The task with its start model, state and broadcast on ``device``."""
    if task.start is None and task.state is None and task.broadcast is None:
        return task
    return replace(
        task,
        start=devices.to(task.start, device),
        state=devices.to(task.state, device),
        broadcast=devices.to(task.broadcast, device),
    )


def check_row(task: NodeTask, message: torch.Tensor, round_: int) -> None:
    """A message with NaN or Inf is the node's error. NaN and Inf reach the sum (one pass, no
    (d,) temporary); a finite row whose sum overflows is told apart by the full check."""
    if not math.isfinite(float(message.sum())) and not bool(torch.isfinite(message).all()):
        raise NodeError(task.node_id, round_, "update contains NaN or Inf (lower the learning rate?)")


def block_sum(pending: Sequence[tuple[NodeTask, torch.Tensor, float]], round_: int) -> list[Any]:
    """[sum of w * message, sum of w] over a block's rows, in node order: row after row, or one
    matrix-vector product for a run of rows that are consecutive rows of one matrix (a cohort's
    messages). NaN and Inf reach the sum, checked once; row by row only when it is not finite
    (the first such node is named, as without summing)."""
    total: torch.Tensor | None = None
    i = 0
    while i < len(pending):
        j = i + 1
        m = pending[i][1]
        base, d = m._base, m.numel()
        if base is not None and m.is_contiguous():
            while (
                j < len(pending)
                and pending[j][1]._base is base
                and pending[j][1].is_contiguous()
                and pending[j][1].storage_offset() == m.storage_offset() + (j - i) * d
            ):
                j += 1
        if j - i > 1:
            rows = m.as_strided((j - i, d), (d, 1))
            part = torch.tensor([w for _, _, w in pending[i:j]], dtype=m.dtype, device=m.device) @ rows
            total = part if total is None else total.add_(part)
        elif total is None:
            total = m.mul(pending[i][2])  # w * m, as 0 + w * m would be
        else:
            total.add_(m, alpha=pending[i][2])
        i = j
    assert total is not None
    if not math.isfinite(float(total.sum())):
        for task, message, _ in pending:
            check_row(task, message, round_)
    return [total, sum(w for _, _, w in pending)]


def node_state(client: NodeState | None, uplink: NodeState | None) -> NodeState | None:
    """A node's state between participations: its client's and its uplink's parts (None when
    both are empty)."""
    out: NodeState = {}
    if client is not None:
        out["client"] = client
    if uplink:
        out["uplink"] = uplink
    return out or None


def in_blocks(tasks: Sequence[NodeTask], size: int = BLOCK) -> list[NodeTask]:
    """The tasks sorted by node id, each marked with its block (position // ``size``)."""
    ordered = sorted(tasks, key=lambda t: t.node_id)
    return [replace(t, block=p // size) for p, t in enumerate(ordered)]


def round_tasks(spec: WorkerSpec, tasks: Sequence[NodeTask], presum: PreSum | None) -> tuple[list[NodeTask], bool]:
    """What an executor runs: (the tasks, whether they are in blocks that must stay on one
    worker): in blocks when the round is summed (`PreSum`) or vectorised, else as given."""
    blocked = presum is not None or spec.blocked
    return (in_blocks(tasks, spec.block_size) if blocked else list(tasks)), blocked


def assign_blocks(tasks: Sequence[NodeTask], work: Sequence[int], num_workers: int) -> list[list[NodeTask]]:
    """`assign_lpt` over whole blocks (see `in_blocks`): a block's tasks stay on one worker."""
    blocks: dict[int, list[int]] = {}
    for i, t in enumerate(tasks):
        blocks.setdefault(t.block, []).append(i)
    keys = sorted(blocks)
    loads = [sum(max(int(work[i]), 1) for i in blocks[b]) for b in keys]
    order = sorted(range(len(keys)), key=lambda j: (-loads[j], keys[j]))
    totals = [0] * num_workers
    plan: list[list[NodeTask]] = [[] for _ in range(num_workers)]
    for j in order:
        w = min(range(num_workers), key=lambda k: (totals[k], k))
        plan[w] += [tasks[i] for i in blocks[keys[j]]]
        totals[w] += loads[j]
    return [sorted(p, key=lambda t: t.node_id) for p in plan]


def assign_lpt(tasks: Sequence[NodeTask], work: Sequence[int], num_workers: int) -> list[list[NodeTask]]:
    """Longest-processing-time-first: give the next-largest node to the least-loaded worker.
    Deterministic (ties by node id, then worker index). The assignment never changes results,
    only how evenly the workers finish a round."""
    order = sorted(range(len(tasks)), key=lambda i: (-work[i], tasks[i].node_id))
    loads = [0] * num_workers
    plan: list[list[NodeTask]] = [[] for _ in range(num_workers)]
    for i in order:
        w = min(range(num_workers), key=lambda j: (loads[j], j))
        plan[w].append(tasks[i])
        loads[w] += max(int(work[i]), 1)
    return [sorted(p, key=lambda t: t.node_id) for p in plan]


CPU_COHORT = 64
"""Nodes per vectorised block on the CPU (``cluster.cohort=null``)."""
GPU_COHORT_MAX = 256
"""The most nodes per vectorised block on a GPU (``cluster.cohort=null``)."""


def vectorized(spec: WorkerSpec, vectorize: bool, cohort: int | None) -> WorkerSpec:
    """``spec`` with the executor's ``cluster.vectorize`` and ``cluster.cohort`` settings
    (``spec.device`` already set). ``cohort=null`` chooses it for the device: `CPU_COHORT` on
    the CPU; on a GPU as many nodes as keep the cohort's (K, d) parameter, gradient and update
    matrices (about 6 K d floats with momentum) within a quarter of the worker's share of the
    GPU's memory, between 1 and `GPU_COHORT_MAX`."""
    if cohort is None:
        cohort = CPU_COHORT
        if spec.device.startswith("cuda") and vectorize:
            cohort = gpu_cohort(spec)
    if cohort < 1:
        raise ConfigError(f"cluster.cohort={cohort} must be >= 1")
    return replace(spec, vectorize=bool(vectorize), cohort=int(cohort))


def gpu_cohort(spec: WorkerSpec) -> int:
    """`vectorized`'s cohort for ``spec`` on its GPU."""
    d = sum(p.numel() for p in spec.model_factory(tuple(spec.input_shape), int(spec.num_classes)).parameters())
    try:
        total = torch.cuda.get_device_properties(devices.resolve(spec.device)).total_memory
    except (RuntimeError, ConfigError):  # a driver without the GPU (Ray workers elsewhere): assume 16 GiB
        total = 16 * 2**30
    budget = total * spec.gpu_share / 4
    return int(max(1, min(GPU_COHORT_MAX, budget // (6 * 4 * max(d, 1)))))
