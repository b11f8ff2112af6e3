"""Error-feedback rules of a compressed uplink (config group ``feedback``; the compressors are
``fedsim/compress.py``, and the engine's uplink stage, ``fedsim/uplink.py``, runs them right after
the client update and, for the estimate rules, keeps the server side). Method notes:
docs/methods/econtrol.md.

The node runs its strategy's client update, which yields g (for FedAvg the pseudo-gradient
``start - local``; with one local step it is the stochastic gradient times the step size); the
rule turns g into the compressed message Delta. Per node, in the node state (float32, d entries
each):

- ``none`` (`NoFeedback`): Delta = C(g). No state.
- ``ef14`` (Seide et al. 2014; Stich & Karimireddy): p = g + e, Delta = C(p), e <- p - Delta.
  The "unscaled" variant: e is kept in message units and the server applies its step size to the
  combination of the Delta, which equals the gamma-scaled form for a constant step size.
- ``ef21`` (Richtarik et al. 2021): Delta = C(g - h), h <- h + Delta.
- ``ef21_sgdm`` (Fatkhullin et al. 2023): v <- (1 - eta) v + eta g (v starts at the first g),
  Delta = C(v - h), h <- h + Delta.
- ``econtrol`` (Gao, Islamov, Stich, ICLR 2024, arXiv 2311.05645): Delta = C(eta e + g - h), then,
  both with the *old* h: e <- e + g - h - Delta, h <- h + Delta.

For the estimate rules (ef21, ef21_sgdm, econtrol) h starts, at a node's first participation,
at g sent uncompressed (``h0: full``, 4 d bytes, as both public implementations of EControl do)
or at C(g) (``h0: compressed``, EF21's original). Either way the message is always the increment
of h_i, which the server accumulates (``fedsim/uplink.py``: a mirror of the mean for linear
strategies, every sender's h_i otherwise), and the server steps with the updated h_{t+1}.

eta's default (0.1) is an in-practice value; the theory's delta/400 is far smaller. No official
EControl code exists; the update above follows a reconstruction from two independent
implementations and the OpenReview discussion (docs/methods/econtrol.md).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fedsim.compress import Payload
from fedsim.contract import Feedback
from fedsim.errors import ConfigError
from fedsim.types import NodeState

Compress = Callable[[torch.Tensor], Payload]


def _check_h0(h0: str) -> str:
    if h0 not in ("full", "compressed"):
        raise ConfigError(f"feedback.h0={h0!r} must be 'full' (first g uncompressed) or 'compressed' (C(g))")
    return h0


def _check_unit(name: str, value: float) -> float:
    if not 0.0 <= float(value) <= 1.0:
        raise ConfigError(f"feedback.{name}={value} must be in [0, 1]")
    return float(value)


class NoFeedback(Feedback):
    """Delta = C(g): compressed messages without any feedback (may stall or diverge)."""

    name = "none"

    def node(self, g: torch.Tensor, state: NodeState, compress: Compress) -> tuple[torch.Tensor, int, NodeState]:
        p = compress(g)
        return p.values, p.nbytes, {}


class EF14(Feedback):
    """Classic error feedback: p = g + e, Delta = C(p), e <- p - Delta."""

    name = "ef14"

    def node(self, g: torch.Tensor, state: NodeState, compress: Compress) -> tuple[torch.Tensor, int, NodeState]:
        e = state.get("e")
        p = g if e is None else g + e
        out = compress(p)
        return out.values, out.nbytes, {"e": p - out.values}


class _Estimate(Feedback):
    """Shared by the h-based rules: the first participation initialises h (and sends it)."""

    name = "estimate"
    estimate = True

    def __init__(self, *, h0: str = "full") -> None:
        self.h0 = _check_h0(h0)

    def first(self, g: torch.Tensor, compress: Compress) -> tuple[torch.Tensor, int]:
        if self.h0 == "full":
            return g.clone(), 4 * int(g.numel())
        p = compress(g)
        return p.values, p.nbytes


class EF21(_Estimate):
    """EF21: Delta = C(g - h), h <- h + Delta."""

    name = "ef21"

    def node(self, g: torch.Tensor, state: NodeState, compress: Compress) -> tuple[torch.Tensor, int, NodeState]:
        h = state.get("h")
        if h is None:
            h1, nbytes = self.first(g, compress)
            return h1, nbytes, {"h": h1}
        out = compress(g - h)
        return out.values, out.nbytes, {"h": h + out.values}


class EF21SGDM(_Estimate):
    """EF21-SGDM: v <- (1 - momentum) v + momentum g; Delta = C(v - h), h <- h + Delta."""

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
    """EControl: Delta = C(eta e + g - h); e <- e + g - h - Delta; h <- h + Delta (old h in both)."""

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
