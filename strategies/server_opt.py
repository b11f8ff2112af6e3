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
