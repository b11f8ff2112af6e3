"""Error feedback (docs/methods/econtrol.md): the heterogeneous-quadratic separation, the update
order, the server's mirror and per-node estimates, byte accounting and config errors in real runs."""

from __future__ import annotations

import math

import pytest
import torch

from fedsim.compress import Identity, TopK
from fedsim.errors import ConfigError
from fedsim.simulation import build, set_driver_threads
from fedsim.types import RoundInfo, UpdateBatch
from fedsim.uplink import Uplink
from strategies.client import LocalSGD
from strategies.fedavg import FedAvg
from strategies.feedback import EF14, EF21, EF21SGDM, EControl, NoFeedback
from tests.conftest import compose, run_facts
from tests.test_server import Recorder


def quadratic(n: int = 10, m: int = 30, d: int = 50, seed: int = 0):
    """f_i(x) = 1/2 ||A_i x - b_i||^2 with node-dependent b_i (heterogeneity zeta > 0)."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n, m, d, generator=g, dtype=torch.float64) / math.sqrt(m)
    b = 3 * torch.randn(n, m, generator=g, dtype=torch.float64) + torch.arange(n, dtype=torch.float64)[:, None]
    L = max(float(torch.linalg.matrix_norm(A[i], 2) ** 2) for i in range(n))

    def grads(x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("nmd,nm->nd", A, torch.einsum("nmd,d->nm", A, x) - b)

    return grads, L


def run_quadratic(feedback, *, steps: int, k: int = 5) -> tuple[float, float]:
    """Full gradients; node i sends the compressed gamma * grad f_i (one local step of size
    gamma) through `feedback`; the server is the real uplink stage (the mirror of the h-based
    rules) and FedAvg's step, lr 1."""
    grads, L = quadratic()
    n, d = 10, 50
    gamma = 0.2 / L
    strategy = FedAvg(client=LocalSGD(), weighted=False)
    uplink = Uplink(TopK(k=k), feedback)
    x = torch.zeros(d, dtype=torch.float64)
    facts = run_facts(n)
    state, ustate = strategy.init(x, facts), uplink.init(x, strategy, facts)
    nodes: list[dict] = [{} for _ in range(n)]
    info = RoundInfo(0, 0, 0, n, tuple(range(n)))
    ids = torch.arange(n)
    start = float(grads(x).mean(0).norm())
    for _ in range(steps):
        G = gamma * grads(x)
        rows = []
        for i in range(n):
            msg, _, nodes[i] = feedback.node(G[i], nodes[i], lambda v: uplink.compressor.compress(v))
            rows.append(msg)
        zeros = torch.zeros(n, dtype=torch.int64)
        batch = UpdateBatch(ids, torch.stack(rows), torch.ones(n, dtype=torch.int64), zeros, zeros)
        assert uplink.mode(strategy) == ("mirror" if feedback.estimate else "none")
        batch, ustate = uplink.fold(batch, ustate)
        x, state, _ = strategy.step(x, batch, state, info)
        if not torch.isfinite(x).all():
            return start, math.inf
    return start, float(grads(x).mean(0).norm())


def test_heterogeneous_quadratic_separates_the_feedback_rules():
    """The main qualitative check of docs/methods/econtrol.md: with top-k and full gradients EF21 and EControl reach
    machine precision; EF14 is stuck far from it after the same steps; naive compression stalls."""
    steps = 2000
    start, naive = run_quadratic(NoFeedback(), steps=steps)
    _, ef14 = run_quadratic(EF14(), steps=steps)
    _, ef21 = run_quadratic(EF21(), steps=steps)
    _, econtrol = run_quadratic(EControl(eta=0.1), steps=steps)
    assert ef21 < 1e-8 and econtrol < 1e-8
    assert ef14 > 1e-3
    assert naive > 0.1 * start or not math.isfinite(naive)


def test_econtrol_with_eta_zero_is_ef21():
    assert run_quadratic(EControl(eta=0.0), steps=50) == run_quadratic(EF21(), steps=50)


def test_update_order_uses_the_old_estimate():
    """One hand-worked EControl step with top-1: Δ = C(eta e + g - h), then e and h both with the
    old h."""
    top1 = TopK(k=1)
    e, h = torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 2.0, 0.0])
    g = torch.tensor([0.5, 2.5, -3.0])
    msg, nbytes, new = EControl(eta=0.5).node(g, {"e": e, "h": h}, lambda v: top1.compress(v))
    # eta e + g - h = [1.0, 0.5, -3.0] -> top-1 keeps -3.0
    assert msg.tolist() == [0.0, 0.0, -3.0]
    assert new["h"].tolist() == [0.0, 2.0, -3.0]
    assert new["e"].tolist() == [1.0 + 0.5, 0.5, 0.0]  # e + (g - h) - Δ
    assert nbytes == math.ceil((32 + 2) / 8)
    # EF14 on the same input: p = g + e, e <- p - C(p)
    msg14, _, new14 = EF14().node(g, {"e": e}, lambda v: top1.compress(v))
    assert msg14.tolist() == [0.0, 0.0, -3.0] and new14["e"].tolist() == [1.5, 2.5, 0.0]


@pytest.mark.parametrize("feedback", [EF21(), EF21SGDM(momentum=0.3), EControl(eta=0.2)], ids=lambda f: f.name)
def test_first_participation_sends_g_uncompressed_or_compressed(feedback):
    g = torch.tensor([3.0, -1.0, 0.5, 0.0])
    top1 = TopK(k=1)
    msg, nbytes, state = feedback.node(g, {}, lambda v: top1.compress(v))
    assert torch.equal(msg, g) and nbytes == 16 and torch.equal(state["h"], g)
    feedback.h0 = "compressed"
    msg, nbytes, state = feedback.node(g, {}, lambda v: top1.compress(v))
    assert msg.tolist() == [3.0, 0.0, 0.0, 0.0] and nbytes == math.ceil((32 + 2) / 8)
    if "e" in state:  # EControl keeps what C dropped as error
        assert state["e"].tolist() == [0.0, -1.0, 0.5, 0.0]


