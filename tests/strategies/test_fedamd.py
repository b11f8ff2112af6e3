"""FedAMD (strategies/fedamd.py, docs/methods/fedamd.md): the anchor split, the anchors' bullseyes,
the miners' SARAH recursion checked against a hand-written one on logistic regression (gradients
written out, not autograd), the server step by hand, full-batch gradient descent as the special
case it is, executor independence, bytes and the refusals. Real runs on digits where a property
is about a run; the authors' loop itself is compared in scripts/fedamd_parity.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsim.errors import ConfigError
from fedsim.models import LogisticRegression, build_model
from fedsim.params import FlatModel
from fedsim.simulation import build, set_driver_threads
from fedsim.types import ClientContext, Layout, NodeData, RoundInfo, UpdateBatch
from strategies.client import LocalSGD
from strategies.fedamd import AnchorSchedule, FedAMD, FedAMDClient
from tests.conftest import Recorder, compose, run_facts

DIGITS = ["dataset=digits", "model=logreg", "num_nodes=10", "cluster=local", "eval_every=0", "seed=3"]


def simulate(*overrides: str):
    set_driver_threads(1)
    sim = build(compose(*DIGITS, "strategy=fedamd", *overrides))
    start = sim.state.params.clone()
    record = Recorder()
    try:
        state, summary = sim.run([record])
        return sim, start, state, record.rounds
    finally:
        sim.close()


def node_data(sim, i: int) -> NodeData:
    ds, part = sim.data.dataset, sim.data.partition
    ix = part.train[i]
    return NodeData(torch.as_tensor(ds.x_train[ix]), torch.as_tensor(ds.y_train[ix]))


def softmax_grad(W: torch.Tensor, b: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The gradient of the mean cross-entropy of softmax regression, written out:
    dW = (P - Y)^T X / n, db = mean(P - Y); flattened as the model's (weight, bias)."""
    X = x.reshape(len(x), -1).to(torch.float64)
    P = torch.softmax(X @ W.T + b, dim=1)
    R = P - torch.nn.functional.one_hot(y, W.shape[0]).to(torch.float64)
    return torch.cat([(R.T @ X / len(x)).reshape(-1), R.mean(0)])


