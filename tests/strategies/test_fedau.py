"""FedAU's estimator and the unknown-participation weightings (docs/methods/fedau.md)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsim.errors import ConfigError
from fedsim.faults.participation import Bernoulli
from fedsim.simulation import build, set_driver_threads
from fedsim.state import PersistentMap
from fedsim.types import RoundInfo, UpdateBatch
from strategies.client import LocalSGD
from strategies.fedau import MIFA, FedAU, KnownProb, estimator_update
from tests.conftest import Recorder, compose, run_facts


def batch_of(ids: list[int], rows: torch.Tensor) -> UpdateBatch:
    k = len(ids)
    z = torch.zeros(k, dtype=torch.int64)
    return UpdateBatch(torch.tensor(ids, dtype=torch.int64), rows, torch.ones(k, dtype=torch.int64), z, z)


def run_estimator(probs: np.ndarray, rounds: int, cutoff: int | None, seed: int = 0):
    """The real strategy step over `rounds` rounds of Bernoulli(p_n) participation (d = 1)."""
    n = len(probs)
    part = Bernoulli(rates="constant").bind(num_nodes=n, seed=seed)
    part.probs = probs
    strat = FedAU(client=LocalSGD(), cutoff=cutoff, log_weights_every=0)
    x = torch.zeros(1)
    state = strat.init(x, run_facts(n))
    largest = 0.0
    for t in range(rounds):
        ids = part(t, n, 0, None).tolist()
        x, state, m = strat.step(x, batch_of(ids, torch.zeros(len(ids), 1)), state, RoundInfo(t, t, 0, n, tuple(ids)))
        largest = max(largest, m.get("fedau/estimate_max", 0.0))
    return state, largest


def test_estimate_converges_to_one_over_p_under_bernoulli():
    probs = np.array([0.02, 0.05, 0.1, 0.2, 0.5, 0.9, 1.0])
    state, _ = run_estimator(np.repeat(probs, 4), rounds=20000, cutoff=None)
    est = state["estimate"].reshape(len(probs), 4).mean(1)
    # the mean interval of Bernoulli(p) is 1/p; 4 nodes x 20000 rounds per rate
    assert np.allclose(est * probs, 1.0, atol=0.06), est * probs


def test_cutoff_bounds_the_weight_by_k():
    probs = np.full(20, 0.01)  # mean gap 100 > K
    state, largest = run_estimator(probs, rounds=3000, cutoff=10)
    assert largest <= 10.0 and state["estimate"].max() <= 10.0
    assert state["estimate"].min() > 5  # mostly truncated intervals of length K
    _, largest_free = run_estimator(probs, rounds=3000, cutoff=None)
    assert largest_free > 30


def test_estimator_rule_by_hand():
    c, M, w = np.array([0, 3, 9]), np.array([0, 2, 1]), np.array([0.0, 4.0, 7.0])
    used, c2, M2, w2 = estimator_update(c, M, w, np.array([True, True, False]), cutoff=10)
    assert used.tolist() == [1.0, 4.0, 7.0]  # cold start 1; else the mean recorded *before*
    assert c2.tolist() == [0, 0, 0] and M2.tolist() == [1, 3, 2]
    assert w2.tolist() == [1.0, (2 * 4 + 4) / 3, (7 + 10) / 2]  # intervals c+1 = 1, 4; cutoff K = 10


def store(state: dict, rows: dict[int, list[float]]) -> dict:
    """FedVarp's and MIFA's stored updates set by hand (the rows and their running sum)."""
    stored = {i: torch.tensor(r) for i, r in rows.items()}
    total = torch.stack(list(stored.values())).to(torch.float64).sum(0)
    return {**state, "stored": PersistentMap(stored), "stored_sum": total}


def test_weightings_by_hand():
    """Two of N = 4 nodes send; the direction each weighting applies (server lr 1)."""
    U = torch.tensor([[2.0, 0.0], [0.0, 4.0]])
    ids = [1, 3]
    probs = np.array([0.5, 0.5, 0.25, 0.25])
    out = {}
    for weighting in ("average_participating", "average_all", "known_prob", "adaptive", "mifa", "fedvarp"):
        s = FedAU(client=LocalSGD(), weighting=weighting)
        state = s.init(torch.zeros(2), run_facts(4, probs=probs))
        if weighting in ("mifa", "fedvarp"):
            state = store(state, {0: [4.0, 4.0], 1: [1.0, 1.0]})
        if weighting == "adaptive":
            state["intervals"][3], state["estimate"][3] = 2, 5.0
        x, state, _ = s.step(torch.zeros(2), batch_of(ids, U), state, RoundInfo(0, 0, 0, 4, tuple(ids)))
        out[weighting] = (-x).tolist()
    assert out["average_participating"] == [1.0, 2.0]
    assert out["average_all"] == [0.5, 1.0]
    assert out["known_prob"] == [2 / 0.5 / 4, 4 / 0.25 / 4]
    assert out["adaptive"] == [2 * 1.0 / 4, 4 * 5.0 / 4]  # node 1 cold (weight 1), node 3 weight 5
    # MIFA: stored rows become [4,4], [2,0], [0,0], [0,4]; mean over all 4
    assert out["mifa"] == [1.5, 2.0]
    # FedVarp: mean of (U - y_old) over participants + mean of y_old over all nodes
    assert out["fedvarp"] == pytest.approx([((2 - 1) + 0) / 2 + 5 / 4, ((0 - 1) + 4) / 2 + 5 / 4])


def test_empty_round_counts_absences_and_skips_fedvarp():
    for weighting, moves in (("adaptive", False), ("fedvarp", False), ("mifa", True)):
        s = FedAU(client=LocalSGD(), weighting=weighting)
        state = s.init(torch.zeros(2), run_facts(3))
        if weighting == "mifa":
            state = store(state, {0: [3.0, 0.0]})
        x, state, _ = s.step(torch.zeros(2), batch_of([], torch.zeros(0, 2)), state, RoundInfo(0, 0, 0, 3, ()))
        assert state["count"].tolist() == [1, 1, 1]
        assert bool(x.abs().sum() > 0) == moves


def test_baselines_fix_their_weighting_and_bad_options():
    assert MIFA(client=LocalSGD()).weighting == "mifa" and KnownProb(client=LocalSGD()).weighting == "known_prob"
    with pytest.raises(ConfigError, match="strategy.weighting='adaptive' does not fit strategy=mifa"):
        MIFA(client=LocalSGD(), weighting="adaptive")
    with pytest.raises(ConfigError, match="weighting"):
        FedAU(client=LocalSGD(), weighting="median")
    with pytest.raises(ConfigError, match="cutoff"):
        FedAU(client=LocalSGD(), cutoff=0)


SIM = [
    "cluster=local",
    "dataset=digits",
    "model=logreg",
    "num_nodes=30",
    "rounds=60",
    "eval_every=0",
    "partition=dirichlet_per_node",
    "seed=2",
    "strategy.log_weights_every=20",
]


def test_fedau_in_a_real_run_tracks_one_over_p():
    set_driver_threads(1)
    sim = build(
        compose(*SIM, "strategy=fedau", "participation=bernoulli", "participation.p=0.3", "participation.p_min=0.1")
    )
    record = Recorder()
    state, _ = sim.run([record])
    rec = record.rounds
    probs = sim.participation.probabilities()
    assert np.array_equal(state.strategy_state["probs"], probs)
    counts = [m["train/participants"] for m in rec]
    assert abs(np.mean(counts) - probs.sum()) < 3 * np.sqrt((probs * (1 - probs)).sum() / 60) + 0.5
    weights = [m for m in rec if "fedau/estimates" in m]
    assert len(weights) == 3 and len(weights[-1]["fedau/estimates"]) == 30
    assert weights[-1]["fedau/rates"] == probs.tolist()  # beside the estimates, for plotting w_n against 1/p_n

    assert rec[-1]["fedau/estimate_rel_err"] < 0.5  # 60 rounds: rough, but tracking 1/p


def test_memory_methods_store_one_update_per_node():
    set_driver_threads(1)
    sim = build(compose(*SIM, "strategy=mifa", "participation=cyclic", "participation.period=10", "rounds=4"))
    state, _ = sim.run()
    stored = state.strategy_state["stored"]
    # exactly the nodes that took part in some round hold a (non-zero) stored update, and the
    # running sum is their sum
    took_part = np.zeros(30, dtype=bool)
    for t in range(4):
        took_part[sim.participation(t, 30, 0, None)] = True
    assert 0 < took_part.sum() < 30 and sorted(stored) == np.flatnonzero(took_part).tolist()
    assert all(row.shape == (sim.num_params,) and row.abs().sum() > 0 for row in stored.values())
    total = torch.stack(list(stored.values())).to(torch.float64).sum(0)
    assert torch.allclose(state.strategy_state["stored_sum"], total, rtol=1e-9, atol=1e-9)
