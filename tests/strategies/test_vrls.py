"""The VRLS pipeline (strategies/vrls.py) through the real engine: phases, reports, the pooled
target, the oracle and no-weight baselines, determinism across executors, bad configs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsim.errors import ConfigError
from fedsim.simulation import build, set_driver_threads
from fedsim.types import ClientContext, NodeData
from strategies import label_shift as ls
from strategies.server_opt import ServerAdam
from strategies.vrls import VRLSClient
from tests.conftest import compose

# A Gaussian mixture in the paper's 5clients setting: train node k holds class 5+k at 0.95, its
# test set class k at 0.95, so about 5 training examples of each class 0-4 per node.
SMALL = [
    "partition=vrls_5clients",
    "dataset=synthetic",
    "dataset.n_train=10000",
    "dataset.n_test=2000",
    "dataset.separation=5.0",
    "model=mlp",
    "model.hidden=[32]",
    "strategy.predictor_rounds=400",
    "strategy.calibration_rounds=6",
    "strategy.client.batch_size=64",
    "rounds=150",
    "eval_every=0",
    "seed=3",
]


class Recorder:
    def __init__(self) -> None:
        self.rounds: list[dict] = []

    def on_round_end(self, t: int, metrics: dict) -> None:
        self.rounds.append(dict(metrics))


def run(*overrides: str):
    set_driver_threads(1)
    sim = build(compose(*SMALL, *overrides))
    rec = Recorder()
    try:
        state, summary = sim.run([rec])
    finally:
        sim.close()
    return sim, state, summary, rec.rounds


@pytest.fixture(scope="module")
def vrls_run():
    return run("strategy=vrls", "cluster=local")


def test_phases_run_in_order_and_take_the_announced_rounds(vrls_run):
    sim, _, summary, rounds = vrls_run
    phases = [m["vrls/phase"] for m in rounds]
    assert phases == [0] * 400 + [1] * 6 + [2] + [3] * 150
    assert summary["rounds"] == sim.total_rounds == 400 + 6 + 1 + 150
    temps = [m["vrls/temperature"] for m in rounds if m["vrls/phase"] == 1]
    nll = [m["vrls/calib_nll"] for m in rounds if m["vrls/phase"] == 1]
    assert nll[-1] <= nll[0] and temps[-1] > 0  # Newton on the pooled held-out NLL descends
    # the nodes' reports are a few numbers, the training messages the whole model
    assert rounds[400]["comm/bytes_up"] < 5 * 4 * 200 < rounds[-1]["comm/bytes_up"]


def test_estimated_marginals_recover_the_node_test_mixes(vrls_run):
    sim, state, _, rounds = vrls_run
    st = state.strategy_state
    test = sim.data.label_counts("test").astype(float)
    q_true = test / test.sum(1, keepdims=True)
    assert np.abs(st["q_hat"] - q_true).sum(1).max() < 0.4  # each node finds its 0.95 class (no estimate: ~1.9)
    assert np.argmax(st["q_hat"], 1).tolist() == [0, 1, 2, 3, 4]
    target_true = (q_true * test.sum(1, keepdims=True)).sum(0) / test.sum()
    assert np.abs(st["target"] - target_true).sum() < 0.2  # the pooled training mix is ~1.9 away
    report = next(m for m in rounds if "vrls/ratio_mse_mean" in m)
    assert report["vrls/phase"] == 3 and len(report["vrls/ratio_mse"]) == 5
    assert report["vrls/marginal_l1_max"] == pytest.approx(np.abs(st["q_hat"] - q_true).sum(1).max(), rel=1e-6)


def test_importance_weighting_beats_no_weights_on_shifted_node_tests(vrls_run):
    _, _, vrls, _ = vrls_run
    _, _, plain, _ = run("strategy=vrls_fedavg", "cluster=local")
    _, _, oracle, rounds = run("strategy=vrls_oracle", "cluster=local")
    assert [m["vrls/phase"] for m in rounds] == [3] * 150  # no estimation phases
    report = next(m for m in rounds if "vrls/ratio_mse_mean" in m)
    assert report["vrls/ratio_mse_max"] == 0.0  # the oracle's weights are the true ones
    assert oracle["eval/node_acc_mean"] > plain["eval/node_acc_mean"] + 0.2
    assert vrls["eval/node_acc_mean"] > plain["eval/node_acc_mean"] + 0.2


def test_the_no_weight_baseline_reports_the_size_of_the_shift():
    sim, _, _, rounds = run("strategy=vrls_fedavg", "cluster=local", "rounds=1")
    report = next(m for m in rounds if "vrls/ratio_mse_mean" in m)
    train, test = sim.data.label_counts("train"), sim.data.label_counts("test").astype(float)
    target = test.sum(0) / test.sum()
    expected = [float(np.mean((1.0 - target / ls.smoothed_prior(train[k], 1.0)) ** 2)) for k in range(5)]
    assert report["vrls/ratio_mse"] == pytest.approx(expected, rel=1e-6)


@pytest.mark.integration
def test_bit_identical_local_and_ray(ray_cluster):
    short = ["strategy.predictor_rounds=5", "strategy.calibration_rounds=2", "rounds=4"]
    for strategy in ("strategy=vrls", "strategy=vrls_bbse"):
        _, local, _, _ = run(strategy, *short, "cluster=local")
        _, ray, _, _ = run(strategy, *short, "cluster=ray", "cluster.num_actors=2")
        assert torch.equal(local.params, ray.params)
        assert np.array_equal(local.strategy_state["q_hat"], ray.strategy_state["q_hat"])


def test_local_form_and_bbse_run_end_to_end():
    _, state, summary, rounds = run(
        "strategy=vrls_bbse",
        "strategy.client.form=local",
        "strategy.client.steps=3",
        "strategy.client.lr=0.1",
        "strategy.predictor_rounds=20",
        "rounds=5",
        "cluster=local",
    )
    assert [m["vrls/phase"] for m in rounds] == [0] * 20 + [1] + [2] + [3] * 5  # BBSE: one report round
    assert "vrls/temperature" not in rounds[20]  # no calibration for BBSE
    assert np.isfinite(state.strategy_state["target"]).all() and state.strategy_state["target"].sum() == pytest.approx(
        1
    )
    assert 0.0 <= summary["eval/node_acc_mean"] <= 1.0


@pytest.mark.parametrize(
    "extra,message",
    [
        (["server=async"], "strategy=vrls runs on server=sync, not server=async"),
        (["strategy.estimate_rounds=0"], "estimate_rounds"),
        (["strategy.estimator=magic"], "estimator"),
        (["strategy.client.form=sometimes"], "form"),
        (["strategy.client.holdout=0"], "holdout"),
        (["strategy.calibration=platt"], "calibration"),
    ],
)
def test_bad_configs_fail_with_one_line(extra, message):
    with pytest.raises(ConfigError, match=message) as err:
        build(compose(*SMALL, "strategy=vrls", "cluster=local", *extra))
    assert "\n" not in str(err.value)


SHORT = ["strategy.predictor_rounds=30", "strategy.calibration_rounds=2", "rounds=3", "cluster=local"]


def test_partial_participation_pools_the_nodes_that_have_reported():
    """Under Bernoulli participation every phase uses the round's nodes; the target pools the
    estimates of the nodes sampled in the estimate rounds, and more estimate rounds hear more."""
    part = [
        "partition=dirichlet",
        "partition.node_test=iid",
        "num_nodes=12",
        "nodes_per_round=12",
        "participation=bernoulli",
        "participation.rates=constant",
        "participation.p=0.3",
    ]
    one = run("strategy=vrls", *SHORT, *part)
    many = run("strategy=vrls", *SHORT, *part, "strategy.estimate_rounds=8")
    for sim, state, _, rounds in (one, many):
        reported = np.isfinite(state.strategy_state["q_hat"]).all(1)
        heard = [m["vrls/estimates"] for m in rounds if "vrls/estimates" in m]
        assert heard == [int(reported.sum())] and 0 < heard[0] <= 12
        target = state.strategy_state["target"]
        assert np.isfinite(target).all() and target.min() >= 0 and target.sum() == pytest.approx(1)
        assert sim.total_rounds == 30 + 2 + sim.strategy.estimate_rounds + 3
    assert (
        np.isfinite(one[1].strategy_state["q_hat"]).all(1).sum()
        < np.isfinite(many[1].strategy_state["q_hat"]).all(1).sum()
    )


def test_robust_pooling_resists_lying_reports():
    """Two of ten nodes report all mass on class 0 from a huge test sample: the plain mean (the
    paper's pooling by sample size) follows them, the median does not."""
    honest = np.random.default_rng(0).dirichlet(100 * np.array([0.1, 0.2, 0.3, 0.4]), size=8)
    liars = np.tile([1.0, 0.0, 0.0, 0.0], (2, 1))
    rows, sizes = np.vstack([honest, liars]), np.array([100.0] * 8 + [1e6] * 2)
    mean_vrls = build(compose(*SMALL, "strategy=vrls", "cluster=local")).strategy
    median_vrls = build(compose(*SMALL, "strategy=vrls", "strategy/aggregator=median", "cluster=local")).strategy
    truth = honest.mean(0)
    assert not mean_vrls.robust and median_vrls.robust
    assert np.abs(mean_vrls.pooled(rows, sizes) - truth).sum() > 1.0
    assert np.abs(median_vrls.robust_pool(rows) - np.median(rows, axis=0)).max() < 1e-12
    robust = median_vrls.robust_pool(rows) / median_vrls.robust_pool(rows).sum()
    assert np.abs(robust - truth).sum() < 0.1 < 1.0 < np.abs(mean_vrls.pooled(rows, sizes) - truth).sum()


def test_byzantine_nodes_lie_in_their_reports_and_robust_pooling_survives():
    """A Byzantine node's report rows come from the attack like any row; with the median the
    pipeline runs every phase to a valid target and a finite model."""
    sim, state, summary, rounds = run(
        "strategy=vrls",
        *SHORT,
        "partition=dirichlet",
        "num_nodes=9",
        "nodes_per_round=9",
        "byzantine.num=2",
        "attack=alie",
        "strategy/aggregator=median",
    )
    assert [m["attack/byzantine_rows"] for m in rounds] == [2] * len(rounds)
    lied = state.strategy_state["q_hat"][sorted(sim.byzantine.ids)]
    assert np.isfinite(lied).all()  # the attackers' estimates were received (and pooled robustly)
    target = state.strategy_state["target"]
    assert target.sum() == pytest.approx(1) and np.isfinite(summary["eval/acc"])


def test_compressed_uplink_compresses_training_and_leaves_reports_alone():
    sim, state, _, rounds = run("strategy=vrls", *SHORT, "compressor=top_k", "compressor.ratio=0.05", "feedback=ef14")
    d, phases = sim.num_params, [m["vrls/phase"] for m in rounds]
    report_bytes = [m["comm/bytes_up"] for m, ph in zip(rounds, phases) if ph in (1, 2)]
    train_bytes = [m["comm/bytes_up"] for m, ph in zip(rounds, phases) if ph in (0, 3)]
    assert max(report_bytes) < 5 * 4 * 200 and max(train_bytes) < 5 * 4 * d * 0.2  # reports exact, updates sparse
    assert all("e" in s["uplink"] for s in state.node_states.values())
    assert np.isfinite(state.strategy_state["target"]).all()


def test_the_client_refuses_to_run_without_the_server_phase():
    client = VRLSClient()
    data = NodeData(torch.zeros(4, 3), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="strategy=vrls"):
        client(None, torch.zeros(5), data, None, ClientContext(0, 0, 0, 2))


def test_weighted_loss_ignores_zero_mass_classes_and_normalises_on_request():
    client = VRLSClient(prior_floor=0.0)
    y = torch.tensor([1, 1, 2, 2])
    prior = client.prior(y, 3)  # class 0 absent on this node
    weights = torch.from_numpy(ls.class_weights(np.array([0.5, 0.25, 0.25]), prior)).float()
    assert torch.isinf(weights[0])
    logits = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    loss = client.weighted_loss(weights)(logits, y)
    per = torch.nn.functional.cross_entropy(logits, y, reduction="none") * weights[y]
    assert torch.isfinite(loss) and torch.allclose(loss, per.mean())
    batch = VRLSClient(normalize="batch").weighted_loss(weights)(logits, y)
    assert torch.allclose(batch, per.sum() / weights[y].sum())


def test_holdout_split_is_disjoint_fixed_and_covers_the_node():
    client = VRLSClient(holdout=0.2)
    ctx = ClientContext(0, 3, 11, 10)
    tr, val = client.split(100, ctx)
    assert len(val) == 20 and len(tr) == 80 and not set(tr) & set(val) and set(tr) | set(val) == set(range(100))
    tr2, val2 = client.split(100, ClientContext(57, 3, 11, 10))  # another round: the same split
    assert np.array_equal(tr, tr2) and np.array_equal(val, val2)


def test_server_adam_matches_torch_adam():
    torch.manual_seed(0)
    x0 = torch.randn(10)
    grads = [torch.randn(10) for _ in range(5)]
    opt = ServerAdam(lr=0.01, weight_decay=0.1)
    x, st = x0.clone(), opt.init(x0)
    for g in grads:
        x, st = opt.step(x, g, st)
    p = torch.nn.Parameter(x0.clone())
    ref = torch.optim.Adam([p], lr=0.01, weight_decay=0.1)
    for g in grads:
        p.grad = g.clone()
        ref.step()
    assert torch.allclose(x, p.detach(), atol=1e-6)


def test_lazy_node_data_gathers_the_same_rows():
    x = torch.arange(60, dtype=torch.float32).reshape(20, 3)
    y = torch.arange(20) % 4
    index = torch.tensor([3, 7, 1, 19, 12])
    lazy = NodeData.rows(x, y, index, x * 2, torch.tensor([0, 5]))
    eager = NodeData(x[index], y[index], (x * 2)[torch.tensor([0, 5])])
    idx = torch.tensor([4, 0, 2])
    for a, b in zip(lazy.take(idx), eager.take(idx)):
        assert torch.equal(a, b)
    sub = lazy.subset(torch.tensor([1, 3]))
    assert torch.equal(sub.x, x[torch.tensor([7, 19])]) and torch.equal(sub.y, y[torch.tensor([7, 19])])
    assert torch.equal(lazy.x, eager.x) and torch.equal(lazy.x_unlabelled, eager.x_unlabelled) and len(lazy) == 5


def test_the_entropy_weight_reaches_the_nodes():
    short = ["strategy.predictor_rounds=20", "strategy.calibration_rounds=2", "rounds=1", "cluster=local"]
    q = {
        name: run(*args, *short)[1].strategy_state["q_hat"]
        for name, args in {
            "vrls": ["strategy=vrls"],
            "vrls_zeta0": ["strategy=vrls", "strategy.zeta=0"],
            "mlls": ["strategy=vrls_mlls"],
        }.items()
    }
    assert np.array_equal(q["vrls_zeta0"], q["mlls"])  # MLLS is VRLS with zeta = 0, bit for bit
    assert not np.array_equal(q["vrls"], q["mlls"])  # zeta changed the predictor, hence the estimate
