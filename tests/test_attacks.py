"""Attacks (formulas on hand-made honest rows), the Byzantine bookkeeping, and the attacks inside
real runs of the sync and peer-to-peer loops."""

from __future__ import annotations

from statistics import NormalDist

import numpy as np
import pytest
import torch

from fedsim.data.base import FederatedData
from fedsim.data.partition import IID
from fedsim.data.sources import load_digits
from fedsim.errors import ConfigError, FedsimError
from fedsim.faults.attacks import (
    ALIE,
    IPM,
    Gaussian,
    Infinite,
    LabelFlip,
    Mimic,
    OptimalALIE,
    OptimalIPM,
    SignFlip,
    line_maximize,
    line_maximize_monna,
)
from fedsim.faults.byzantine import Byzantine, inject
from fedsim.seeding import np_rng
from fedsim.simulation import build, make_attack
from fedsim.types import RoundInfo, UpdateBatch
from strategies.aggregators import Mean, TrimmedMean
from tests.conftest import Recorder, compose

H = torch.tensor([[1.0, 2.0], [3.0, 2.0], [2.0, 5.0]])
MEAN = H.mean(0)
STD = H.std(0, correction=1)
INFO = RoundInfo(0, 0, 0, 5, (0, 1, 2, 3, 4), 2)


def test_simple_attacks_follow_their_formulas():
    rows, _ = SignFlip()(H, 2)
    assert rows.shape == (2, 2) and torch.allclose(rows, -MEAN.expand(2, -1))
    assert torch.allclose(IPM(tau=0.5)(H, 1)[0][0], -0.5 * MEAN)
    assert torch.allclose(ALIE()(H, 1)[0][0], MEAN + 1.5 * STD)
    assert torch.isinf(Infinite()(H, 3)[0]).all()
    assert SignFlip()(H, 0)[0].shape == (0, 2)


def test_alie_zmax_is_baruch_et_al():
    # n = 3 honest + 2 Byzantine = 5: s = floor(5/2 + 1) - 2 = 1, z = Phi^-1(4/5)
    z = NormalDist().inv_cdf(4 / 5)
    assert ALIE.z_max(5, 2) == pytest.approx(z)
    assert torch.allclose(ALIE(z="max")(H, 2)[0][0], MEAN - z * STD)
    with pytest.raises(ConfigError):
        ALIE(z="min")


