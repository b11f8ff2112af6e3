"""The plug-in contract: every extension point of fedsim, in one place.

A plug-in is a class named by the ``_target_`` of its YAML in ``conf/`` (there is no registry).
The engine calls only what is declared here, and everything it needs to know about a plug-in
before a run starts is *declared* (class attributes, `Capabilities`), never probed. The one
place that checks that the chosen plug-ins fit together is `fedsim.compat.check`, which runs
before any Ray process starts. ``docs/design.md`` walks through the contract with examples.

Extension points (tensors are float32; ``U`` is an (n, d) matrix of rows, one per node):

- `ClientUpdate`: what a node does with the model it receives.
- `Aggregator`: ``aggregate(U, weights, state) -> (vector, state)``; `PreAggregator`:
  ``(U, weights, *, rng) -> (U', weights')``, chained before an aggregator.
- `ServerOptimizer`: ``init(params)`` and ``step(params, direction, state)``.
- `Strategy`: a client update paired with the server step; declares its `Capabilities`.
- `UpdateAttack` (server side, on the honest rows of a step) and `DataAttack` (inside a node).
- `Feedback`: the node-side rule of a compressed uplink (the compressors are
  ``fedsim.compress.Compressor``); the engine's uplink stage (``fedsim.uplink``) runs it.
- `Participation` (who may take part in round t) and `Latency` (how long a job takes).
- `Server`: a loop that decides who runs and when; the shared round pipeline
  (``fedsim.server.pipeline``) does the rest.
- Callbacks (``fedsim.logging.Callback``): ``on_run_start``, ``on_round_end``, ``on_run_end``.

Facts about the run that plug-ins may need at ``init`` (sizes, label counts, rates, latencies)
reach them as one `RunFacts` object.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import numpy as np
import torch

from fedsim.types import (
    UPDATE,
    ClientContext,
    ClientResult,
    Layout,
    NodeData,
    NodeState,
    RoundInfo,
    UpdateBatch,
    Vector,
)

if TYPE_CHECKING:
    from fedsim.params import FlatModel
    from fedsim.server.pipeline import Pipeline
    from fedsim.state import RunState

SERVERS = ("sync", "async", "p2p")
"""The server loops: synchronous rounds, the asynchronous virtual clock, peer to peer."""

ROW_SPACES = ("update", "current", "model")
TRIGGERS = ("barrier", "buffer", "period")
BROADCASTS = ("none", "scalars", "vectors")

__all__ = ["Layout", "Vector", "UPDATE"]  # re-exported: a plug-in imports the contract from here

Defence = Callable[[torch.Tensor], torch.Tensor]
"""A strategy's aggregation as an attacker sees it: rows -> the vector the server would use."""


@dataclass(frozen=True)
class PeerDefence:
    """A peer-to-peer strategy's mixing as an attacker sees it: ``at(U, i)`` is the model that
    honest node i keeps from the vectors ``U`` (the honest nodes' rows first, node i's at row i,
    then the Byzantine ones). Called as a plain `Defence`, it is honest node 0's view."""

    at: Callable[[torch.Tensor, int], torch.Tensor]

    def __call__(self, U: torch.Tensor) -> torch.Tensor:
        return self.at(U, 0)


@dataclass(frozen=True)
class RunFacts:
    """What is known about a run before its first round; passed to ``Strategy.init``."""

    num_nodes: int
    num_classes: int
    seed: int
    server: str
    """The server loop that drives the run (one of `SERVERS`)."""
    sizes: np.ndarray
    """(N,) training examples per node."""
    train_label_counts: np.ndarray
    """(N, C) label histogram of every node's training set (labels as the nodes hold them, i.e.
    after any label poisoning)."""
    test_label_counts: np.ndarray
    """(N, C) label histogram of every node's own test set (the simulator's truth; strategies use
    it only for diagnostics and oracles)."""
    participation_probs: np.ndarray
    """(N,) every node's long-run participation rate under the run's participation model."""
    node_times: np.ndarray
    """(N,) every node's mean job duration under the run's latency model."""
    byzantine_ids: frozenset[int] = frozenset()
    declared_f: int = 0
    attack: str = "none"
    """The kind of attack of the faulty nodes: "none" (silent), "update" or "data"."""
    members: tuple[int, ...] = ()
    """Nodes that hold a model and run their client update (all but the Byzantine nodes of an
    update attack); in peer-to-peer runs row r of the model matrix belongs to ``members[r]``."""


