import pytest
import torch
from torch import nn

from fedsim.errors import ConfigError
from fedsim.params import FlatModel
from fedsim.types import ClientContext, NodeData, RoundInfo, UpdateBatch
from strategies.aggregators import Mean
from strategies.client import LocalSGD
from strategies.fedavg import FedAvg
from strategies.server_opt import ServerSGD
from tests.conftest import run_facts


def batch_of(messages, counts):
    k = len(counts)
    return UpdateBatch(
        torch.arange(k),
        messages,
        torch.tensor(counts),
        torch.zeros(k, dtype=torch.int64),
        torch.full((k,), 4 * messages.shape[1]),
    )


INFO = RoundInfo(0, 0, 0, 3, (0, 1, 2))


def test_mean_is_sample_weighted_and_pure():
    U = torch.tensor([[1.0, 0.0], [3.0, 4.0], [100.0, 100.0]])
    before = U.clone()
    out = Mean()(U, torch.tensor([1.0, 3.0, 0.0]))
    assert torch.allclose(out, torch.tensor([2.5, 3.0]))
    assert torch.equal(U, before)
    assert torch.equal(Mean()(U, torch.zeros(3)), torch.zeros(2))


def test_server_sgd_with_and_without_momentum():
    x, g = torch.ones(3), torch.full((3,), 0.5)
    opt = ServerSGD(lr=1.0)
    assert torch.equal(opt.step(x, g, opt.init(x))[0], torch.full((3,), 0.5))
    m = ServerSGD(lr=0.1, momentum=0.9)
    s = m.init(x)
    x1, s = m.step(x, g, s)
    x2, s = m.step(x1, g, s)
    assert torch.allclose(x2, x - 0.1 * g - 0.1 * (0.9 * g + g))
    with pytest.raises(ValueError):
        ServerSGD(momentum=1.0)


def test_fedavg_lands_on_the_weighted_average_of_local_models():
    x = torch.tensor([1.0, 1.0])
    local = torch.tensor([[0.0, 2.0], [4.0, 2.0]])
    strat = FedAvg(client=LocalSGD())
    params, _, metrics = strat.step(x, batch_of(x - local, [1, 3]), strat.init(x, run_facts(4)), INFO)
    assert torch.allclose(params, torch.tensor([3.0, 2.0]))
    unweighted = FedAvg(client=LocalSGD(), weighted=False)
    params, _, _ = unweighted.step(x, batch_of(x - local, [1, 3]), unweighted.init(x, run_facts(4)), INFO)
    assert torch.allclose(params, torch.tensor([2.0, 2.0]))
    assert metrics["agg/direction_norm"] > 0


def linear_node(n=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return NodeData(x, (x[:, 0] > 0).long())


def test_local_sgd_is_reproducible_and_returns_start_minus_local():
    model = FlatModel(nn.Linear(4, 2))
    start = model.vector()
    update = LocalSGD(lr=0.1, epochs=2, batch_size=8)
    ctx = ClientContext(round=3, node_id=5, seed=0, num_classes=2)
    r1 = update(model, start, linear_node(), None, ctx)
    local = model.vector()
    assert torch.allclose(r1.message, start - local)
    assert r1.num_examples == 20 and 0 <= r1.metrics["train/acc"] <= 1
    model.load(start)
    r2 = update(model, start, linear_node(), None, ctx)
    assert torch.equal(r1.message, r2.message)
    model.load(start)
    r3 = update(model, start, linear_node(), None, ClientContext(4, 5, 0, 2))
    assert not torch.equal(r1.message, r3.message)  # another round, another batch order


def test_local_sgd_steps_mode_and_work_estimate():
    update = LocalSGD(lr=0.1, steps=7, batch_size=8)
    assert update.work(20) == 56 and update.work(0) == 0
    assert LocalSGD(epochs=3).work(10) == 30
    seen = sum(len(b) for b in update._batches(20, torch.Generator().manual_seed(0)))
    assert seen == 8 + 8 + 4 + 8 + 8 + 4 + 8  # passes of 3 batches, reshuffled, cut at 7 steps
    model = FlatModel(nn.Linear(4, 2))
    empty = NodeData(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))
    res = update(model, model.vector(), empty, None, ClientContext(0, 0, 0, 2))
    assert res.num_examples == 0 and res.message.abs().sum() == 0