def split(theta: torch.Tensor, classes: int = 10, features: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    theta = theta.to(torch.float64)
    return theta[: classes * features].reshape(classes, features), theta[classes * features :]


# -- the anchor split -----------------------------------------------------------------------


def test_anchor_split_is_a_function_of_seed_round_and_node():
    s = AnchorSchedule(prob=0.2)
    draws = [[s.drawn(7, t, i) for i in range(50)] for t in range(400)]
    again = [[s.drawn(7, t, i) for i in range(50)] for t in range(400)]
    assert draws == again  # reproducible
    assert abs(np.mean(draws) - 0.2) < 0.01  # 20,000 draws of Bernoulli(0.2)
    assert draws != [[s.drawn(8, t, i) for i in range(50)] for t in range(400)]  # the seed matters
    # a node without a bullseye is an anchor whatever the draw; with one, the draw decides
    assert all(s.is_anchor(7, t, 3, False) for t in range(20))
    assert [s.is_anchor(7, t, 3, True) for t in range(400)] == [row[3] for row in draws]
    seq = AnchorSchedule(prob=0.2, period=3)
    assert [seq.drawn(0, t, 5) for t in range(7)] == [True, False, False, True, False, False, True]
    assert not any(AnchorSchedule(prob=0.0).drawn(0, t, 1) for t in range(50))
    assert all(AnchorSchedule(prob=1.0).drawn(0, t, 1) for t in range(50))


def test_split_and_result_do_not_depend_on_the_executor_or_on_cohorts():
    """The roles come from (seed, "anchor", round, node) at both ends; a run on the in-process
    executor and one with cluster.vectorize=true (FedAMD says why it trains one node at a time)
    give the same model bit for bit and the same anchors per round."""
    common = ["nodes_per_round=4", "rounds=6", "strategy.client.steps=3", "strategy.anchor_prob=0.4"]
    sim, _, local, rounds = simulate(*common)
    _, _, vec, rounds_vec = simulate(*common, "cluster.vectorize=true")
    assert torch.equal(local.params, vec.params)
    anchors = [r["fedamd/anchors"] for r in rounds]
    assert anchors == [r["fedamd/anchors"] for r in rounds_vec]
    assert anchors[0] == 4 and 0 < sum(r["fedamd/miners"] for r in rounds)
    assert "two gradients per step" in FedAMDClient().not_vectorized and not FedAMDClient().vectorizable


def test_split_does_not_depend_on_the_ray_executor(ray_cluster):
    common = ["nodes_per_round=4", "rounds=5", "strategy.client.steps=3", "strategy.anchor_prob=0.4"]
    _, _, local, rounds = simulate(*common)
    _, _, ray2, rounds_ray = simulate(*common, "cluster=ray", "cluster.num_actors=2")
    assert torch.equal(local.params, ray2.params)
    assert [r["fedamd/anchors"] for r in rounds] == [r["fedamd/anchors"] for r in rounds_ray]


# -- anchors, p = 1 and full-batch gradient descent ----------------------------------------


def test_anchor_probability_one_keeps_the_model_and_stores_every_full_gradient():
    """With p = 1 every participant is an anchor in every round, so nobody mines and the model
    never moves (the authors' server steps with the miners' returns only); what the rounds do is
    store each participant's full local gradient at that model, and v becomes their mean."""
    sim, start, state, rounds = simulate("nodes_per_round=4", "rounds=4", "strategy.anchor_prob=1.0")
    assert torch.equal(state.params, start)
    assert all(r["fedamd/miners"] == 0 and r["fedamd/anchors"] == 4 for r in rounds)
    store = state.strategy_state["bullseyes"]
    W, b = split(start)
    expected = {i: softmax_grad(W, b, node_data(sim, i).x, node_data(sim, i).y) for i in store}
    for i, g in store.items():
        assert torch.allclose(g.to(torch.float64), expected[i], rtol=1e-5, atol=1e-7), i
    v = sim.strategy.broadcast(state.strategy_state)["v"]
    mean = torch.stack(list(expected.values())).mean(0)
    assert torch.allclose(v.to(torch.float64), mean, rtol=1e-5, atol=1e-7)


def test_anchor_rounds_then_one_step_miners_are_full_batch_gradient_descent():
    """Every node every round, anchor rounds every second round (r = 2) and K = 1: the anchors'
    round stores every node's full gradient at x, the next round's miners step once along their
    mean, so every two rounds x <- x - lr_g lr (1/N) sum_i grad F_i(x): full-batch gradient
    descent on the mean of the anchors' gradients. Checked against gradient descent with the
    gradient written out, to float32 rounding (the reductions run in another order, and a
    miner's update is x - (x - lr v) rather than lr v), over 4 steps."""
    lr, lr_g, steps = 0.5, 0.8, 4
    sim, start, state, rounds = simulate(
        "nodes_per_round=10",
        f"rounds={2 * steps}",
        "strategy.anchor_period=2",
        "strategy.client.steps=1",
        f"strategy.client.lr={lr}",
        f"strategy.server_opt.lr={lr_g}",
    )
    assert [r["fedamd/miners"] for r in rounds] == [0, 10] * steps
    nodes = [node_data(sim, i) for i in range(10)]
    theta = start.to(torch.float64)
    for _ in range(steps):
        W, b = split(theta)
        theta = theta - lr_g * lr * torch.stack([softmax_grad(W, b, d.x, d.y) for d in nodes]).mean(0)
    assert float((theta - start.to(torch.float64)).norm()) > 0.1  # it moved
    assert torch.allclose(state.params.to(torch.float64), theta, rtol=1e-5, atol=1e-6)


# -- the miners ------------------------------------------------------------------------------


@pytest.mark.parametrize("steps", [1, 4])
def test_miner_recursion_matches_a_hand_written_one_on_logistic_regression(steps):
    """v_0 = the broadcast v; for k >= 1 v_k = v_(k-1) + grad f(x_k; b_k) - grad f(x_(k-1); b_k)
    (same minibatch b_k for both); x_(k+1) = x_k - lr v_k; the message is x_0 - x_K. The hand
    recursion uses the written-out softmax-regression gradient and the node's own minibatches
    (from its stream, as the client draws them)."""
    torch.manual_seed(0)
    model = FlatModel(build_model(LogisticRegression, (1, 8, 8), 10, seed=0))
    n, lr = 70, 0.3
    data = NodeData(torch.rand(n, 1, 8, 8), torch.randint(0, 10, (n,)))
    v0 = 0.1 * torch.randn(model.dim)
    client = FedAMDClient(lr=lr, steps=steps, batch_size=16)
    client.schedule = AnchorSchedule(prob=0.0)  # a node holding a bullseye: a miner
    ctx = ClientContext(round=3, node_id=2, seed=5, num_classes=10, broadcast={"v": v0})
    start = model.vector()
    result = client(model, start, data, {"bullseye": True}, ctx)
    assert isinstance(result.message, dict) and float(result.message["bullseye"].abs().sum()) == 0

    batches = list(LocalSGD._batches(client, n, ctx.generator()))
    assert len(batches) == steps
    x = start.to(torch.float64)
    x_prev, v = x, v0.to(torch.float64)
    for k, idx in enumerate(batches):
        if k > 0:
            xb, yb = data.x[idx], data.y[idx]
            v = v + softmax_grad(*split(x), xb, yb) - softmax_grad(*split(x_prev), xb, yb)
        x_prev, x = x, x - lr * v
    expected = start.to(torch.float64) - x
    assert torch.allclose(result.message["update"].to(torch.float64), expected, rtol=1e-5, atol=1e-6)
    if steps == 1:  # one step moves along v_0 itself
        assert torch.allclose(result.message["update"], lr * v0, atol=1e-7)
    assert result.state == {"bullseye": True}  # a miner keeps its state


def test_anchor_sends_its_full_or_large_batch_gradient():
    model = FlatModel(build_model(LogisticRegression, (1, 8, 8), 10, seed=0))
    n = 50
    data = NodeData(torch.rand(n, 1, 8, 8), torch.randint(0, 10, (n,)))
    ctx = ClientContext(round=0, node_id=1, seed=5, num_classes=10, broadcast={"v": torch.zeros(model.dim)})
    start = model.vector()
    full = FedAMDClient()(model, start, data, None, ctx)  # no bullseye yet: an anchor
    assert full.state == {"bullseye": True}
    expected = softmax_grad(*split(start), data.x, data.y)
    assert torch.allclose(full.message["bullseye"].to(torch.float64), expected, rtol=1e-5, atol=1e-7)
    assert float(full.message["update"].abs().sum()) == 0
    part = FedAMDClient(anchor_batch=20)(model, start, data, None, ctx)
    idx = torch.randperm(n, generator=ctx.generator())[:20]
    expected = softmax_grad(*split(start), data.x[idx], data.y[idx])
    assert torch.allclose(part.message["bullseye"].to(torch.float64), expected, rtol=1e-5, atol=1e-7)


# -- the server -----------------------------------------------------------------------------


def test_server_steps_with_the_miners_mean_and_keeps_the_bullseyes_sum():
    d = 5
    strategy = FedAMD(client=FedAMDClient(), anchor_prob=0.0)  # only nodes without a bullseye anchor
    params = torch.zeros(d)
    state = strategy.init(params, run_facts(4))
    layout = Layout(strategy.capabilities.message, d)

    def batch(ids, updates, bullseyes):
        rows = torch.stack([torch.cat([u, g]) for u, g in zip(updates, bullseyes)])
        k = len(ids)
        one = torch.ones(k, dtype=torch.int64)
        return UpdateBatch(torch.tensor(ids), rows, 10 * one, 0 * one, one, layout=layout)

    z = torch.zeros(d)
    g = {i: torch.full((d,), float(i + 1)) for i in range(4)}
    # round 0: nobody holds a bullseye, all anchors: the model stays
    info = RoundInfo(0, 0, 0, 4, (0, 1, 2))
    p1, state, m = strategy.step(params, batch([0, 1, 2], [z, z, z], [g[0], g[1], g[2]]), state, info)
    assert torch.equal(p1, params) and m["fedamd/miners"] == 0 and m["fedamd/bullseyes"] == 3
    assert torch.allclose(strategy.broadcast(state)["v"], torch.full((d,), 2.0))
    # round 1: 0 and 2 mine, 3 is new (an anchor); the step is -lr_g * the miners' mean
    u0, u2 = torch.arange(d, dtype=torch.float32), torch.ones(d)
    info = RoundInfo(1, 1, 0, 4, (0, 2, 3))
    p2, state, m = strategy.step(params, batch([0, 2, 3], [u0, u2, z], [z, z, g[3]]), state, info)
    assert torch.allclose(p2, params - (u0 + u2) / 2)
    assert (m["fedamd/anchors"], m["fedamd/miners"], m["fedamd/bullseyes"]) == (1, 2, 4)
    assert torch.allclose(strategy.broadcast(state)["v"], torch.full((d,), 2.5))
    total = sum(state["bullseyes"][i].to(torch.float64) for i in range(4))
    assert torch.allclose(state["bullseye_sum"], total)


def test_uncompressed_rows_count_one_vector():
    sim, _, state, rounds = simulate("nodes_per_round=4", "rounds=2")
    d = state.params.numel()
    assert state.totals["bytes_up"] == 2 * 4 * 4 * d
    assert sim.info()["message"] == ("update", "bullseye")


# -- refusals -------------------------------------------------------------------------------


@pytest.mark.parametrize("server", ["async", "p2p"])
def test_refused_off_the_synchronous_server(server):
    overrides = [*DIGITS, "strategy=fedamd", f"server={server}"]
    if server == "p2p":
        overrides = [o for o in overrides if not o.startswith("nodes_per_round")]
    with pytest.raises(ConfigError, match="server=sync") as exc:
        build(compose(*overrides))
    assert "\n" not in str(exc.value)


def test_options_without_a_meaning_are_refused():
    with pytest.raises(ConfigError, match="momentum"):
        FedAMDClient(momentum=0.9)
    with pytest.raises(ConfigError, match="anchor_prob"):
        FedAMD(client=FedAMDClient(), anchor_prob=1.5)
    with pytest.raises(ConfigError, match="anchor_period"):
        FedAMD(client=FedAMDClient(), anchor_period=0)
    with pytest.raises(ConfigError, match="FedAMDClient"):
        FedAMD(client=LocalSGD())  # type: ignore[arg-type]
