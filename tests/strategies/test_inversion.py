"""Unlimited staleness by gradient inversion (strategies/inversion.py; docs/methods/inversion.md)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedsim.errors import ConfigError
from fedsim.faults.latency import Delayed
from fedsim.params import FlatModel
from fedsim.seeding import torch_rng
from fedsim.simulation import build, set_driver_threads
from fedsim.types import NodeData, RoundInfo, UpdateBatch
from strategies.client import LocalSGD
from strategies.inversion import Inversion, Unrolled, invert, milestones
from tests.conftest import Recorder, compose, run_facts


@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _linear(seed: int = 0) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Linear(16, 4)


def _flat(m: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in m.parameters()])


def test_inversion_of_a_linear_model_reproduces_the_update():
    """The issue's test: a dataset recovered from dw whose unrolled training from the start model
    reproduces dw to tolerance."""
    m = _linear()
    un = Unrolled(m, lr=0.1)
    w0 = _flat(m)
    g = torch_rng(0, "data")
    x = torch.rand(20, 16, generator=g)
    labels = F.one_hot(torch.randint(0, 4, (20,), generator=g), 4).float() * 20 - 10
    dw = un.update(w0, x, labels, 3).detach()
    xs, ls, fit = invert(
        un, w0, dw, steps=3, input_shape=(16,), num_classes=4, images=16, iterations=200, lr=0.1,
        box=(0.0, 1.0), generator=torch_rng(0, "inv"),
    )  # fmt: skip
    replay = un.update(w0, xs, ls, 3)
    rel = float((replay - dw).abs().sum() / dw.abs().sum())
    assert rel < 1e-3
    assert fit == pytest.approx(float((replay - dw).abs().sum()), rel=1e-4)
    assert float(xs.min()) >= 0.0 and float(xs.max()) <= 1.0  # the box


def test_unrolled_steps_equal_local_sgd_full_batch():
    """The unrolled training is the client's SGD: with hard labels as one-hot logits of large
    margin the soft cross-entropy is the hard one, so K full-batch LocalSGD steps agree."""
    m = _linear(1)
    w0 = _flat(m)
    x = torch.rand(8, 16, generator=torch_rng(1, "x"))
    y = torch.randint(0, 4, (8,), generator=torch_rng(1, "y"))
    un = Unrolled(m, lr=0.05, weight_decay=0.01, momentum=0.5)
    soft = F.one_hot(y, 4).float() * 1e4  # softmax = one-hot
    dw = un.update(w0, x, soft, 3)
    client = LocalSGD(lr=0.05, steps=3, batch_size=8, weight_decay=0.01, momentum=0.5)
    flat = FlatModel(_linear(1))

    class Ctx:
        seed, round, node_id = 0, 0, 0

        def generator(self):
            return torch_rng(0, "train", 0, 0)

    out = client(flat, w0.clone(), NodeData(x, y), None, Ctx())  # type: ignore[arg-type]
    assert isinstance(out.message, torch.Tensor)
    torch.testing.assert_close(dw, -out.message, atol=1e-6, rtol=1e-5)


def test_milestones_are_the_authors():
    assert milestones(40000) == [14998, 24999, 35026]  # float floor division, as the authors
    assert milestones(8) == [2, 4, 7]


class _Replica:
    """A stand-in for `Replica` on a linear model and two nodes of random data."""

    def __init__(self) -> None:
        self.module = _linear(2)
        self.flat = FlatModel(self.module)
        self.input_shape, self.num_classes = (16,), 4
        g = torch_rng(2, "nodes")
        self.data = [
            NodeData(torch.rand(12, 16, generator=g), torch.randint(0, 4, (12,), generator=g)) for _ in range(2)
        ]

    def node_data(self, node: int) -> NodeData:
        return self.data[node]


def _strategy(**options) -> Inversion:
    opts = dict(iterations=30, images=8, inv_lr=0.1, min_staleness=3, buffer=2, box=(0.0, 1.0))
    opts.update(options)
    return Inversion(replica=_Replica(), client=LocalSGD(lr=0.1, steps=2, batch_size=12), **opts)  # type: ignore[arg-type]


def _drive(strategy: Inversion, steps: int = 4):
    """Step the strategy ``steps`` times; each step gets one fresh row and one row from
    3 versions back (when kept). Returns the parameters and every step's metrics."""
    params = _flat(strategy.replica.module)
    state = strategy.init(params, run_facts(2, classes=4, server="async"))
    out = []
    for v in range(steps):
        msgs = torch.stack([0.01 * torch.randn(params.shape, generator=torch_rng(3, "row", v, i)) for i in range(2)])
        base = torch.tensor([v, max(v - 3, 0)])
        batch = UpdateBatch(torch.tensor([0, 1]), msgs, torch.tensor([12, 12]), base, torch.zeros(2))
        params, state, metrics = strategy.step(params, batch, state, RoundInfo(v, v, 3, 2, (0, 1)))
        out.append(metrics)
    return params, state, out


