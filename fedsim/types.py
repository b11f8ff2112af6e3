"""Frozen per-round contexts and the struct-of-arrays that carries node updates to the server."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

NodeState = dict[str, Any]
"""A node's persistent state between rounds (e.g. an error-feedback vector). Plain dict of
tensors and numbers, so a checkpoint is a dump of it."""


@dataclass(frozen=True)
class RoundInfo:
    """What the server knows about the round being aggregated."""

    round: int
    version: int
    seed: int
    num_nodes: int
    sampled: tuple[int, ...]
    declared_f: int = 0


@dataclass(frozen=True)
class ClientContext:
    """What a node knows when it runs its client update."""

    round: int
    node_id: int
    seed: int
    num_classes: int
    server: Mapping[str, Any] | None = None
    """What the strategy broadcasts next to the model this round (``strategy.broadcast``), if
    anything: a few numbers, e.g. VRLS's phase and pooled label marginal."""

    def generator(self) -> torch.Generator:
        """The node's training stream for this round: (seed, "train", round, node_id)."""
        from fedsim.seeding import torch_rng

        return torch_rng(self.seed, "train", self.round, self.node_id)


class NodeData:
    """A node's training data: features float32, labels int64.

    Built from tensors (``NodeData(x, y)``) or, by the worker, as rows ``index`` of shared
    tensors (`NodeData.rows`): then the features are gathered only when asked for, and `take`
    gathers just a minibatch's rows, so a round that touches a few minibatches never copies the
    node's whole dataset. Labels are always gathered (they are small).

    ``x_unlabelled`` are the node's own test inputs without labels, for clients that declare
    ``uses_unlabelled`` (label-shift estimation); None otherwise.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, x_unlabelled: torch.Tensor | None = None) -> None:
        self._x: torch.Tensor | None = x
        self.y = y
        self._x_unlabelled = x_unlabelled
        self._source: tuple[torch.Tensor, torch.Tensor] | None = None
        self._test_source: tuple[torch.Tensor, torch.Tensor] | None = None

    @classmethod
    def rows(
        cls,
        x: torch.Tensor,
        y: torch.Tensor,
        index: torch.Tensor,
        x_test: torch.Tensor | None = None,
        test_index: torch.Tensor | None = None,
    ) -> NodeData:
        """Rows ``index`` of shared ``x``, ``y`` (and rows ``test_index`` of ``x_test``), lazily."""
        test = (x_test, test_index) if x_test is not None and test_index is not None else None
        return cls._lazy(x, index, y.index_select(0, index), test, None)

    @classmethod
    def _lazy(
        cls,
        full: torch.Tensor,
        index: torch.Tensor,
        y: torch.Tensor,
        test: tuple[torch.Tensor, torch.Tensor] | None,
        x_unlabelled: torch.Tensor | None,
    ) -> NodeData:
        data = cls.__new__(cls)
        data._x, data.y, data._x_unlabelled = None, y, x_unlabelled
        data._source, data._test_source = (full, index), test
        return data

    @property
    def x(self) -> torch.Tensor:
        if self._x is None:
            assert self._source is not None
            full, index = self._source
            self._x = full.index_select(0, index)
        return self._x

    @property
    def x_unlabelled(self) -> torch.Tensor | None:
        if self._x_unlabelled is None and self._test_source is not None:
            full, index = self._test_source
            self._x_unlabelled = full.index_select(0, index)
        return self._x_unlabelled

    def take(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features, labels) of the rows ``idx`` (positions in this node's data)."""
        if self._x is None and self._source is not None:
            full, index = self._source
            return full.index_select(0, index.index_select(0, idx)), self.y.index_select(0, idx)
        return self.x.index_select(0, idx), self.y.index_select(0, idx)

    def subset(self, idx: torch.Tensor) -> NodeData:
        """The rows ``idx`` as a node dataset of their own (lazy when this one is)."""
        if self._x is None and self._source is not None:
            full, index = self._source
            return NodeData._lazy(
                full, index.index_select(0, idx), self.y.index_select(0, idx), self._test_source, self._x_unlabelled
            )
        return NodeData(self.x.index_select(0, idx), self.y.index_select(0, idx), self.x_unlabelled)

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass
class ClientResult:
    """What a client update returns: the message it sends, its new state, scalar metrics."""

    message: torch.Tensor
    state: NodeState | None
    metrics: dict[str, float] = field(default_factory=dict)
    num_examples: int = 0
    nbytes: int | None = None
    """Bytes the encoded message takes on the wire; None: the dense float32 vector (4 d)."""
    report: bool = False
    """A small report (a few numbers in the first entries of the row), not a model update: the
    uplink never compresses it and error-feedback estimates never absorb it."""


@dataclass
class UpdateBatch:
    """Updates of one round as a struct of arrays, rows sorted by node id.

    ``messages`` is (k, d) float32. ``metrics`` maps a key to a (k,) float64 tensor.
    """

    node_ids: torch.Tensor
    messages: torch.Tensor
    num_examples: torch.Tensor
    base_version: torch.Tensor
    bytes_up: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    report: bool = False
    """The rows are small reports (see `ClientResult.report`), not model updates."""

    def __len__(self) -> int:
        return int(self.node_ids.shape[0])
