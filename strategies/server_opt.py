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
    pseudo-gradients it is close to FedAdam (Reddi et al. 2021), which `FedAdam` implements as the
    paper does (no bias correction, tau)."""

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


class FedOpt:
    """The adaptive server step of FedOpt (Reddi et al., "Adaptive Federated Optimization",
    ICLR 2021, Algorithm 2), shared by `FedAdagrad`, `FedAdam` and `FedYogi`, which differ only
    in ``second_moment``. The paper's Delta is the averaged change of the model (local - start);
    fedsim's direction is start - local, so Delta = -(direction + weight_decay * x), where
    ``weight_decay`` (default 0; not in the paper) is the L2 term of `ServerSGD` and `ServerAdam`:

        m <- beta1 m + (1 - beta1) Delta
        v <- second_moment(v, Delta^2)
        x <- x + lr * m / (sqrt(v) + tau)

    m starts at 0 and v at tau^2 in every coordinate; there is no bias correction (Algorithm 2
    has none). ``tau`` (the paper's "adaptivity") floors the denominator: a coordinate whose
    updates are far above tau moves by about lr * m / sqrt(v), i.e. by up to about lr whatever the
    scale of the update, one whose updates are far below tau by about lr * m / tau (an SGD step
    with learning rate lr / tau). The paper tunes lr and tau per task on a grid; the defaults here
    are beta1 0.9, beta2 0.99 (the paper's), tau 1e-3, lr 0.01 (FedAdam, FedYogi) and 0.1
    (FedAdagrad, whose v is a sum, not an average); docs/methods/fedopt.md says why. The state
    is ``{"m": tensor, "v": tensor}``; ``step`` returns new tensors and never writes to its
    arguments or to the state it is given."""

    def __init__(self, *, lr: float = 0.01, beta1: float = 0.9, tau: float = 1e-3, weight_decay: float = 0.0) -> None:
        lr, beta1, tau, weight_decay = float(lr), float(beta1), float(tau), float(weight_decay)
        name = type(self).__name__
        if not lr > 0:
            raise ValueError(f"{name} lr must be > 0, got {lr}")
        if not 0.0 <= beta1 < 1.0:
            raise ValueError(f"{name} beta1 must be in [0, 1), got {beta1}")
        if not tau > 0:
            raise ValueError(f"{name} tau must be > 0 (v starts at tau^2 and tau is added to sqrt(v)), got {tau}")
        if not weight_decay >= 0:
            raise ValueError(f"{name} weight_decay must be >= 0, got {weight_decay}")
        self.lr, self.beta1, self.tau, self.weight_decay = lr, beta1, tau, weight_decay

    def second_moment(self, v: torch.Tensor, delta2: torch.Tensor) -> torch.Tensor:
        """The new v from the old v and Delta^2, as a new tensor."""
        raise NotImplementedError

    def init(self, params: torch.Tensor) -> dict[str, Any]:
        return {"m": torch.zeros_like(params), "v": torch.full_like(params, self.tau**2)}

    def step(
        self, params: torch.Tensor, direction: torch.Tensor, state: dict[str, Any]
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        g = direction.to(params.dtype)
        if self.weight_decay:
            g = g + self.weight_decay * params
        delta = -g  # fedsim's direction is start - local; the paper's Delta is local - start
        m = state["m"] * self.beta1 + (1.0 - self.beta1) * delta
        v = self.second_moment(state["v"], delta * delta)
        return params + self.lr * m / (v.sqrt() + self.tau), {"m": m, "v": v}


class FedAdagrad(FedOpt):
    """FedAdagrad (Reddi et al., ICLR 2021, Algorithm 2): v <- v + Delta^2, the sum of all squared
    updates, so every coordinate's step shrinks as its updates add up. FedAdam's v adds them with
    weight 1 - beta2 = 0.01 (and forgets), so FedAdagrad's sqrt(v) is about 10 times FedAdam's in
    the first rounds and more later: hence a default lr of 0.1, ten times FedAdam's. See `FedOpt`."""

    def __init__(self, *, lr: float = 0.1, beta1: float = 0.9, tau: float = 1e-3, weight_decay: float = 0.0) -> None:
        super().__init__(lr=lr, beta1=beta1, tau=tau, weight_decay=weight_decay)

    def second_moment(self, v: torch.Tensor, delta2: torch.Tensor) -> torch.Tensor:
        return v + delta2


class FedAdam(FedOpt):
    """FedAdam (Reddi et al., ICLR 2021, Algorithm 2): v <- beta2 v + (1 - beta2) Delta^2, an
    exponential average of the squared updates. Unlike `ServerAdam` (torch's Adam) it has no bias
    correction, starts v at tau^2 and adds tau, not eps, to sqrt(v). See `FedOpt`."""

    def __init__(
        self,
        *,
        lr: float = 0.01,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(lr=lr, beta1=beta1, tau=tau, weight_decay=weight_decay)
        beta2 = float(beta2)
        if not 0.0 <= beta2 < 1.0:
            raise ValueError(f"{type(self).__name__} beta2 must be in [0, 1), got {beta2}")
        self.beta2 = beta2

    def second_moment(self, v: torch.Tensor, delta2: torch.Tensor) -> torch.Tensor:
        return self.beta2 * v + (1.0 - self.beta2) * delta2


class FedYogi(FedAdam):
    """FedYogi (Reddi et al., ICLR 2021, Algorithm 2; Yogi: Zaheer et al., NeurIPS 2018):
    v <- v - (1 - beta2) Delta^2 sign(v - Delta^2). v moves towards Delta^2 by (1 - beta2) Delta^2
    instead of FedAdam's (1 - beta2) |Delta^2 - v|: once the squared updates fall below v / 2, v
    falls more slowly than FedAdam's, and so does the effective step lr / (sqrt(v) + tau) rise
    more slowly; v stays > 0. Options and defaults as `FedAdam` (a subclass only to share them);
    see `FedOpt`."""

    def second_moment(self, v: torch.Tensor, delta2: torch.Tensor) -> torch.Tensor:
        return v - (1.0 - self.beta2) * delta2 * torch.sign(v - delta2)
