"""Frozen per-round contexts and the struct-of-arrays that carries node updates to the server."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

NodeState = dict[str, Any]
"""A node's persistent state between rounds (e.g. an error-feedback vector). Plain dict of
tensors and numbers, so a checkpoint is a dump of it."""


@dataclass(frozen=True)
class Vector:
    """One named vector of a node's message (`fedsim.contract.Capabilities.message`).

    ``size``: None for a model-sized vector (d entries, e.g. an update or a control variate), or a
    fixed number of entries (a few scalars, e.g. a count of local steps). ``compress``: whether it
    goes through the uplink's compressor and error feedback (its own stage and state); a vector
    that does not is sent dense, as it is. The first vector of a message is its *update*: the one
    the row spaces (``rows=current|model``) apply to."""

    name: str
    size: int | None = None
    compress: bool = True

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("_", "").isalnum():
            raise ValueError(f"vector name {self.name!r} must be a non-empty identifier")
        if self.size is not None and self.size < 1:
            raise ValueError(f"vector {self.name!r}: size={self.size} must be >= 1 (None: the model's size)")


UPDATE = (Vector("update"),)
"""The message of most strategies: one model-sized vector."""


@dataclass(frozen=True)
class Layout:
    """Where each declared vector sits in a message row: the vectors, concatenated in declared
    order, make one row of ``width`` floats. A one-vector layout is the row itself."""

    vectors: tuple[Vector, ...]
    dim: int
    """The model's size d (the size of every model-sized vector)."""

    def __post_init__(self) -> None:
        names = [v.name for v in self.vectors]
        if not names:
            raise ValueError("a message needs at least one vector")
        if len(set(names)) != len(names):
            raise ValueError(f"message vectors {names} repeat a name")

    def size(self, vector: Vector) -> int:
        return self.dim if vector.size is None else int(vector.size)

    @property
    def single(self) -> bool:
        return len(self.vectors) == 1

    @property
    def width(self) -> int:
        return sum(self.size(v) for v in self.vectors)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(v.name for v in self.vectors)

    def items(self) -> Iterator[tuple[Vector, slice]]:
        """(vector, its columns) in row order."""
        at = 0
        for v in self.vectors:
            n = self.size(v)
            yield v, slice(at, at + n)
            at += n

    def columns(self, name: str) -> slice:
        for v, cols in self.items():
            if v.name == name:
                return cols
        raise KeyError(f"the message has no vector {name!r}; it has {', '.join(self.names)}")

    def pack(self, message: torch.Tensor | Mapping[str, torch.Tensor]) -> torch.Tensor:
        """One row from a client's message: the tensor itself (one vector), or the declared
        vectors by name, concatenated."""
        if not isinstance(message, Mapping):
            if not self.single:
                raise ValueError(f"the strategy declares the vectors {', '.join(self.names)}; send them by name")
            return message
        missing = [n for n in self.names if n not in message]
        extra = [n for n in message if n not in self.names]
        if missing or extra:
            raise ValueError(
                f"a message must hold exactly the declared vectors {', '.join(self.names)}"
                + (f"; missing {', '.join(missing)}" if missing else "")
                + (f"; undeclared {', '.join(extra)}" if extra else "")
            )
        parts = []
        for v in self.vectors:
            part = message[v.name].reshape(-1)
            if part.numel() != self.size(v):
                raise ValueError(f"vector {v.name!r} has {part.numel()} entries, declared {self.size(v)}")
            parts.append(part)
        return parts[0] if self.single else torch.cat(parts)

    def unpack(self, row: torch.Tensor) -> dict[str, torch.Tensor]:
        """The named vectors of one row (views)."""
        return {v.name: row[..., cols] for v, cols in self.items()}


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
    broadcast: Mapping[str, Any] | None = None
    """What the strategy broadcasts next to the model (``Strategy.broadcast``; declared by
    `fedsim.contract.Capabilities.broadcast`): e.g. VRLS's phase and pooled label marginal, or
    SCAFFOLD's server control variate. On the asynchronous server it is the broadcast of the
    model version the node started from."""

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
        """(features, labels) of the rows ``idx`` (positions in this node's data). ``idx`` may be
        on the CPU (it is moved to the data's device; `fedsim.contract` clients that take many
        minibatches move their whole plan once instead)."""
        if idx.device != self.y.device:
            idx = idx.to(self.y.device)
        if self._x is None and self._source is not None:
            full, index = self._source
            return full.index_select(0, index.index_select(0, idx)), self.y.index_select(0, idx)
        return self.x.index_select(0, idx), self.y.index_select(0, idx)

    def subset(self, idx: torch.Tensor) -> NodeData:
        """The rows ``idx`` as a node dataset of their own (lazy when this one is)."""
        if idx.device != self.y.device:
            idx = idx.to(self.y.device)
        if self._x is None and self._source is not None:
            full, index = self._source
            return NodeData._lazy(
                full, index.index_select(0, idx), self.y.index_select(0, idx), self._test_source, self._x_unlabelled
            )
        return NodeData(self.x.index_select(0, idx), self.y.index_select(0, idx), self.x_unlabelled)

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @staticmethod
    def concatenated(datas: Sequence[NodeData]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Several nodes' rows as one sequence, node after node: (features, row map, labels)
        such that position p holds the features ``features[row_map[p]]`` (lazy rows of one
        shared array: nothing is copied) or ``features[p]`` (row map None), and label
        ``labels[p]``. A cohort gathers all its minibatches from it in one index select."""
        sources = [d._source for d in datas]
        first = sources[0]
        if first is not None and all(
            d._x is None and src is not None and src[0] is first[0] for d, src in zip(datas, sources)
        ):
            full = sources[0][0]  # type: ignore[index]
            return full, torch.cat([src[1] for src in sources]), torch.cat([d.y for d in datas])  # type: ignore[index]
        return torch.cat([d.x for d in datas]), None, torch.cat([d.y for d in datas])


@dataclass
class ClientResult:
    """What a client update returns: the message it sends, its new state, scalar metrics.

    ``message`` is one (d,) vector, or for a strategy that declares several
    (`fedsim.contract.Capabilities.message`) a mapping from each declared name to its vector."""

    message: torch.Tensor | Mapping[str, torch.Tensor]
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

    ``messages`` is (k, width) float32: each row the node's declared vectors side by side
    (``layout``; None: one vector, the row itself), read by name with `vector`. ``metrics`` maps a
    key to a (k,) float64 tensor.
    """

    node_ids: torch.Tensor
    messages: torch.Tensor
    num_examples: torch.Tensor
    base_version: torch.Tensor
    bytes_up: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    report: bool = False
    """The rows are small reports (see `ClientResult.report`), not model updates."""
    layout: Layout | None = None
    summed: float | None = None
    """When the step's rows were summed where the nodes ran (`fedsim.execution.worker.PreSum`),
    the batch holds their weighted mean as its one row, and this is the sum of their weights (the
    number of senders with data for an unweighted mean); None: one row per sender."""

    def __len__(self) -> int:
        return int(self.node_ids.shape[0])

    def vector(self, name: str) -> torch.Tensor:
        """The (k, size) columns of the declared vector ``name`` (a view)."""
        if self.layout is None:
            raise KeyError(f"the message is one vector; it has no vector {name!r}")
        if self.layout.single:
            return self.messages
        return self.messages[:, self.layout.columns(name)]

    def senders(self) -> float:
        """How many rows the step's weighted mean is over: ``summed`` when the rows were summed
        where the nodes ran, else the number of rows with examples."""
        if self.summed is not None:
            return float(self.summed)
        return float((self.num_examples > 0).sum())
