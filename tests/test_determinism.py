"""docs/design.md, "Determinism": results are a function of (config, seed) alone, not of the executor, the
number of actors or the number of machines."""

from __future__ import annotations

import pytest
import torch

from fedsim.simulation import build, set_driver_threads
from tests.conftest import compose

pytestmark = pytest.mark.integration

BASE = [
    "dataset=digits",
    "model=mlp",
    "num_nodes=12",
    "nodes_per_round=6",
    "rounds=3",
    "eval_every=0",
    "strategy.client.epochs=2",
    "partition.alpha=0.3",
    "seed=7",
]


def final_params(*cluster: str) -> tuple[torch.Tensor, list[str]]:
    set_driver_threads(1)
    sim = build(compose(*BASE, *cluster))
    try:
        state, _ = sim.run()
        return state.params, sim.executor.worker_nodes()
    finally:
        sim.close()


def test_bit_identical_across_executors_actors_and_machines(ray_cluster):
    local, _ = final_params("cluster=local")
    one, _ = final_params("cluster=ray", "cluster.num_actors=1")
    two, _ = final_params("cluster=ray", "cluster.num_actors=2")
    three, machines = final_params("cluster=ray", "cluster.num_actors=3")
    # 3 one-CPU actors on a cluster of 2 + 1 CPUs must span both Ray nodes.
    assert len(set(machines)) == 2
    assert not torch.equal(local, build_initial())  # training moved the model
    for other in (one, two, three):
        assert torch.equal(local, other)


CROSS_DEVICE = [
    "dataset=digits",
    "model=logreg",
    "num_nodes=300",
    "nodes_per_round=150",
    "partition.alpha=100",
    "rounds=3",
    "eval_every=0",
    "seed=3",
]


def test_large_steps_are_summed_where_nodes_run_bit_identically_for_any_actor_count(ray_cluster, monkeypatch):
    """150 rows per step (> SHIP_ROWS_UP_TO): FedAvg's rows are summed in blocks of 16 where they
    are trained; the result does not depend on the executor or the actor count, and agrees with
    shipping every row to float tolerance."""
    from fedsim.execution import worker
    from fedsim.server import pipeline

    def run(*cluster: str) -> tuple[torch.Tensor, object]:
        set_driver_threads(1)
        sim = build(compose(*CROSS_DEVICE, *cluster))
        try:
            return sim.run()[0].params, sim.pipeline().presum
        finally:
            sim.close()

    local, reduce = run("cluster=local")
    assert reduce == worker.PreSum(weighted=True)
    for actors in (1, 2, 3):
        ray_params, _ = run("cluster=ray", f"cluster.num_actors={actors}")
        assert torch.equal(local, ray_params), actors
    monkeypatch.setattr(pipeline, "SHIP_ROWS_UP_TO", 10**9)  # every row shipped, as for small steps
    shipped, _ = run("cluster=local")
    assert torch.allclose(local, shipped, rtol=1e-5, atol=1e-6)
    assert not torch.equal(local, build_initial(CROSS_DEVICE))


def build_initial(base: list[str] | None = None) -> torch.Tensor:
    sim = build(compose(*(base or BASE), "cluster=local"))

    return sim.state.params


def test_seed_changes_the_result():
    set_driver_threads(1)
    a = build(compose(*BASE, "cluster=local"))
    b = build(compose(*BASE, "cluster=local", "seed=8"))
    assert not torch.equal(a.run()[0].params, b.run()[0].params)


BYZ = ["dataset=digits", "model=logreg", "num_nodes=10", "nodes_per_round=8", "rounds=3", "eval_every=0", "seed=5"]


def run_params(*overrides: str) -> torch.Tensor:
    set_driver_threads(1)
    sim = build(compose(*BYZ, *overrides))
    try:
        return sim.run()[0].params
    finally:
        sim.close()


@pytest.mark.parametrize(
    "setup",
    [
        [
            "strategy=robust",
            "attack=optimal_alie",
            "byzantine.num=2",
            "strategy.preaggregators=[nnm,bucketing]",
            "strategy/aggregator=centered_clipping",
        ],
        ["strategy=fedavg", "attack=label_flip", "byzantine.num=2", "strategy/aggregator=median"],
        [
            "strategy=monna",
            "server=p2p",
            "nodes_per_round=10",
            "strategy.client.lr=0.1",
            "attack=ipm",
            "byzantine.num=2",
        ],
        ["strategy=floral", "attack=label_flip", "attack.nodes=all", "attack.fraction=0.3"],
        ["compressor=rand_k", "compressor.ratio=0.05", "feedback=econtrol", "strategy.client.steps=3"],
        ["compressor=qsgd", "compressor.layerwise=true", "feedback=ef14", "strategy/aggregator=median"],
        ["strategy=fedau", "participation=markov", "participation.p=0.4", "strategy.cutoff=5"],
        ["strategy=fedvarp", "participation=cyclic", "participation.period=4", "participation.p=0.5"],
        [
            "server=async",
            "strategy=fedbuff",
            "strategy.buffer=3",
            "server.concurrency=5",
            "latency=lognormal",
            "strategy.client.steps=2",
            "rounds=6",
        ],
        [
            "server=async",
            "strategy=fedasync",
            "latency=exponential",
            "latency.node_spread=1.0",
            "strategy/aggregator=median",
            "rounds=8",
        ],
        [
            "strategy=scaffold",
            "strategy.client.option=I",
            "compressor=top_k",
            "feedback=ef21",
            "attack=sign_flip",
            "byzantine.num=2",
            "strategy/aggregator=median",
        ],
        ["strategy=feddyn", "participation=bernoulli", "participation.p=0.5", "strategy.client.momentum=0.5"],
        ["strategy=fednova", "strategy.client.momentum=0.9"],
    ],
    ids=[
        "robust-optimal-alie",
        "label-flip-median",
        "monna-p2p",
        "floral-poisoned",
        "randk-econtrol",
        "qsgd-ef14-median",
        "fedau-markov",
        "fedvarp-cyclic",
        "async-fedbuff",
        "async-fedasync-median",
        "scaffold-I-ef21-median",
        "feddyn-bernoulli",
        "fednova-momentum",
    ],
)
def test_byzantine_runs_are_bit_identical_across_executors(ray_cluster, setup):
    local = run_params(*setup, "cluster=local")
    ray2 = run_params(*setup, "cluster=ray", "cluster.num_actors=2")
    assert torch.isfinite(local).all() and torch.equal(local, ray2)
