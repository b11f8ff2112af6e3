"""The VRLS pipeline (strategies/vrls.py) through the real engine: phases, reports, the pooled
target, the oracle and no-weight baselines, determinism across executors, bad configs, and the
warnings that name a degenerate estimate (on crafted server states and in a run)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedsim.errors import ConfigError
from fedsim.logging import Callback, RunMeta
from fedsim.logging.console import ProgressBar
from fedsim.logging.jsonl import JsonlLogger
from fedsim.simulation import build, set_driver_threads
from fedsim.types import ClientContext, NodeData
from strategies import label_shift as ls
from strategies.server_opt import ServerAdam
from strategies.vrls import VRLS, VRLSClient
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


class Recorder(Callback):
    """Every step's metrics; a step's warnings (`Callback.on_warning`, called after its
    ``on_round_end``) go into its record under ``warnings``."""

    def __init__(self) -> None:
        self.rounds: list[dict] = []

    def on_round_end(self, round_: int, metrics: dict) -> None:
        self.rounds.append(dict(metrics))

    def on_warning(self, round_: int, message: str) -> None:
        assert self.rounds and self.rounds[-1]["round"] == round_
        self.rounds[-1].setdefault("warnings", []).append(message)


def warned(rounds: list[dict]) -> list[str]:
    return [w for m in rounds for w in m.get("warnings", [])]


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
    # a healthy estimate: the checks pass and say nothing
    checks = next(m for m in rounds if "vrls/target_dropped" in m)
    assert checks["vrls/phase"] == 2 and checks["vrls/target_dropped"] == 0 and checks["vrls/em_unconverged"] == 0
    assert checks["vrls/degenerate_nodes"] == 0 and checks["vrls/untrained_classes"] == 0
    assert checks["vrls/target_max"] < 0.99
    assert warned(rounds) == []


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


# -- warnings: degenerate estimates named without the test labels ----------------------------


def test_dropped_classes_collapse_and_em_cap_on_crafted_inputs():
    prior = np.array([0.05, 0.05, 0.3, 0.3, 0.3, 0.0])
    target = np.array([0.2, 1e-5, 0.5, 0.3 - 1e-5, 0.0, 0.0])
    # below 1e-3 of the training share: classes 1 and 4; class 5 has no training mass (left out)
    assert ls.dropped_classes(target, prior).tolist() == [1, 4]
    assert ls.dropped_classes(prior, prior).tolist() == []
    assert ls.collapsed(np.array([0.005, 0.995, 0.0])) == 1 and ls.collapsed(np.array([0.5, 0.5])) is None
    # EM stopped by its cap, on posteriors that pull the marginal to a boundary
    probs = np.array([[0.9, 0.1]] * 50 + [[0.6, 0.4]] * 50)
    q, it = ls.em_marginal(probs, np.array([0.5, 0.5]), max_iter=3)
    assert it == 3 and ls.em_unconverged(np.array([it, np.nan]), 3) == 1
    q, it = ls.em_marginal(probs, np.array([0.5, 0.5]))
    assert it < 1000 and ls.em_unconverged(np.array([it, np.nan]), 1000) == 0
    # the calibration step: relative in 1/T, absolute in the biases
    assert ls.calibration_step(np.array([2.0]), np.array([2.5])) == pytest.approx(0.25)
    assert ls.calibration_step(np.array([1.0, 0.1, -0.1]), np.array([1.0, 0.3, -0.3])) == pytest.approx(0.2)
    assert ls.calibration_step(np.zeros(0), np.zeros(0)) == 0.0
    # BBSE: a class without held-out examples makes the confusion matrix rank-deficient
    assert ls.confusion_rank(np.eye(4) * 10) == 4
    assert ls.confusion_rank(np.diag([10.0, 10.0, 10.0, 0.0])) == 3


def strategy(*overrides: str) -> VRLS:
    out = build(compose(*SMALL, *overrides, "cluster=local")).strategy
    assert isinstance(out, VRLS)
    return out


def five_clients(q_hat: np.ndarray, *, em_iters=None, counts=None) -> dict:
    """The server's state at the end of the estimate phase in the 5clients setting (Fashion-MNIST
    sizes): the nodes' estimates, the target they pool to, the pooled training counts."""
    sizes = np.full(5, 1022.0)
    seen = np.isfinite(q_hat).all(1)
    return {
        "q_hat": q_hat,
        "sample": sizes,
        "target": (q_hat[seen] * sizes[seen, None]).sum(0) / sizes[seen].sum(),
        "counts": np.array([66.0] * 5 + [2334.0] * 5) if counts is None else counts,
        "em_iters": np.array([67.0, 255.0, 96.0, 61.0, 41.0]) if em_iters is None else em_iters,
    }


