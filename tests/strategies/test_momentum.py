"""FedAvg-M and SCAFFOLD-M (Cheng, Huang, Wu, Yuan, ICLR 2024; strategies/momentum.py): beta = 1
is the parent method bit for bit; the rescaled-step `Correction` is the paper's local step to
float rounding; the server's direction is the mean update over lr K; cohorts match one node at a
time; the direction survives a checkpoint; what has no meaning is refused with one line."""

from __future__ import annotations

import pytest
import torch

from fedsim.errors import ConfigError
from fedsim.models import MLP, build_model
from fedsim.params import FlatModel
from fedsim.simulation import build, set_driver_threads
from fedsim.types import ClientContext
from strategies.momentum import MomentumClient, ScaffoldMomentumClient
from tests.conftest import Recorder, compose
from tests.execution.test_cohort import digits_nodes, one_at_a_time

SKEWED = [
    "dataset=digits",
    "model=mlp",
    "model.hidden=[16]",
    "num_nodes=10",
    "partition=dirichlet",
    "partition.alpha=0.1",
    "cluster=local",
    "eval_every=0",
    "seed=3",
]


def simulate(*overrides: str):
    set_driver_threads(1)
    sim = build(compose(*SKEWED, *overrides))
    try:
        return sim.run()[0]
    finally:
        sim.close()


# -- beta = 1: the parent method, bit for bit ----------------------------------------------------


@pytest.mark.parametrize(
    "setting",
    [
        ["nodes_per_round=10", "rounds=4"],  # full participation, one epoch (node sizes differ: K_i differ)
        ["nodes_per_round=4", "rounds=4", "strategy.client.momentum=0.5", "strategy.client.steps=3"],
    ],
)
def test_fedavg_m_with_beta_1_is_fedavg_bit_for_bit(setting):
    """At beta = 1 the local step size is lr * 1.0 = lr and there is no correction term, and the
    model moves by the same aggregate of the same rows: the parameters are equal bit for bit."""
    fedavg = simulate(*setting, "strategy=fedavg")
    momentum = simulate(*setting, "strategy=fedavg_m", "strategy.client.beta=1")
    assert torch.equal(fedavg.params, momentum.params)
    assert float(momentum.strategy_state["g"].norm()) > 0  # the direction is formed even when unused


@pytest.mark.parametrize("option", ["I", "II"])
def test_scaffold_m_with_beta_1_is_scaffold_bit_for_bit(option):
    setting = ["nodes_per_round=4", "rounds=4", f"strategy.client.option={option}"]
    scaffold = simulate(*setting, "strategy=scaffold")
    momentum = simulate(*setting, "strategy=scaffold_m", "strategy.client.beta=1")
    assert torch.equal(scaffold.params, momentum.params)
    assert torch.equal(scaffold.strategy_state["c"], momentum.strategy_state["c"])


def test_beta_below_1_changes_the_run():
    setting = ["nodes_per_round=10", "rounds=3"]
    fedavg = simulate(*setting, "strategy=fedavg")
    momentum = simulate(*setting, "strategy=fedavg_m", "strategy.client.beta=0.5")
    assert not torch.equal(fedavg.params, momentum.params)
    assert torch.isfinite(momentum.params).all()


# -- the local step and the server's direction -------------------------------------------------