def test_local_sgd_momentum_and_weight_decay_change_the_update():
    model = FlatModel(nn.Linear(4, 2))
    start = model.vector()
    ctx = ClientContext(0, 0, 0, 2)
    plain = LocalSGD(lr=0.1, batch_size=4)(model, start, linear_node(), None, ctx).message
    model.load(start)
    heavy = LocalSGD(lr=0.1, batch_size=4, momentum=0.9)(model, start, linear_node(), None, ctx).message
    model.load(start)
    decay = LocalSGD(lr=0.1, batch_size=4, weight_decay=0.5)(model, start, linear_node(), None, ctx).message
    assert heavy.norm() > plain.norm() and not torch.equal(plain, decay)


def test_local_sgd_rejects_bad_options():
    for kwargs in ({"lr": 0}, {"batch_size": 0}, {"epochs": 0}, {"steps": 0}, {"momentum": 1.0}):
        with pytest.raises(ConfigError):
            LocalSGD(**kwargs)


def gradient_at(model, start, data, idx):
    model.load(start)
    model.flat_grad.zero_()
    torch.nn.functional.cross_entropy(model.module(data.x[idx]), data.y[idx]).backward()
    return model.flat_grad.clone()


def test_worker_momentum_persists_across_rounds_in_node_state():
    from strategies.client import WorkerMomentum

    model = FlatModel(nn.Linear(4, 2))
    start = model.vector()
    data = linear_node()
    wm = WorkerMomentum(batch_size=5, beta=0.9)
    c0, c1 = ClientContext(0, 2, 0, 2), ClientContext(1, 2, 0, 2)
    g0 = gradient_at(model, start, data, next(wm._batches(20, c0.generator())))
    g1 = gradient_at(model, start, data, next(wm._batches(20, c1.generator())))
    model.load(start)
    r0 = wm(model, start, data, None, c0)
    assert torch.allclose(r0.message, 0.1 * g0) and torch.equal(r0.state["momentum"], r0.message)
    model.load(start)
    r1 = wm(model, start, data, r0.state, c1)
    assert torch.allclose(r1.message, 0.9 * 0.1 * g0 + 0.1 * g1, atol=1e-7)
    assert torch.allclose(r1.state["momentum"], r1.message)
    # with a local lr and the MoNNA schedule the message is the local step lr_t * m
    step = WorkerMomentum(batch_size=5, beta=0.0, lr=0.75, lr_decay=50, lr_decay_delta=50)
    assert step.lr_at(49) == 0.75 and step.lr_at(50) == pytest.approx(0.375) and step.lr_at(149) == pytest.approx(0.25)
    model.load(start)
    r = step(model, start, data, None, c0)
    assert torch.allclose(r.message, 0.75 * g0)
    # the two regularisers: weight_decay adds lambda x (squared norm), l2_norm lambda x / ||x|| (norm)
    for kwargs, extra in (({"weight_decay": 0.3}, 0.3 * start), ({"l2_norm": 0.3}, 0.3 * start / start.norm())):
        model.load(start)
        reg = WorkerMomentum(batch_size=5, beta=0.0, lr=0.75, **kwargs)(model, start, data, None, c0)
        assert torch.allclose(reg.message, 0.75 * (g0 + extra), atol=1e-6)


def test_fedprox_adds_the_proximal_gradient_at_every_step():
    """With lr * mu = 1 the second step lands on w0 - lr g(w1): FedProx's message after 2 steps is
    LocalSGD's after 2 steps minus LocalSGD's after 1 (the same minibatches from the same stream);
    mu = 0 is LocalSGD bit for bit; a larger mu keeps the node closer to the model it received."""
    from strategies.fedprox import FedProxClient

    model = FlatModel(nn.Linear(4, 2))
    start = model.vector()
    ctx = ClientContext(0, 0, 0, 2)

    def message(update):
        model.load(start)
        return update(model, start, linear_node(), None, ctx).message

    two, one = message(LocalSGD(lr=0.5, steps=2, batch_size=4)), message(LocalSGD(lr=0.5, steps=1, batch_size=4))
    prox = message(FedProxClient(mu=2.0, lr=0.5, steps=2, batch_size=4))
    assert torch.allclose(prox, two - one, atol=1e-6)
    assert torch.equal(
        message(FedProxClient(mu=0.0, lr=0.5, steps=5, batch_size=4)), message(LocalSGD(lr=0.5, steps=5, batch_size=4))
    )
    norms = [float(message(FedProxClient(mu=mu, lr=0.1, steps=10, batch_size=4)).norm()) for mu in (0.0, 1.0, 5.0)]
    assert norms[0] > norms[1] > norms[2]
    with pytest.raises(ConfigError, match="mu=-1"):
        FedProxClient(mu=-1)
