"""The heterogeneity baselines (SCAFFOLD, FedNova, FedDyn) and the contract they need: messages of
several named vectors (own uplink stage, own forgery), client corrections that see the node's
state and the broadcast, a broadcast versioned with the model on the asynchronous server, and
linearity that a subclass does not inherit by accident. Real runs on digits where a property
is about a run; a small quadratic where a step is checked by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedsim.contract import Capabilities, is_linear, linear_step
from fedsim.errors import ConfigError
from fedsim.faults.attacks import SignFlip
from fedsim.faults.byzantine import Byzantine, inject
from fedsim.params import FlatModel
from fedsim.simulation import build, set_driver_threads
from fedsim.types import UPDATE, ClientContext, Layout, NodeData, RoundInfo, UpdateBatch, Vector
from strategies.fedavg import FedAvg
from strategies.feddyn import FedDyn, FedDynClient
from strategies.scaffold import ScaffoldClient
from tests.conftest import compose, run_facts

DIGITS = ["dataset=digits", "model=logreg", "num_nodes=10", "cluster=local", "eval_every=0", "seed=3"]


def simulate(*overrides: str):
    set_driver_threads(1)
    sim = build(compose(*DIGITS, *overrides))
    try:
        state, summary = sim.run()
        return sim, state, summary
    finally:
        sim.close()


# -- SCAFFOLD -------------------------------------------------------------------------------


def test_scaffold_first_round_is_fedavgs_with_one_local_step():
    """c = c_i = 0, one local step, server lr 1, every node: SCAFFOLD's first round is FedAvg's
    (unweighted mean, the paper's)."""
    common = ["nodes_per_round=10", "rounds=1", "strategy.client.steps=1"]
    _, fedavg, _ = simulate(*common, "strategy=fedavg", "strategy.weighted=false")
    for option in ("I", "II"):
        _, scaffold, _ = simulate(*common, "strategy=scaffold", f"strategy.client.option={option}")
        assert torch.equal(scaffold.params, fedavg.params), option
        assert float(scaffold.strategy_state["c"].norm()) > 0  # c moved: the controls are not zeros


def mean_of_node_controls(state, num_nodes: int) -> torch.Tensor:
    total = torch.zeros_like(state.params)
    for nid in range(num_nodes):
        node = state.node_states.get(nid) or {}
        c = (node.get("client") or {}).get("c")
        if c is not None:
            total += c
    return total / num_nodes


@pytest.mark.parametrize("option", ["I", "II"])
@pytest.mark.parametrize("uplink", [[], ["compressor=top_k", "compressor.ratio=0.1", "feedback=ef21"]])
def test_scaffold_keeps_c_the_mean_of_every_nodes_c_i(option, uplink):
    """Partial participation, 6 rounds: the server's c equals (1/N) sum_i c_i over all N nodes
    (those never sampled hold 0), with or without a top-k + EF21 uplink on the update (the
    control vector goes dense by default, so the server knows each c_i exactly)."""
    _, state, _ = simulate(
        "strategy=scaffold", f"strategy.client.option={option}", "nodes_per_round=4", "rounds=6", *uplink
    )
    mean = mean_of_node_controls(state, 10)
    c = state.strategy_state["c"]
    assert float(mean.norm()) > 0
    assert float((c - mean).norm()) <= 1e-5 * float(mean.norm())


def test_scaffold_under_compression_sends_the_update_compressed_and_the_control_dense():
    sim, state, _ = simulate(
        "strategy=scaffold",
        "nodes_per_round=4",
        "rounds=2",
        "compressor=top_k",
        "compressor.ratio=0.1",
        "feedback=ef21",
        "feedback.h0=compressed",
    )
    d = state.params.numel()
    per_row = state.totals["bytes_up"] / 8  # 2 rounds x 4 nodes
    assert 4 * d < per_row < 4 * d + 4 * d * 0.5  # the dense control plus a top-10% update
    node = next(s for s in state.node_states.values() if s is not None)
    assert set(node["uplink"]) == {"update"} and set(node["client"]) == {"c"}
    assert sim.info()["message"] == ("update", "control")


def test_scaffold_nodes_train_in_cohorts_as_one_at_a_time():
    from fedsim.models import MLP, build_model
    from tests.execution.test_cohort import digits_nodes, one_at_a_time

    model = FlatModel(build_model(MLP, (1, 8, 8), 10, seed=0))
    d = model.dim
    g = torch.Generator().manual_seed(0)
    c = 0.01 * torch.randn(d, generator=g)
    for option in ("I", "II"):
        update = ScaffoldClient(option=option, lr=0.1, steps=3, batch_size=8, momentum=0.5)
        datas = digits_nodes([20, 30, 25])
        states = [None, {"c": 0.01 * torch.randn(d, generator=g)}, {"c": 0.01 * torch.randn(d, generator=g)}]
        ctxs = [ClientContext(round=2, node_id=k, seed=5, num_classes=10, broadcast={"c": c}) for k in range(3)]
        starts = model.vector().expand(3, -1)
        seq = one_at_a_time(update, model, starts, datas, states, ctxs)
        vec = update.cohort(model, starts, datas, states, ctxs)
        for a, b in zip(seq, vec):
            for name in ("update", "control"):
                assert torch.allclose(a.message[name], b.message[name], rtol=1e-4, atol=1e-6), (option, name)
            assert torch.allclose(a.state["c"], b.state["c"], rtol=1e-4, atol=1e-6)
    assert update.vectorizable


def test_feddyn_and_fednova_nodes_train_in_cohorts_as_one_at_a_time():
    from fedsim.models import MLP, build_model
    from strategies.fednova import FedNovaClient
    from tests.execution.test_cohort import digits_nodes, one_at_a_time

    model = FlatModel(build_model(MLP, (1, 8, 8), 10, seed=0))
    g = torch.Generator().manual_seed(1)
    cases = [
        (
            FedDynClient(alpha=0.05, lr=0.1, steps=3, batch_size=8),
            [None, {"g": 0.01 * torch.randn(model.dim, generator=g)}],
        ),
        (FedNovaClient(lr=0.1, steps=3, batch_size=8, momentum=0.9), [None, None]),
    ]
    for update, states in cases:
        assert update.vectorizable
        datas = digits_nodes([20, 30])
        ctxs = [ClientContext(round=1, node_id=k, seed=5, num_classes=10) for k in range(2)]
        starts = model.vector().expand(2, -1)
        seq = one_at_a_time(update, model, starts, datas, states, ctxs)
        vec = update.cohort(model, starts, datas, states, ctxs)
        for a, b in zip(seq, vec):
            pairs = (
                [(a.message[n], b.message[n]) for n in a.message]
                if isinstance(a.message, dict)
                else [(a.message, b.message)]
            )
            pairs += [(a.state[n], b.state[n]) for n in (a.state or {})]
            for x, y in pairs:
                assert torch.allclose(x, y, rtol=1e-4, atol=1e-6), type(update).__name__


# -- FedNova --------------------------------------------------------------------------------


def test_fednova_is_fedavg_when_every_node_takes_as_many_steps():
    common = ["nodes_per_round=5", "rounds=3", "strategy.client.steps=4"]
    _, fedavg, _ = simulate(*common, "strategy=fedavg")
    _, nova, _ = simulate(*common, "strategy=fednova")
    assert torch.allclose(nova.params, fedavg.params, rtol=1e-5, atol=1e-6)
    # one epoch each: unequal step counts, and the normalisation changes the step
    _, fedavg_e, _ = simulate("nodes_per_round=5", "rounds=3", "strategy=fedavg")
    _, nova_e, _ = simulate("nodes_per_round=5", "rounds=3", "strategy=fednova")
    assert not torch.allclose(nova_e.params, fedavg_e.params, rtol=1e-4, atol=1e-5)


def test_fednova_steps_norm_with_momentum():
    from strategies.fednova import FedNovaClient

    client = FedNovaClient(steps=3, batch_size=4, momentum=0.5)
    assert client.norm_a(100) == pytest.approx(1.0 + 1.5 + 1.75)
    assert FedNovaClient(steps=3, batch_size=4).norm_a(100) == 3.0


# -- FedDyn on a quadratic --------------------------------------------------------------------


class QuadraticDyn(FedDynClient):
    """FedDyn's node on f(w) = 1/2 mean_j (w_j - t_j)^2: inputs are the unit vectors, so the
    logit of example j is w_j and its label t_j."""

    def loss(self, logits, y, state):
        return 0.5 * ((logits.squeeze(1) - y.to(logits.dtype)) ** 2).mean()


def test_feddyn_two_rounds_match_a_hand_computed_step():
    alpha, lr, N = 0.1, 0.3, 2
    client = QuadraticDyn(alpha=alpha, lr=lr, steps=2, batch_size=3)
    strategy = FedDyn(client=client)
    model = FlatModel(nn.Linear(3, 1, bias=False))
    x = torch.tensor([0.5, -1.0, 2.0])
    targets = [torch.tensor([1, 2, 3]), torch.tensor([0, -1, 4])]
    datas = [NodeData(torch.eye(3), t) for t in targets]
    state = strategy.init(x, run_facts(N))
    lay = Layout(UPDATE, 3)

    g = [torch.zeros(3), torch.zeros(3)]
    node_states: list = [None, None]
    for rnd in range(2):
        # by hand: two full-batch steps of grad f(w) - g_i + alpha (w - x)
        expected = []
        for i in range(N):
            w = x.clone()
            for _ in range(2):
                w = w - lr * ((w - targets[i].float()) / 3 - g[i] + alpha * (w - x))
            expected.append(x - w)
        results = []
        for i in range(N):
            model.load(x)
            ctx = ClientContext(rnd, i, 0, 3)
            results.append(client(model, x, datas[i], node_states[i], ctx))
        for i in range(N):
            assert torch.allclose(results[i].message, expected[i], atol=1e-6)
            g[i] = g[i] + alpha * expected[i]
            assert torch.allclose(results[i].state["g"], g[i], atol=1e-6)
            node_states[i] = results[i].state
        batch = UpdateBatch(
            torch.arange(N),
            torch.stack([r.message for r in results]),
            torch.full((N,), 3),
            torch.zeros(N, dtype=torch.int64),
            torch.zeros(N, dtype=torch.int64),
            layout=lay,
        )
        h_before = state["h"].clone()
        new_x, state, _ = strategy.step(x, batch, state, RoundInfo(rnd, rnd, 0, N, (0, 1)))
        deltas = torch.stack(expected)
        h = h_before + alpha / N * deltas.sum(0)  # h - alpha/N sum (theta_i - x)
        assert torch.allclose(state["h"], h, atol=1e-6)
        assert torch.allclose(new_x, (x - deltas).mean(0) - h / alpha, atol=1e-6)
        x = new_x


# -- the contract ---------------------------------------------------------------------------


def test_a_layout_packs_named_vectors_and_refuses_others():
    lay = Layout((Vector("update"), Vector("steps", size=1, compress=False)), 4)
    row = lay.pack({"update": torch.arange(4.0), "steps": torch.tensor([7.0])})
    assert row.tolist() == [0.0, 1.0, 2.0, 3.0, 7.0] and lay.width == 5
    assert lay.unpack(row)["steps"].tolist() == [7.0]
    with pytest.raises(ValueError, match="missing steps"):
        lay.pack({"update": torch.zeros(4)})
    with pytest.raises(ValueError, match="undeclared extra"):
        lay.pack({"update": torch.zeros(4), "steps": torch.zeros(1), "extra": torch.zeros(1)})
    with pytest.raises(ValueError, match="send them by name"):
        lay.pack(torch.zeros(5))
    with pytest.raises(ValueError, match="repeat"):
        Capabilities(message=(Vector("a"), Vector("a")))


def test_each_vector_has_its_own_uplink_stage():
    from fedsim.compress import TopK
    from fedsim.uplink import Uplink
    from strategies.feedback import EF21

    uplink = Uplink(TopK(ratio=0.25), EF21(h0="compressed"))
    lay = Layout((Vector("update"), Vector("control"), Vector("steps", size=1, compress=False)), 8)
    g = torch.arange(17, dtype=torch.float32) - 8
    ctx = ClientContext(0, 3, 0, 10)
    sent, nbytes, state, _ = uplink.encode(g, None, ctx, [8], lay)
    assert set(state) == {"update", "control"}  # one error-feedback state per compressed vector
    assert sent[16] == g[16]  # the dense scalar as it is
    assert int((sent[:8] != 0).sum()) == 2 and int((sent[8:16] != 0).sum()) == 2  # top-25% of each
    one, one_bytes, _, _ = uplink.encode(g[:8].clone(), None, ctx, [8])
    assert nbytes == 2 * one_bytes + 4


def test_an_attack_forges_the_vectors_it_targets_and_sends_the_honest_mean_elsewhere():
    lay = Layout((Vector("update"), Vector("control")), 3)
    honest = torch.tensor([[1.0, 2, 3, 10, 20, 30], [3.0, 4, 5, 30, 40, 50]])
    batch = UpdateBatch(
        torch.tensor([0, 1]),
        honest,
        torch.tensor([5, 5]),
        torch.zeros(2, dtype=torch.int64),
        torch.zeros(2, dtype=torch.int64),
        layout=lay,
    )
    info = RoundInfo(0, 0, 0, 3, (0, 1, 2), 1)
    for targets, control in ((None, [-20.0, -30, -40]), (("update",), [20.0, 30, 40])):
        attack = SignFlip()
        attack.vectors = targets
        out = inject(
            batch,
            [2],
            byzantine=Byzantine(frozenset({2}), 1, attack),
            info=info,
            state={},
            defence=None,
            sizes=torch.tensor([5, 5, 5]).numpy(),
        )
        row = out.batch.messages[out.batch.node_ids == 2][0]
        assert row[:3].tolist() == [-2.0, -3, -4]
        assert row[3:].tolist() == control
        assert out.batch.layout is lay


def test_a_step_override_does_not_inherit_linearity():
    class Marked(FedAvg):
        @linear_step
        def step(self, params, batch, state, info):
            return super().step(params, batch, state, info)

    class Unmarked(FedAvg):
        def step(self, params, batch, state, info):
            return super().step(params, batch, state, info)

    from strategies.client import LocalSGD

    assert is_linear(FedAvg(client=LocalSGD()))
    assert is_linear(Marked(client=LocalSGD()))
    assert not is_linear(Unmarked(client=LocalSGD()))
    assert Unmarked(client=LocalSGD()).capabilities.linear  # declared, but not honoured


def test_the_async_server_hands_each_node_the_broadcast_of_its_start_model():
    _, state, _ = simulate(
        "strategy=scaffold", "server=async", "rounds=6", "server.concurrency=4", "latency=exponential"
    )
    loop = state.server_state
    assert set(loop.broadcasts) == set(loop.models)
    for b in loop.broadcasts.values():
        assert b["c"].shape == state.params.shape
    newest = max(loop.broadcasts)
    assert torch.equal(loop.broadcasts[newest]["c"], state.strategy_state["c"])


def test_what_a_server_cannot_honour_is_refused_with_one_line():
    with pytest.raises(ConfigError, match="scaffold aggregates at a server"):
        build(compose(*DIGITS, "strategy=scaffold", "server=p2p"))
    with pytest.raises(ConfigError, match="targets the vectors"):
        build(compose(*DIGITS, "strategy=scaffold", "attack=sign_flip", "byzantine.num=1", "attack.vectors=[dc]"))


def test_run_start_says_when_a_client_trains_one_node_at_a_time():
    set_driver_threads(1)
    for strategy, expected in (("scaffold", "cohorts"), ("floral", "one node at a time (FloralSGD overrides")):
        sim = build(compose(*DIGITS, f"strategy={strategy}", "cluster.vectorize=true", "rounds=1"))
        try:
            assert sim.info()["vectorize"].startswith(expected)
        finally:
            sim.close()


def test_feddyn_state_survives_in_the_node_states():
    _, state, _ = simulate("strategy=feddyn", "nodes_per_round=4", "rounds=3")
    kept = [s["client"]["g"] for s in state.node_states.values() if s is not None]
    assert kept and all(float(g.norm()) > 0 for g in kept)
