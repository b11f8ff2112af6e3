"""Compressed uplinks with error feedback (config groups ``compressor`` and ``feedback``;
shared/specs/econtrol.md).

Any server-based strategy's uplink can be compressed: the node runs the strategy's own client
update, which yields g (for FedAvg the pseudo-gradient ``start - local``; with one local step
it is the stochastic gradient times the step size), then a feedback rule turns g into the
compressed message Δ. Per node, in the node state (float32, d entries each):

- ``none`` (naive): Δ = C(g). No state.
- ``ef14`` (Seide et al. 2014; Stich & Karimireddy): p = g + e, Δ = C(p), e <- p - Δ. The
  spec's "unscaled" variant: e is kept in message units and the server applies its step size
  to the average of Δ, which equals the γ-scaled form for a constant step size.
- ``ef21`` (Richtárik et al. 2021): Δ = C(g - h), h <- h + Δ.
- ``ef21_sgdm`` (Fatkhullin et al. 2023): v <- (1 - η) v + η g (v starts at the first g),
  Δ = C(v - h), h <- h + Δ.
- ``econtrol`` (Gao, Islamov, Stich, ICLR 2024, arXiv 2311.05645): Δ = C(η e + g - h), then, both
  with the *old* h: e <- e + g - h - Δ, h <- h + Δ.

For the h-based rules (ef21, ef21_sgdm, econtrol) the estimate h starts, at a node's first
participation, at g sent uncompressed (``h0: full``, 4 d bytes, as both reference
implementations of EControl do) or at C(g) (``h0: compressed``, EF21's original). Either way
the message is always the increment of h_i, so the server can **mirror** the average estimate
h = Σ_i w_i h_i with O(d) memory: h <- h + Σ_{received i} w_i Δ_i, and it steps with the
updated h_{t+1} (the spec's reading of the reference implementations; the paper's Algorithm 2
was not available to verify whether it steps with h_t, a one-step delay). w_i is 1/n, or
n_i / Σ n (examples) when the wrapped strategy is sample-weighted. Nodes that are not sampled in
a round keep contributing their last h_i (EF21 with partial participation).

Because the mirror *is* the average, the h-based rules need the strategy's aggregation to be the
mean; robust aggregators would need every node's h_i on the server (n d memory) and are refused
with a clear error. Naive and EF14 send Δ itself and work with any aggregator.

η's default (0.1) is an in-practice value from the spec's tuning grid; the theory's δ/400 is
far smaller. No official EControl code exists; the update above follows the spec, which was
reconstructed from two independent implementations and the OpenReview discussion.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from fedsim.compress import Compressor, Payload
from fedsim.errors import ConfigError
from fedsim.params import FlatModel
from fedsim.seeding import torch_rng
from fedsim.types import ClientContext, ClientResult, NodeData, NodeState, RoundInfo, UpdateBatch

Compress = Callable[[torch.Tensor], Payload]


def _check_h0(h0: str) -> str:
    if h0 not in ("full", "compressed"):
        raise ConfigError(f"feedback.h0={h0!r} must be 'full' (first g uncompressed) or 'compressed' (C(g))")
    return h0


def _check_unit(name: str, value: float) -> float:
    if not 0.0 <= float(value) <= 1.0:
        raise ConfigError(f"feedback.{name}={value} must be in [0, 1]")
    return float(value)


class Feedback:
    """Base of the feedback rules: ``node(g, state, compress) -> (message, nbytes, state)``."""

    name = "feedback"
    mirror = False

    def node(self, g: torch.Tensor, state: NodeState, compress: Compress) -> tuple[torch.Tensor, int, NodeState]:
        raise NotImplementedError

    def wrap(self, strategy: Any, compressor: Compressor) -> Any:
        """``strategy`` with its uplink compressed by ``compressor`` under this rule; the
        strategy itself when nothing would change (identity compressor, no feedback)."""
        if compressor.is_identity and isinstance(self, Naive):
            return strategy
        return Compressed(strategy, compressor=compressor, feedback=self)


class Naive(Feedback):
    """Δ = C(g): compressed messages without any feedback (may stall or diverge)."""

    name = "none"

    def node(self, g: torch.Tensor, state: NodeState, compress: Compress) -> tuple[torch.Tensor, int, NodeState]:
        p = compress(g)
        return p.values, p.nbytes, {}


class EF14(Feedback):
    """Classic error feedback: p = g + e, Δ = C(p), e <- p - Δ."""

    name = "ef14"

    def node(self, g: torch.Tensor, state: NodeState, compress: Compress) -> tuple[torch.Tensor, int, NodeState]:
        e = state.get("e")
        p = g if e is None else g + e
        out = compress(p)
        return out.values, out.nbytes, {"e": p - out.values}


class _Estimate(Feedback):
    """Shared by the h-based rules: the first participation initialises h (and sends it)."""

    name = "estimate"
    mirror = True

    def __init__(self, *, h0: str = "full") -> None:
        self.h0 = _check_h0(h0)

    def first(self, g: torch.Tensor, compress: Compress) -> tuple[torch.Tensor, int]:
        if self.h0 == "full":
            return g.clone(), 4 * int(g.numel())
        p = compress(g)
        return p.values, p.nbytes


class EF21(_Estimate):
    """EF21: Δ = C(g - h), h <- h + Δ."""

    name = "ef21"

    def node(self, g: torch.Tensor, state: NodeState, compress: Compress) -> tuple[torch.Tensor, int, NodeState]:
        h = state.get("h")
        if h is None:
            h1, nbytes = self.first(g, compress)
            return h1, nbytes, {"h": h1}
        out = compress(g - h)
        return out.values, out.nbytes, {"h": h + out.values}


class EF21SGDM(_Estimate):
    """EF21-SGDM: v <- (1 - momentum) v + momentum g; Δ = C(v - h), h <- h + Δ."""

    name = "ef21_sgdm"

    def __init__(self, *, momentum: float = 0.1, h0: str = "full") -> None:
        super().__init__(h0=h0)
        self.momentum = _check_unit("momentum", momentum)
        if self.momentum == 0.0:
            raise ConfigError("feedback.momentum=0 freezes v; use a value in (0, 1] (1 is plain EF21)")

    def node(self, g: torch.Tensor, state: NodeState, compress: Compress) -> tuple[torch.Tensor, int, NodeState]:
        h, v = state.get("h"), state.get("v")
        v = g.clone() if v is None else (1.0 - self.momentum) * v + self.momentum * g
        if h is None:
            h1, nbytes = self.first(v, compress)
            return h1, nbytes, {"h": h1, "v": v}
        out = compress(v - h)
        return out.values, out.nbytes, {"h": h + out.values, "v": v}


class EControl(_Estimate):
    """EControl: Δ = C(eta e + g - h); e <- e + g - h - Δ; h <- h + Δ (old h in both)."""

    name = "econtrol"

    def __init__(self, *, eta: float = 0.1, h0: str = "full") -> None:
        super().__init__(h0=h0)
        self.eta = _check_unit("eta", eta)

    def node(self, g: torch.Tensor, state: NodeState, compress: Compress) -> tuple[torch.Tensor, int, NodeState]:
        h, e = state.get("h"), state.get("e")
        if h is None:
            h1, nbytes = self.first(g, compress)
            e1 = torch.zeros_like(g) if self.h0 == "full" else g - h1
            return h1, nbytes, {"h": h1, "e": e1}
        innovation = g - h
        arg = innovation if e is None or self.eta == 0.0 else innovation + self.eta * e
        out = compress(arg)
        e_new = innovation - out.values if e is None else e + innovation - out.values
        return out.values, out.nbytes, {"h": h + out.values, "e": e_new}


def layer_sizes(model: FlatModel) -> list[int]:
    return [int(p.numel()) for p in model.module.parameters()]


class CompressedClient:
    """Runs the wrapped client update, then the feedback rule with the compressor. The node
    state is ``{"inner": <wrapped client's state>, "e"/"h"/"v": tensors}``; random compressors
    draw from the node's stream (seed, "compress", round, node_id)."""

    def __init__(self, inner: Any, compressor: Compressor, feedback: Any) -> None:
        self.inner = inner
        self.compressor = compressor
        self.feedback = feedback

    def work(self, num_examples: int) -> int:
        return int(self.inner.work(num_examples))

    def __call__(
        self, model: FlatModel, start: torch.Tensor, data: NodeData, state: NodeState | None, ctx: ClientContext
    ) -> ClientResult:
        state = state or {}
        res = self.inner(model, start, data, state.get("inner"), ctx)
        rng = torch_rng(ctx.seed, "compress", ctx.round, ctx.node_id)
        sizes = layer_sizes(model)
        own = {k: v for k, v in state.items() if k != "inner"}
        message, nbytes, new = self.feedback.node(res.message, own, lambda v: self.compressor.compress(v, rng, sizes))
        metrics = dict(res.metrics)
        if "e" in new:
            metrics["compress/error_norm"] = float(new["e"].norm())
        if res.state is not None:
            new["inner"] = res.state
        return ClientResult(message, new or None, metrics, res.num_examples, nbytes=nbytes)


def _is_mean(strategy: Any) -> bool:
    from strategies.aggregators import Mean

    return isinstance(getattr(strategy, "aggregator", None), Mean) and not getattr(strategy, "preaggregators", [])


class Compressed:
    """A strategy whose uplink is compressed with ``feedback``. Naive and EF14 hand the
    compressed messages to the wrapped strategy's ``step`` unchanged; the h-based rules keep the
    mirrored average estimate ``state["h"]`` and apply the wrapped strategy's server optimiser
    to it. The wrapped strategy's state lives in ``state["inner"]``."""

    def __init__(self, inner: Any, *, compressor: Compressor, feedback: Any) -> None:
        if getattr(inner, "peer_to_peer", False):
            raise ConfigError("compression applies to server-based strategies; remove compressor=/feedback= or use server=sync")
        if feedback.mirror and not (_is_mean(inner) and hasattr(inner, "server_opt")):
            raise ConfigError(
                f"feedback={feedback.name} mirrors the mean of the node estimates, so it needs strategy/aggregator=mean "
                "and no preaggregators; use feedback=ef14 or feedback=none with robust aggregators"
            )
        self.inner = inner
        self.compressor = compressor
        self.feedback = feedback
        self.client = CompressedClient(inner.client, compressor, feedback)

    def __getattr__(self, name: str) -> Any:
        # the asynchronous server reads when and how the wrapped strategy aggregates
        if name in ("trigger", "buffer", "period", "direction") and "inner" in self.__dict__:
            return getattr(self.inner, name)
        raise AttributeError(name)

    def check(self, n: int) -> None:
        check = getattr(self.inner, "check", None)
        if check is not None:
            check(n)

    def init(self, params: torch.Tensor, *, sizes: np.ndarray | None = None) -> dict[str, Any]:
        state: dict[str, Any] = {"inner": self.inner.init(params)}
        if self.feedback.mirror:
            if sizes is None:
                raise ValueError("the h mirror needs the nodes' sizes")
            w = np.asarray(sizes, dtype=np.float64)
            if not getattr(self.inner, "weighted", False) or w.sum() <= 0:
                w = np.ones_like(w)
            state["h"] = torch.zeros_like(params)
            state["node_weights"] = torch.from_numpy(w / w.sum())
        return state

    def defence(self, state: dict[str, Any], info: RoundInfo) -> Callable[[torch.Tensor], torch.Tensor]:
        if self.feedback.mirror or not hasattr(self.inner, "defence"):
            raise ConfigError(f"feedback={self.feedback.name} exposes no defence to line-search against")
        return self.inner.defence(state["inner"], info)

    def step(
        self, params: torch.Tensor, batch: UpdateBatch, state: dict[str, Any], info: RoundInfo
    ) -> tuple[torch.Tensor, dict[str, Any], dict[str, float]]:
        if not self.feedback.mirror:
            new_params, inner_state, metrics = self.inner.step(params, batch, state["inner"], info)
            return new_params, {**state, "inner": inner_state}, metrics
        w = state["node_weights"].index_select(0, batch.node_ids).to(batch.messages.dtype)
        h = state["h"] + w @ batch.messages
        inner_state = state["inner"]
        new_params, opt_state = self.inner.server_opt.step(params, h, inner_state["server_opt"])
        metrics = {"agg/direction_norm": float(h.norm())}
        return new_params, {**state, "h": h, "inner": {**inner_state, "server_opt": opt_state}}, metrics
