"""Participation models: long-run rates, FedAU's label-correlated rates, seeded determinism."""

from __future__ import annotations

import numpy as np
import pytest

from fedsim.errors import ConfigError
from fedsim.faults.participation import Bernoulli, Cyclic, Full, Markov, Uniform, label_rates
from fedsim.seeding import np_rng

N = 40


def label_counts(n: int = N, classes: int = 10, seed: int = 0) -> np.ndarray:
    """Label counts of n nodes with Dirichlet(0.1) label mixes (200 examples each)."""
    rng = np.random.default_rng(seed)
    return np.stack([rng.multinomial(200, rng.dirichlet(0.1 * np.ones(classes))) for _ in range(n)])


def schedule(model, rounds: int) -> np.ndarray:
    out = np.zeros((rounds, N), dtype=bool)
    for t in range(rounds):
        out[t, model(t, N, 0, np_rng(0, "sample", t))] = True
    return out


@pytest.mark.parametrize(
    "model,rounds,tol",
    [
        (Bernoulli(rates="label"), 6000, 0.02),
        (Markov(rates="label", transition=0.05), 6000, 0.05),
        (Markov(rates="constant", p=0.3, transition=0.5), 6000, 0.03),
        (Cyclic(rates="label", period=20), 6000, None),
    ],
    ids=["bernoulli", "markov-0.05", "markov-0.5", "cyclic-20"],
)
def test_long_run_rate_matches_p(model, rounds, tol):
    bound = model.bind(num_nodes=N, seed=3, label_counts=label_counts())
    p = bound.probabilities()
    rate = schedule(bound, rounds).mean(0)
    if isinstance(model, Cyclic):
        active, inactive = bound.lengths()  # the rate the cycle can realise: A / (A + B)
        # whole cycles plus at most one partial cycle: off by at most A / rounds
        assert np.allclose(rate, active / (active + inactive), atol=20 / rounds)
        assert np.abs(rate - p).max() <= 1 / 20 + 0.02  # rounding L p to whole rounds
    else:
        assert np.abs(rate - p).max() < tol + 3 * np.sqrt(p * (1 - p) / rounds).max()


def test_label_rates_follow_fedau():
    counts = label_counts()
    p = label_rates(counts, p=0.1, alpha=0.1, p_min=0.02, rng=np.random.default_rng(0))
    assert p.min() >= 0.02 and p.max() <= 1.0
    # same label mix, same rate; rates are not all equal (label-correlated heterogeneity)
    twin = label_rates(np.vstack([counts, counts[:1] * 3]), p=0.1, alpha=0.1, p_min=0.02, rng=np.random.default_rng(0))
    assert twin[-1] == pytest.approx(twin[0])
    assert p.std() > 0.01
    # the mean is about p (exact in expectation over m when p_min does not bind)
    means = [label_rates(counts, p=0.1, alpha=0.1, p_min=0.0, rng=np.random.default_rng(s)).mean() for s in range(300)]
    assert np.mean(means) == pytest.approx(0.1, rel=0.1)


def test_markov_transition_rule_and_cap():
    bound = Markov(rates="constant", p=0.05, transition=0.5).bind(num_nodes=N, seed=0)
    a, b = bound.rates_ab()
    # b = 0.5 (1/0.05 - 1) = 9.5 > 1: a <- a / b, b <- 1; stationary a / (a + b) = p
    assert np.allclose(b, 1.0) and np.allclose(a, 0.5 / 9.5) and np.allclose(a / (a + b), 0.05)


def test_cyclic_pattern_is_on_off_blocks():
    bound = Cyclic(rates="constant", p=0.25, period=8).bind(num_nodes=N, seed=1)
    s = schedule(bound, 64)
    for n in range(N):
        col = s[:, n].astype(int)
        runs = np.diff(np.flatnonzero(np.diff(col) != 0))
        assert set(runs[1:].tolist()) <= {2, 6}  # A = round(8 * 0.25) = 2 on, B = 6 off
    assert not s[0].all()  # random phases


def test_processes_are_seeded_and_replay_from_any_round():
    counts = label_counts()
    for model in (Markov(), Cyclic(period=10), Bernoulli()):
        a = model.bind(num_nodes=N, seed=5, label_counts=counts)
        b = model.bind(num_nodes=N, seed=5, label_counts=counts)
        c = model.bind(num_nodes=N, seed=6, label_counts=counts)
        sa = schedule(a, 50)
        # a fresh copy asked for round 37 first (a resumed run) gives the same set
        assert np.array_equal(b(37, N, 0, None), np.flatnonzero(sa[37]))
        assert np.array_equal(b(12, N, 0, None), np.flatnonzero(sa[12]))  # going back replays
        assert not np.array_equal(schedule(c, 50), sa)


def test_full_and_uniform():
    full = Full().bind(num_nodes=N, seed=0)
    assert full(4, N, 3, None).tolist() == list(range(N)) and np.all(full.probabilities() == 1)
    ids = Uniform()(0, N, 7, np_rng(0, "sample", 0))
    assert len(ids) == 7 and np.all(np.diff(ids) > 0)
    assert np.allclose(Uniform().probabilities(N, 10), 0.25)


@pytest.mark.parametrize("kwargs,match", [({"p": 0}, "p=0"), ({"rates": "zipf"}, "rates"), ({"p_min": 2}, "p_min")])
def test_bad_options(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Bernoulli(**kwargs)
    with pytest.raises(ConfigError, match="period"):
        Cyclic(period=1)
