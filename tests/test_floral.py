"""FLORAL: the kernel game's projection, attacker and bias; the NN self-attacker; the random
Fourier feature head; label poisoning at chosen nodes; the federated defence end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from fedsim.errors import ConfigError
from fedsim.models import RandomFourierSVM, build_model
from fedsim.params import FlatModel
from fedsim.seeding import np_rng
from fedsim.simulation import build
from strategies.floral import (
    FloralSGD,
    bias,
    dual_qp,
    floral,
    project_box_hyperplane,
    randomized_sv_flip,
    rbf_kernel,
    rbf_svm,
)
from tests.conftest import compose


def brute_force_projection(lam_hat, y, C):
    cons = [{"type": "eq", "fun": lambda x: y @ x, "jac": lambda x: y}]
    res = minimize(
        lambda x: 0.5 * np.sum((x - lam_hat) ** 2),
        np.full_like(lam_hat, C / 2),
        jac=lambda x: x - lam_hat,
        bounds=[(0, C)] * len(y),
        constraints=cons,
        method="SLSQP",
        options={"ftol": 1e-14, "maxiter": 500},
    )
    return res.x


@pytest.mark.parametrize("seed", range(6))
def test_projection_is_feasible_and_matches_a_brute_force_qp(seed):
    rng = np.random.default_rng(seed)
    n, C = 9, 2.0
    y = rng.choice([-1.0, 1.0], size=n)
    y[0], y[1] = 1.0, -1.0
    lam_hat = rng.normal(1.0, 2.0, size=n)
    lam = project_box_hyperplane(lam_hat, y, C)
    assert (lam >= 0).all() and (lam <= C).all() and abs(y @ lam) < 1e-9
    ref = brute_force_projection(lam_hat, y, C)
    assert np.allclose(lam, ref, atol=1e-5)
    # a point that is already feasible stays where it is
    assert np.allclose(project_box_hyperplane(lam, y, C), lam, atol=1e-12)


def test_projection_with_one_class_is_zero():
    assert np.array_equal(project_box_hyperplane(np.array([1.0, 2.0]), np.array([1.0, 1.0]), 1.0), np.zeros(2))


def test_attacker_flips_its_budget_among_the_top_support_vectors():
    lam = np.array([0.0, 5.0, 1e-7, 3.0, 9.0, 2.0, 7.0, 0.5, 4.0, 0.0])
    for seed in range(5):
        idx = randomized_sv_flip(lam, 2, np.random.default_rng(seed), sv_tol=1e-5)
        assert len(idx) == 2 and len(set(idx.tolist())) == 2
        assert set(idx.tolist()) <= {4, 6, 1, 8}  # the 2B = 4 largest dual weights
    assert len(randomized_sv_flip(lam, 20, np.random.default_rng(0), sv_tol=1e-5)) == 7  # only 7 SVs
    assert len(randomized_sv_flip(lam, 0, np.random.default_rng(0), sv_tol=1e-5)) == 0


def moons(n=300, noise=0.2, seed=0, poison=0.2):
    from sklearn.datasets import make_moons

    X, y = make_moons(n_samples=n, noise=noise, random_state=seed)
    rng = np.random.default_rng(seed)
    flip = rng.choice(n, size=int(poison * n), replace=False)
    yp = y.copy()
    yp[flip] = 1 - yp[flip]
    return X, y, yp


def test_dual_qp_satisfies_the_kkt_conditions_and_the_bias_formula():
    X, y, _ = moons(n=120)
    ypm = np.where(y > 0, 1.0, -1.0)
    K = rbf_kernel(X, X, 0.5)
    C = 10.0
    lam = dual_qp(K, ypm, C)
    assert (lam >= -1e-12).all() and (lam <= C + 1e-9).all() and abs(ypm @ lam) < 1e-6
    free = (lam > 1e-3) & (lam < C - 1e-3)
    raw = K @ (lam * ypm)
    b_free = np.mean(ypm[free] - raw[free])  # the textbook bias, from the free support vectors
    margin = ypm * (raw + b_free)
    assert np.allclose(margin[free], 1.0, atol=1e-3)  # free support vectors sit on the margin
    assert (margin[lam < 1e-8] >= 1 - 1e-3).all() and (margin[lam > C - 1e-6] <= 1 + 1e-3).all()
    # FLORAL's code averages over *all* support vectors, bound ones included
    sv = lam > 1e-5
    assert bias(lam, ypm, K, C, sv_tol=1e-5) == pytest.approx(np.mean(ypm[sv] - raw[sv]))
    assert rbf_svm(X, y).accuracy(X, ypm) > 0.9


def test_floral_game_runs_is_seeded_and_keeps_the_flip_budget():
    X, y, yp = moons(n=200, poison=0.2)
    a = floral(X, yp, rounds=30, budget=10, rng=np.random.default_rng(1))
    b = floral(X, yp, rounds=30, budget=10, rng=np.random.default_rng(1))
    assert np.array_equal(a.lam, b.lam)
    assert len(a.flips) == 29 and all(len(f) == 10 for f in a.flips)  # one move per PGD step
    ypm = np.where(yp > 0, 1.0, -1.0)
    for flips in a.flips:  # flips are drawn from the support vectors of the current dual
        assert len(set(flips.tolist())) == 10
    assert (a.lam >= 0).all() and (a.lam <= 10.0 + 1e-9).all()
    y_last = ypm.copy()
    y_last[a.flips[-1]] *= -1
    assert abs(y_last @ a.lam) < 1e-6
    Xt, yt, _ = moons(n=400, seed=5, poison=0.0)
    assert a.model.accuracy(Xt, np.where(yt > 0, 1, -1)) > 0.7


def test_floral_sgd_flips_budget_labels_among_the_most_influential():
    logits = torch.tensor(
        [
            [5.0, 0.0, 0.0],
            [0.0, 5.0, 0.0],
            [1.0, 0.9, 0.0],
            [0.0, 0.2, 0.3],
            [3.0, 0.0, 2.9],
            [0.0, 0.0, 6.0],
            [4.0, 0.0, 0.0],
            [0.0, 4.0, 0.0],
            [0.0, 0.0, 4.0],
            [0.0, 0.1, 0.0],
        ]
    )
    y = torch.tensor([0, 1, 0, 2, 0, 2, 0, 1, 2, 1])
    for influence in ("grad_norm", "margin"):
        client = FloralSGD(budget=0.2, influence=influence)
        scores = client.scores(logits, y)
        top4 = set(torch.argsort(scores, descending=True)[:4].tolist())
        assert top4 == {2, 3, 4, 9}  # the low-margin rows
        out = client.targets(logits, y, torch.Generator().manual_seed(0))
        changed = (out != y).nonzero().flatten().tolist()
        assert len(changed) == 2 and set(changed) <= top4
        for i in changed:  # to the strongest wrong class
            wrong = logits[i].clone()
            wrong[y[i]] = float("-inf")
            assert out[i] == wrong.argmax()
    rev = FloralSGD(budget=0.2, flip="reverse").targets(logits, y, torch.Generator().manual_seed(0))
    assert ((rev == y) | (rev == 2 - y)).all()
    with pytest.raises(ConfigError):
        FloralSGD(budget=0.9)


def test_random_fourier_head_has_fixed_features_and_trainable_head_only():
    shape = (1, 8, 8)
    a = build_model(lambda s, c: RandomFourierSVM(s, c, features=64), shape, 10, seed=0)
    b = build_model(lambda s, c: RandomFourierSVM(s, c, features=64), shape, 10, seed=1)
    assert torch.equal(a.omega, b.omega) and FlatModel(a).dim == 64 * 10 + 10
    wide = RandomFourierSVM(shape, 10, features=20000, gamma=0.5)
    x = 0.1 * torch.randn(6, *shape, generator=torch.Generator().manual_seed(0))
    k_approx = wide.features(x) @ wide.features(x).T
    k_true = torch.exp(-0.5 * torch.cdist(x.flatten(1), x.flatten(1)) ** 2)
    assert 0.2 < float(k_true[0, 1]) < 0.9  # a kernel with informative off-diagonal values
    assert torch.allclose(k_approx, k_true, atol=0.05)  # Rahimi-Recht: the features reproduce the kernel


def test_label_flip_at_chosen_nodes_and_at_all_nodes():
    base = [
        "dataset=digits",
        "model=logreg",
        "cluster=local",
        "num_nodes=6",
        "nodes_per_round=6",
        "rounds=2",
        "partition=iid",
        "attack=label_flip",
        "attack.fraction=0.5",
    ]
    sim = build(compose(*base, "attack.nodes=[1,4]"))
    assert sim.byzantine.ids == {1, 4}
    from fedsim.data.sources import load_digits

    y0 = load_digits().y_train
    y1 = sim.data.dataset.y_train
    for nid, ix in enumerate(sim.data.partition.train):
        changed = int((y1[ix] != y0[ix]).sum())
        if nid in (1, 4):
            flipped_ok = (y1[ix] == 9 - y0[ix]) | (y1[ix] == y0[ix])
            assert flipped_ok.all() and abs(changed - 0.5 * len(ix)) <= 0.5 + (y0[ix] == 9 - y0[ix]).sum()
        else:
            assert changed == 0
    everyone = build(compose(*base, "attack.nodes=all"))
    assert everyone.byzantine.ids == set(range(6))
    with pytest.raises(ConfigError, match="leave byzantine.num=0"):
        build(compose(*base, "attack.nodes=all", "byzantine.num=2"))


def test_federated_floral_defence_runs_end_to_end_with_a_robust_aggregator():
    cfg = compose(
        "dataset=digits",
        "model=mlp",
        "cluster=local",
        "num_nodes=8",
        "nodes_per_round=8",
        "rounds=12",
        "strategy.client.epochs=2",
        "strategy=floral",
        "strategy/aggregator=trimmed_mean",
        "byzantine.declared=1",
        "attack=label_flip",
        "attack.nodes=all",
        "attack.fraction=0.3",
        "eval_every=0",
    )
    sim = build(cfg)
    before = sim.evaluator(sim.state.params)["eval/acc"]
    state, summary = sim.run()
    # 30 % of every node's labels reversed, the self-attacking client, the trimmed mean: it still
    # learns the 10 digits (chance 0.1; 0.73 when this test was written)
    assert torch.isfinite(state.params).all() and summary["eval/acc"] > max(0.6, before + 0.4)
    cfg = compose(
        "dataset=moons",
        "model=rff_svm",
        "cluster=local",
        "num_nodes=4",
        "nodes_per_round=4",
        "rounds=3",
        "strategy=floral",
        "strategy.client.objective=hinge",
        "strategy.client.weight_decay=1e-3",
        "attack=label_flip",
        "attack.nodes=all",
        "attack.fraction=0.2",
        "eval_every=0",
    )
    state, summary = build(cfg).run()
    assert summary["eval/acc"] > 0.5


def test_poisoned_labels_are_seeded_per_node():
    from fedsim.faults.attacks import LabelFlip

    y = np.arange(100) % 10
    a = LabelFlip(fraction=0.3).poison(y, 10, np_rng(0, "poison", 3))
    b = LabelFlip(fraction=0.3).poison(y, 10, np_rng(0, "poison", 3))
    c = LabelFlip(fraction=0.3).poison(y, 10, np_rng(0, "poison", 4))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
