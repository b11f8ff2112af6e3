"""From a composed config to a ready simulation: data, partition, model, strategy, executor."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig

from fedsim.config import validate
from fedsim.data.base import FederatedData
from fedsim.errors import ConfigError, FedsimError
from fedsim.evaluate import Evaluator
from fedsim.execution.worker import WorkerSpec
from fedsim.faults.byzantine import Byzantine
from fedsim.logging import Callback
from fedsim.models import build_model
from fedsim.params import FlatModel
from fedsim.seeding import np_rng
from fedsim.server.state import ServerState


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
    strategy: Any
    executor: Any
    server: Any
    participation: Any
    evaluator: Evaluator
    state: ServerState
    num_params: int
    byzantine: Byzantine = Byzantine()
    latency: Any = None

    def run(self, callbacks: Sequence[Callback] = ()) -> tuple[ServerState, dict[str, object]]:
        self.state, summary = self.server.run(
            self.state,
            strategy=self.strategy,
            executor=self.executor,
            participation=self.participation,
            evaluator=self.evaluator,
            callbacks=callbacks,
            byzantine=self.byzantine,
            sizes=self.data.partition.sizes(),
            **({"latency": self.latency} if getattr(self.server, "uses_latency", False) else {}),
        )
        return self.state, summary

    @property
    def total_rounds(self) -> int:
        """Rounds the run will take: ``rounds``, plus the earlier phases of a phased strategy."""
        return int(self.cfg.rounds) + int(getattr(self.strategy, "pre_rounds", 0))

    def info(self) -> dict[str, Any]:
        sizes = self.data.partition.sizes()
        return {
            "executor": self.executor.description,
            "num_params": self.num_params,
            "partition_digest": self.data.partition.digest(),
            "node_sizes_min": int(sizes.min()),
            "node_sizes_max": int(sizes.max()),
            "num_train": len(self.data.dataset.y_train),
            "num_test": len(self.data.dataset.y_test),
            "byzantine_ids": sorted(self.byzantine.ids),
        }

    def close(self) -> None:
        self.executor.shutdown()


def build(cfg: DictConfig) -> Simulation:
    validate(cfg)
    seed = int(cfg.seed)
    dataset = make(cfg.dataset)
    partitioner = make(cfg.partition)
    partition = partitioner(dataset.y_train, dataset.y_test, int(cfg.num_nodes), np_rng(seed, "partition"))
    attack = make(cfg.attack) if cfg.attack.get("_target_") else None
    byz_cfg = cfg.byzantine
    byzantine = Byzantine.draw(
        num_nodes=int(cfg.num_nodes), num=byz_cfg.num, declared=byz_cfg.declared, attack=attack, seed=seed
    )
    data = byzantine.poison(FederatedData(dataset, partition), seed)
    model_factory = make(cfg.model)
    model = build_model(model_factory, dataset.input_shape, dataset.num_classes, seed=seed)
    flat = FlatModel(model)
    base_strategy = make(cfg.strategy)
    strategy = make(cfg.feedback).wrap(base_strategy, make(cfg.compressor))
    participation = make(cfg.participation)
    if hasattr(participation, "bind"):
        labels = data.dataset.y_train
        counts = np.stack([np.bincount(labels[ix], minlength=dataset.num_classes) for ix in data.partition.train])
        participation = participation.bind(num_nodes=int(cfg.num_nodes), seed=seed, label_counts=counts)
    probs = participation.probabilities(int(cfg.num_nodes), int(cfg.nodes_per_round))
    latency = make(cfg.latency).bind(num_nodes=int(cfg.num_nodes), seed=seed, sizes=data.partition.sizes())
    server = make(cfg.server)
    p2p = bool(getattr(server, "peer_to_peer", False))
    if p2p != bool(getattr(strategy, "peer_to_peer", False)):
        if p2p:
            raise ConfigError("server=p2p needs a peer-to-peer strategy, e.g. strategy=monna")
        raise ConfigError("this strategy runs peer to peer; add server=p2p")
    if getattr(strategy, "trigger", None) is not None and not getattr(server, "uses_latency", False):
        raise ConfigError(f"strategy {type(strategy).__name__} aggregates stale updates; add server=async")
    if hasattr(base_strategy, "broadcast"):
        check_phased(base_strategy, wrapped=strategy is not base_strategy, server=server, cfg=cfg, probs=probs)
    check = getattr(strategy, "check", None)
    if check is not None:
        if p2p:
            rows = server.received(byzantine)
        elif getattr(server, "uses_latency", False):  # asynchronous: the rows of one aggregation
            in_flight = server.concurrency or int(cfg.num_nodes)
            rows = int(strategy.buffer) if getattr(strategy, "trigger", None) == "buffer" else in_flight
        else:
            rows = int(cfg.nodes_per_round)
        check(rows)
    if attack is not None and getattr(attack, "needs_defence", False) and not (p2p or hasattr(strategy, "defence")):
        raise ConfigError(f"attack {type(attack).__name__} line-searches against the defence, which this strategy does not expose")
    spec = WorkerSpec(model_factory, dataset.input_shape, dataset.num_classes, strategy.client, seed, threads=1,
                      unlabelled=bool(getattr(strategy.client, "uses_unlabelled", False)))
    executor = make(cfg.cluster)(spec, data)
    evaluator = Evaluator(flat, dataset.x_test, dataset.y_test, partition.test)
    params = flat.vector()
    state = server.initial(params, byzantine, strategy) if p2p else ServerState(0, 0, params, init_strategy(
        strategy, params, sizes=partition.sizes(), participation_probs=probs, node_times=latency.mean_times(),
        train_label_counts=data.label_counts("train"), test_label_counts=data.label_counts("test")))
    return Simulation(cfg, data, strategy, executor, server, participation, evaluator, state, flat.dim, byzantine, latency)


def check_phased(strategy: Any, *, wrapped: bool, server: Any, cfg: DictConfig, probs: np.ndarray) -> None:
    """A strategy with a ``broadcast`` (VRLS) runs in phases driven by the synchronous loop and
    exchanges small reports in its message rows: refuse what would silently break that."""
    name = type(strategy).__name__
    if getattr(server, "uses_latency", False) or getattr(server, "peer_to_peer", False):
        raise ConfigError(f"strategy {name} runs in phases that only the synchronous server drives; use server=sync")
    if wrapped:
        raise ConfigError(f"strategy {name} sends small reports that compression would corrupt; "
                          "use compressor=identity feedback=none")
    if int(cfg.byzantine.num) > 0:
        raise ConfigError(f"strategy {name} does not model Byzantine nodes; set byzantine.num=0")
    if int(cfg.nodes_per_round) != int(cfg.num_nodes) or not np.all(probs == 1.0):
        raise ConfigError(f"strategy {name} needs every node in every round (its estimate pools all nodes); "
                          f"set nodes_per_round={cfg.num_nodes} (= num_nodes) and participation=uniform")


def init_strategy(strategy: Any, params: torch.Tensor, **run_facts: Any) -> dict[str, Any]:
    """``strategy.init(params)``, passing each fact of the run (``sizes``: examples per node;
    ``participation_probs``: every node's long-run participation rate; ``node_times``: every
    node's mean latency; ``train_label_counts`` / ``test_label_counts``: (nodes, classes) label
    histograms of every node's train and test set) that its signature names. The error-feedback
    mirror weights nodes by their sizes, the known-probability oracle of strategies.fedau reads
    the rates, the importance corrections of strategies.asynchronous read the latencies, and
    strategies.vrls reads the label counts for its oracle and its ratio-error diagnostics."""
    accepted = inspect.signature(strategy.init).parameters
    return strategy.init(params, **{k: v for k, v in run_facts.items() if k in accepted})


def set_driver_threads(n: int = 1) -> None:
    """The driver evaluates with one thread so that reported losses are bit-reproducible."""
    torch.set_num_threads(n)