def paper_step(model: FlatModel, start, data, g, ctx, *, lr, beta, steps, batch_size, linear=None):
    """K steps of y <- y - lr (beta * (grad + linear) + (1 - beta) g), written out directly,
    on the minibatches the client draws from the same stream."""
    client = MomentumClient(beta=beta, lr=lr, steps=steps, batch_size=batch_size)
    model.load(start)
    flat = model.flat
    for idx in client._batches(len(data), ctx.generator()):
        xb, yb = data.take(idx)
        model.flat_grad.zero_()
        torch.nn.functional.cross_entropy(model.module(xb), yb).backward()
        with torch.no_grad():
            grad = model.flat_grad.clone() if linear is None else model.flat_grad + linear
            flat.sub_(lr * (beta * grad + (1 - beta) * g))
    return start - flat


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_the_rescaled_correction_is_the_papers_local_step_to_rounding(beta):
    """(lr beta)(grad + ((1 - beta)/beta) g) against lr (beta grad + (1 - beta) g): equal up to
    float32 rounding (the two products are rounded differently), over 5 local steps."""
    model = FlatModel(build_model(MLP, (1, 8, 8), 10, seed=0))
    start = model.vector().clone()
    g = 0.1 * torch.randn(start.numel(), generator=torch.Generator().manual_seed(1))
    data = digits_nodes([40])[0]
    ctx = ClientContext(round=2, node_id=0, seed=5, num_classes=10, broadcast={"g": g})
    client = MomentumClient(beta=beta, lr=0.1, steps=5, batch_size=8)
    model.load(start)
    ours = client(model, start, data, None, ctx).message["update"]
    theirs = paper_step(model, start, data, g, ctx, lr=0.1, beta=beta, steps=5, batch_size=8)
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6)

    c, c_i = 0.01 * torch.randn(start.numel()), 0.01 * torch.randn(start.numel())
    ctx = ClientContext(round=2, node_id=0, seed=5, num_classes=10, broadcast={"g": g, "c": c})
    scaffold = ScaffoldMomentumClient(beta=beta, lr=0.1, steps=5, batch_size=8)
    model.load(start)
    result = scaffold(model, start, data, {"c": c_i}, ctx)
    theirs = paper_step(model, start, data, g, ctx, lr=0.1, beta=beta, steps=5, batch_size=8, linear=c - c_i)
    assert torch.allclose(result.message["update"], theirs, rtol=1e-5, atol=1e-6)
    # option II recovers the mean minibatch gradient: c_i+ = mean_k grad_k (the corrected
    # direction without the momentum part, minus the correction c - c_i)
    mean_direction = result.message["update"] / (5 * 0.1)
    expected = c_i - c + (mean_direction - (1 - beta) * g) / beta
    assert torch.allclose(result.state["c"], expected, rtol=1e-5, atol=1e-6)


def test_the_server_direction_is_the_mean_update_over_lr_k():
    """Full participation, fixed K, server SGD lr 1: after one round the model moved by the mean
    update D and g = D / (lr K); after the second the nodes used that g."""
    lr, k = 0.05, 4
    common = ["nodes_per_round=10", f"strategy.client.lr={lr}", f"strategy.client.steps={k}"]
    set_driver_threads(1)
    sim = build(compose(*SKEWED, *common, "rounds=1", "strategy=fedavg_m", "strategy.client.beta=0.3"))
    try:
        start = sim.state.params.clone()
        state, _ = sim.run()
    finally:
        sim.close()
    moved = start - state.params
    g = state.strategy_state["g"]
    assert torch.allclose(g, moved / (lr * k), rtol=1e-4, atol=1e-6)
    assert float(g.norm()) > 0


# -- cohorts ------------------------------------------------------------------------------------


