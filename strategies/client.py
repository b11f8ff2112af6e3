"""Client update rules: what a node does with the model it receives (``fedsim.contract.ClientUpdate``)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from fedsim.contract import ClientUpdate
from fedsim.errors import ConfigError
from fedsim.params import FlatModel
from fedsim.seeding import torch_rng
from fedsim.types import ClientContext, ClientResult, NodeData, NodeState


class LocalSGD(ClientUpdate):
    """Local minibatch SGD, returning the pseudo-gradient ``start - local``.

    Runs ``epochs`` passes over the node's data (reshuffled each pass), or exactly ``steps``
    minibatches when ``steps`` is set (cycling passes). Optional heavy-ball ``momentum`` (reset
    every round) and L2 ``weight_decay``. Batch order comes from the node's own stream
    (seed, "train", round, node_id), so the result does not depend on where the node runs.

    Subclasses change the objective by overriding `loss`, the labels a step trains on by
    overriding `targets`, and the gradient by overriding `adjust_gradient` (which sees the
    start model: a proximal term, as strategies/fedprox.py does).
    """

    def __init__(
        self,
        *,
        lr: float = 0.05,
        epochs: int = 1,
        steps: int | None = None,
        batch_size: int = 32,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        objective: str = "cross_entropy",
    ) -> None:
        if objective not in ("cross_entropy", "hinge"):
            raise ConfigError(f"client objective={objective!r} must be 'cross_entropy' or 'hinge' (multi-class SVM)")
        if lr <= 0:
            raise ConfigError(f"client lr={lr} must be > 0")
        if batch_size < 1:
            raise ConfigError(f"client batch_size={batch_size} must be >= 1")
        if steps is None and epochs < 1:
            raise ConfigError(f"client epochs={epochs} must be >= 1 (or set steps)")
        if steps is not None and steps < 1:
            raise ConfigError(f"client steps={steps} must be >= 1")
        if not 0.0 <= momentum < 1.0:
            raise ConfigError(f"client momentum={momentum} must be in [0, 1)")
        self.lr = float(lr)
        self.epochs = int(epochs)
        self.steps = None if steps is None else int(steps)
        self.batch_size = int(batch_size)
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self.objective = objective

    def work(self, num_examples: int) -> int:
        if num_examples == 0:
            return 0
        if self.steps is not None:
            return self.steps * min(self.batch_size, num_examples)
        return self.epochs * num_examples

    def loss(self, logits: torch.Tensor, y: torch.Tensor, state: NodeState | None) -> torch.Tensor:
        if self.objective == "hinge":
            return F.multi_margin_loss(logits, y)
        return F.cross_entropy(logits, y)

    def targets(self, logits: torch.Tensor, y: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """The labels the step trains on (the node's own by default; FLORAL attacks them)."""
        return y

    def adjust_gradient(self, grad: torch.Tensor, params: torch.Tensor, start: torch.Tensor) -> None:
        """Change the flat gradient in place before the step (after weight decay). ``params`` is
        the node's current model, ``start`` the model it received. Default: nothing."""

    def _batches(self, n: int, gen: torch.Generator):
        """Yield index tensors of minibatches for this round."""
        b = self.batch_size
        if self.steps is None:
            for _ in range(self.epochs):
                perm = torch.randperm(n, generator=gen)
                for i in range(0, n, b):
                    yield perm[i : i + b]
            return
        per_pass = math.ceil(n / b)
        done = 0
        while done < self.steps:
            perm = torch.randperm(n, generator=gen)
            for i in range(min(per_pass, self.steps - done)):
                yield perm[i * b : (i + 1) * b]
            done += min(per_pass, self.steps - done)

    def __call__(
        self, model: FlatModel, start: torch.Tensor, data: NodeData, state: NodeState | None, ctx: ClientContext
    ) -> ClientResult:
        return self.train(model, start, data, state, ctx, lambda logits, y: self.loss(logits, y, state))

    def train(
        self,
        model: FlatModel,
        start: torch.Tensor,
        data: NodeData,
        state: NodeState | None,
        ctx: ClientContext,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> ClientResult:
        """The local SGD loop on ``loss_fn(logits, targets)``; returns ``start - local``."""
        n = len(data)
        if n == 0:
            return ClientResult(torch.zeros_like(start), state, {}, 0)
        gen = ctx.generator()
        aux = torch_rng(ctx.seed, "client-aux", ctx.round, ctx.node_id)
        flat, grad, module = model.flat, model.flat_grad, model.module
        velocity = torch.zeros_like(flat) if self.momentum > 0 else None
        loss_sum = 0.0
        correct = 0
        seen = 0
        for idx in self._batches(n, gen):
            xb, yb = data.take(idx)
            grad.zero_()
            logits = module(xb)
            loss = loss_fn(logits, self.targets(logits.detach(), yb, aux))
            loss.backward()
            with torch.no_grad():
                if self.weight_decay:
                    grad.add_(flat, alpha=self.weight_decay)
                self.adjust_gradient(grad, flat, start)
                if velocity is not None:
                    velocity.mul_(self.momentum).add_(grad)
                    flat.add_(velocity, alpha=-self.lr)
                else:
                    flat.add_(grad, alpha=-self.lr)
                k = int(yb.shape[0])
                loss_sum += float(loss) * k
                correct += int((logits.argmax(1) == yb).sum())
                seen += k
        metrics = {"train/loss": loss_sum / seen, "train/acc": correct / seen}
        return ClientResult(start - flat, state, metrics, n)


class WorkerMomentum(LocalSGD):
    """One minibatch gradient per round with Polyak momentum kept at the node.

    g = grad of the loss (+ ``weight_decay`` * x, the squared-norm penalty; + ``l2_norm`` *
    x / ||x||, the gradient of the norm penalty l2_norm * ||x|| over the whole flat vector) on one
    minibatch of ``batch_size`` at the received model, optionally clipped to norm ``grad_clip``;
    then
    m <- beta * m + (1 - dampening) * g, with ``dampening=None`` meaning dampening = beta (the EMA
    m <- beta m + (1 - beta) g of ByzFL and of the MoNNA paper). m starts at 0 and **persists
    across rounds in the node state** (``{"momentum": m}``), travelling with the node's task.

    The message is m itself (``lr=None``: the server applies its own step, ByzFL's robust D-SGD),
    or the local step lr_t * m (``lr`` set: the node moves to x - lr_t m, as in MoNNA's P2P loop)
    with lr_t = lr / (1 + floor(t / lr_decay_delta) * lr_decay_delta / lr_decay) when
    ``lr_decay`` is set (the MoNNA scripts' schedule), else lr.
    """

    def __init__(
        self,
        *,
        batch_size: int = 25,
        beta: float = 0.9,
        dampening: float | None = None,
        weight_decay: float = 0.0,
        l2_norm: float = 0.0,
        grad_clip: float | None = None,
        lr: float | None = None,
        lr_decay: float | None = None,
        lr_decay_delta: int = 1,
    ) -> None:
        super().__init__(lr=1.0 if lr is None else lr, steps=1, batch_size=batch_size, weight_decay=weight_decay)
        if not 0.0 <= beta < 1.0:
            raise ConfigError(f"client beta={beta} must be in [0, 1)")
        if grad_clip is not None and grad_clip <= 0:
            raise ConfigError(f"client grad_clip={grad_clip} must be > 0 or null")
        if lr_decay is not None and lr_decay <= 0:
            raise ConfigError(f"client lr_decay={lr_decay} must be > 0 or null")
        if lr_decay_delta < 1:
            raise ConfigError(f"client lr_decay_delta={lr_decay_delta} must be >= 1")
        if l2_norm < 0:
            raise ConfigError(f"client l2_norm={l2_norm} must be >= 0")
        self.l2_norm = float(l2_norm)
        self.beta = float(beta)
        self.dampening = self.beta if dampening is None else float(dampening)
        self.grad_clip = None if grad_clip is None else float(grad_clip)
        self.step_lr = None if lr is None else float(lr)
        self.lr_decay = None if lr_decay is None else float(lr_decay)
        self.lr_decay_delta = int(lr_decay_delta)

    def lr_at(self, t: int) -> float:
        """The local step size of round t (only with ``lr`` set)."""
        assert self.step_lr is not None
        if self.lr_decay is None:
            return self.step_lr
        d = self.lr_decay_delta
        return self.step_lr / (1.0 + (t // d) * d / self.lr_decay)

    def __call__(
        self, model: FlatModel, start: torch.Tensor, data: NodeData, state: NodeState | None, ctx: ClientContext
    ) -> ClientResult:
        n = len(data)
        old = None if state is None else state.get("momentum")
        m = torch.zeros_like(start) if old is None else old.clone()
        if n == 0:
            return ClientResult(torch.zeros_like(start), {"momentum": m}, {}, 0)
        idx = next(self._batches(n, ctx.generator()))
        xb, yb = data.take(idx)
        flat, grad = model.flat, model.flat_grad
        grad.zero_()
        logits = model.module(xb)
        loss = self.loss(logits, yb, state)
        loss.backward()
        with torch.no_grad():
            g = grad.clone()
            if self.weight_decay:
                g.add_(flat, alpha=self.weight_decay)
            if self.l2_norm:
                g.add_(flat, alpha=self.l2_norm / max(float(flat.norm()), 1e-30))
            if self.grad_clip is not None:
                norm = float(g.norm())
                if norm > self.grad_clip:
                    g.mul_(self.grad_clip / norm)
            m.mul_(self.beta).add_(g, alpha=1.0 - self.dampening)
            k = int(yb.shape[0])
            metrics = {"train/loss": float(loss), "train/acc": int((logits.argmax(1) == yb).sum()) / k}
        message = m.clone() if self.step_lr is None else m * self.lr_at(ctx.round)
        return ClientResult(message, {"momentum": m}, metrics, n)