def test_gaussian_is_seeded_and_rows_differ():
    a, _ = Gaussian(sigma=2.0)(H, 2, rng=torch.Generator().manual_seed(1))
    b, _ = Gaussian(sigma=2.0)(H, 2, rng=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.equal(a[0], a[1])


def test_mimic_copies_an_honest_row_and_the_heuristic_finds_the_outlying_direction():
    assert torch.equal(Mimic(index=1)(H, 2)[0], H[1].expand(2, -1))
    g = torch.Generator().manual_seed(0)
    state = None
    attack = Mimic(heuristic=True, warmup=20)
    for _ in range(25):
        a = torch.randn(6, generator=g) * 5.0
        rows = torch.stack([torch.tensor([a_i, 0.0, 0.0]) for a_i in a]) + 0.01 * torch.randn(6, 3, generator=g)
        out, state = attack(rows, 1, rng=torch.Generator().manual_seed(0), state=state)
    assert state["t"] == 20
    assert abs(float(state["z"][0])) > 0.99  # the principal direction is the first axis
    assert torch.equal(out[0], rows[int(torch.argmax(rows[:, 0].abs()))])


def test_line_maximize_follows_byzfl_and_the_two_sided_variant():
    concave = lambda x: -((x - 7.0) ** 2)
    assert line_maximize(concave) == 10.0  # ByzFL only tries points above the best
    assert abs(line_maximize(concave, below=True) - 7.0) < 1.0
    calls = []
    line_maximize(lambda x: calls.append(x) or x, budget=5)
    assert len(calls) == 5


def tried(search, objective, **kwargs) -> tuple[float, list[float]]:
    calls: list[float] = []
    best = search(lambda x: calls.append(x) or objective(x), **kwargs)
    return best, [round(x, 6) for x in calls]


def test_the_two_searches_try_the_hand_worked_strengths():
    """Worked by hand for a concave objective with its peak at 2.7 (then 2.2), delta 1, ratio 0.8,
    8 evaluations. Both expand 0, 1, 3, 7 (7 is worse: delta 4 -> 3.2). ByzFL then only tries
    best + delta: 3 + 3.2, + 2.56, + 2.048, + 1.6384. The authors' search moves the last point
    tried: 7 is above the best, so 7 - 3.2 = 3.8; above again, 3.8 - 2.56 = 1.24; below, so
    1.24 + 2.048 = 3.288; above, 3.288 - 1.6384 = 1.6496, which beats 3 when the peak is 2.2."""
    for peak in (2.7, 2.2):
        f = lambda x, p=peak: -((x - p) ** 2)
        assert tried(line_maximize, f, delta=1.0, budget=8) == (3.0, [0.0, 1.0, 3.0, 7.0, 6.2, 5.56, 5.048, 4.6384])
        best, xs = tried(line_maximize_monna, f, delta=1.0, budget=8)
        assert xs == [0.0, 1.0, 3.0, 7.0, 3.8, 1.24, 3.288, 1.6496]
        assert best == (3.0 if peak == 2.7 else pytest.approx(1.6496))
    # a decreasing objective: the first try fails (delta 0.8), then every step down would go below
    # 0 and is halved back towards the last point: 1 - 0.8 = 0.2; 0.2 - 0.64 < 0 -> (-0.44 + 0.2) / 2
    # = -0.12 -> 0.04; 0.04 - 0.512 -> -0.216 -> -0.088 -> -0.024 -> 0.008; then 0.0016
    assert tried(line_maximize_monna, lambda x: -x, delta=1.0, budget=6) == (0.0, [0.0, 1.0, 0.2, 0.04, 0.008, 0.0016])
    assert tried(line_maximize_monna, lambda x: x, delta=1.0, budget=4) == (7.0, [0.0, 1.0, 3.0, 7.0])
    assert tried(line_maximize_monna, lambda x: x, delta=1.0, budget=1) == (0.0, [0.0])


def test_the_all_honest_objective_averages_what_every_honest_node_keeps():
    """The authors' objective in the peer-to-peer loop: ||mean_i NNA_i(U) - mean(H)|| with NNA_i
    around honest node i, against honest node 0's view alone (by hand on 4 honest rows, f = 1)."""
    from fedsim.contract import PeerDefence
    from strategies.aggregators import NNA

    honest = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [4.0, 4.0]])
    nna = NNA(f=1)
    defence = PeerDefence(at=lambda U, i: nna.around(U, i))
    mean = honest.mean(0)
    for tau in (0.0, 0.5, 2.0):
        U = torch.cat([honest, (mean + tau * honest.std(0, correction=1)).unsqueeze(0)])
        kept = []
        for i in range(4):  # drop the row farthest from row i, average the other 4
            far = int(torch.linalg.vector_norm(U - U[i], dim=1).argmax())
            kept.append(torch.cat([U[:far], U[far + 1 :]]).mean(0))
        every = float(torch.linalg.vector_norm(torch.stack(kept).mean(0) - mean))
        node0 = float(torch.linalg.vector_norm(kept[0] - mean))
        assert OptimalALIE(objective="all_honest").distortion(honest, 1, defence)(tau) == pytest.approx(every)
        assert OptimalALIE(objective="node0").distortion(honest, 1, defence)(tau) == pytest.approx(node0)
        assert every != pytest.approx(node0)