def test_momentum_nodes_train_in_cohorts_as_one_at_a_time():
    model = FlatModel(build_model(MLP, (1, 8, 8), 10, seed=0))
    d = model.dim
    gen = torch.Generator().manual_seed(0)
    g, c = 0.05 * torch.randn(d, generator=gen), 0.01 * torch.randn(d, generator=gen)
    datas = digits_nodes([20, 30, 25])
    ctxs = [ClientContext(round=2, node_id=k, seed=5, num_classes=10, broadcast={"g": g, "c": c}) for k in range(3)]
    starts = model.vector().expand(3, -1)
    clients = [
        (MomentumClient(beta=0.3, lr=0.1, steps=3, batch_size=8), [None, None, None], ("update", "steps")),
        *[
            (
                ScaffoldMomentumClient(beta=0.3, lr=0.1, steps=3, batch_size=8, option=option),
                [None, {"c": 0.01 * torch.randn(d, generator=gen)}, {"c": 0.01 * torch.randn(d, generator=gen)}],
                ("update", "control", "steps"),
            )
            for option in ("I", "II")
        ],
    ]
    for client, states, names in clients:
        assert client.vectorizable
        seq = one_at_a_time(client, model, starts, datas, states, ctxs)
        vec = client.cohort(model, starts, datas, states, ctxs)
        for a, b in zip(seq, vec):
            for name in names:
                assert torch.allclose(a.message[name], b.message[name], rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("strategy", ["fedavg_m", "scaffold_m"])
def test_a_vectorised_run_matches_one_node_at_a_time(strategy):
    """cluster.vectorize=true against the default, 80 nodes a round (more than 64 rows: the
    fedavg_m step is summed where the nodes run, the steps vector with it)."""
    setting = [
        "num_nodes=80",
        "nodes_per_round=80",
        "partition.alpha=0.5",
        "rounds=3",
        f"strategy={strategy}",
        "strategy.client.beta=0.5",
        "strategy.client.steps=2",
    ]
    sequential = simulate(*setting)
    vectorised = simulate(*setting, "cluster.vectorize=true")
    assert torch.allclose(sequential.params, vectorised.params, rtol=1e-4, atol=1e-5)
    assert torch.allclose(sequential.strategy_state["g"], vectorised.strategy_state["g"], rtol=1e-3, atol=1e-5)


# -- checkpoint / resume --------------------------------------------------------------------------


@pytest.mark.integration
def test_the_server_direction_survives_checkpoint_and_resume(tmp_path):
    """A run stopped at round 4 (its checkpoint holds g) and resumed to 8 ends bit-identical to an
    undisturbed 8-round run."""
    from tests.test_faults import run, strict_records

    args = [*SKEWED, "nodes_per_round=5", "strategy=scaffold_m", "logger=jsonl", "checkpoint.every=4"]
    clean = run(*args, "rounds=8", f"hydra.run.dir={tmp_path / 'clean'}")
    assert clean.returncode == 0, clean.stderr
    first = run(*args, "rounds=4", f"hydra.run.dir={tmp_path / 'cut'}")
    assert first.returncode == 0, first.stderr
    saved = torch.load(sorted((tmp_path / "cut" / "checkpoints").glob("step-*.pt"))[-1], weights_only=False)
    assert float(saved["state"].strategy_state["g"].norm()) > 0
    resumed = run(*args, "rounds=8", "resume=true", f"hydra.run.dir={tmp_path / 'cut'}")
    assert resumed.returncode == 0, resumed.stderr
    sha = [strict_records(tmp_path / d / "metrics.jsonl")[-1]["params_sha256"] for d in ("clean", "cut")]
    assert sha[0] == sha[1]


# -- refusals -----------------------------------------------------------------------------------


def test_what_has_no_meaning_is_refused_with_one_line():
    # the direction g is formed and sent by a server: peer to peer has none
    for strategy in ("fedavg_m", "scaffold_m"):
        with pytest.raises(ConfigError, match="aggregates at a server"):
            build(compose(*SKEWED, f"strategy={strategy}", "server=p2p"))
    for beta in (0, 1.5):
        with pytest.raises(ConfigError, match=r"beta=.* must be in \(0, 1\]"):
            build(compose(*SKEWED, "strategy=fedavg_m", f"strategy.client.beta={beta}"))
    with pytest.raises(ConfigError, match="its own client"):
        build(
            compose(
                *SKEWED,
                "strategy=fedavg_m",
                "strategy.client._target_=strategies.client.LocalSGD",
                "~strategy.client.beta",
            )
        )


# -- the variance-reduced forms ------------------------------------------------------------------


def storm_step(model: FlatModel, start, data, g, prev, ctx, *, lr, beta, steps, batch_size, linear=None):
    """K steps of y <- y - lr (grad(y) + (1 - beta)(g - grad(x_prev)) + beta * linear), with both
    gradients on the step's minibatch, written out with a second copy of the model."""
    client = MomentumClient(beta=beta, lr=lr, steps=steps, batch_size=batch_size)
    other = FlatModel(build_model(MLP, (1, 8, 8), 10, seed=0))
    other.load(prev)
    model.load(start)
    fresh_sum = torch.zeros_like(start)
    for idx in client._batches(len(data), ctx.generator()):
        xb, yb = data.take(idx)
        model.flat_grad.zero_()
        torch.nn.functional.cross_entropy(model.module(xb), yb).backward()
        other.flat_grad.zero_()
        torch.nn.functional.cross_entropy(other.module(xb), yb).backward()
        with torch.no_grad():
            fresh_sum += model.flat_grad
            v = model.flat_grad + (1 - beta) * (g - other.flat_grad)
            if linear is not None:
                v = v + beta * linear
            model.flat.sub_(lr * v)
    return start - model.flat, fresh_sum / steps


@pytest.mark.parametrize("beta", [0.1, 0.7])
def test_the_variance_reduced_steps_are_the_storm_recursion(beta):
    from strategies.momentum import MomentumVRClient, ScaffoldMomentumVRClient

    model = FlatModel(build_model(MLP, (1, 8, 8), 10, seed=0))
    start = model.vector().clone()
    gen = torch.Generator().manual_seed(2)
    g = 0.1 * torch.randn(start.numel(), generator=gen)
    prev = start + 0.05 * torch.randn(start.numel(), generator=gen)
    data = digits_nodes([40])[0]
    ctx = ClientContext(round=2, node_id=0, seed=5, num_classes=10, broadcast={"g": g, "x_prev": prev})
    ours = MomentumVRClient(beta=beta, lr=0.1, steps=5, batch_size=8)(model, start, data, None, ctx)
    theirs, _ = storm_step(model, start, data, g, prev, ctx, lr=0.1, beta=beta, steps=5, batch_size=8)
    assert torch.allclose(ours.message["update"], theirs, rtol=1e-5, atol=1e-6)
    assert float(ours.message["steps"][0]) == 5 and 0 < ours.metrics["train/loss"]

    c, c_i = 0.01 * torch.randn(start.numel(), generator=gen), 0.01 * torch.randn(start.numel(), generator=gen)
    ctx = ClientContext(round=2, node_id=0, seed=5, num_classes=10, broadcast={"g": g, "c": c, "x_prev": prev})
    result = ScaffoldMomentumVRClient(beta=beta, lr=0.1, steps=5, batch_size=8)(model, start, data, {"c": c_i}, ctx)
    theirs, mean_fresh = storm_step(
        model, start, data, g, prev, ctx, lr=0.1, beta=beta, steps=5, batch_size=8, linear=c - c_i
    )
    assert torch.allclose(result.message["update"], theirs, rtol=1e-5, atol=1e-6)
    assert torch.allclose(result.state["c"], mean_fresh, rtol=1e-5, atol=1e-6)  # option II: mean fresh gradient
    assert torch.allclose(result.message["control"], mean_fresh - c_i, rtol=1e-5, atol=1e-6)

    # without x_prev (the first round) the step is plain SGD on grad + beta * linear
    ctx = ClientContext(round=0, node_id=0, seed=5, num_classes=10, broadcast={"g": g})
    first = MomentumVRClient(beta=beta, lr=0.1, steps=5, batch_size=8)(model, start, data, None, ctx)
    plain, _ = storm_step(model, start, data, g, start, ctx, lr=0.1, beta=1.0, steps=5, batch_size=8)
    assert torch.allclose(first.message["update"], plain, rtol=1e-5, atol=1e-6)


def test_variance_reduced_runs_at_beta_1_are_the_parents_and_keep_the_previous_model():
    """beta = 1 drops the correction: FedAvg-M-VR is FedAvg (same steps at lr), SCAFFOLD-M-VR is
    SCAFFOLD with option II's mean minibatch gradient (to rounding: SCAFFOLD recovers it from
    the update). Below 1 the run differs, and the server keeps x_prev = the last model."""
    setting = ["nodes_per_round=4", "rounds=3", "strategy.client.steps=3"]
    fedavg = simulate(*setting, "strategy=fedavg")
    vr = simulate(*setting, "strategy=fedavg_m_vr", "strategy.client.beta=1")
    assert torch.allclose(fedavg.params, vr.params, rtol=0, atol=1e-6)
    scaffold = simulate(*setting, "strategy=scaffold")
    svr = simulate(*setting, "strategy=scaffold_m_vr", "strategy.client.beta=1")
    assert torch.allclose(scaffold.params, svr.params, rtol=1e-4, atol=1e-5)
    below = simulate(*setting, "strategy=fedavg_m_vr", "strategy.client.beta=0.5")
    assert not torch.allclose(fedavg.params, below.params) and torch.isfinite(below.params).all()
    prev = below.strategy_state["x_prev"]
    assert prev.shape == below.params.shape and not torch.equal(prev, below.params)


def test_variance_reduced_clients_refuse_what_their_step_lacks_and_say_they_run_one_at_a_time():
    with pytest.raises(ConfigError, match="take no strategy.client.weight_decay or strategy.client.momentum"):
        build(compose(*SKEWED, "strategy=fedavg_m_vr", "strategy.client.momentum=0.5"))
    sim = build(compose(*SKEWED, "strategy=scaffold_m_vr", "cluster.vectorize=true"))
    try:
        assert "overrides __call__" in sim.info()["vectorize"]
    finally:
        sim.close()


def test_the_downlink_counts_g_and_x_prev():
    """Per round and node the model, g, and from round 1 on x_prev: 1, 2, 3 times 4 d bytes."""
    from fedsim.simulation import build as build_sim

    def per_round(strategy: str) -> list[int]:
        record = Recorder()
        set_driver_threads(1)
        sim = build_sim(compose(*SKEWED, "rounds=3", "nodes_per_round=5", f"strategy={strategy}"))
        try:
            sim.run([record])
            d = sim.num_params
        finally:
            sim.close()
        totals = [int(m["comm/bytes_down_total"]) for m in record.rounds]
        return [(b - a) // (5 * 4 * d) for a, b in zip([0, *totals], totals)]

    assert per_round("fedavg") == [1, 1, 1]
    assert per_round("fedavg_m") == [2, 2, 2]
    assert per_round("fedavg_m_vr") == [2, 3, 3]