def test_the_checks_name_a_degenerate_estimate_and_pass_a_healthy_one():
    vrls = strategy("strategy=vrls", "strategy.predictor_rounds=20")
    healthy = np.full((5, 10), 0.05 / 9)
    healthy[np.arange(5), np.arange(5)] = 0.95  # the true 5clients marginals: node j's test is class j at 0.95
    metrics, warnings = vrls.estimate_checks(five_clients(healthy))
    assert warnings == []
    assert metrics["vrls/target_dropped"] == 0 and metrics["vrls/em_unconverged"] == 0
    assert metrics["vrls/degenerate_nodes"] == 0

    # the reported failure: every node's estimate collapsed onto class 6 (the predictor called the
    # test inputs shirts), so the target dropped classes 0-4, 8, 9
    collapsed = np.zeros((5, 10))
    collapsed[:, 5], collapsed[:, 6], collapsed[:, 7] = 0.001, 0.995, 0.004
    state = five_clients(collapsed)
    before = {k: np.array(v, copy=True) for k, v in state.items()}
    metrics, warnings = vrls.estimate_checks(state)
    assert all(np.array_equal(before[k], state[k]) for k in state)  # the checks only read the state
    assert metrics["vrls/target_dropped"] == 7 and metrics["vrls/degenerate_nodes"] == 5
    assert metrics["vrls/target_max"] == pytest.approx(0.995)
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert warnings[0].startswith("VRLS: degenerate ratio estimate: the pooled target drops 7 of 10 classes (0, 1,")
    assert "puts 0.995 on class 6" in warnings[0] and "5 of 5 nodes" in warnings[0]
    assert warnings[0].endswith("raise strategy.predictor_rounds (now 20)")

    # EM stopped at its cap on two nodes (the estimates themselves fine)
    metrics, warnings = vrls.estimate_checks(five_clients(healthy, em_iters=np.array([1000.0, 12, 1000, 30, np.nan])))
    assert metrics["vrls/em_unconverged"] == 2
    assert len(warnings) == 1 and warnings[0].startswith("VRLS: EM did not converge on 2 of 5 nodes")
    assert "strategy.client.em_max_iter=1000" in warnings[0]

    # too few estimates, and classes nobody can train: both named, neither taken for a degenerate estimate
    partial = healthy.copy()
    partial[2:] = np.nan
    counts = np.array([0.0] * 5 + [2334.0] * 5)
    metrics, warnings = vrls.estimate_checks(five_clients(partial, counts=counts))
    assert [w.split(":")[1] for w in warnings] == [
        " only 2 of 5 nodes sent an estimate in the 1 estimate round, so the target leaves out the others' test data",
        " 5 of 10 classes (0, 1, 2, 3, 4) have no training example on the nodes that reported their counts, so no "
        "model trained here can predict them (the data or partition, not the estimate)",
    ]
    assert metrics["vrls/untrained_classes"] == 5 and metrics["vrls/target_dropped"] == 0


def test_bbse_names_a_singular_confusion_matrix():
    bbse = strategy("strategy=vrls_bbse")
    healthy = np.full((5, 10), 0.05 / 9)
    healthy[np.arange(5), np.arange(5)] = 0.95
    state = {**five_clients(healthy), "confusion": np.diag([7.0] * 5 + [230.0] * 5)}
    metrics, warnings = bbse.estimate_checks(state)
    assert warnings == [] and metrics["vrls/confusion_rank"] == 10 and "vrls/em_unconverged" not in metrics
    state["confusion"][3, 3] = 0.0  # class 3: no held-out example, never predicted
    metrics, warnings = bbse.estimate_checks(state)
    assert metrics["vrls/confusion_rank"] == 9
    assert warnings == [
        "VRLS: BBSE's held-out confusion matrix has rank 9 for 10 trained classes (1 without a held-out example, 1 "
        "never predicted), so it cannot identify every class weight: raise strategy.predictor_rounds (now 400) or "
        "strategy.client.holdout (now 0.1)"
    ]


def test_a_degenerate_run_warns_on_the_console_and_in_metrics_jsonl(tmp_path, capsys):
    """Digits in the 5clients setting after 20 predictor rounds (the reported failure, small): the
    estimate is degenerate, EM is cut at 20 iterations, one calibration round does not converge,
    and the split leaves classes 0-4 without training examples. Each is one line, once, at the
    step that finds it, on the console and in metrics.jsonl."""
    set_driver_threads(1)
    cfg = compose(
        "strategy=vrls",
        "dataset=digits",
        "model=mlp",
        "partition=vrls_5clients",
        "strategy.predictor_rounds=20",
        "strategy.calibration_rounds=1",
        "strategy.client.em_max_iter=20",
        "rounds=2",
        "eval_every=0",
        "cluster=local",
    )
    sim = build(cfg)
    loggers: list[Callback] = [ProgressBar(), JsonlLogger()]
    rec = Recorder()
    try:
        for cb in loggers:
            cb.on_run_start(RunMeta(tmp_path, {}, sim.total_rounds))
        _, summary = sim.run([*loggers, rec])
        for cb in loggers:
            cb.on_run_end(summary)
    finally:
        sim.close()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    found = [(r["round"], r["message"]) for r in records if r["event"] == "warning"]
    assert [(t, m.split(":")[1].split(" (")[0]) for t, m in found] == [
        (20, " calibration did not converge in strategy.calibration_rounds=1 rounds"),
        (21, " 5 of 10 classes"),
        (21, " degenerate ratio estimate"),
        (21, " EM did not converge on 5 of 5 nodes"),
    ]
    assert found[1][1].endswith("(the data or partition, not the estimate)")
    assert found[2][1].endswith("raise strategy.predictor_rounds (now 20)")
    step = next(r for r in records if r.get("vrls/phase") == 2)
    assert step["vrls/em_unconverged"] == 5 and step["vrls/target_dropped"] >= 1 and step["round"] == 21
    assert "warnings" not in step  # the pipeline hands them to the callbacks, not into the step's record
    err = capsys.readouterr().err
    for t, message in found:
        assert f"fedsim: warning (step {t}): {message}\n" in err
    assert warned(rec.rounds) == [m for _, m in found]
