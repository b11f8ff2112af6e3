"""The node worker: hosts many virtual nodes and runs their client updates one after another,
reusing one model object. The local executor and every Ray actor run this same code."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from fedsim.errors import NodeError
from fedsim.params import FlatModel
from fedsim.types import ClientContext, NodeData, NodeState
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

    @property
    def unlabelled(self) -> bool:
        """Whether nodes also get their own test inputs, without labels (``NodeData.x_unlabelled``)."""
        return bool(self.client_update.needs_unlabelled)


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

    def row_bytes(self) -> list[int]:
        if self.bytes_up is not None:
            return list(self.bytes_up)
        d = int(self.messages.shape[1]) if self.messages.dim() == 2 else 0
        return [d * self.messages.element_size()] * len(self.node_ids)

    @staticmethod
    def merge(parts: Sequence[RoundResult]) -> RoundResult:
        rows = sorted((nid, part, i) for part in parts for i, nid in enumerate(part.node_ids))
        if not rows:
            raise ValueError("no node results to merge")
        row_bytes = {id(part): part.row_bytes() for part in parts}
        return RoundResult(
            node_ids=[nid for nid, _, _ in rows],
            messages=torch.stack([part.messages[i] for _, part, i in rows]),
            num_examples=[part.num_examples[i] for _, part, i in rows],
            metrics=[part.metrics[i] for _, part, i in rows],
            states=[part.states[i] for _, part, i in rows],
            busy_s=[b for part in parts for b in part.busy_s],
            bytes_up=[row_bytes[id(part)][i] for _, part, i in rows],
            report=any(part.report for part in parts),
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
        self.x = _as_tensor(x)
        self.y = _as_tensor(y)
        self.index = _index(index)
        self.x_test = _as_tensor(x_test) if x_test is not None else None
        self.test_index = _index(test_index) if test_index is not None else None
        self.model = FlatModel(spec.model_factory(tuple(spec.input_shape), int(spec.num_classes)))
        self.layer_sizes = [int(p.numel()) for p in self.model.module.parameters()]

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

    def run(
        self, params: torch.Tensor | None, round_: int, tasks: Sequence[NodeTask], broadcast: dict | None = None
    ) -> RoundResult:
        import time

        torch.set_num_threads(self.spec.threads)
        uplink = self.spec.uplink if self.spec.uplink is not None and self.spec.uplink.active else None
        messages, counts, metrics, states, nbytes = [], [], [], [], []
        reports: set[bool] = set()
        t0 = time.perf_counter()
        for task in tasks:
            ctx = ClientContext(
                round_ if task.round is None else task.round,
                task.node_id,
                self.spec.seed,
                self.spec.num_classes,
                broadcast,
            )
            start = task.start if task.start is not None else params
            if start is None:
                raise ValueError(f"node {task.node_id} has no model: pass params or a per-task start")
            self.model.load(start)
            old = task.state or {}
            try:
                result = self.spec.client_update(
                    self.model, start, self.node_data(task.node_id), old.get("client"), ctx
                )
                message, row_bytes, node_metrics = result.message, result.nbytes, dict(result.metrics)
                uplink_state = old.get("uplink")
                if uplink is not None and not result.report:
                    message, row_bytes, uplink_state, extra = uplink.encode(
                        message, uplink_state, ctx, self.layer_sizes
                    )
                    node_metrics.update(extra)
            except Exception as exc:  # reported with the node id, not swallowed
                raise NodeError(task.node_id, round_, f"{type(exc).__name__}: {exc}") from exc
            if not torch.isfinite(message).all():
                raise NodeError(task.node_id, round_, "update contains NaN or Inf (lower the learning rate?)")
            messages.append(message)
            counts.append(int(result.num_examples))
            metrics.append(node_metrics)
            states.append(node_state(result.state, uplink_state))
            nbytes.append(int(row_bytes) if row_bytes is not None else message.numel() * message.element_size())
            reports.add(bool(result.report))
        if len(reports) > 1:
            raise ValueError(f"round {round_} mixes reports and model updates; a strategy sends one kind per round")
        return RoundResult(
            node_ids=[t.node_id for t in tasks],
            messages=torch.stack(messages) if messages else torch.zeros(0, self.model.dim),
            num_examples=counts,
            metrics=metrics,
            states=states,
            busy_s=[time.perf_counter() - t0],
            bytes_up=nbytes,
            report=reports == {True},
        )


def node_state(client: NodeState | None, uplink: NodeState | None) -> NodeState | None:
    """A node's state between participations: its client's and its uplink's parts (None when
    both are empty)."""
    out: NodeState = {}
    if client is not None:
        out["client"] = client
    if uplink:
        out["uplink"] = uplink
    return out or None


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
