"""From a composed config to a ready simulation: data, partition, model, strategy, faults,
uplink, server; the compatibility check (``fedsim.compat``); then the executor and the state."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fedsim import compat, devices
from fedsim.config import choices, validate
from fedsim.contract import RunFacts, Server, Strategy, UpdateAttack, message_layout
from fedsim.data.base import FederatedData
from fedsim.errors import ConfigError, FedsimError
from fedsim.evaluate import Evaluator
from fedsim.execution.worker import WorkerSpec
from fedsim.faults.byzantine import Byzantine
from fedsim.logging import Callback
from fedsim.models import build_model
from fedsim.params import FlatModel
from fedsim.seeding import np_rng
from fedsim.server.pipeline import Pipeline
from fedsim.state import RunState
from fedsim.uplink import Uplink


def make(node: Any, *args: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that surfaces fedsim's own errors instead of Hydra's wrapper."""
    try:
        return instantiate(node, *args, **kwargs)
    except InstantiationException as exc:
        cause: BaseException | None = exc
        while cause is not None:
            if isinstance(cause, FedsimError):
                raise cause from None
            if isinstance(cause, (TypeError, ValueError)) and cause is not exc:
                target = node.get("_target_", "?") if isinstance(node, DictConfig) else "?"
                raise ConfigError(f"bad options for {target}: {cause}") from None
            cause = cause.__cause__
        first = str(exc).strip().splitlines()[0]
        raise ConfigError(first) from None


@dataclass
class Simulation:
    cfg: DictConfig
    data: FederatedData
    strategy: Strategy
    executor: Any
    server: Server
    participation: Any
    evaluator: Evaluator
    state: RunState
    num_params: int
    facts: RunFacts
    uplink: Uplink
    byzantine: Byzantine = field(default_factory=Byzantine)
    latency: Any = None
    names: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    """What the compatibility check allows but expects to waste (`compat.warnings`), said at start."""

    def pipeline(
        self,
        callbacks: Sequence[Callback] = (),
        *,
        divergence: float | None = None,
        on_boundary: Callable[[RunState], None] | None = None,
    ) -> Pipeline:
        return Pipeline(
            divergence=divergence,
            on_boundary=on_boundary,
            strategy=self.strategy,
            executor=self.executor,
            byzantine=self.byzantine,
            uplink=self.uplink,
            evaluator=self.evaluator,
            callbacks=callbacks,
            facts=self.facts,
            participation=self.participation,
            latency=self.latency,
            nodes_per_round=int(self.cfg.nodes_per_round),
        )

    def run(self, callbacks: Sequence[Callback] = ()) -> tuple[RunState, dict[str, object]]:
        self.state, summary = self.server.run(self.state, self.pipeline(callbacks))
        return self.state, summary

    @property
    def total_rounds(self) -> int:
        """Steps the run will take: ``rounds``, plus the earlier phases of a phased strategy."""
        return self.server.total_rounds(self.strategy)

    def info(self) -> dict[str, Any]:
        sizes = self.data.partition.sizes()
        return {
            "executor": self.executor.description,
            **(
                {"server_device": devices.name_of(self.evaluator.device)} if self.evaluator.device.type != "cpu" else {}
            ),
            "num_params": self.num_params,
            "partition_digest": self.data.partition.digest(),
            "node_sizes_min": int(sizes.min()),
            "node_sizes_max": int(sizes.max()),
            "num_train": len(self.data.dataset.y_train),
            "num_test": len(self.data.dataset.y_test),
            "byzantine_ids": sorted(self.byzantine.ids),
            "uplink": self.uplink.mode(self.strategy),
            "large_steps": "summed where nodes run" if self.pipeline().presum is not None else "rows shipped",
            "message": message_layout(self.strategy, self.num_params).names,
            **({"vectorize": self.vectorize_info()} if self.executor.spec.vectorize else {}),
            **({"attack": repr(self.byzantine.attack)} if self.byzantine.attack is not None else {}),
        }

    def vectorize_info(self) -> str:
        """With ``cluster.vectorize=true``: whether the nodes train in cohorts, and if not why."""
        client = self.strategy.client
        why_model = self.executor.spec.model_not_vectorized
        if why_model:
            return f"one node at a time ({why_model})"
        if client.vectorizable:
            return f"cohorts of up to {self.executor.spec.cohort} nodes"
        why = getattr(client, "not_vectorized", "") or f"{type(client).__name__} has no cohort path"
        return f"one node at a time ({why})"

    @property
    def where(self) -> str:
        """Where the run computes, as far as bits depend on it: the nodes' device and the
        server's (GPU model included); a resume elsewhere is said to differ in bits."""
        nodes = self.executor.spec.device
        if nodes.startswith("cuda") and torch.cuda.is_available() and self.executor.num_workers == 1:
            nodes = devices.name_of(torch.device(nodes))
        return f"nodes on {nodes}, server on {devices.name_of(self.evaluator.device)}"

    def close(self) -> None:
        try:
            self.evaluator.close()
        finally:
            self.executor.shutdown()


def model_not_vectorized(module: torch.nn.Module) -> str:
    """Why a model has no vectorised cohort path ("" when it has one): a model declares
    ``vectorizable = False`` and its reason in ``not_vectorized``."""
    if getattr(module, "vectorizable", True):
        return ""
    return f"{type(module).__name__}: {getattr(module, 'not_vectorized', '') or 'no batched gradient'}"