def test_line_searched_attacks_take_the_strategy_defaults_where_unset():
    monna = build(compose(*p2p_overrides("cluster=local", "attack=optimal_alie", "byzantine.num=2")))
    byzfl = {"search": "byzfl", "objective": "node0", "delta": 10.0, "budget": 20, "ratio": 0.8, "below": False}
    authors = {**byzfl, "search": "monna", "objective": "all_honest", "delta": 1.0, "budget": 16}
    assert monna.byzantine.attack.settings == authors
    assert "search=monna" in monna.info()["attack"]
    mixed = build(
        compose(*p2p_overrides("cluster=local", "attack=optimal_ipm", "byzantine.num=2", "attack.search=byzfl"))
    )
    assert mixed.byzantine.attack.settings == {**authors, "search": "byzfl"}
    robust = build(compose(*digits_overrides("attack=optimal_alie", "byzantine.num=2", "strategy=robust")))
    assert robust.byzantine.attack.settings == byzfl
    with pytest.raises(ConfigError, match="below=true extends search=byzfl only"):
        build(compose(*p2p_overrides("cluster=local", "attack=optimal_alie", "byzantine.num=2", "attack.below=true")))
    for bad, needle in (("attack.search=grid", "choose one of byzfl, monna"), ("attack.objective=all", "node0")):
        with pytest.raises(ConfigError, match=needle):
            make_attack(compose("attack=optimal_alie", bad).attack)


def test_optimal_attacks_beat_fixed_strength_against_their_defence():

    g = torch.Generator().manual_seed(0)
    honest = torch.randn(8, 20, generator=g) + 1.0
    mean = honest.mean(0)
    tm = TrimmedMean(f=2)

    def defence(U):
        return tm(U, torch.ones(U.shape[0]))

    def damage(rows):
        return float((defence(torch.cat([honest, rows])) - mean).norm())

    for opt, fixed in ((OptimalALIE(), ALIE()), (OptimalIPM(), IPM())):
        rows, state = opt(honest, 2, defence=defence)
        assert state["tau"] >= 0
        assert damage(rows) >= damage(fixed(honest, 2)[0]) - 1e-6
    with pytest.raises(ConfigError, match="needs the defence"):
        OptimalALIE()(honest, 2)
    # against the plain mean the damage grows without bound: the search keeps expanding
    rows, state = OptimalIPM()(honest, 2, defence=lambda U: Mean()(U, torch.ones(U.shape[0])))
    assert state["tau"] > 100


def test_label_flip_poisons_exactly_its_budget():
    y = np.repeat(np.arange(10), 10)
    rng = np_rng(0, "poison", 0)
    out = LabelFlip(fraction=0.3).poison(y, 10, rng)
    changed = out != y
    assert changed.sum() == 30
    assert np.array_equal(out[changed], 9 - y[changed])
    tgt = LabelFlip(fraction=0.5, mapping="targeted", source=3, target=8).poison(y, 10, np_rng(0, "poison", 1))
    assert (tgt != y).sum() == 5 and set(np.flatnonzero(tgt != y)) <= set(np.flatnonzero(y == 3))
    assert (tgt[tgt != y] == 8).all()
    with pytest.raises(ConfigError):
        LabelFlip(mapping="targeted")


def test_byzantine_ids_are_seeded_and_declared_defaults_to_num():
    a = Byzantine.draw(num_nodes=20, num=4, declared=None, attack=SignFlip(), seed=3)
    b = Byzantine.draw(num_nodes=20, num=4, declared=None, attack=SignFlip(), seed=3)
    c = Byzantine.draw(num_nodes=20, num=4, declared=None, attack=SignFlip(), seed=4)
    assert a.ids == b.ids and a.ids != c.ids and a.num == 4 and a.declared == 4
    assert Byzantine.draw(num_nodes=20, num=4, declared=6, attack=None, seed=3).declared == 6
    with pytest.raises(ConfigError, match="needs faulty nodes"):
        Byzantine.draw(num_nodes=20, num=0, declared=None, attack=SignFlip(), seed=0)
    with pytest.raises(ConfigError, match="byzantine.num"):
        Byzantine.draw(num_nodes=5, num=6, declared=None, attack=None, seed=0)


