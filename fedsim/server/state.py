"""The server's explicit state: everything a checkpoint needs to resume a run.

RNG positions need no storage: every stream is derived from (seed, path), and the paths of a
round depend only on the round number.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from fedsim.types import NodeState


@dataclass
class ServerState:
    round: int
    version: int
    params: torch.Tensor
    strategy_state: dict[str, Any]
    node_states: dict[int, NodeState] = field(default_factory=dict)
    totals: dict[str, float] = field(default_factory=dict)
    attack_state: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """A plain dict (tensors, numbers, dicts) suitable for ``torch.save``."""
        return {
            "round": self.round,
            "version": self.version,
            "params": self.params,
            "strategy_state": self.strategy_state,
            "node_states": self.node_states,
            "totals": dict(self.totals),
            "attack_state": self.attack_state,
        }
