"""The plug-in interfaces (DESIGN.md section 5) as structural protocols: a plain function or a
small class qualifies. Tensors are float32; ``U`` is (n, d)."""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from fedsim.params import FlatModel
from fedsim.types import ClientContext, ClientResult, NodeData, NodeState, RoundInfo, UpdateBatch


@runtime_checkable
class Aggregator(Protocol):
    """``(U, weights) -> vector``; pure, never mutates its inputs."""

    def __call__(self, U: torch.Tensor, weights: torch.Tensor, /) -> torch.Tensor: ...


@runtime_checkable
class ServerOptimizer(Protocol):
    """Applies an aggregated direction (a pseudo-gradient) to the server parameters."""

    def init(self, params: torch.Tensor) -> dict[str, Any]: ...

    def step(
        self, params: torch.Tensor, direction: torch.Tensor, state: dict[str, Any]
    ) -> tuple[torch.Tensor, dict[str, Any]]: ...


@runtime_checkable
class ClientUpdate(Protocol):
    """What a node does with the model it receives. ``model`` is already loaded with ``start``;
    the message is typically the pseudo-gradient ``start - local``."""

    def __call__(
        self, model: FlatModel, start: torch.Tensor, data: NodeData, state: NodeState | None, ctx: ClientContext
    ) -> ClientResult: ...

    def work(self, num_examples: int) -> int:
        """Examples this update processes for a node holding ``num_examples`` (for scheduling)."""
        ...


@runtime_checkable
class Strategy(Protocol):
    """The pairing of a client update with a server step. No sampling, no transport inside."""

    client: ClientUpdate

    def init(self, params: torch.Tensor) -> dict[str, Any]: ...

    def step(
        self, params: torch.Tensor, batch: UpdateBatch, state: dict[str, Any], info: RoundInfo
    ) -> tuple[torch.Tensor, dict[str, Any], dict[str, float]]: ...
