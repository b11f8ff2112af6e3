"""The explicit state of a run: everything a checkpoint needs to resume it bit for bit.

RNG positions need no storage: every stream is derived from (seed, path), and the paths of a
step depend only on its round, node and job numbers. What does need storage is here: the model
(or every member's model, peer to peer), the strategy's, every node's, the attack's and the
uplink's state, the totals, and the server loop's own state (the asynchronous clock, its event
queue, the jobs in flight and the model versions they started from).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from fedsim.types import NodeState


class PersistentMap(Mapping[int, Any]):
    """An immutable map from node ids whose `updated` copy costs what changed, not all nodes.

    States are never mutated once a step has produced them (a checkpoint after a failure saves
    the last complete one), yet copying a dict of N node states every round would make a round
    cost O(N) for N nodes that mostly sit idle. This map keeps a shared base dict and a small
    top dict of recent changes; `updated` copies only the top, and folds it into a new base
    when it outgrows sqrt(N k) (k the entries changed per call), so a round costs O(k + sqrt(N k))
    amortised. Iteration order: the base's keys, then the new keys of the top."""

    __slots__ = ("_base", "_top", "_len")

    def __init__(self, items: Mapping[int, Any] | None = None) -> None:
        self._base: dict[int, Any] = dict(items) if items else {}
        self._top: dict[int, Any] = {}
        self._len = len(self._base)

    def __getitem__(self, key: int) -> Any:
        top = self._top
        if key in top:
            return top[key]
        return self._base[key]

    def __contains__(self, key: object) -> bool:
        return key in self._top or key in self._base

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[int]:
        yield from self._base
        yield from (k for k in self._top if k not in self._base)

    @classmethod
    def of(cls, items: Mapping[int, Any]) -> PersistentMap:
        """``items`` itself when it is one already, else a new map of them."""
        return items if isinstance(items, PersistentMap) else cls(items)

    def get(self, key: int, default: Any = None) -> Any:
        top = self._top
        if key in top:
            return top[key]
        return self._base.get(key, default)

    def updated(self, changes: Mapping[int, Any]) -> PersistentMap:
        """A new map with ``changes`` applied; this one is left as it was."""
        if not changes:
            return self
        out = PersistentMap.__new__(PersistentMap)
        top = {**self._top, **changes}
        new_keys = sum(1 for k in changes if k not in self._top and k not in self._base)
        base = self._base
        if len(top) > max(64, math.isqrt(max(len(base), 1) * len(changes))):
            base, top = {**base, **top}, {}
        out._base, out._top, out._len = base, top, self._len + new_keys
        return out

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and dict(self.items()) == dict(other.items())

    def __repr__(self) -> str:
        return f"PersistentMap({dict(self.items())!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        return (PersistentMap, (dict(self.items()),))


@dataclass
class RunState:
    round: int
    """Steps taken (rounds for ``server=sync``/``p2p``, server updates for ``server=async``)."""
    version: int
    """Model version: +1 per step."""
    params: torch.Tensor
    """The model vector, or the (members, d) matrix of every member's model (peer to peer)."""
    strategy_state: dict[str, Any]
    node_states: Mapping[int, NodeState] = field(default_factory=PersistentMap)
    """Per-node state between participations (momenta, error-feedback vectors), keyed by node id:
    ``{"client": ..., "uplink": ...}`` (a `PersistentMap`: updated per round in O(participants))."""
    totals: dict[str, float] = field(default_factory=dict)
    attack_state: dict[str, Any] = field(default_factory=dict)
    uplink_state: dict[str, Any] = field(default_factory=dict)
    """The server side of a compressed uplink (error-feedback mirror or per-node estimates)."""
    server_state: Any = None
    """The server loop's own state (`fedsim.server.async_server.AsyncState`; None for the others)."""

    def __post_init__(self) -> None:
        self.node_states = PersistentMap.of(self.node_states)

    def replace(self, **changes: Any) -> RunState:
        return dataclasses.replace(self, **changes)

    def to(self, device: torch.device) -> RunState:
        """This state with the server's tensors (model, strategy, attack, uplink and server-loop
        state) on ``device``; node states stay where they are (on the CPU: they travel to nodes)."""
        from fedsim import devices

        server = self.server_state
        if dataclasses.is_dataclass(server) and not isinstance(server, type):
            fields = {f.name: devices.to(getattr(server, f.name), device) for f in dataclasses.fields(server) if f.init}
            server = dataclasses.replace(server, **fields)
        return self.replace(
            params=self.params.to(device),
            strategy_state=devices.to(self.strategy_state, device),
            attack_state=devices.to(self.attack_state, device),
            uplink_state=devices.to(self.uplink_state, device),
            server_state=server,
        )

    def as_dict(self) -> dict[str, Any]:
        """A plain dict (tensors, arrays, numbers, dicts) suitable for ``torch.save``."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["node_states"] = dict(self.node_states.items())
        server = out["server_state"]
        if dataclasses.is_dataclass(server) and not isinstance(server, type):
            out["server_state"] = {"type": type(server).__name__, **dataclasses.asdict(server)}
        return out