@dataclass(frozen=True)
class Capabilities:
    """What a strategy declares about itself; the engine reads nothing else.

    - ``servers``: the server loops it runs on (`SERVERS`).
    - ``needs_all_nodes``: every node must take part in every round (refused otherwise).
    - ``accepts_empty``: it also steps on rounds with no row (to count absences).
    - ``extra_rounds``: rounds of earlier phases that come on top of ``rounds``.
    - ``trigger`` / ``buffer`` / ``period``: when the asynchronous server aggregates
      (`TRIGGERS`: wait for every node in flight, every ``buffer`` arrivals, every ``period`` of
      simulated time).
    - ``rows``: what the rows handed to the attack and to ``step`` are: ``update`` (the message
      as sent, e.g. x_sent - y), ``current`` (x_now - y: the message plus the model's drift since
      the node started) or ``model`` (start - message: the node's model after its step).
    - ``linear``: ``step`` depends on the rows only through their weighted mean
      sum w_i m_i / sum w_i with w_i the node's examples (or 1 each, see ``weighted``), so the
      engine may hand it that mean as a single row (error-feedback mirrors).
    - ``weighted``: with ``linear``, whether w_i is the node's number of examples.
    - ``defence``: ``defence()`` returns its aggregation for line-searched attacks.
    - ``message``: the named vectors a node sends (`Vector`; default one model-sized ``update``).
      Each vector has its own uplink stage (compression, error-feedback state, bytes), its own
      Byzantine forgery (`UpdateAttack.vectors`), and is read by name in ``step``
      (``batch.vector(name)``). The row spaces apply to the first vector.
    - ``broadcast``: what ``broadcast(state)`` sends beside the model (`BROADCASTS`): nothing,
      a few numbers, or vectors (sent through the object store once per step; on the asynchronous
      server each node gets the broadcast of the model version it starts from).

    ``linear`` is honoured only for a ``step`` marked with `linear_step` (see `is_linear`): a
    subclass that overrides ``step`` without re-declaring it gets rows.
    """

    servers: frozenset[str] = frozenset({"sync", "async"})
    needs_all_nodes: bool = False
    accepts_empty: bool = False
    extra_rounds: int = 0
    trigger: str = "barrier"
    buffer: int = 1
    period: float | None = None
    rows: str = "update"
    linear: bool = False
    weighted: bool = True
    defence: bool = True
    message: tuple[Vector, ...] = UPDATE
    broadcast: str = "none"

    def __post_init__(self) -> None:
        Layout(tuple(self.message), 1)  # names: non-empty, unique
        if self.broadcast not in BROADCASTS:
            raise ValueError(f"broadcast={self.broadcast!r} must be one of {BROADCASTS}")
        unknown = set(self.servers) - set(SERVERS)
        if unknown:
            raise ValueError(f"unknown servers {sorted(unknown)}; choose from {SERVERS}")
        if self.rows not in ROW_SPACES:
            raise ValueError(f"rows={self.rows!r} must be one of {ROW_SPACES}")
        if self.trigger not in TRIGGERS:
            raise ValueError(f"trigger={self.trigger!r} must be one of {TRIGGERS}")


def linear_step(step: Callable[..., Any]) -> Callable[..., Any]:
    """Mark a ``Strategy.step`` whose result depends on the rows only through their weighted
    mean (when its instance declares ``linear``): the engine may then sum rows where the nodes
    run, and mirror an error-feedback uplink. The mark belongs to the function, so a subclass
    that overrides ``step`` drops it unless it marks its own."""
    step.linear_step = True  # type: ignore[attr-defined]
    return step


def is_linear(strategy: Strategy) -> bool:
    """Whether the engine may hand ``strategy.step`` the weighted mean of the rows as one row:
    it declares ``linear`` and its ``step`` is marked with `linear_step`."""
    return bool(strategy.capabilities.linear) and bool(getattr(type(strategy).step, "linear_step", False))


def message_layout(strategy: Strategy, dim: int) -> Layout:
    """Where the strategy's declared vectors sit in a message row, for a model of ``dim``."""
    return Layout(tuple(strategy.capabilities.message), int(dim))


class ClientUpdate:
    """What a node does with the model it receives.

    ``__call__(model, start, data, state, ctx) -> ClientResult``: ``model`` is already loaded with
    ``start``; ``state`` is the node's own state from its previous participation (None at first);
    the node's random streams come from ``ctx``. The message is usually the pseudo-gradient
    ``start - local``; a message flagged ``report=True`` is a small report (a few numbers), which
    the uplink never compresses.

    Declared: ``needs_unlabelled`` (the node also gets its own unlabelled test inputs,
    ``data.x_unlabelled``). ``work(n)`` is the examples it processes for a node holding n (for
    load balancing only).

    Optional, for ``cluster.vectorize=true``: ``vectorizable`` and ``cohort(model, starts,
    datas, states, ctxs) -> [ClientResult]``, which trains K nodes that take the same number of
    steps (``steps(n)``) at once from the (K, d) matrix of their start models; each node keeps its
    own data, state and streams, so its result equals the one-at-a-time result up to float
    rounding.
    """

    needs_unlabelled: bool = False
    vectorizable: bool = False

    def __call__(
        self, model: FlatModel, start: torch.Tensor, data: NodeData, state: NodeState | None, ctx: ClientContext
    ) -> ClientResult:
        raise NotImplementedError

    def work(self, num_examples: int) -> int:
        return num_examples

    def steps(self, num_examples: int) -> int:
        """Optimizer steps for a node holding ``num_examples`` (cohorts group nodes by it)."""
        return 1

    def cohort(
        self,
        model: FlatModel,
        starts: torch.Tensor,
        datas: Sequence[NodeData],
        states: Sequence[NodeState | None],
        ctxs: Sequence[ClientContext],
    ) -> list[ClientResult]:
        raise NotImplementedError


