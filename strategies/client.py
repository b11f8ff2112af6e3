"""Client update rules: what a node does with the model it receives (``fedsim.contract.ClientUpdate``)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from fedsim.contract import ClientUpdate
from fedsim.errors import ConfigError
from fedsim.params import FlatModel, FunctionalModel
from fedsim.seeding import torch_rng
from fedsim.types import ClientContext, ClientResult, NodeData, NodeState


@dataclass(frozen=True)
class Correction:
    """Per-node terms that a client adds to every local gradient g (after weight decay):
    g + prox * (x - start) + linear, with x the node's current model and ``start`` the model it
    received. FedProx: prox = mu; SCAFFOLD: linear = c - c_i; FedDyn: prox = alpha and
    linear = -g_i. Terms of this form keep a client on the vectorised cohort path."""

    prox: float = 0.0
    linear: torch.Tensor | None = None


def sgd_direction(
    g: torch.Tensor,
    x: torch.Tensor,
    start: torch.Tensor,
    *,
    weight_decay: float,
    prox: float = 0.0,
    linear: torch.Tensor | None = None,
    velocity: torch.Tensor | None = None,
    momentum: float = 0.0,
) -> torch.Tensor:
    """The local SGD update, written once for the one-node loop (flat (d,) vectors) and the
    cohort loop (per-parameter (K, *shape) views): the gradient ``g`` (changed in place) plus
    weight decay and the client's `Correction`, then heavy-ball momentum; returns the direction
    that the model descends (x <- x - lr * direction)."""
    if weight_decay:
        g.add_(x, alpha=weight_decay)
    if prox:
        g.add_(x - start, alpha=prox)
    if linear is not None:
        g.add_(linear)
    if velocity is None:
        return g
    velocity.mul_(momentum).add_(g)
    return velocity


class LocalSGD(ClientUpdate):
    """Local minibatch SGD, returning the pseudo-gradient ``start - local``.

    Runs ``epochs`` passes over the node's data (reshuffled each pass), or exactly ``steps``
    minibatches when ``steps`` is set (cycling passes). Optional heavy-ball ``momentum`` (reset
    every round) and L2 ``weight_decay``. Batch order comes from the node's own stream
    (seed, "train", round, node_id), so the result does not depend on where the node runs.

    Subclasses change the objective by overriding `loss`, the labels a step trains on by
    overriding `targets`, the gradient by `correction` (per-node terms from the node's state and
    the round's broadcast: a proximal term, as strategies/fedprox.py does, or a control variate),
    and what is sent and kept by `finish` (a message of several vectors, a new node state). The
    last two keep the client on the vectorised cohort path; the first two do not.
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
        self.local_steps = None if steps is None else int(steps)
        self.batch_size = int(batch_size)
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self.objective = objective

    def work(self, num_examples: int) -> int:
        if num_examples == 0:
            return 0
        if self.local_steps is not None:
            return self.local_steps * min(self.batch_size, num_examples)
        return self.epochs * num_examples

    def steps(self, num_examples: int) -> int:
        if num_examples == 0:
            return 0
        if self.local_steps is not None:
            return self.local_steps
        return self.epochs * math.ceil(num_examples / self.batch_size)

    @property
    def vectorizable(self) -> bool:  # type: ignore[override]
        """Local SGD with any `correction` and `finish`; a subclass that changes `loss`,
        `targets` or ``__call__`` trains one node at a time unless it says otherwise
        (`not_vectorized` says why)."""
        return not self.not_vectorized

    @property
    def not_vectorized(self) -> str:
        """Why this client has no cohort path ("" when it has one)."""
        cls = type(self)
        changed = [
            name for name in ("loss", "targets", "__call__") if getattr(cls, name) is not getattr(LocalSGD, name)
        ]
        return f"{cls.__name__} overrides {', '.join(changed)}" if changed else ""

    def loss(self, logits: torch.Tensor, y: torch.Tensor, state: NodeState | None) -> torch.Tensor:
        if self.objective == "hinge":
            return F.multi_margin_loss(logits, y)
        return F.cross_entropy(logits, y)

    def terms(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The per-example losses whose mean is `loss` (for cohorts)."""
        if self.objective == "hinge":
            return F.multi_margin_loss(logits, y, reduction="none")
        return F.cross_entropy(logits, y, reduction="none")

    def targets(self, logits: torch.Tensor, y: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        """The labels the step trains on (the node's own by default; FLORAL attacks them)."""
        return y

    def correction(self, start: torch.Tensor, state: NodeState | None, ctx: ClientContext) -> Correction | None:
        """The terms this node adds to every local gradient this round (`Correction`), from the
        model it received, its own state and the round's context (``ctx.broadcast``). Default:
        none."""
        return None

    def finish(
        self,
        model: FlatModel,
        delta: torch.Tensor,
        start: torch.Tensor,
        data: NodeData,
        state: NodeState | None,
        ctx: ClientContext,
    ) -> tuple[torch.Tensor | Mapping[str, torch.Tensor], NodeState | None]:
        """(message, new state) once the local steps are done; ``delta`` = start - local
        model (zeros for a node without data). ``model`` may be loaded with any parameters
        (e.g. ``start``, to take a gradient there). Default: the message is ``delta``, the state
        unchanged. Strategies that declare several vectors return them by name here."""
        return delta, state

    def _batches(self, n: int, gen: torch.Generator):
        """Yield index tensors of minibatches for this round."""
        b = self.batch_size
        if self.local_steps is None:
            for _ in range(self.epochs):
                perm = torch.randperm(n, generator=gen, device="cpu")
                for i in range(0, n, b):
                    yield perm[i : i + b]
            return
        per_pass = math.ceil(n / b)
        done = 0
        while done < self.local_steps:
            perm = torch.randperm(n, generator=gen, device="cpu")
            for i in range(min(per_pass, self.local_steps - done)):
                yield perm[i * b : (i + 1) * b]
            done += min(per_pass, self.local_steps - done)

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
            return self.empty(model, start, state, ctx)
        gen = ctx.generator()
        # the stream of `targets` (FLORAL's attacker), made only for clients that use it
        aux = torch_rng(ctx.seed, "client-aux", ctx.round, ctx.node_id) if self.uses_aux else None
        flat, grad, module = model.flat, model.flat_grad, model.module
        velocity = torch.zeros_like(flat) if self.momentum > 0 else None
        corr = self.correction(start, state, ctx) or NO_CORRECTION
        tally = Tally(flat.device)
        for idx in on_device(self._batches(n, gen), flat.device):
            xb, yb = data.take(idx)
            grad.zero_()
            logits = module(xb)
            loss = loss_fn(logits, self.targets(logits.detach(), yb, aux))
            loss.backward()
            with torch.no_grad():
                direction = sgd_direction(
                    grad,
                    flat,
                    start,
                    weight_decay=self.weight_decay,
                    prox=corr.prox,
                    linear=corr.linear,
                    velocity=velocity,
                    momentum=self.momentum,
                )
                flat.add_(direction, alpha=-self.lr)
                tally.add(loss, logits, yb)
        metrics = tally.metrics()
        message, new_state = self.finish(model, start - flat, start, data, state, ctx)
        return ClientResult(message, new_state, metrics, n)

    @property
    def uses_aux(self) -> bool:
        return type(self).targets is not LocalSGD.targets

    def cohort(self, model, starts, datas, states, ctxs):
        """`train` for K nodes at once: per step, each node's own minibatch (from its own
        stream), padded to the largest with zero-weight rows, and one ``vmap`` of ``grad`` over
        the (K, d) parameter matrix. Each node's loss is the mean over its real examples, as in
        `train`; the update rule is the same, row by row."""
        plans = [list(self._batches(len(d), ctx.generator())) if len(d) else [] for d, ctx in zip(datas, ctxs)]
        return self.train_cohort(model, starts, datas, states, plans, ctxs=ctxs)

    def train_cohort(
        self,
        model: FlatModel,
        starts: torch.Tensor,
        datas: Sequence[NodeData],
        states: Sequence[NodeState | None],
        plans: Sequence[Sequence[torch.Tensor]],
        *,
        class_weights: torch.Tensor | None = None,
        normalize: str = "count",
        zeta: float = 0.0,
        gradient: bool = False,
        ctxs: Sequence[ClientContext] | None = None,
    ) -> list[ClientResult]:
        """The cohort loop, given each node's minibatches (``plans``; nodes with different
        numbers of steps run as separate groups). The loss of node k on a batch is
        sum_i a_i l_i / N_k with l_i the example's loss (minus ``zeta`` times its prediction
        entropy), a_i = ``class_weights[k, y_i]`` (1 without) and N_k the batch size
        (``normalize="count"``) or sum_i a_i (``"weights"``). ``gradient=True``: one step's
        gradient at the start model is the message (FedSGD), nothing is trained. With ``ctxs``
        each node's `correction` applies at every step and its `finish` makes its message."""
        K = len(datas)
        out: list[ClientResult | None] = [None] * K
        groups: dict[int, list[int]] = {}
        for k, plan in enumerate(plans):
            if len(datas[k]) == 0:
                out[k] = self.empty(model, starts[k], states[k], None if ctxs is None else ctxs[k])
            else:
                groups.setdefault(len(plan), []).append(k)
        fm, batched, from_one = self._vector_parts(model, zeta, normalize)
        # Each parameter's (K, *shape) gradient updates its view of the rows directly. The rows
        # kept are D = start - current model (the messages), so a step is D += lr * v and the
        # model S - D is formed only when a later step needs it; a first step from one shared
        # model (the synchronous case) runs that model unbatched.
        C = None if class_weights is None else class_weights.shape[1]
        shared = starts.shape[0] > 0 and starts.stride(0) == 0  # one model, expanded
        dev = starts.device
        for members in groups.values():
            n_k = len(members)
            chosen = torch.tensor(members, device=dev)
            if shared:
                S = starts[0].expand(n_k, -1)
            else:
                S = starts if n_k == K else starts.index_select(0, chosen)
            A = (
                torch.ones(n_k, C or 1, device=dev)
                if class_weights is None
                else class_weights.index_select(0, chosen.to(class_weights.device))
            )
            D: torch.Tensor | None = None
            velocity = torch.zeros(S.shape, dtype=S.dtype, device=dev) if self.momentum > 0 and not gradient else None
            Vv = fm.views(velocity) if velocity is not None else None
            prox, Lv = self.cohort_correction(fm, S, members, states, ctxs)
            Sv = fm.views(S) if prox else None
            loss_sum = torch.zeros(n_k, dtype=torch.float64, device=dev)
            correct = torch.zeros(n_k, dtype=torch.int64, device=dev)
            seen = torch.zeros(n_k, dtype=torch.int64, device=dev)
            batches = CohortBatches([datas[k] for k in members], [plans[k] for k in members], dev)
            for s in range(len(plans[members[0]])):
                X, Y, M = batches.step(s)
                P = S if D is None else torch.sub(S, D)
                Pv = fm.views(P)
                if D is None and shared:
                    grads, (loss, logits) = from_one(fm.one(S[0]), X, Y, M, A)
                else:
                    grads, (loss, logits) = batched(Pv, X, Y, M, A)
                with torch.no_grad():
                    counts = M.sum(1).to(torch.int64)
                    loss_sum += loss.detach().to(torch.float64) * counts
                    correct += ((logits.argmax(-1) == Y) & M.bool()).sum(1)
                    seen += counts
                    if gradient:
                        D = fm.flat(grads)
                        break
                    first = D is None
                    if first:
                        D = torch.empty(S.shape, dtype=S.dtype, device=S.device)
                    Dv = fm.views(D)
                    for name, g in grads.items():
                        v = sgd_direction(
                            g,
                            Pv[name],
                            Sv[name] if Sv is not None else Pv[name],
                            weight_decay=self.weight_decay,
                            prox=prox,
                            linear=None if Lv is None else Lv[name],
                            velocity=None if Vv is None else Vv[name],
                            momentum=self.momentum,
                        )
                        if first:
                            torch.mul(v, self.lr, out=Dv[name])
                        else:
                            Dv[name].add_(v, alpha=self.lr)
            assert D is not None
            sums, rights, counts_all = loss_sum.tolist(), correct.tolist(), seen.tolist()  # one read per cohort
            for j, k in enumerate(members):
                n = int(counts_all[j])
                metrics = {"train/loss": float(sums[j]) / n, "train/acc": int(rights[j]) / n}
                message: torch.Tensor | Mapping[str, torch.Tensor] = D[j]
                state = states[k]
                if ctxs is not None and not gradient:
                    model_start = S[j]
                    message, state = self.finish(model, D[j], model_start, datas[k], states[k], ctxs[k])
                out[k] = ClientResult(message, state, metrics, len(datas[k]))
        return [r for r in out if r is not None]

    def empty(
        self, model: FlatModel, start: torch.Tensor, state: NodeState | None, ctx: ClientContext | None
    ) -> ClientResult:
        """The result of a node without data: it sends zeros (every declared vector) and keeps
        its state."""
        zero = torch.zeros_like(start)
        if ctx is None or type(self).finish is LocalSGD.finish:
            return ClientResult(zero, state, {}, 0)
        nothing = NodeData(zero[:0], torch.zeros(0, dtype=torch.int64, device=zero.device))
        message, _ = self.finish(model, zero, start, nothing, state, ctx)
        if isinstance(message, Mapping):
            message = {name: torch.zeros_like(v) for name, v in message.items()}
        return ClientResult(message, state, {}, 0)

    def cohort_correction(
        self,
        fm: FunctionalModel,
        S: torch.Tensor,
        members: Sequence[int],
        states: Sequence[NodeState | None],
        ctxs: Sequence[ClientContext] | None,
    ) -> tuple[float, dict[str, torch.Tensor] | None]:
        """The cohort's `Correction`: the proximal factor (one for the cohort) and the per-node
        linear terms as per-parameter (K, *shape) views (None when no node has one)."""
        if ctxs is None or type(self).correction is LocalSGD.correction:
            return 0.0, None
        corrs = [self.correction(S[j], states[k], ctxs[k]) or NO_CORRECTION for j, k in enumerate(members)]
        proxes = {c.prox for c in corrs}
        if len(proxes) > 1:
            raise ValueError("a cohort's nodes must share the proximal factor of their correction")
        if all(c.linear is None for c in corrs):
            return proxes.pop(), None
        L = torch.stack([c.linear if c.linear is not None else torch.zeros_like(S[0]) for c in corrs])
        return proxes.pop(), fm.views(L)

    def _vector_grad(self, model: FlatModel, zeta: float = 0.0, normalize: str = "count") -> Callable[..., Any]:
        """vmap(grad) of the masked, weighted loss over a (K, d) parameter matrix: the (K, d)
        gradient matrix and (per-node loss, logits)."""
        fm, batched, from_one = self._vector_parts(model, zeta, normalize)

        def step(P: torch.Tensor, X: torch.Tensor, Y: torch.Tensor, M: torch.Tensor, A: torch.Tensor) -> Any:
            if P.shape[0] > 0 and P.stride(0) == 0:  # one model for all rows
                grads, aux = from_one(fm.one(P[0]), X, Y, M, A)
            else:
                grads, aux = batched(fm.views(P), X, Y, M, A)
            return fm.flat(grads), aux

        return step

    def _vector_parts(self, model: FlatModel, zeta: float = 0.0, normalize: str = "count") -> tuple[Any, Any, Any]:
        """The model's `FunctionalModel`, vmap(grad) of the loss over per-parameter (K, *shape)
        views, and the same for one model shared by the K nodes (per-node gradients of one
        model; built once per model and loss)."""
        cache = self.__dict__.setdefault("_vector_grads", {})
        key = (id(model), float(zeta), normalize)
        if key not in cache:
            from torch.func import grad_and_value, vmap

            fm = FunctionalModel(model)

            def one(
                p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, m: torch.Tensor, a: torch.Tensor
            ) -> Any:
                logits = fm.logits(p, x)
                terms = self.terms(logits, y)
                if zeta:
                    logp = torch.log_softmax(logits, dim=-1)
                    terms = terms + zeta * (logp.exp() * logp).sum(-1)
                w = m * (a[y] if a.shape[0] > 1 else a[0])
                return (terms * w).sum() / (w.sum() if normalize == "weights" else m.sum()), logits

            both = grad_and_value(one, has_aux=True)
            cache[key] = (model, fm, vmap(both), vmap(both, in_dims=(None, 0, 0, 0, 0)))
        return cache[key][1], cache[key][2], cache[key][3]

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_vector_grads", None)  # per process, rebuilt on first use
        return state


NO_CORRECTION = Correction()


def on_device(batches: Iterator[torch.Tensor], device: torch.device) -> Iterator[torch.Tensor]:
    """A node's minibatch indices (drawn on the CPU, from its own stream) on ``device``: on the
    CPU as they come; elsewhere all of them in one copy, so the steps themselves move nothing."""
    if device.type == "cpu":
        return batches
    plan = list(batches)
    if not plan:
        return iter(())
    return iter(torch.cat(plan).to(device).split([int(b.shape[0]) for b in plan]))


class Tally:
    """A node's training loss and accuracy over its steps (means over examples). On the CPU
    each step adds Python numbers: float64(loss) * batch size, in step order. On a GPU a step
    only keeps references to its loss, logits and labels (no kernel, no synchronisation), and
    `metrics` reduces them once, at the end of the node (the float64 sum in another order:
    equal to float tolerance)."""

    def __init__(self, device: torch.device) -> None:
        self.host = device.type == "cpu"
        self.loss, self.correct, self.seen = 0.0, 0, 0
        self.steps: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        k = int(y.shape[0])
        if self.host:
            self.loss += float(loss) * k
            self.correct += int((logits.argmax(1) == y).sum())
        else:
            self.steps.append((loss.detach(), logits.detach(), y))
        self.seen += k

    def metrics(self) -> dict[str, float]:
        if self.steps:
            losses = torch.stack([loss for loss, _, _ in self.steps]).to(torch.float64)
            sizes = torch.tensor([int(y.shape[0]) for _, _, y in self.steps], dtype=torch.float64, device="cpu")
            logits = torch.cat([lg for _, lg, _ in self.steps])
            labels = torch.cat([y for _, _, y in self.steps])
            hits = (logits.argmax(1) == labels).sum()
            total, right = torch.stack([(losses * sizes.to(losses.device)).sum(), hits.to(torch.float64)]).tolist()
            self.loss, self.correct, self.steps = total, int(right), []
        return {"train/loss": float(self.loss) / self.seen, "train/acc": int(self.correct) / self.seen}


class CohortBatches:
    """The padded minibatches of a cohort's steps, gathered from the nodes' rows in one index
    select per step (`NodeData.concatenated`). Step s gives (K, B_s, ...) inputs, (K, B_s)
    labels and a (K, B_s) 0/1 mask, B_s the largest of the K batches at that step; padding rows
    are zeros with label 0 (as `_padded` makes them). The positions of every step are laid out
    on the CPU and moved to the device in one copy."""

    def __init__(self, datas: Sequence[NodeData], plans: Sequence[Sequence[torch.Tensor]], device: torch.device):
        self.features, self.row_map, self.labels = NodeData.concatenated(datas)
        offsets = [0]
        for d in datas[:-1]:
            offsets.append(offsets[-1] + len(d))
        K, steps = len(datas), len(plans[0]) if plans else 0
        positions, masks, self.widths = [], [], []
        for s in range(steps):
            sizes = [int(plan[s].shape[0]) for plan in plans]
            B = max(sizes)
            pos = torch.zeros(K, B, dtype=torch.int64, device="cpu")
            mask = torch.zeros(K, B, dtype=torch.bool, device="cpu")
            for k, plan in enumerate(plans):
                pos[k, : sizes[k]] = plan[s] + offsets[k]
                mask[k, : sizes[k]] = True
            positions.append(pos.reshape(-1))
            masks.append(mask.reshape(-1))
            self.widths.append(B)
        self.K = K
        if steps:
            both = torch.cat([torch.cat(positions), torch.cat(masks).to(torch.int64)]).to(device)
            total = both.shape[0] // 2
            self.positions = both[:total].split([K * B for B in self.widths])
            self.masks = both[total:].bool().split([K * B for B in self.widths])

    def step(self, s: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        K, B = self.K, self.widths[s]
        pos, mask = self.positions[s], self.masks[s]
        rows = pos if self.row_map is None else self.row_map.index_select(0, pos)
        X = self.features.index_select(0, rows)
        X = X.view(K, B, *X.shape[1:]).masked_fill_(~mask.view(K, B, *[1] * (X.dim() - 1)), 0)
        Y = self.labels.index_select(0, pos).masked_fill_(~mask, 0).view(K, B)
        return X, Y, mask.view(K, B).to(X.dtype)


def _padded(batches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """K minibatches as (K, B, ...) inputs, (K, B) labels and a (K, B) 0/1 mask, B the largest."""
    B = max(int(y.shape[0]) for _, y in batches)
    x0 = batches[0][0]
    X = x0.new_zeros((len(batches), B, *x0.shape[1:]))
    Y = torch.zeros((len(batches), B), dtype=torch.int64, device=x0.device)
    M = torch.zeros((len(batches), B), dtype=x0.dtype, device=x0.device)
    for k, (x, y) in enumerate(batches):
        b = int(y.shape[0])
        X[k, :b] = x
        Y[k, :b] = y
        M[k, :b] = 1.0
    return X, Y, M


def full_gradient(
    model: FlatModel, at: torch.Tensor, data: NodeData, loss: Callable[..., torch.Tensor]
) -> torch.Tensor:
    """The gradient of the mean of ``loss`` over all of ``data`` at the parameters ``at`` (in
    chunks of 1,024 examples; ``model`` is left loaded with ``at``)."""
    model.load(at)
    n = len(data)
    out = torch.zeros_like(at)
    for i in range(0, n, 1024):
        idx = torch.arange(i, min(n, i + 1024), device=at.device)
        xb, yb = data.take(idx)
        model.flat_grad.zero_()
        loss(model.module(xb), yb).backward()
        out.add_(model.flat_grad, alpha=len(idx) / n)
    return out


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

    vectorizable = True

    def cohort(self, model, starts, datas, states, ctxs):
        """`__call__` for K nodes at once: one minibatch each, one vmap of grad, row-wise momentum."""
        K = len(datas)
        sizes = [len(d) for d in datas]
        old = [None if s is None else s.get("momentum") for s in states]
        m = torch.stack([torch.zeros_like(starts[k]) if o is None else o.clone() for k, o in enumerate(old)])
        live = [k for k in range(K) if sizes[k] > 0]
        out: list[ClientResult] = [
            ClientResult(torch.zeros_like(starts[k]), {"momentum": m[k]}, {}, 0) for k in range(K)
        ]
        if not live:
            return out
        batches = [datas[k].take(next(self._batches(sizes[k], ctxs[k].generator()))) for k in live]
        X, Y, M = _padded(batches)
        shared = starts.stride(0) == 0 and len(live) == K  # one model for all: stays one row
        P = starts if shared else starts[live]
        G, (loss, logits) = self._vector_grad(model)(P, X, Y, M, torch.ones(len(live), 1, device=P.device))

        with torch.no_grad():
            if self.weight_decay:
                G.add_(P, alpha=self.weight_decay)
            if self.l2_norm:
                G.add_(P / torch.linalg.vector_norm(P, dim=1, keepdim=True).clamp(min=1e-30), alpha=self.l2_norm)
            if self.grad_clip is not None:
                norms = torch.linalg.vector_norm(G, dim=1)
                scale = torch.where(norms > self.grad_clip, self.grad_clip / norms, torch.ones_like(norms))
                G.mul_(scale.unsqueeze(1))
            mk = m[live].mul_(self.beta).add_(G, alpha=1.0 - self.dampening)
            correct = ((logits.argmax(-1) == Y) & M.bool()).sum(1)
            for j, k in enumerate(live):
                b = int(M[j].sum())
                metrics = {"train/loss": float(loss[j]), "train/acc": int(correct[j]) / b}
                message = mk[j].clone() if self.step_lr is None else mk[j] * self.lr_at(ctxs[k].round)
                out[k] = ClientResult(message, {"momentum": mk[j].clone()}, metrics, sizes[k])
        return out