BASE = [
    "cluster=local",
    "dataset=digits",
    "model=logreg",
    "num_nodes=8",
    "nodes_per_round=4",
    "rounds=4",
    "eval_every=0",
    "seed=3",
]
SIM = [*BASE, "strategy.client.steps=2"]


def test_server_mirror_equals_the_weighted_mean_of_node_estimates():
    """After a real run with partial participation, the server's h is sum_i w_i h_i over every
    node (never-sampled nodes count as h_i = 0) with w_i = n_i / sum n."""
    set_driver_threads(1)
    sim = build(compose(*SIM, "compressor=top_k", "compressor.ratio=0.1", "feedback=econtrol"))
    state, _ = sim.run()
    sizes = torch.tensor(sim.data.partition.sizes(), dtype=torch.float64)
    w = sizes / sizes.sum()
    mirror = torch.zeros_like(state.params, dtype=torch.float64)
    for nid, s in state.node_states.items():
        assert s["uplink"]["h"].shape == s["uplink"]["e"].shape == state.params.shape
        mirror += w[nid] * s["uplink"]["h"].double()
    assert 4 <= len(state.node_states) < 8  # some nodes were never sampled
    assert sim.uplink.mode(sim.strategy) == "mirror"
    assert torch.allclose(state.uplink_state["h"].double(), mirror, atol=1e-6)


def test_per_node_estimates_feed_any_aggregator():
    """With a robust rule the server keeps every sender's h_i (the nodes' own h_i, exactly) and
    the rule combines them; with the trimmed mean at f = 0 (the plain mean, but not declared
    linear) under full participation this equals the mirror of the mean."""
    set_driver_threads(1)
    full = [
        *SIM,
        "nodes_per_round=8",
        "strategy.weighted=false",
        "compressor=top_k",
        "compressor.ratio=0.1",
        "feedback=ef21",
    ]
    per_node = build(compose(*full, "strategy/aggregator=trimmed_mean", "byzantine.declared=0"))
    mirror = build(compose(*full))
    assert per_node.uplink.mode(per_node.strategy) == "per_node" and mirror.uplink.mode(mirror.strategy) == "mirror"
    a, b = per_node.run()[0], mirror.run()[0]
    for nid, s in a.node_states.items():
        assert torch.equal(a.uplink_state["h"][nid], s["uplink"]["h"])
    start = build(compose(*full)).state.params
    assert torch.allclose(a.params, b.params, atol=1e-5) and not torch.allclose(a.params, start, atol=1e-3)
    median = build(
        compose(*SIM, "compressor=top_k", "compressor.ratio=0.1", "feedback=econtrol", "strategy/aggregator=median")
    )
    _, summary = median.run()
    assert math.isfinite(summary["eval/acc"])


def test_uplink_bytes_are_the_compressed_sizes():
    set_driver_threads(1)
    sim = build(compose(*SIM, "compressor=top_k", "compressor.ratio=0.1", "feedback=ef21"))
    rec = Recorder()
    sim.run([rec])
    d = sim.num_params
    sparse = math.ceil(math.ceil(0.1 * d) * (32 + math.ceil(math.log2(d))) / 8)
    first_time: set[int] = set()
    for m, ids in zip(rec.rounds, sampled_ids(sim)):
        new = [i for i in ids if i not in first_time]
        first_time.update(ids)
        # first participation: g uncompressed (4 d); afterwards top-k values + indices
        assert m["comm/bytes_up"] == len(new) * 4 * d + (len(ids) - len(new)) * sparse
        assert m["comm/bytes_down"] == len(ids) * 4 * d


def sampled_ids(sim) -> list[list[int]]:
    from fedsim.seeding import np_rng

    server = sim.server
    return [
        sorted(
            int(i)
            for i in sim.participation(t, server.num_nodes, server.nodes_per_round, np_rng(server.seed, "sample", t))
        )
        for t in range(server.rounds)
    ]


def test_compressed_training_learns_and_identity_changes_nothing():
    set_driver_threads(1)
    plain = build(compose(*SIM, "rounds=6")).run()
    ident_ef14 = build(compose(*SIM, "rounds=6", "feedback=ef14"))
    assert ident_ef14.uplink.active and isinstance(ident_ef14.uplink.compressor, Identity)
    # EF14 with the identity compressor never accumulates error: the same model as plain FedAvg
    assert torch.equal(ident_ef14.run()[0].params, plain[0].params)
    sim = build(compose(*SIM, "rounds=10", "compressor=top_k", "compressor.ratio=0.2", "feedback=econtrol"))
    before = sim.evaluator(sim.state.params)["eval/acc"]
    _, summary = sim.run()
    assert summary["eval/acc"] > before + 0.3


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["feedback=econtrol", "feedback.eta=1.5"], "eta=1.5"),
        (["feedback=ef21", "feedback.h0=zero"], "h0"),
        (["compressor=top_k", "compressor.ratio=null"], "exactly one"),
        (
            ["compressor=top_k", "strategy=monna", "server=p2p", "nodes_per_round=8"],
            "server=p2p exchanges whole models",
        ),
    ],
)
def test_bad_compression_configs_fail_with_one_line(overrides, match):
    with pytest.raises(ConfigError, match=match):
        build(compose(*BASE, *overrides))
