"""Which nodes are Byzantine, and how their rows enter a round.

``byzantine.num`` nodes (ids drawn once from the stream (seed, "byzantine"), fixed for the run)
are faulty; ``byzantine.declared`` is what the defence assumes (ByzFL's ``declared_nb_byz``). With
``attack=none`` faulty nodes are silent (crash faults: they send nothing). With an update attack
they do no training and the attack writes their rows from the round's honest rows; with a data
attack (label flip) they train on poisoned labels like any node.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from fedsim.contract import DataAttack, UpdateAttack
from fedsim.data.base import FederatedData
from fedsim.errors import ConfigError
from fedsim.seeding import np_rng, torch_rng
from fedsim.types import RoundInfo, UpdateBatch


@dataclass(frozen=True)
class Byzantine:
    ids: frozenset[int] = frozenset()
    declared: int = 0
    attack: Any = None

    @property
    def num(self) -> int:
        return len(self.ids)

    @property
    def kind(self) -> str:
        """ "none" (faulty nodes are silent), "update" or "data" (the attack's declared kind)."""
        return "none" if self.attack is None else str(self.attack.kind)

    @property
    def is_update_attack(self) -> bool:
        return self.kind == "update"

    @property
    def is_data_attack(self) -> bool:
        return self.kind == "data"

    def trains(self, node_id: int) -> bool:
        """Whether ``node_id`` runs its client update this round."""
        return node_id not in self.ids or self.is_data_attack

    @staticmethod
    def draw(*, num_nodes: int, num: int, declared: int | None, attack: Any, seed: int, name: str = "") -> Byzantine:

        if isinstance(num, bool) or not isinstance(num, int) or not 0 <= num <= num_nodes:
            raise ConfigError(f"byzantine.num={num!r} must be an integer in 0..num_nodes ({num_nodes})")
        declared = num if declared is None else declared
        if isinstance(declared, bool) or not isinstance(declared, int) or declared < 0:
            raise ConfigError(f"byzantine.declared={declared!r} must be an integer >= 0 (or null: = byzantine.num)")
        chosen = attack.nodes if isinstance(attack, DataAttack) else None
        if chosen is not None:  # a data attack at named nodes (or all), not at drawn Byzantine ones
            if num:
                raise ConfigError("attack.nodes names the poisoned nodes itself; leave byzantine.num=0")
            named = list(range(num_nodes)) if chosen == "all" else [int(i) for i in chosen]
            bad = [i for i in named if not 0 <= i < num_nodes]
            if bad:
                raise ConfigError(f"attack.nodes has ids {bad[:5]} outside 0..{num_nodes - 1}")
            return Byzantine(frozenset(named), int(declared), attack)
        if attack is not None and num == 0:
            raise ConfigError(f"attack={name or type(attack).__name__} needs faulty nodes; set byzantine.num >= 1")
        if num == num_nodes and isinstance(attack, UpdateAttack):
            raise ConfigError("every node is Byzantine, so an update attack has no honest rows; lower byzantine.num")
        drawn = np_rng(seed, "byzantine").choice(num_nodes, size=num, replace=False).tolist() if num else []
        return Byzantine(frozenset(int(i) for i in drawn), int(declared), attack)

    def poison(self, data: FederatedData, seed: int) -> FederatedData:
        """For a data attack: the same data with each Byzantine node's labels poisoned. Labels are
        rewritten in a copy of the train labels, so a poisoned example must belong to that node
        alone (true of every partitioner that deals out disjoint index sets)."""
        if not isinstance(self.attack, DataAttack) or not self.ids:
            return data
        y = data.dataset.y_train.copy()
        owner = np.full(len(y), -1, dtype=np.int64)
        for nid, ix in enumerate(data.partition.train):
            ix = np.asarray(ix, dtype=np.int64)
            if nid in self.ids and ((owner[ix] != -1).any() or len(np.unique(ix)) != len(ix)):
                raise ConfigError("label poisoning needs a partition whose nodes hold disjoint examples")
            owner[ix] = nid
        for nid in sorted(self.ids):
            ix = np.asarray(data.partition.train[nid], dtype=np.int64)
            if (owner[ix] != nid).any():
                raise ConfigError("label poisoning needs a partition whose nodes hold disjoint examples")
            y[ix] = self.attack.poison(y[ix], data.dataset.num_classes, np_rng(seed, "poison", nid))
        return FederatedData(replace(data.dataset, y_train=y), data.partition)


@dataclass
class Injection:
    """What happened to one round's batch: how many Byzantine rows went in, the attack's state
    and its chosen strength (optimal attacks)."""

    batch: UpdateBatch
    num_byzantine: int
    attack_state: dict[str, Any] = field(default_factory=dict)


def inject(
    batch: UpdateBatch,
    byz_ids: list[int],
    *,
    byzantine: Byzantine,
    info: RoundInfo,
    state: dict[str, Any],
    defence: Any,
    sizes: np.ndarray,
) -> Injection:
    """Append the update attack's rows for ``byz_ids`` to the honest ``batch`` and shuffle all rows
    with the stream (seed, "shuffle", round), so no rule can find Byzantine rows by position.
    Data attacks and silent nodes leave the batch as it is (apart from the shuffle)."""
    f = len(byz_ids) if byzantine.is_update_attack else 0
    new_state = state
    if f:
        d = batch.messages.shape[1]
        lay = batch.layout
        if lay is None or lay.single:
            rows, new_state = forge(batch.messages, f, byzantine, info, state, defence)
        else:
            rows, new_state = forge_vectors(batch, f, byzantine, info, state, defence)
        # every column of the batch gets its new entries on its own device
        ids = torch.tensor(byz_ids, dtype=torch.int64, device=batch.node_ids.device)
        examples = torch.as_tensor(sizes[byz_ids], dtype=torch.int64, device=batch.num_examples.device)
        batch = replace(
            batch,
            node_ids=torch.cat([batch.node_ids, ids]),
            messages=torch.cat([batch.messages, rows.to(batch.messages.device)]),
            num_examples=torch.cat([batch.num_examples, examples]),
            base_version=torch.cat(
                [batch.base_version, batch.base_version.new_full((f,), info.version, dtype=torch.int64)]
            ),
            bytes_up=torch.cat(
                [batch.bytes_up, batch.bytes_up.new_full((f,), d * rows.element_size(), dtype=torch.int64)]
            ),
            metrics={k: torch.cat([v, v.new_full((f,), float("nan"))]) for k, v in batch.metrics.items()},
        )
    if byzantine.num:
        # the permutation comes from the CPU stream; it is moved once to each device that needs it
        perm = torch.from_numpy(np_rng(info.seed, "shuffle", info.round).permutation(len(batch)))
        on: dict[torch.device, torch.Tensor] = {}

        def at(t: torch.Tensor) -> torch.Tensor:
            if t.device not in on:
                on[t.device] = perm.to(t.device)
            return on[t.device]

        batch = replace(
            batch,
            node_ids=batch.node_ids[at(batch.node_ids)],
            messages=batch.messages.index_select(0, at(batch.messages)),
            num_examples=batch.num_examples[at(batch.num_examples)],
            base_version=batch.base_version[at(batch.base_version)],
            bytes_up=batch.bytes_up[at(batch.bytes_up)],
            metrics={k: v[at(v)] for k, v in batch.metrics.items()},
        )
    return Injection(batch, f, new_state)


def forge(
    honest: torch.Tensor,
    f: int,
    byzantine: Byzantine,
    info: RoundInfo,
    state: dict[str, Any],
    defence: Any,
    *,
    vector: str | None = None,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """The attack's (f, width) rows from the honest rows of one vector (``vector``: its name in a
    message of several, which keys the attack's stream)."""
    path = ("attack", info.round) if vector is None else ("attack", info.round, vector)
    rows, new_state = byzantine.attack(
        honest, f, info=info, rng=torch_rng(info.seed, *path), state=state, defence=defence
    )
    rows = rows.to(honest.dtype)
    if rows.shape != (f, honest.shape[1]):
        raise ConfigError(f"attack returned shape {tuple(rows.shape)}, expected {(f, honest.shape[1])}")
    return rows, new_state


def forge_vectors(
    batch: UpdateBatch, f: int, byzantine: Byzantine, info: RoundInfo, state: dict[str, Any], defence: Any
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Byzantine rows of a message of several vectors: each vector the attack targets
    (`UpdateAttack.vectors`, all by default) is forged from the honest rows of that vector, with
    the attack's state for that vector; an untargeted vector carries the honest rows' mean (what
    an average honest node would send). The defence, if any, is the aggregation of one vector."""
    assert batch.layout is not None and byzantine.attack is not None
    targets = byzantine.attack.vectors
    parts, new_state = [], {}
    for vector, cols in batch.layout.items():
        honest = batch.messages[:, cols]
        if targets is None or vector.name in targets:
            rows, new_state[vector.name] = forge(
                honest, f, byzantine, info, state.get(vector.name, {}), defence, vector=vector.name
            )
        else:
            rows = honest.mean(0, keepdim=True).expand(f, -1)
        parts.append(rows)
    return torch.cat(parts, dim=1), new_state