def test_inject_appends_attack_rows_at_seeded_positions():
    honest = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    batch = UpdateBatch(
        torch.tensor([0, 2, 3, 5]),
        honest,
        torch.tensor([5, 5, 5, 5]),
        torch.zeros(4, dtype=torch.int64),
        torch.full((4,), 12),
    )
    byz = Byzantine(frozenset({1, 4}), 2, SignFlip())
    sizes = np.array([5, 7, 5, 5, 9, 5])
    out = inject(batch, [1, 4], byzantine=byz, info=INFO, state={}, defence=None, sizes=sizes)
    again = inject(batch, [1, 4], byzantine=byz, info=INFO, state={}, defence=None, sizes=sizes)
    b = out.batch
    assert out.num_byzantine == 2 and len(b) == 6
    assert torch.equal(b.node_ids, again.batch.node_ids)
    assert sorted(b.node_ids.tolist()) == [0, 1, 2, 3, 4, 5]
    for row, nid in zip(b.messages, b.node_ids.tolist()):
        expect = -honest.mean(0) if nid in (1, 4) else honest[[0, 2, 3, 5].index(nid)]
        assert torch.equal(row, expect)
    assert dict(zip(b.node_ids.tolist(), b.num_examples.tolist()))[4] == 9
    assert b.node_ids.tolist() != sorted(b.node_ids.tolist())  # shuffled (this seed)


def digits_overrides(*extra):
    return [
        "dataset=digits",
        "model=logreg",
        "cluster=local",
        "num_nodes=10",
        "nodes_per_round=10",
        "rounds=3",
        "eval_every=0",
        *extra,
    ]


def test_sync_run_with_update_attack_reports_byzantine_rows():
    sim = build(
        compose(*digits_overrides("strategy=robust", "attack=alie", "byzantine.num=3", "strategy.preaggregators=[nnm]"))
    )
    record = Recorder()
    state, summary = sim.run([record])
    metrics = record.rounds
    assert all(m["attack/byzantine_rows"] == 3 for m in metrics)
    assert 0.0 <= summary["eval/acc"] <= 1.0
    assert len(sim.byzantine.ids) == 3
    # Byzantine nodes never ran: only honest nodes have momentum state
    assert set(state.node_states) == set(range(10)) - sim.byzantine.ids


def test_inf_attack_breaks_the_mean_with_a_clear_error_and_not_trimmed_mean():
    sim = build(compose(*digits_overrides("attack=infinite", "byzantine.num=2")))
    with pytest.raises(FedsimError, match="NaN or Inf"):
        sim.run()
    sim = build(compose(*digits_overrides("attack=infinite", "byzantine.num=2", "strategy/aggregator=trimmed_mean")))
    state, _ = sim.run()
    assert torch.isfinite(state.params).all()


def test_too_large_declared_f_is_a_config_error():
    with pytest.raises(ConfigError, match="trimmed_mean needs 2f < n"):
        build(compose(*digits_overrides("strategy=robust", "attack=sign_flip", "byzantine.num=5")))


def test_label_flip_rewrites_only_byzantine_labels():
    sim = build(compose(*digits_overrides("attack=label_flip", "byzantine.num=2", "partition=iid")))
    clean = load_digits()
    y0, y1 = clean.y_train, sim.data.dataset.y_train
    part = sim.data.partition
    for nid in range(10):
        ix = part.train[nid]
        if nid in sim.byzantine.ids:
            assert np.array_equal(y1[ix], 9 - y0[ix])
        else:
            assert np.array_equal(y1[ix], y0[ix])
    state, _ = sim.run()
    assert set(state.node_states) == set()  # LocalSGD keeps no state; all 10 nodes trained


def test_label_poisoning_refuses_overlapping_partitions():
    ds = load_digits()
    part = IID()(ds.y_train, ds.y_test, 4, np_rng(0, "partition"))
    shared = type(part)([part.train[0], part.train[0], part.train[2], part.train[3]], part.test)
    byz = Byzantine(frozenset({1}), 1, LabelFlip())
    with pytest.raises(ConfigError, match="disjoint"):
        byz.poison(FederatedData(ds, shared), 0)


