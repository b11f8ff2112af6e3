"""The explicit state of a run: everything a checkpoint needs to resume it bit for bit.

RNG positions need no storage: every stream is derived from (seed, path), and the paths of a
step depend only on its round, node and job numbers. What does need storage is here: the model
(or every member's model, peer to peer), the strategy's, every node's, the attack's and the
uplink's state, the totals, and the server loop's own state (the asynchronous clock, its event
queue, the jobs in flight and the model versions they started from).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from fedsim.types import NodeState


@dataclass
class RunState:
    round: int
    """Steps taken (rounds for ``server=sync``/``p2p``, server updates for ``server=async``)."""
    version: int
    """Model version: +1 per step."""
    params: torch.Tensor
    """The model vector, or the (members, d) matrix of every member's model (peer to peer)."""
    strategy_state: dict[str, Any]
    node_states: dict[int, NodeState] = field(default_factory=dict)
    """Per-node state between participations (momenta, error-feedback vectors), keyed by node id:
    ``{"client": ..., "uplink": ...}``."""
    totals: dict[str, float] = field(default_factory=dict)
    attack_state: dict[str, Any] = field(default_factory=dict)
    uplink_state: dict[str, Any] = field(default_factory=dict)
    """The server side of a compressed uplink (error-feedback mirror or per-node estimates)."""
    server_state: Any = None
    """The server loop's own state (`fedsim.server.async_server.AsyncState`; None for the others)."""

    def replace(self, **changes: Any) -> RunState:
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict[str, Any]:
        """A plain dict (tensors, arrays, numbers, dicts) suitable for ``torch.save``."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        server = out["server_state"]
        if dataclasses.is_dataclass(server) and not isinstance(server, type):
            out["server_state"] = {"type": type(server).__name__, **dataclasses.asdict(server)}
        return out
