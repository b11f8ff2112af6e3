"""The asynchronous server on its virtual clock, latency models and the stale-update steps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedsim.errors import ConfigError
from fedsim.faults.latency import Data, Exponential, Linear, LogNormal
from fedsim.simulation import build, set_driver_threads
from strategies.asynchronous import staleness_weight
from tests.conftest import Recorder, compose

BASE = [
    "cluster=local",
    "dataset=digits",
    "model=logreg",
    "num_nodes=3",
    "nodes_per_round=3",
    "eval_every=0",
    "seed=4",
    "server=async",
    "latency=linear",
    "latency.spread=50",
]  # times 1, 0.75, 0.5: exact in binary


def record(*overrides: str):
    set_driver_threads(1)
    sim = build(compose(*BASE, *overrides))
    record = Recorder()
    state, summary = sim.run([record])
    return sim, state, summary, record.rounds


def test_event_order_and_staleness_by_hand():
    """Three nodes always in flight, one update per arrival. Node 2 (0.5) arrives at 0.5 (tau 0)
    and restarts from v1; node 1 at 0.75 (tau 1); at 1.0 node 0 (from v0) and node 2 (from v1)
    tie and the lower id goes first (tau 2, then 2); at 1.5 node 1 (from v2, tau 2) before node 2
    (from v4, tau 1)."""
    _, state, summary, rows = record("strategy=async_fedavg", "rounds=6")
    assert [m["time/simulated"] for m in rows] == [0.5, 0.75, 1.0, 1.0, 1.5, 1.5]
    assert [m["async/staleness"] for m in rows] == [[0], [1], [2], [2], [2], [1]]
    assert state.version == 6 and summary["time/simulated"] == 1.5


def test_buffer_collects_k_arrivals():
    _, _, _, rows = record("strategy=fedbuff", "strategy.buffer=2", "rounds=3")
    # arrivals: n2@0.5 (v0), n1@0.75 (v0) -> step; n2@1.0 (v0), n0@1.0 (v0) -> step; ...
    assert [m["async/buffer"] for m in rows] == [2, 2, 2]
    assert [m["time/simulated"] for m in rows] == [0.75, 1.0, 1.5]
    assert rows[0]["async/staleness"] == [0, 0]


def test_synchronous_fedavg_on_the_clock_is_sync_fedavg():
    """A barrier run with every node in flight trains exactly as server=sync with every node in
    every round; the clock advances by the slowest node per round."""
    _, state, _, rows = record("strategy=fedavg", "rounds=4")
    set_driver_threads(1)
    sync = build(compose(*BASE[:-3], "rounds=4")).run()[0]
    assert torch.equal(state.params, sync.params)
    assert [m["time/simulated"] for m in rows] == [1.0, 2.0, 3.0, 4.0]
    assert all(m["async/staleness_max"] == 0 for m in rows)


def test_fedfix_weights_each_arrival_by_its_period():
    """dt = 0.5 with times 1, 0.75, 0.5: node 2 arrives every period (ceil(0.5/0.5) = 1), nodes 0
    and 1 every second one (ceil = 2); with p_i = 1/3 the weights sum to 1/3, then 1/3 + 4/3."""
    _, _, _, rows = record("strategy=fedfix", "strategy.period=0.5", "rounds=4")
    assert [m["time/simulated"] for m in rows] == [0.5, 1.0, 1.5, 2.0]
    assert [m["async/buffer"] for m in rows] == [1, 3, 1, 3]
    assert rows[0]["agg/weight_sum"] == pytest.approx(1 / 3)
    assert rows[1]["agg/weight_sum"] == pytest.approx(5 / 3)
    # node 1 arrived at 0.75 and waited: it is stale by one step at 1.0
    assert rows[1]["async/staleness"] == [1, 1, 0]


def test_staleness_functions():
    tau = torch.tensor([0, 1, 3, 4, 5, 8])
    assert torch.equal(staleness_weight(tau, "constant"), torch.ones(6, dtype=torch.float64))
    assert torch.allclose(staleness_weight(tau, "polynomial", a=0.5), (tau + 1.0).double() ** -0.5)
    hinge = staleness_weight(tau, "hinge", a=10, b=4)
    assert hinge.tolist() == [1, 1, 1, 1, 1 / 11, 1 / 41]


def test_latency_models():
    lin = Linear(spread=80).bind(num_nodes=5, seed=0)
    assert np.allclose(lin.mean_times(), [1.0, 0.8, 0.6, 0.4, 0.2])  # fastest is 80 % faster
    data = Data(scale=2.0).bind(num_nodes=3, seed=0, sizes=np.array([10, 20, 30]))
    assert np.allclose(data.mean_times(), [1.0, 2.0, 3.0]) and data.time(2, 5) == 3.0
    for kind in (LogNormal, Exponential):
        lat = kind(mean=2.0, node_spread=0.0).bind(num_nodes=2, seed=1)
        draws = np.array([lat.time(0, k) for k in range(20000)])
        assert draws.mean() == pytest.approx(2.0, rel=0.03) and (draws > 0).all()
        assert lat.time(1, 7) == kind(mean=2.0).bind(num_nodes=2, seed=1).time(1, 7)
        assert len({lat.time(0, k) for k in range(5)}) == 5  # a fresh draw per job
    spread = LogNormal(node_spread=1.0).bind(num_nodes=200, seed=0).mean_times()
    assert spread.std() > 0.5 and spread.mean() == pytest.approx(1.0, rel=0.25)
    with pytest.raises(ConfigError, match="spread"):
        Linear(spread=100)
    with pytest.raises(ConfigError, match="sigma"):
        LogNormal(sigma=-1.0)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["server=sync", "strategy=fedbuff"], "add server=async"),
        (["strategy=fedfix", "strategy.period=null"], "period"),
        (["strategy=fedbuff", "strategy.importance=period"], "trigger=period"),
        (["strategy=fedbuff", "server.concurrency=9"], "concurrency=9"),
        (["strategy=fedbuff", "strategy.staleness=cubic"], "staleness"),
    ],
)
def test_bad_async_configs(overrides, match):
    with pytest.raises(ConfigError, match=match):
        build(compose(*BASE, *overrides))


def test_robust_buffer_with_attack_and_partial_concurrency_learns():
    set_driver_threads(1)
    sim = build(
        compose(
            "cluster=local",
            "dataset=digits",
            "model=logreg",
            "num_nodes=12",
            "eval_every=0",
            "seed=1",
            "nodes_per_round=6",
            "server=async",
            "server.concurrency=6",
            "latency=lognormal",
            "strategy=fedbuff",
            "strategy.buffer=5",
            "strategy/aggregator=median",
            "attack=sign_flip",
            "byzantine.num=2",
            "rounds=30",
        )
    )
    before = sim.evaluator(sim.state.params)["eval/acc"]
    record = Recorder()
    _, summary = sim.run([record])
    rows = record.rounds
    assert summary["eval/acc"] > before + 0.3
    assert any(m.get("attack/byzantine_rows", 0) > 0 for m in rows)
    assert max(m["async/in_flight"] for m in rows) <= 6
    times = [m["time/simulated"] for m in rows]
    assert times == sorted(times) and math.isfinite(times[-1])


def test_fedasync_mixes_towards_the_stale_local_model():
    """FedAsync with alpha 1 and constant s: every arrival *replaces* x by the node's local model
    y (direction x_now - y), stale or not; asynchronous FedAvg instead adds the node's own step
    x_sent - y to the current model. On the hand-worked schedule, the second arrival (node 1,
    from v0) is stale by one: FedAsync ends at x0 - m1, async FedAvg at x0 - m2 - m1."""
    one = ["strategy=async_fedavg", "strategy.importance=one", "strategy.server_opt.lr=1.0"]
    set_driver_threads(1)
    x0 = build(compose(*BASE, *one, "rounds=1")).state.params
    a1 = record(*one, "rounds=1")[1].params  # x0 - m2
    a2 = record(*one, "rounds=2")[1].params  # x0 - m2 - m1
    f2 = record("strategy=fedasync", "strategy.staleness=constant", "strategy.server_opt.lr=1.0", "rounds=2")[1].params
    assert torch.allclose(f2, x0 - (a1 - a2), atol=1e-6)
    assert not torch.allclose(f2, a2, atol=1e-4)


def test_participation_limits_who_is_dispatched():
    _, state, _, rows = record(
        "num_nodes=12",
        "nodes_per_round=12",
        "participation=bernoulli",
        "participation.rates=constant",
        "participation.p=0.3",
        "strategy=fedavg",
        "rounds=15",
    )
    counts = [m["train/participants"] for m in rows]
    assert state.round == 15 and max(counts) < 12 and np.mean(counts) == pytest.approx(3.6, abs=1.5)
