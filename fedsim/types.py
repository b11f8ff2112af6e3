"""Frozen per-round contexts and the struct-of-arrays that carries node updates to the server."""

from __future__ import annotations

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

    def generator(self) -> torch.Generator:
        """The node's training stream for this round: (seed, "train", round, node_id)."""
        from fedsim.seeding import torch_rng

        return torch_rng(self.seed, "train", self.round, self.node_id)


@dataclass
class NodeData:
    """A node's training data as tensors (features float32, labels int64)."""

    x: torch.Tensor
    y: torch.Tensor

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

    def __len__(self) -> int:
        return int(self.node_ids.shape[0])