class Aggregator(Protocol):
    """``aggregate(U, weights, state) -> (vector, state)``; pure: never mutates its inputs, keeps
    any state explicit. ``init()`` gives the initial state, ``check(n)`` raises ConfigError when
    the rule cannot run on n rows with its declared f. ``strategies.aggregators.Rule`` is a base
    class that turns a plain ``__call__(U, weights)`` into this form."""

    def init(self) -> dict[str, Any]: ...

    def check(self, n: int) -> None: ...

    def aggregate(
        self, U: torch.Tensor, weights: torch.Tensor, state: dict[str, Any]
    ) -> tuple[torch.Tensor, dict[str, Any]]: ...


class PreAggregator(Protocol):
    """``(U, weights, *, rng) -> (U', weights')`` before an aggregator; ``check(n)`` and
    ``out_rows(n)`` (rows it outputs for n rows in). ``strategies.preaggregators.PreRule`` is
    the base class."""

    def __call__(
        self, U: torch.Tensor, weights: torch.Tensor, *, rng: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def check(self, n: int) -> None: ...

    def out_rows(self, n: int) -> int: ...


class ServerOptimizer(Protocol):
    """Applies an aggregated direction (a pseudo-gradient) to the server parameters."""

    def init(self, params: torch.Tensor) -> dict[str, Any]: ...

    def step(
        self, params: torch.Tensor, direction: torch.Tensor, state: dict[str, Any]
    ) -> tuple[torch.Tensor, dict[str, Any]]: ...


class Strategy:
    """The pairing of a client update with the server step. No sampling, no transport inside.

    Subclasses set ``client`` and ``capabilities`` (an instance attribute when it depends on
    options) and implement ``init`` and ``step``:

    - ``init(params, facts) -> state``: the strategy's explicit state (plain dicts of tensors,
      arrays and numbers, so that a checkpoint is a dump of it);
    - ``step(params, batch, state, info) -> (params, state, metrics)``: returns new state, never
      mutates the old one. ``params`` is the model vector, or the (members, d) matrix of every
      member's model for peer-to-peer strategies.

    Optional: ``broadcast(state)`` (what is sent with the model, read by nodes as
    ``ctx.broadcast``; declared in ``Capabilities.broadcast``), ``defence(state, info)`` (its aggregation for line-searched attacks: a
    `Defence`, or a `PeerDefence` when every node mixes on its own), ``attack_defaults``,

    ``check(rows)`` (raise ConfigError when its rules cannot take ``rows`` rows per step),
    ``rows_per_step(facts)`` (how many rows its rule gets when the strategy itself decides it, as
    a peer-to-peer exchange does; None: as the server delivers them).
    """

    client: ClientUpdate
    capabilities: Capabilities = Capabilities()
    attack_defaults: ClassVar[Mapping[str, Any]] = {}
    """The settings of line-searched attacks (search, objective, delta, budget) that this method's
    source uses; they apply where the user left an attack's option unset. Empty: ByzFL's."""

    def init(self, params: torch.Tensor, facts: RunFacts) -> dict[str, Any]:
        raise NotImplementedError

    def step(
        self, params: torch.Tensor, batch: UpdateBatch, state: dict[str, Any], info: RoundInfo
    ) -> tuple[torch.Tensor, dict[str, Any], dict[str, Any]]:
        raise NotImplementedError

    def broadcast(self, state: dict[str, Any]) -> dict[str, Any] | None:
        return None

    def defence(self, state: dict[str, Any], info: RoundInfo) -> Defence | None:
        return None

    def check(self, rows: int) -> None:
        pass

    def rows_per_step(self, facts: RunFacts) -> int | None:
        return None


class UpdateAttack:
    """A Byzantine update attack, run at the server once the honest rows of a step are in:
    ``__call__(honest (h, d), f, *, info, rng, state, defence) -> ((f, d) rows, state)``. It sees
    the rows as the strategy will combine them (`Capabilities.rows`). ``rng`` is the step's stream
    (seed, "attack", round); ``state`` its own explicit state (``init()``). Declared:
    ``needs_defence`` (it line-searches against the strategy's ``defence``) and ``vectors``: the
    message vectors it forges (None: all). For a message of several vectors it runs once per
    targeted vector on that vector's columns (with the stream (seed, "attack", round, name) and a
    state of its own per vector); an untargeted vector carries the honest rows' mean."""

    kind = "update"
    needs_defence = False
    vectors: tuple[str, ...] | None = None

    def init(self) -> dict[str, Any]:
        return {}

    def adopt(self, defaults: Mapping[str, Any]) -> None:
        """Take the strategy's ``attack_defaults`` for the options the user left unset."""

    def __call__(
        self,
        honest: torch.Tensor,
        f: int,
        *,
        info: RoundInfo | None = None,
        rng: torch.Generator | None = None,
        state: dict[str, Any] | None = None,
        defence: Defence | None = None,
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        raise NotImplementedError


class DataAttack:
    """A data attack inside the faulty nodes: ``poison(y, num_classes, rng) -> y'`` rewrites a
    node's training labels once, before the run; the node then trains like any other.
    ``nodes``: None (the seeded Byzantine nodes), ``"all"`` or a list of node ids."""

    kind = "data"
    needs_defence = False
    nodes: str | list[int] | None = None

    def init(self) -> dict[str, Any]:
        return {}

    def poison(self, y: np.ndarray, num_classes: int, rng: np.random.Generator) -> np.ndarray:
        raise NotImplementedError


Compress = Callable[[torch.Tensor], Any]


class Feedback:
    """The node side of a compressed uplink: ``node(g, state, compress) -> (message, nbytes,
    state)`` turns the client's message g into what is sent, with ``compress(v)`` giving a
    ``fedsim.compress.Payload``. Declared: ``estimate`` (messages are increments of a per-node
    estimate h_i that the server must accumulate: EF21 and its relatives)."""

    name = "feedback"
    estimate = False

    def node(self, g: torch.Tensor, state: NodeState, compress: Compress) -> tuple[torch.Tensor, int, NodeState]:
        raise NotImplementedError


class Participation:
    """Which nodes take part in round t. ``bind(num_nodes=, seed=, label_counts=)`` fixes it to
    the run (every node's long-run rate, ``probabilities()``); ``__call__(round, num_nodes,
    nodes_per_round, rng)`` gives the sorted ids of round t with ``rng`` = (seed, "sample",
    round); ``active(t)`` the boolean mask of nodes available in round t (the asynchronous server
    dispatches only those). Declared: ``uses_nodes_per_round`` (False for availability models,
    which ignore ``nodes_per_round``)."""

    uses_nodes_per_round = False

    def bind(self, *, num_nodes: int, seed: int, label_counts: np.ndarray | None = None) -> Participation:
        return self

    def probabilities(self, num_nodes: int | None = None, nodes_per_round: int | None = None) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, round_: int, num_nodes: int, nodes_per_round: int, rng: np.random.Generator) -> np.ndarray:
        raise NotImplementedError

    def active(self, t: int) -> np.ndarray:
        raise NotImplementedError


class Latency:
    """Simulated duration of a node's jobs (``server=async``). ``bind(num_nodes=, seed=, sizes=)``
    fixes it to the run; then ``time(node, k)`` is the duration of node's k-th job and
    ``mean_times()`` every node's expected duration."""

    def bind(self, *, num_nodes: int, seed: int, sizes: np.ndarray | None = None) -> Latency:
        raise NotImplementedError

    def time(self, node: int, k: int) -> float:
        raise NotImplementedError

    def mean_times(self) -> np.ndarray:
        raise NotImplementedError


class Server:
    """A server loop: decides who runs and when, and hands every step to the shared round
    pipeline. ``kind`` is one of `SERVERS`. ``initial(params, strategy, facts)`` gives the run's
    first `RunState`; ``run(state, pipeline)`` runs to the end and returns ``(state, summary)``;
    ``rows_per_step(strategy, facts, nodes_per_round)`` is how many rows one aggregation gets (for
    the strategy's ``check``); ``total_rounds(strategy)`` the rounds the progress bar counts."""

    kind = "sync"
    rounds: int

    def initial(self, params: torch.Tensor, strategy: Strategy, facts: RunFacts) -> RunState:
        raise NotImplementedError

    def run(self, state: RunState, pipeline: Pipeline) -> tuple[RunState, dict[str, Any]]:
        raise NotImplementedError

    def rows_per_step(self, strategy: Strategy, facts: RunFacts, nodes_per_round: int) -> int:
        raise NotImplementedError

    def total_rounds(self, strategy: Strategy) -> int:
        return int(self.rounds) + int(strategy.capabilities.extra_rounds)