def test_only_stale_rows_are_inverted_and_marked_fresh():
    _, state, metrics = _drive(_strategy(), steps=4)
    assert [m["inversion/rows"] for m in metrics] == [0.0, 0.0, 0.0, 1.0]  # tau = 3 only at v = 3
    assert metrics[-1]["inversion/fit"] >= 0.0 and "inversion/correction" in metrics[-1]
    assert sorted(state["history"]) == [0, 1, 2, 3, 4]


def test_history_bounds_the_kept_versions():
    _, state, metrics = _drive(_strategy(history=2), steps=4)
    assert sorted(state["history"]) == [3, 4]
    assert metrics[-1]["inversion/too_old"] == 1.0 and metrics[-1]["inversion/rows"] == 0.0


def test_switch_rules():
    # never: inverts at every chance; max_version stops it
    _, _, m = _drive(_strategy(switch="never"), steps=5)
    assert [x["inversion/rows"] for x in m] == [0, 0, 0, 1, 1]
    _, _, m = _drive(_strategy(switch="never", max_version=4), steps=5)
    assert [x["inversion/active"] for x in m] == [1, 1, 1, 1, 0] and m[4]["inversion/rows"] == 0
    # fit: a huge margin fires at the first inversion; switch_delay keeps it on for that long
    _, state, m = _drive(_strategy(switch="fit", margin=1e9, switch_delay=1), steps=6)
    assert state["switch_at"] == 4
    assert [x["inversion/rows"] for x in m] == [0, 0, 0, 1, 0, 0]
    # fit: a tiny margin never fires
    _, state, _ = _drive(_strategy(switch="fit", margin=1e-9), steps=5)
    assert state["switch_at"] == -1
    # oracle: compares against the node trained again from the current model
    _, state, m = _drive(_strategy(switch="oracle", margin=1e-9), steps=5)
    assert state["switch_at"] == 3 and m[3]["inversion/err_stale"] > 0 and m[3]["inversion/err_estimate"] > 0
    assert m[4]["inversion/active"] == 0
    _, state, m = _drive(_strategy(switch="oracle", margin=1e9), steps=5)
    assert state["switch_at"] == -1 and m[4]["inversion/rows"] == 1


def test_same_seed_same_result():
    a, _, ma = _drive(_strategy(), steps=4)
    b, _, mb = _drive(_strategy(), steps=4)
    assert torch.equal(a, b)
    assert ma[-1]["inversion/fit"] == mb[-1]["inversion/fit"]


def test_bad_options_are_refused():
    for bad in ({"switch": "sometimes"}, {"label_loss": "mse"}, {"iterations": 0}, {"box": [1.0, 0.0]}, {"history": 0}):
        with pytest.raises(ConfigError):
            _strategy(**bad)


def test_delayed_latency():
    lat = Delayed(value=1.0, delay=40.0, nodes=[1, 3]).bind(num_nodes=4, seed=0)
    assert lat.mean_times().tolist() == [1.0, 41.0, 1.0, 41.0]
    assert lat.time(3, 7) == 41.0
    with pytest.raises(ConfigError):
        Delayed(nodes=[5]).bind(num_nodes=4, seed=0)


BASE = [
    "cluster=local",
    "dataset=digits",
    "model=logreg",
    "num_nodes=4",
    "nodes_per_round=4",
    "eval_every=0",
    "seed=3",
    "server=async",
    "latency=delayed",
    "latency.delay=3",
    "latency.nodes=[1]",
    "strategy=inversion",
    "strategy.buffer=3",
    "strategy.iterations=3",
    "strategy.images=4",
    "strategy.min_staleness=2",
    "rounds=5",
]


def _run(*overrides: str):
    set_driver_threads(1)
    sim = build(compose(*BASE, *overrides))
    record = Recorder()
    try:
        state, summary = sim.run([record])
    finally:
        sim.close()
    return state.params, summary, record.rounds


def test_end_to_end_deterministic_and_inverts_the_delayed_node():
    p1, s1, rows = _run()
    p2, _, _ = _run()
    assert torch.equal(p1, p2)
    assert sum(r["inversion/rows"] for r in rows) >= 1
    assert np.isfinite(s1["eval/acc"])


def test_refused_off_the_asynchronous_server():
    with pytest.raises(ConfigError, match="server=async"):
        build(compose(*[b for b in BASE if not b.startswith(("server=", "latency"))], "server=sync"))


def test_oracle_refused_under_a_data_attack():
    with pytest.raises(ConfigError, match="switch=oracle"):
        build(compose(*BASE, "strategy.switch=oracle", "attack=label_flip", "byzantine.num=1"))
