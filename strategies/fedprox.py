"""FedProx (T. Li, A. K. Sahu, M. Zaheer, M. Sanjabi, A. Talwalkar, V. Smith, "Federated
Optimization in Heterogeneous Networks", MLSys 2020): FedAvg whose nodes minimise their local
objective plus the proximal term mu/2 ||w - w_start||^2, w_start the model they received."""

from __future__ import annotations

from typing import Any

import torch

from fedsim.errors import ConfigError
from fedsim.types import ClientContext, NodeState
from strategies.client import Correction, LocalSGD
from strategies.fedavg import FedAvg


class FedProxClient(LocalSGD):
    """Local SGD on F_k(w) + mu/2 ||w - w_start||^2: every step adds the term's gradient
    mu (w - w_start) (a `Correction` with prox = mu)."""

    def __init__(self, *, mu: float = 0.01, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if mu < 0:
            raise ConfigError(f"strategy.client.mu={mu} must be >= 0")
        self.mu = float(mu)

    def correction(self, start: torch.Tensor, state: NodeState | None, ctx: ClientContext) -> Correction | None:
        return Correction(prox=self.mu) if self.mu else None


class FedProx(FedAvg):
    """``strategy=fedprox``: FedAvg (any aggregator, server optimiser) with `FedProxClient` nodes."""
