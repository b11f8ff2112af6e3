"""Vectorised cohorts (``cluster.vectorize=true``): K nodes trained at once with torch.func give
each node's one-at-a-time result up to float rounding, on real digits; whole runs are
bit-identical for any number of actors within the mode; and clients that do not support it run
one at a time exactly as before."""

from __future__ import annotations

import pytest
import torch

from fedsim.models import MLP, build_model
from fedsim.params import FlatModel
from fedsim.simulation import build, set_driver_threads
from fedsim.types import ClientContext, NodeData
from strategies.client import LocalSGD, WorkerMomentum
from strategies.fedprox import FedProxClient
from tests.conftest import compose


def digits_nodes(sizes: list[int], seed: int = 0) -> list[NodeData]:
    from fedsim.data.sources import load_digits

    ds = load_digits()
    x, y = torch.from_numpy(ds.x_train), torch.from_numpy(ds.y_train)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    out, at = [], 0
    for n in sizes:
        ix = perm[at : at + n]
        out.append(NodeData(x[ix], y[ix]))
        at += n
    return out


def one_at_a_time(update, model, starts, datas, states, ctxs):
    out = []
    for k in range(len(datas)):
        model.load(starts[k])
        out.append(update(model, starts[k], datas[k], states[k], ctxs[k]))
    return out


def compare(update, sizes, *, states=None, rtol=1e-5, atol=1e-6, same_start=True):
    model = FlatModel(build_model(MLP, (1, 8, 8), 10, seed=0))
    base = model.vector()
    K = len(sizes)
    noise = 0.01 * torch.randn(K, base.numel(), generator=torch.Generator().manual_seed(0))
    # "shared": one row expanded (what the worker passes in a synchronous round: the first step
    # then runs the one model unbatched); True: K equal copies; False: K different models
    starts = {"shared": base.clone().expand(K, -1), True: base.expand(K, -1).clone()}.get(same_start, base + noise)
    datas = digits_nodes(sizes)
    states = states if states is not None else [None] * K
    ctxs = [ClientContext(round=2, node_id=10 + k, seed=5, num_classes=10) for k in range(K)]
    seq = one_at_a_time(update, model, starts, datas, states, ctxs)
    vec = update.cohort(model, starts, datas, states, ctxs)
    assert len(vec) == K
    for a, b in zip(seq, vec):
        assert a.num_examples == b.num_examples
        assert torch.allclose(a.message, b.message, rtol=rtol, atol=atol), float((a.message - b.message).abs().max())
        assert a.metrics.keys() == b.metrics.keys()
        for key in a.metrics:
            assert a.metrics[key] == pytest.approx(b.metrics[key], rel=1e-4, abs=1e-6)
    return seq, vec


@pytest.mark.parametrize(
    "update",
    [
        LocalSGD(lr=0.1, epochs=1, batch_size=8),
        LocalSGD(lr=0.1, epochs=2, batch_size=8, momentum=0.9, weight_decay=1e-3),
        LocalSGD(lr=0.1, steps=5, batch_size=6),
        LocalSGD(lr=0.1, epochs=1, batch_size=8, objective="hinge"),
        FedProxClient(lr=0.1, epochs=1, batch_size=8, mu=0.5),
    ],
    ids=["sgd", "momentum+decay", "steps", "hinge", "fedprox"],
)
def test_a_cohort_of_local_sgd_nodes_matches_one_at_a_time(update):
    assert update.vectorizable
    # equal step counts (the worker groups nodes by steps), unequal last batches (padding)
    sizes = [13, 15, 16, 9] if update.local_steps is None else [7, 3, 30, 12]
    sizes = [n for n in sizes if update.steps(n) == update.steps(sizes[0])] or sizes[:1]
    compare(update, sizes, same_start=False)
    compare(update, sizes, same_start="shared")


def test_a_cohort_handles_nodes_without_data():
    update = LocalSGD(lr=0.1, epochs=1, batch_size=8)
    model = FlatModel(build_model(MLP, (1, 8, 8), 10, seed=0))
    start = model.vector()
    datas = [NodeData(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.int64))] * 2
    ctxs = [ClientContext(0, k, 0, 10) for k in range(2)]
    out = update.cohort(model, start.expand(2, -1).clone(), datas, [None, None], ctxs)
    assert all(r.num_examples == 0 and r.message.abs().sum() == 0 for r in out)


