"""Unlimited staleness by gradient inversion (``strategy=inversion``; docs/methods/inversion.md).

Source: H. Wang and W. Gao, *Tackling the Unlimited Staleness in Federated Learning with
Intertwined Data and Device Heterogeneities*, arXiv 2309.13536 (authors' code
pittisl/FL-with-intertwined-heterogeneity, ``fixed.py``; the inversion follows Geiping et al.'s
inverting-gradients ``FedAvgReconstructor``).

A row that arrives with staleness tau >= ``min_staleness`` carries dw = y - w^{t-tau}, computed
by the node from the model w^{t-tau} it was sent. The server

1. **inverts** it: a synthetic set D = (x, l) of ``images`` inputs (from randn) and label logits
   l (from randn) is fitted so that K unrolled, differentiable local steps on D from
   w^{t-tau} reproduce dw:

       min_{x, l}  || U_K(w^{t-tau}; x, l) - dw ||_1      (the L1 distance summed over all tensors)

   with U_K(w; x, l) = w_K - w, w_{k+1} = w_k - lr g(w_k), g the full-batch gradient of the
   soft-label cross-entropy -sum_c softmax(l)_c log softmax(f(w; x))_c (``label_loss=soft_ce``;
   ``bce`` is the authors' code: BCE-with-logits against the raw l), K = the node's number of
   local steps and lr its local lr (plus its weight decay and momentum). Adam at lr
   ``inv_lr`` (1) on the signed gradient of x and the plain gradient of l, the lr divided by 10
   at 3/8, 5/8 and 7/8 of ``iterations``; x clamped to ``box`` after every step;
2. **replays** the same K steps on D from the current model w^t: dw_hat = U_K(w^t; x, l); the
   row becomes the fresh-looking message -dw_hat (i.e. w^t + dw_hat replaces the stale local
   model) and is weighted as staleness 0.

The rest is `strategies.asynchronous.Buffered` (FedBuff's machinery; by default the plain mean
of the buffer, lr 1: FedAvg over the arrivals, as the authors' code averages).

**Switch back** (``switch``): inverting stops for good once the estimate no longer beats the
stale update, decided at the first step where the rule fires; plain aggregation resumes
``switch_delay`` server versions later. ``max_version`` stops inverting at that version in any
case (the authors' ``switch_max``).

- ``never``: invert until ``max_version`` (with it: the fixed-round rule);
- ``oracle`` (the authors', a simulator's privilege): the node is trained again at the server
  from w^t on its own data (the fresh update dw_fresh, on the stream (seed, "inversion-oracle",
  version, node)); switch once ||dw_hat - dw_fresh||_1 >= ``margin`` ||dw - dw_fresh||_1;
- ``fit`` (no oracle): the inversion's own residual e_fit = ||U_K(w^{t-tau}; D) - dw||_1 is the
  noise level of the estimate, the estimated correction c = ||dw_hat - dw||_1 its signal;
  switch once c <= ``margin`` e_fit (the estimate can no longer tell the current model's update
  from the stale one).

The server does not hand the strategy the models rows started from, so the strategy keeps the
last ``history`` model versions itself (older rows are aggregated stale, counted in
``inversion/too_old``); the model and data are rebuilt at the server from the run's config
(`Replica`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad

from fedsim.contract import RunFacts
from fedsim.errors import ConfigError
from fedsim.params import FlatModel, FunctionalModel
from fedsim.seeding import np_rng, torch_rng
from fedsim.types import ClientContext, NodeData, RoundInfo, UpdateBatch
from strategies.asynchronous import Buffered
from strategies.client import LocalSGD

SWITCHES = ("never", "oracle", "fit")
LABEL_LOSSES = ("soft_ce", "bce")


def milestones(iterations: int) -> list[int]:
    """The iterations after which the inversion's lr drops tenfold: 3/8, 5/8, 7/8 of the budget
    (the authors' iterations // 2.667, // 1.6, // 1.142)."""
    return [int(iterations // 2.667), int(iterations // 1.6), int(iterations // 1.142)]


def label_loss(logits: torch.Tensor, labels: torch.Tensor, kind: str) -> torch.Tensor:
    """The loss of the synthetic set: soft-label cross-entropy with targets softmax(labels), or
    (``bce``) BCE-with-logits against the raw label tensor (the authors' code path)."""
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(logits, labels)
    return -(labels.softmax(-1) * logits.log_softmax(-1)).sum(-1).mean()


class Unrolled:
    """K differentiable local SGD steps of ``module`` on a synthetic set, written with
    ``torch.func`` (``functional_call`` + ``grad``) so that their result can be differentiated
    with respect to the set: ``update(w, x, labels)`` is w_K - w for the flat model ``w``."""

    def __init__(
        self,
        module: nn.Module,
        *,
        lr: float,
        weight_decay: float = 0.0,
        momentum: float = 0.0,
        loss: str = "soft_ce",
    ) -> None:
        self.module = module
        self.fm = FunctionalModel(FlatModel(module))
        self.lr, self.weight_decay, self.momentum, self.loss = float(lr), float(weight_decay), float(momentum), loss

        def objective(p: dict[str, torch.Tensor], x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
            return label_loss(functional_call(self.module, p, (x,)), labels, self.loss)

        self.gradient: Callable[..., dict[str, torch.Tensor]] = grad(objective)

    def update(self, w: torch.Tensor, x: torch.Tensor, labels: torch.Tensor, steps: int) -> torch.Tensor:
        p = self.fm.one(w)
        velocity: dict[str, torch.Tensor] | None = None
        for _ in range(int(steps)):
            g = self.gradient(p, x, labels)
            if self.weight_decay:
                g = {k: g[k] + self.weight_decay * p[k] for k in g}
            if self.momentum:
                velocity = g if velocity is None else {k: self.momentum * velocity[k] + g[k] for k in g}
                g = velocity
            p = {k: p[k] - self.lr * g[k] for k in p}
        return torch.cat([p[name].reshape(-1) for name, *_ in self.fm.layout]) - w


def invert(
    unrolled: Unrolled,
    start: torch.Tensor,
    dw: torch.Tensor,
    *,
    steps: int,
    input_shape: tuple[int, ...],
    num_classes: int,
    images: int,
    iterations: int,
    lr: float = 1.0,
    signed: bool = True,
    box: tuple[float, float] | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Fit a synthetic set (x, labels) so that ``unrolled.update(start, x, labels, steps)``
    matches ``dw`` in L1; returns (x, labels, final L1 residual). x and labels start from
    randn drawn from ``generator`` (CPU); Adam at ``lr`` on the signed x gradient (``signed``)
    and the raw label gradient, lr / 10 at `milestones`; x clamped to ``box`` after each step."""
    dev = start.device
    x0 = torch.randn((images, *input_shape), generator=generator, dtype=torch.float32)
    l0 = torch.randn((images, num_classes), generator=generator, dtype=torch.float32)
    x = x0.to(dev).requires_grad_(True)
    labels = l0.to(dev).requires_grad_(True)
    start, dw = start.detach(), dw.detach()

    def residual(x_: torch.Tensor, l_: torch.Tensor) -> torch.Tensor:
        return (unrolled.update(start, x_, l_, steps) - dw).abs().sum()

    both = grad(residual, argnums=(0, 1))
    opt = torch.optim.Adam([x, labels], lr=lr)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones(iterations), gamma=0.1)
    for _ in range(int(iterations)):
        gx, gl = both(x.detach(), labels.detach())
        x.grad = gx.sign() if signed else gx
        labels.grad = gl
        opt.step()
        sched.step()
        if box is not None:
            with torch.no_grad():
                x.clamp_(box[0], box[1])
    with torch.no_grad():
        fit = float(residual(x.detach(), labels.detach()))
    return x.detach(), labels.detach(), fit


class Replica:
    """The server's copy of what the nodes have, rebuilt from the run's config: the model (to
    invert and replay updates) and, for ``switch=oracle`` only, the dataset's partition (to
    train a node again from the current model). Built from a node that Hydra does not
    instantiate (``_recursive_: false``), so that the data are loaded once, here."""

    def __init__(self, *, model: Any, dataset: Any, partition: Any, num_nodes: int, seed: int) -> None:
        from hydra.utils import instantiate

        from fedsim.models import build_model

        self._instantiate = instantiate
        self.seed, self.num_nodes = int(seed), int(num_nodes)
        self._partition_cfg = partition
        self.dataset = instantiate(dataset)
        self.input_shape = tuple(int(s) for s in self.dataset.input_shape)
        self.num_classes = int(self.dataset.num_classes)
        self.module = build_model(instantiate(model), self.input_shape, self.num_classes, seed=self.seed)
        if any(isinstance(m, nn.Embedding) for m in self.module.modules()):
            raise ConfigError(
                f"strategy=inversion fits continuous synthetic inputs; {type(self.module).__name__} reads token ids "
                "through an embedding, which has no input gradient: use an image or vector model"
            )
        self.flat = FlatModel(self.module)
        self._index: list[torch.Tensor] | None = None

    def node_data(self, node: int) -> NodeData:
        """Node ``node``'s training rows, partitioned as the run partitions them."""
        if self._index is None:
            partitioner = self._instantiate(self._partition_cfg)
            dataset = self.dataset
            if getattr(partitioner, "takes_dataset", False):
                dataset, partition = partitioner.split(dataset, self.num_nodes)
            else:
                partition = partitioner(dataset.y_train, dataset.y_test, self.num_nodes, np_rng(self.seed, "partition"))
            self._x = torch.from_numpy(np.ascontiguousarray(dataset.x_train))
            self._y = torch.from_numpy(np.ascontiguousarray(dataset.y_train))
            self._index = [torch.from_numpy(np.asarray(ix, dtype=np.int64)) for ix in partition.train]
        return NodeData.rows(self._x, self._y, self._index[node])


class Inversion(Buffered):
    """Stale rows converted into fresh ones by gradient inversion; see the module docstring."""

    def __init__(
        self,
        *,
        replica: Replica,
        iterations: int = 200,
        images: int = 32,
        inv_lr: float = 1.0,
        signed: bool = True,
        box: list[float] | tuple[float, float] | None = (0.0, 1.0),
        label_loss: str = "soft_ce",
        steps: int | None = None,
        min_staleness: int = 5,
        history: int = 64,
        switch: str = "never",
        margin: float = 1.0,
        switch_delay: int = 0,
        max_version: int | None = None,
        staleness: str = "constant",
        **kwargs: Any,
    ) -> None:
        super().__init__(staleness=staleness, **kwargs)
        if not isinstance(self.client, LocalSGD):
            raise ConfigError(
                "strategy=inversion replays the nodes' local SGD on the synthetic set; strategy.client must be "
                "strategies.client.LocalSGD"
            )
        if int(iterations) < 1 or int(images) < 1:
            raise ConfigError(f"strategy.iterations={iterations} and strategy.images={images} must be >= 1")
        if inv_lr <= 0:
            raise ConfigError(f"strategy.inv_lr={inv_lr} must be > 0")
        if label_loss not in LABEL_LOSSES:
            raise ConfigError(f"strategy.label_loss={label_loss!r} must be one of {', '.join(LABEL_LOSSES)}")
        if switch not in SWITCHES:
            raise ConfigError(f"strategy.switch={switch!r} must be one of {', '.join(SWITCHES)}")
        if steps is not None and int(steps) < 1:
            raise ConfigError(f"strategy.steps={steps} must be >= 1 (null: the node's own number of local steps)")
        if int(min_staleness) < 1 or int(history) < 1 or int(switch_delay) < 0 or margin <= 0:
            raise ConfigError(
                "strategy.min_staleness and strategy.history must be >= 1, strategy.switch_delay >= 0, strategy.margin > 0"
            )
        if box is not None and (len(box) != 2 or float(box[0]) >= float(box[1])):
            raise ConfigError(f"strategy.box={box} must be [low, high] with low < high, or null")
        self.replica = replica
        self.iterations, self.images = int(iterations), int(images)
        self.inv_lr, self.signed = float(inv_lr), bool(signed)
        self.box = None if box is None else (float(box[0]), float(box[1]))
        self.label_loss = label_loss
        self.inv_steps = None if steps is None else int(steps)
        self.min_staleness, self.history = int(min_staleness), int(history)
        self.switch, self.margin, self.switch_delay = switch, float(margin), int(switch_delay)
        self.max_version = None if max_version is None else int(max_version)
        client = self.client
        self.unrolled = Unrolled(
            replica.module,
            lr=client.lr,
            weight_decay=client.weight_decay,
            momentum=client.momentum,
            loss=label_loss,
        )

    # ---- state ------------------------------------------------------------------------------
    def init(self, params: torch.Tensor, facts: RunFacts) -> dict[str, Any]:
        if self.switch == "oracle" and facts.attack == "data":
            raise ConfigError(
                "strategy.switch=oracle trains nodes again on their clean data at the server, which a data attack "
                "changes; use strategy.switch=fit or never"
            )
        self.unrolled.module.to(params.device)
        self.replica.flat.to(params.device)
        state = super().init(params, facts)
        state["history"] = {0: params}
        state["switch_at"] = -1  # -1: not decided
        return state

    def active(self, version: int, state: dict[str, Any]) -> bool:
        """Whether stale rows are inverted at this server version."""
        if self.max_version is not None and version >= self.max_version:
            return False
        return int(state["switch_at"]) < 0 or version < int(state["switch_at"])

    # ---- one row ----------------------------------------------------------------------------
    def local_steps(self, num_examples: int) -> int:
        return self.inv_steps if self.inv_steps is not None else max(1, self.client.steps(int(num_examples)))

    def convert(
        self, start: torch.Tensor, now: torch.Tensor, dw: torch.Tensor, steps: int, gen: torch.Generator
    ) -> tuple[torch.Tensor, float]:
        """(dw_hat, fit residual) for a stale update ``dw`` computed from ``start``."""
        x, labels, fit = invert(
            self.unrolled,
            start,
            dw,
            steps=steps,
            input_shape=self.replica.input_shape,
            num_classes=self.replica.num_classes,
            images=self.images,
            iterations=self.iterations,
            lr=self.inv_lr,
            signed=self.signed,
            box=self.box,
            generator=gen,
        )
        with torch.no_grad():
            return self.unrolled.update(now, x, labels, steps).detach(), fit

    def fresh(self, node: int, now: torch.Tensor, info: RoundInfo) -> torch.Tensor:
        """The oracle: node ``node`` trained at the server from the current model (its update
        w_local - w^t), on the stream (seed, "inversion-oracle", version, node)."""
        data = self.replica.node_data(node)
        model = self.replica.flat
        model.load(now)
        ctx = _OracleContext(info.version, node, info.seed, self.replica.num_classes)
        result = self.client(model, now, data, None, ctx)
        if not isinstance(result.message, torch.Tensor):
            raise ConfigError("strategy.switch=oracle needs a client whose message is one update vector")
        return -result.message.to(now.device)

    # ---- the step ---------------------------------------------------------------------------
    def step(
        self, params: torch.Tensor, batch: UpdateBatch, state: dict[str, Any], info: RoundInfo
    ) -> tuple[torch.Tensor, dict[str, Any], dict[str, float]]:
        history: dict[int, torch.Tensor] = state["history"]
        on = self.active(info.version, state)
        tau = (info.version - batch.base_version).tolist()
        lay = batch.layout
        width = params.numel()
        messages, base = batch.messages, batch.base_version
        metrics: dict[str, float] = {"inversion/active": float(on)}
        inverted = too_old = 0
        fit_sum = corr_sum = dw_sum = est_sum = stale_sum = 0.0
        t0 = time.perf_counter()
        if on and len(batch):
            messages, base = messages.clone(), base.clone()
            for i, t in enumerate(tau):
                if t < self.min_staleness:
                    continue
                v = int(batch.base_version[i])
                if v not in history:
                    too_old += 1
                    continue
                start = history[v]
                if int(params.numel()) != self.replica.flat.dim:
                    raise ConfigError(
                        f"strategy=inversion rebuilt a model of {self.replica.flat.dim} parameters, the run's has "
                        f"{int(params.numel())}: keep strategy.replica.model at ${{model}}"
                    )
                row = messages[i, :width] if lay is None or lay.single else messages[i, lay.columns(lay.names[0])]
                sent = row - (params - start) if self.direction == "current" else row
                dw = -sent  # y - w^{t - tau}
                node = int(batch.node_ids[i])
                steps = self.local_steps(int(batch.num_examples[i]))
                gen = torch_rng(info.seed, "inversion", info.version, node)
                dw_hat, fit = self.convert(start, params, dw, steps, gen)
                new_row = -dw_hat  # w^t - (w^t + dw_hat): a message sent from the current model
                if lay is None or lay.single:
                    messages[i, :width] = new_row
                else:
                    messages[i, lay.columns(lay.names[0])] = new_row
                base[i] = info.version
                inverted += 1
                fit_sum += fit
                corr_sum += float((dw_hat - dw).abs().sum())
                dw_sum += float(dw.abs().sum())
                if self.switch == "oracle" and int(state["switch_at"]) < 0:
                    fresh = self.fresh(node, params, info)
                    est_sum += float((dw_hat - fresh).abs().sum())
                    stale_sum += float((dw - fresh).abs().sum())
            metrics["inversion/time_s"] = time.perf_counter() - t0
        else:
            too_old = 0
        metrics.update({"inversion/rows": float(inverted), "inversion/too_old": float(too_old)})
        switch_at = int(state["switch_at"])
        if inverted:
            metrics["inversion/fit"] = fit_sum / max(dw_sum, 1e-30)
            metrics["inversion/correction"] = corr_sum / max(dw_sum, 1e-30)
            if switch_at < 0:
                fire = False
                if self.switch == "oracle":
                    metrics["inversion/err_estimate"] = est_sum / max(dw_sum, 1e-30)
                    metrics["inversion/err_stale"] = stale_sum / max(dw_sum, 1e-30)
                    fire = est_sum >= self.margin * stale_sum
                elif self.switch == "fit":
                    fire = corr_sum <= self.margin * fit_sum
                if fire:
                    switch_at = info.version + self.switch_delay
        converted = batch if messages is batch.messages else _with(batch, messages, base)
        new_params, new_state, agg = super().step(params, converted, state, info)
        # keep the new version, forget those more than `history` versions old
        kept = {v: m for v, m in history.items() if v > info.version + 1 - self.history}
        kept[info.version + 1] = new_params
        metrics["inversion/switch_at"] = float(switch_at)
        return new_params, {**new_state, "history": kept, "switch_at": switch_at}, {**agg, **metrics}


class _OracleContext(ClientContext):
    """A node's context whose training stream is the oracle's (seed, "inversion-oracle",
    version, node), apart from every job's (seed, "train", k, node)."""

    def generator(self) -> torch.Generator:
        return torch_rng(self.seed, "inversion-oracle", self.round, self.node_id)


def _with(batch: UpdateBatch, messages: torch.Tensor, base: torch.Tensor) -> UpdateBatch:
    from dataclasses import replace

    return replace(batch, messages=messages, base_version=base)