def p2p_overrides(*extra):
    return [
        "dataset=digits",
        "model=logreg",
        "num_nodes=8",
        "nodes_per_round=8",
        "rounds=4",
        "eval_every=2",
        "strategy=monna",
        "server=p2p",
        "strategy.client.lr=0.1",
        *extra,
    ]


def test_p2p_without_faults_and_mean_mixing_is_d_sgd():
    sim = build(compose(*p2p_overrides("cluster=local", "strategy/aggregator=mean")))
    state, summary = sim.run()
    X = state.params
    assert X.shape[0] == 8 and torch.allclose(X, X[0].expand_as(X), atol=1e-6)  # everyone averaged everything
    assert "eval/honest_acc_mean" in summary


def test_p2p_monna_under_attack_keeps_one_model_per_honest_node():
    sim = build(compose(*p2p_overrides("cluster=local", "attack=alie", "byzantine.num=2")))
    assert sim.server.rows_per_step(sim.strategy, sim.facts, 8) == 1 + (8 - 4 - 1) + 2
    state, summary = sim.run()
    assert state.params.shape[0] == 6 and torch.isfinite(state.params).all()
    assert not torch.allclose(state.params[0], state.params[1])  # own models, random neighbourhoods
    assert set(state.node_states) == set(range(8)) - sim.byzantine.ids
    assert 0.0 <= summary["eval/honest_acc_min"] <= summary["eval/honest_acc_mean"] <= summary["eval/honest_acc_max"]


def test_p2p_and_strategy_must_match():
    with pytest.raises(ConfigError, match="strategy=monna runs peer to peer; add server=p2p"):
        build(compose("dataset=digits", "strategy=monna", "cluster=local"))
    with pytest.raises(ConfigError, match="server=p2p runs peer-to-peer strategies .* strategy=fedavg aggregates"):
        build(compose("dataset=digits", "server=p2p", "cluster=local"))
    with pytest.raises(ConfigError, match="strategy=monna needs every node in every round; set nodes_per_round=8"):
        build(compose(*p2p_overrides("cluster=local", "nodes_per_round=4")))
    with pytest.raises(ConfigError, match="participation=bernoulli|every node in every round"):
        build(compose(*p2p_overrides("cluster=local", "participation=bernoulli")))


def test_p2p_label_flip_nodes_train_on_poisoned_labels_and_gossip():
    """A data attack in the peer-to-peer loop: the poisoned nodes are members (they keep and mix
    a model like everyone), no vector is crafted, and eval/* is the first honest member's model."""
    sim = build(compose(*p2p_overrides("cluster=local", "attack=label_flip", "byzantine.num=2")))
    assert sim.facts.members == tuple(range(8)) and sim.facts.attack == "data"
    assert sim.server.rows_per_step(sim.strategy, sim.facts, 8) == 1 + (8 - 4 - 1)
    state, summary = sim.run()
    assert state.params.shape[0] == 8 and torch.isfinite(state.params).all()
    assert set(state.node_states) == set(range(8))
    honest0 = min(set(range(8)) - sim.byzantine.ids)
    assert summary["eval/acc"] == sim.evaluator(state.params[honest0])["eval/acc"]


def test_every_attack_config_runs_a_round():
    from tests.conftest import CONF

    for path in sorted((CONF / "attack").glob("*.yaml")):
        name = path.stem
        extra = [f"attack={name}"] + ([] if name == "none" else ["byzantine.num=2"])
        extra += ["strategy=robust", "rounds=1"]
        cfg = compose(*digits_overrides(*extra))
        sim = build(cfg)
        state, _ = sim.run()
        assert torch.isfinite(state.params).all(), name
        attack = make_attack(cfg.attack)
        assert (attack is None) == (name == "none")
