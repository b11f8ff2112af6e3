"""Server steps for stale updates (``server=async``; docs/methods/async.md).

Every node sends m_i = x_sent - y_i (its start model minus its local result). The asynchronous
server (fedsim/server/async_server.py) decides *when* to aggregate from the strategy's declared
``trigger`` and hands the strategy the arrived rows with their ``base_version``; staleness is
tau_i = version now - base_version_i (server updates since the node's dispatch). The step is
FedAvg's (any aggregator and pre-aggregator chain, then the server optimiser) with per-row
weights w_i = s(tau_i) d_i and

    direction = aggregate(U, w) * (sum_i w_i / k)    (``reduce=mean``: sum_i w_i m_i / k)
    direction = aggregate(U, w) * sum_i w_i          (``reduce=sum``:  sum_i w_i m_i)

which for the mean aggregator are the formulas below (x <- x - lr * direction):

- **FedBuff** (Nguyen et al., AISTATS 2022): trigger = a buffer of K arrivals, s(tau) =
  1/sqrt(1 + tau), d_i = 1, reduce = mean (G = sum s(tau_i) m_i / K), server lr eta_g.
- **FedAsync** (Xie et al. 2019): every arrival, x <- (1 - a_t) x + a_t y with
  a_t = alpha s(tau): ``direction=current`` declares rows=current, so the pipeline hands the
  step x_now - y instead of x_sent - y; reduce = sum, server lr = alpha. s is constant, polynomial (tau + 1)^-a or hinge
  (1 if tau <= b else 1/(a (tau - b) + 1)). The proximal term rho of the paper's local
  objective is not implemented (rho = 0).
- **Asynchronous FedAvg** (Fraboni et al., JMLR 2023): every arrival, x <- x - eta_g d_i m_i with
  d_i = 1 (``importance=one``, the paper's "identical") or d_i = (sum_j 1/T_j) T_i p_i
  (``importance=time``, the paper's "weight"; T_i the node's mean latency), reduce = sum.
- **FedFix-dt** (Fraboni et al.): aggregate at the fixed times n dt over the arrivals since, with
  d_i = ceil(T_i / dt) p_i (``importance=period``) or p_i (``importance=share``), reduce = sum.
- **Synchronous FedAvg** on the same clock: ``trigger=barrier`` (wait for every dispatched
  node), d_i = p_i (``share``), reduce = sum; with p_i = 1/N and full concurrency this is
  FedAvg's mean.

p_i is 1/N, or n_i / sum n with ``weighted=true``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from fedsim.contract import RunFacts
from fedsim.errors import ConfigError
from fedsim.types import RoundInfo, UpdateBatch
from strategies.fedavg import FedAvg


def staleness_weight(tau: torch.Tensor, kind: str, a: float = 0.5, b: float = 4.0) -> torch.Tensor:
    """s(tau) of FedAsync: constant 1, polynomial (tau + 1)^-a, hinge 1 / (a (tau - b) + 1) past b."""
    tau = tau.to(torch.float64).clamp_min(0)
    if kind == "constant":
        return torch.ones_like(tau)
    if kind == "polynomial":
        return (tau + 1.0).pow(-a)
    if kind == "hinge":
        return torch.where(tau <= b, torch.ones_like(tau), 1.0 / (a * (tau - b) + 1.0))
    raise ConfigError(f"strategy.staleness={kind!r} must be constant, polynomial or hinge")


class Buffered(FedAvg):
    """FedAvg's aggregation of stale, weighted updates; see the module docstring. The options
    `FedBuff`, `FedAsync`, `AsyncFedAvg` and `FedFix` are this class with their defaults."""

    def __init__(
        self,
        *,
        trigger: str = "buffer",
        buffer: int = 10,
        period: float | None = None,
        staleness: str = "polynomial",
        a: float = 0.5,
        b: float = 4.0,
        importance: str = "one",
        direction: str = "sent",
        reduce: str = "mean",
        weighted: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(weighted=weighted, **kwargs)
        if trigger not in ("buffer", "period", "barrier"):
            raise ConfigError(f"strategy.trigger={trigger!r} must be buffer, period or barrier")
        if trigger == "buffer" and int(buffer) < 1:
            raise ConfigError(f"strategy.buffer={buffer} must be >= 1")
        if trigger == "period" and (period is None or float(period) <= 0):
            raise ConfigError("strategy.trigger=period needs strategy.period > 0 (the aggregation interval dt)")
        if importance not in ("one", "share", "time", "period"):
            raise ConfigError(f"strategy.importance={importance!r} must be one, share, time or period")
        if importance == "period" and trigger != "period":
            raise ConfigError("strategy.importance=period needs trigger=period (FedFix)")
        if direction not in ("sent", "current"):
            raise ConfigError(f"strategy.direction={direction!r} must be sent (x_sent - y) or current (x_now - y)")
        if reduce not in ("mean", "sum"):
            raise ConfigError(f"strategy.reduce={reduce!r} must be mean or sum")
        staleness_weight(torch.zeros(1, device="cpu"), staleness, a, b)  # validates the kind
        self.trigger = trigger
        self.buffer = int(buffer)
        self.period = None if period is None else float(period)
        self.staleness = staleness
        self.a, self.b = float(a), float(b)
        self.importance = importance
        self.direction = direction
        self.reduce = reduce
        self.declare(
            servers=frozenset({"async"}),
            trigger=trigger,
            buffer=self.buffer,
            period=self.period,
            rows="current" if direction == "current" else "update",
            linear=False,
        )

    def init(self, params: torch.Tensor, facts: RunFacts) -> dict[str, Any]:
        state = super().init(params, facts)
        sizes = np.asarray(facts.sizes, dtype=np.float64)
        p = sizes / sizes.sum() if self.weighted and sizes.sum() > 0 else np.full(len(sizes), 1.0 / len(sizes))
        T = np.asarray(facts.node_times, dtype=np.float64)
        if self.importance == "time":
            d = (1.0 / T).sum() * T * p
        elif self.importance == "period":
            assert self.period is not None
            d = np.ceil(T / self.period - 1e-12) * p
        elif self.importance == "share":
            d = p
        else:
            d = np.ones(len(sizes))
        state["importance"] = torch.from_numpy(d).to(params.device)
        return state

    def row_weights(self, batch: UpdateBatch, state: dict[str, Any], info: RoundInfo) -> torch.Tensor:
        tau = info.version - batch.base_version
        s = staleness_weight(tau, self.staleness, self.a, self.b)
        importance = state["importance"]  # on the server's device; the batch's columns may be elsewhere
        return s.to(importance.device) * importance.index_select(0, batch.node_ids.to(importance.device))

    def scale(self, weights: torch.Tensor) -> float:
        """sum_i w_i / k (``reduce=mean``) or sum_i w_i (``sum``): the aggregate times this is
        sum_i w_i m_i / k or sum_i w_i m_i for the mean aggregator."""
        total = float(weights.sum())
        return total / len(weights) if self.reduce == "mean" else total


class FedBuff(Buffered):
    """``strategy=fedbuff``: buffer of K arrivals, s(tau) = (1 + tau)^-1/2, mean over the buffer."""


class FedAsync(Buffered):
    """``strategy=fedasync``: every arrival mixes x <- (1 - a_t) x + a_t y (rows=current)."""


class AsyncFedAvg(Buffered):
    """``strategy=async_fedavg``: every arrival steps x <- x - eta_g d_i (x_sent - y)."""


class FedFix(Buffered):
    """``strategy=fedfix``: steps at the times n dt over the arrivals since."""