def make_attack(node: DictConfig) -> Any:
    """The attack of ``node`` (None for ``attack=none``). ``vectors`` (the message vectors an
    update attack forges; null: all) is the engine's option, not the attack's: it is set on the
    attack after instantiation."""
    if not node.get("_target_"):
        return None
    targets = node.get("vectors")
    if "vectors" in node:
        node = OmegaConf.masked_copy(node, [str(k) for k in node if k != "vectors"])
    attack = make(node)
    if targets is not None:
        if not isinstance(attack, UpdateAttack):
            raise ConfigError("attack.vectors applies to update attacks only (a data attack poisons labels)")
        attack.vectors = (str(targets),) if isinstance(targets, str) else tuple(str(t) for t in targets)
    return attack


def make_server(node: DictConfig) -> tuple[Server, torch.device]:
    """The server of a ``server`` config node, and its device (``server.device``: where it
    works, not an option of its class)."""
    device = devices.resolve(node.get("device", "auto"), key="server.device")
    plain = OmegaConf.to_container(node, resolve=True)
    assert isinstance(plain, dict)
    plain.pop("device", None)
    return make(OmegaConf.create(plain)), device


def build(cfg: DictConfig, *, names: dict[str, str] | None = None) -> Simulation:
    """Everything of a run but the rounds. ``names`` (config group -> chosen option) word the
    refusals; by default they come from the Hydra run or from a config composed with
    ``return_hydra_config=True``."""
    names = dict(names) if names is not None else choices(cfg)
    if "hydra" in cfg:
        cfg = OmegaConf.masked_copy(cfg, [str(k) for k in cfg if k != "hydra"])
    validate(cfg)
    seed, num_nodes, per_round = int(cfg.seed), int(cfg.num_nodes), int(cfg.nodes_per_round)
    dataset = make(cfg.dataset)
    if num_nodes > len(dataset.y_train):
        raise ConfigError(
            f"num_nodes={num_nodes} exceeds the {len(dataset.y_train)} training examples of this dataset; every node "
            f"needs data: set num_nodes<={len(dataset.y_train)}"
        )

    partitioner = make(cfg.partition)
    if getattr(partitioner, "takes_dataset", False):
        # a natural partition (fedsim.data.natural): the dataset's own nodes, their kept rows only
        dataset, partition = partitioner.split(dataset, num_nodes)
    else:
        partition = partitioner(dataset.y_train, dataset.y_test, num_nodes, np_rng(seed, "partition"))
    attack = make_attack(cfg.attack)
    byzantine = Byzantine.draw(
        num_nodes=num_nodes,
        num=cfg.byzantine.num,
        declared=cfg.byzantine.declared,
        attack=attack,
        seed=seed,
        name=names.get("attack", ""),
    )

    data = byzantine.poison(FederatedData(dataset, partition), seed)
    model_factory = make(cfg.model)
    flat = FlatModel(build_model(model_factory, dataset.input_shape, dataset.num_classes, seed=seed))
    strategy: Strategy = make(cfg.strategy)
    if isinstance(attack, UpdateAttack):
        attack.adopt(strategy.attack_defaults)

    uplink = Uplink(make(cfg.compressor), make(cfg.feedback))
    train_counts = data.label_counts("train")
    participation = make(cfg.participation).bind(num_nodes=num_nodes, seed=seed, label_counts=train_counts)
    latency = make(cfg.latency).bind(num_nodes=num_nodes, seed=seed, sizes=partition.sizes())
    server, server_device = make_server(cfg.server)
    facts = RunFacts(
        num_nodes=num_nodes,
        num_classes=dataset.num_classes,
        seed=seed,
        server=server.kind,
        sizes=partition.sizes(),
        train_label_counts=train_counts,
        test_label_counts=data.label_counts("test"),
        participation_probs=np.asarray(participation.probabilities(num_nodes, per_round), dtype=np.float64),
        node_times=latency.mean_times(),
        byzantine_ids=byzantine.ids,
        declared_f=byzantine.declared,
        attack=byzantine.kind,
        members=tuple(i for i in range(num_nodes) if byzantine.trains(i)),
    )
    plan = compat.Plan(
        strategy, server, byzantine, uplink, facts, per_round, names, fixed_count=participation.uses_nodes_per_round
    )
    compat.check(plan)
    spec = WorkerSpec(
        model_factory,
        dataset.input_shape,
        dataset.num_classes,
        strategy.client,
        seed,
        threads=1,
        uplink=uplink if uplink.active else None,
        message=tuple(strategy.capabilities.message),
        model_not_vectorized=model_not_vectorized(flat.module),
    )
    executor = make(cfg.cluster)(spec, data)
    if server_device.type == "cuda":
        devices.deterministic(server_device)
    evaluator = Evaluator(
        flat, dataset.x_test, dataset.y_test, partition.test, device=server_device, threads=eval_threads(cfg)
    )
    params = flat.vector()  # on the server's device (the evaluator's model is there)
    state = server.initial(params, strategy, facts)
    state.uplink_state = uplink.init(state.params, strategy, facts)
    return Simulation(
        cfg,
        data,
        strategy,
        executor,
        server,
        participation,
        evaluator,
        state,
        flat.dim,
        facts,
        uplink,
        byzantine,
        latency,
        names,
        compat.warnings(plan),
    )


def eval_threads(cfg: DictConfig) -> int:
    """``eval_threads``, or where it is null the CPUs this run may use: ``OMP_NUM_THREADS`` when it
    is set (Ray sets it to a task's CPUs, so a sweep job takes its share), else
    ``cluster.num_cpus``, else the cores this process may run on. The sync, asynchronous and
    peer-to-peer servers evaluate between calls to the executor, while the workers wait."""
    value = cfg.get("eval_threads")
    if value is not None:
        return int(value)
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    num_cpus = cfg.cluster.get("num_cpus") if "cluster" in cfg else None
    if num_cpus:
        return int(num_cpus)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


def set_driver_threads(n: int = 1) -> None:
    """The driver evaluates with one thread so that reported losses are bit-reproducible."""
    torch.set_num_threads(n)
