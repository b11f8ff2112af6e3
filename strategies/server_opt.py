"""Server optimizers: ``init(params) -> state``; ``step(params, direction, state) -> (params, state)``.

The direction is a pseudo-gradient (start - local model, averaged), so a step *descends* it.
"""

from __future__ import annotations

from typing import Any

import torch


class ServerSGD:
    """x <- x - lr * v with v = momentum * v + (direction + weight_decay * x) (heavy ball; Hsu et
    al. 2019's FedAvgM for momentum > 0). lr = 1, momentum = 0 and no weight decay is plain
    FedAvg: x becomes the averaged model. ``weight_decay`` is applied after aggregation, where no
    Byzantine node can touch it (ByzFL's server optimiser, default 1e-4 there)."""

    def __init__(self, *, lr: float = 1.0, momentum: float = 0.0, weight_decay: float = 0.0) -> None:
        if lr <= 0:
            raise ValueError(f"server lr must be > 0, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"server momentum must be in [0, 1), got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"server weight_decay must be >= 0, got {weight_decay}")
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)

    def init(self, params: torch.Tensor) -> dict[str, Any]:
        return {"velocity": torch.zeros_like(params)} if self.momentum > 0 else {}

    def step(
        self, params: torch.Tensor, direction: torch.Tensor, state: dict[str, Any]
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        if self.weight_decay:
            direction = direction + self.weight_decay * params
        if self.momentum > 0:
            velocity = state["velocity"] * self.momentum + direction
            return params - self.lr * velocity, {"velocity": velocity}
        return params - self.lr * direction, state


class ServerAdam:
    """Adam (Kingma & Ba 2015) on the aggregated direction, as ``torch.optim.Adam`` computes it:
    g = direction + weight_decay * x (L2, not decoupled); m <- b1 m + (1 - b1) g;
    v <- b2 v + (1 - b2) g^2; x <- x - lr * m_hat / (sqrt(v_hat) + eps) with the bias-corrected
    m_hat = m / (1 - b1^t), v_hat = v / (1 - b2^t). With the mean of the nodes' minibatch
    gradients as direction this is FedSGD with a server Adam (the VRLS code's loop); with
    pseudo-gradients it is FedAdam (Reddi et al. 2021) without its tau."""

    def __init__(
        self,
        *,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        b1, b2 = (float(b) for b in betas)
        if lr <= 0:
            raise ValueError(f"server lr must be > 0, got {lr}")
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"server Adam betas must be in [0, 1), got {betas}")
        if eps <= 0 or weight_decay < 0:
            raise ValueError("server Adam needs eps > 0 and weight_decay >= 0")
        self.lr, self.b1, self.b2, self.eps, self.weight_decay = float(lr), b1, b2, float(eps), float(weight_decay)

    def init(self, params: torch.Tensor) -> dict[str, Any]:
        return {"m": torch.zeros_like(params), "v": torch.zeros_like(params), "t": 0}

    def step(
        self, params: torch.Tensor, direction: torch.Tensor, state: dict[str, Any]
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        g = direction.to(params.dtype)
        if self.weight_decay:
            g = g + self.weight_decay * params
        t = int(state["t"]) + 1
        m = state["m"] * self.b1 + (1.0 - self.b1) * g
        v = state["v"] * self.b2 + (1.0 - self.b2) * g * g
        m_hat = m / (1.0 - self.b1**t)
        v_hat = v / (1.0 - self.b2**t)
        return params - self.lr * m_hat / (v_hat.sqrt() + self.eps), {"m": m, "v": v, "t": t}