def test_a_cohort_of_worker_momentum_nodes_matches_one_at_a_time():
    d = FlatModel(build_model(MLP, (1, 8, 8), 10, seed=0)).dim
    old = [None, {"momentum": 0.01 * torch.randn(d, generator=torch.Generator().manual_seed(1))}, None]
    for kwargs in ({}, {"lr": 0.5, "lr_decay": 50}, {"l2_norm": 0.1, "weight_decay": 0.01, "grad_clip": 0.5}):
        update = WorkerMomentum(batch_size=8, beta=0.9, **kwargs)
        seq, vec = compare(update, [20, 12, 30], states=old)
        compare(update, [20, 12, 30], states=old, same_start="shared")

        for a, b in zip(seq, vec):
            assert torch.allclose(a.state["momentum"], b.state["momentum"], rtol=1e-5, atol=1e-6)


def test_clients_that_change_the_loss_or_targets_are_not_vectorised():
    from strategies.floral import FloralSGD
    from strategies.vrls import VRLSClient

    assert not FloralSGD().vectorizable and VRLSClient().vectorizable

    class Custom(LocalSGD):
        def loss(self, logits, y, state):
            return super().loss(logits, y, state) * 2

    assert not Custom().vectorizable


def run(*overrides: str) -> torch.Tensor:
    set_driver_threads(1)
    sim = build(compose(*overrides))
    try:
        return sim.run()[0].params
    finally:
        sim.close()


CROSS_DEVICE = [
    "dataset=digits",
    "model=mlp",
    "num_nodes=300",
    "nodes_per_round=100",
    "partition.alpha=100",
    "rounds=3",
    "eval_every=0",
    "seed=2",
]


@pytest.mark.integration
def test_vectorised_runs_are_bit_identical_for_any_actor_count_and_close_to_sequential(ray_cluster):
    vec = [*CROSS_DEVICE, "cluster.vectorize=true", "cluster.cohort=32"]
    local = run(*vec, "cluster=local")
    for actors in (1, 3):
        assert torch.equal(local, run(*vec, "cluster=ray", f"cluster.num_actors={actors}")), actors
    sequential = run(*CROSS_DEVICE, "cluster=local")
    assert not torch.equal(local, sequential)  # batched arithmetic differs in the last bits...
    assert torch.allclose(local, sequential, rtol=1e-4, atol=1e-5)  # ...and nowhere else


@pytest.mark.integration
def test_vectorize_leaves_other_clients_and_small_rounds_as_they_were():
    floral = ["dataset=digits", "num_nodes=12", "nodes_per_round=6", "rounds=2", "eval_every=0", "strategy=floral"]
    assert torch.equal(run(*floral, "cluster=local"), run(*floral, "cluster=local", "cluster.vectorize=true"))


@pytest.mark.parametrize("form", ["fedsgd", "local"])
def test_a_cohort_of_vrls_nodes_matches_one_at_a_time_in_the_training_phases(form):
    from strategies.vrls import VRLSClient

    update = VRLSClient(form=form, lr=0.05, batch_size=8, epochs=1)
    sizes = [24, 17, 20] if form == "fedsgd" else [20, 22, 18]
    target = [0.05 + 0.01 * c for c in range(10)]
    target = [t / sum(target) for t in target]
    for server in (
        {"phase": "predictor", "zeta": 0.1},
        {"phase": "train", "target": None},
        {"phase": "train", "target": target},
    ):
        for normalize in ("none", "batch"):
            update.normalize = normalize
            model = FlatModel(build_model(MLP, (1, 8, 8), 10, seed=0))
            start = model.vector()
            datas = digits_nodes(sizes, seed=3)
            ctxs = [ClientContext(round=1, node_id=k, seed=9, num_classes=10, broadcast=server) for k in range(3)]
            starts = start.expand(3, -1).clone()
            seq = one_at_a_time(update, model, starts, datas, [None] * 3, ctxs)
            vec = update.cohort(model, starts, datas, [None] * 3, ctxs)
            for a, b in zip(seq, vec):
                assert a.num_examples == b.num_examples
                assert torch.allclose(a.message, b.message, rtol=1e-4, atol=1e-6), (server, normalize)
                assert a.metrics["train/loss"] == pytest.approx(b.metrics["train/loss"], rel=1e-4)
