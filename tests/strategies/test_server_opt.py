"""The FedOpt server optimizers (FedAdagrad, FedAdam, FedYogi; Reddi et al., ICLR 2021, Algorithm 2):
steps checked against numbers worked out from the paper's formulas, state, purity, options, the
strategy/server_opt config group, and one tiny run of each new strategy through the command line."""

from __future__ import annotations

import io
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from fedsim.errors import ConfigError
from fedsim.simulation import make
from strategies.server_opt import FedAdagrad, FedAdam, FedYogi, ServerAdam, ServerSGD
from tests.conftest import ROOT, compose, run_facts

B1, B2, TAU = 0.9, 0.99, 1e-3

# A small quadratic f(x) = 1/2 sum_i a_i x_i^2. One local gradient step with step size 1 moves a node
# from x to x - a x, so the pseudo-gradient fedsim hands the server (start - local) is a * x.
A = [1.0, 0.5, 0.0]
X0 = [1.0, -2.0, 3.0]  # direction a * x = [1, -1, 0]: Delta = [-1, 1, 0]


def quadratic(x: list[float]) -> float:
    return 0.5 * sum(a * xi * xi for a, xi in zip(A, x))


def t(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def reference(rule: str, lr: float, x: list[float], directions: list[list[float]]) -> tuple[list[float], list, list]:
    """Algorithm 2 of the paper coordinate by coordinate in plain floats (no torch, no fedsim)."""
    m, v = [0.0] * len(x), [TAU**2] * len(x)
    x = list(x)
    for d in directions:
        for i, di in enumerate(d):
            delta = -di  # the paper's Delta is local - start; fedsim's direction is start - local
            m[i] = B1 * m[i] + (1 - B1) * delta
            if rule == "adagrad":
                v[i] = v[i] + delta**2
            elif rule == "adam":
                v[i] = B2 * v[i] + (1 - B2) * delta**2
            else:  # yogi
                v[i] = v[i] - (1 - B2) * delta**2 * math.copysign(1.0, v[i] - delta**2) * (v[i] != delta**2)
            x[i] = x[i] + lr * m[i] / (math.sqrt(v[i]) + TAU)
    return x, m, v


# --- one step, by hand -------------------------------------------------------------------------

# Step 1 from X0 with Delta = [-1, 1, 0]: m = 0.1 Delta = [-0.1, 0.1, 0] for all three, and for the
# coordinates with |Delta| = 1 (Delta^2 = 1 > v0 = tau^2 = 1e-6, so Yogi's sign(v - Delta^2) is -1):
#   FedAdagrad  v = 1e-6 + 1                  = 1.000001
#   FedAdam     v = 0.99 * 1e-6 + 0.01 * 1    = 0.01000099
#   FedYogi     v = 1e-6 + 0.01 * 1           = 0.010001
# The third coordinate (Delta = 0) keeps m = 0, so it does not move; its v stays 1e-6 (Adagrad adds 0,
# Yogi subtracts 0) except FedAdam's, which decays to 0.99 * 1e-6.
HAND = {
    # optimizer, lr, v of the moving coordinates, v of the resting one, the step lr * 0.1 / (sqrt(v) + tau)
    "adagrad": (FedAdagrad, 0.1, 1.000001, 1e-6, 0.1 * 0.1 / (math.sqrt(1.000001) + 0.001)),
    "adam": (FedAdam, 0.01, 0.01000099, 0.99e-6, 0.01 * 0.1 / (math.sqrt(0.01000099) + 0.001)),
    "yogi": (FedYogi, 0.01, 0.010001, 1e-6, 0.01 * 0.1 / (math.sqrt(0.010001) + 0.001)),
}


@pytest.mark.parametrize("rule", sorted(HAND))
def test_one_step_on_a_quadratic_matches_the_hand_computed_step(rule):
    cls, lr, v1, v_rest, step = HAND[rule]
    opt = cls(lr=lr)  # beta1 0.9, beta2 0.99, tau 1e-3: the defaults
    x0 = t(X0)
    direction = t(A) * x0
    assert direction.tolist() == [1.0, -1.0, 0.0]
    x1, state = opt.step(x0, direction, opt.init(x0))
    torch.testing.assert_close(state["m"], t([-0.1, 0.1, 0.0]), rtol=0, atol=1e-15)
    torch.testing.assert_close(state["v"], t([v1, v1, v_rest]), rtol=1e-12, atol=0)
    # descends the direction: the coordinates with a positive direction go down, and f falls
    torch.testing.assert_close(x1, t([1.0 - step, -2.0 + step, 3.0]), rtol=0, atol=1e-9)
    assert quadratic(x1.tolist()) < quadratic(X0)


def test_the_pinned_numbers_of_the_first_step():
    """The same first steps as decimals, to 9 places (a check on the arithmetic above)."""
    assert HAND["adagrad"][4] == pytest.approx(0.009990005, abs=1e-9)
    assert HAND["adam"][4] == pytest.approx(0.009900505, abs=1e-9)
    assert HAND["yogi"][4] == pytest.approx(0.009900500, abs=1e-9)
    x1, _ = FedYogi().step(t(X0), t([1.0, -1.0, 0.0]), FedYogi().init(t(X0)))
    assert x1.tolist() == pytest.approx([0.990099500, -1.990099500, 3.0], abs=1e-9)


# --- two steps: the state carries over ------------------------------------------------------------


@pytest.mark.parametrize(
    "rule,cls,lr", [("adagrad", FedAdagrad, 0.1), ("adam", FedAdam, 0.01), ("yogi", FedYogi, 0.01)]
)
def test_two_steps_on_the_quadratic_follow_the_paper(rule, cls, lr):
    opt = cls(lr=lr)
    x = t(X0)
    state = opt.init(x)
    directions = []
    for _ in range(2):
        d = t(A) * x  # the pseudo-gradient at the current model
        directions.append(d.tolist())
        x, state = opt.step(x, d, state)
    want_x, want_m, want_v = reference(rule, lr, X0, directions)
    torch.testing.assert_close(x, t(want_x), rtol=0, atol=1e-12)
    torch.testing.assert_close(state["m"], t(want_m), rtol=0, atol=1e-15)
    torch.testing.assert_close(state["v"], t(want_v), rtol=1e-12, atol=0)
    assert set(state) == {"m", "v"}


def test_the_second_moments_differ_as_the_rules_say():
    """After a large update and a much smaller one: Adagrad adds, Adam averages (v falls by
    (1 - b2) (v - Delta^2)), Yogi subtracts only (1 - b2) Delta^2 as v > Delta^2."""
    x = t([0.0])
    big, small = t([1.0]), t([0.01])
    v = {}
    for name, cls in (("adagrad", FedAdagrad), ("adam", FedAdam), ("yogi", FedYogi)):
        opt = cls()
        _, s = opt.step(x, big, opt.init(x))
        _, s = opt.step(x, small, s)
        v[name] = float(s["v"][0])
    assert v["adagrad"] == pytest.approx(1e-6 + 1.0 + 1e-4, rel=1e-12)
    v1_adam = 0.99 * 1e-6 + 0.01
    assert v["adam"] == pytest.approx(0.99 * v1_adam + 0.01 * 1e-4, rel=1e-12)  # 0.0099029801
    v1_yogi = 1e-6 + 0.01  # v0 = 1e-6 < Delta^2 = 1: v grows by 0.01 * 1
    assert v1_yogi > 1e-4  # then v > Delta^2 = 1e-4, so sign(v - Delta^2) = +1
    assert v["yogi"] == pytest.approx(v1_yogi - 0.01 * 1e-4, rel=1e-12)  # 0.010000
    assert v["yogi"] > v["adam"]  # with updates far below sqrt(v), Yogi's v decays more slowly


def test_a_run_of_steps_descends_the_quadratic_and_stays_finite():
    for cls in (FedAdagrad, FedAdam, FedYogi):
        opt = cls(lr=0.1)
        x = t(X0)
        state = opt.init(x)
        for _ in range(100):
            x, state = opt.step(x, t(A) * x, state)
            assert torch.isfinite(x).all() and bool((state["v"] > 0).all())
        assert quadratic(x.tolist()) < 0.5 * quadratic(X0), cls.__name__


def test_weight_decay_adds_to_the_direction():
    x, d = t([2.0, -1.0]), t([0.5, 0.5])
    plain = FedAdam()
    decayed = FedAdam(weight_decay=0.1)
    got, _ = decayed.step(x, d, decayed.init(x))
    want, _ = plain.step(x, d + 0.1 * x, plain.init(x))
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_float32_params_stay_float32_with_a_float64_direction():
    opt = FedYogi()
    x = torch.ones(4, dtype=torch.float32)
    x1, state = opt.step(x, torch.ones(4, dtype=torch.float64), opt.init(x))
    assert x1.dtype == state["m"].dtype == state["v"].dtype == torch.float32


# --- purity and state ----------------------------------------------------------------------------


@pytest.mark.parametrize("cls", [FedAdagrad, FedAdam, FedYogi])
def test_step_and_init_never_mutate_their_inputs(cls):
    opt = cls()
    x = t(X0)
    state = opt.init(x)
    assert x.tolist() == X0  # init reads params only
    assert state["m"].data_ptr() != x.data_ptr() and state["v"].data_ptr() != x.data_ptr()
    d = t(A) * x
    state["m"] += 0.3  # a non-trivial state
    copies = x.clone(), d.clone(), {k: v.clone() for k, v in state.items()}
    x1, s1 = opt.step(x, d, state)
    x2, s2 = opt.step(x, d, state)  # the same inputs give the same answer
    assert torch.equal(x, copies[0]) and torch.equal(d, copies[1])
    assert set(state) == {"m", "v"} and all(torch.equal(state[k], copies[2][k]) for k in state)
    assert torch.equal(x1, x2) and all(torch.equal(s1[k], s2[k]) for k in s1)
    assert s1 is not state and all(s1[k].data_ptr() != state[k].data_ptr() for k in s1)
    assert x1.data_ptr() != x.data_ptr()


def test_state_is_plain_tensors_and_survives_a_checkpoint_round_trip():
    opt = FedYogi()
    x = t(X0)
    _, state = opt.step(x, t(A) * x, opt.init(x))
    buf = io.BytesIO()
    torch.save({"server_opt": state}, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)["server_opt"]
    a, sa = opt.step(x, t(A) * x, state)
    b, sb = opt.step(x, t(A) * x, loaded)
    assert torch.equal(a, b) and all(torch.equal(sa[k], sb[k]) for k in sa)


# --- options -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cls,kwargs,message",
    [
        (FedAdam, {"lr": 0.0}, "FedAdam lr must be > 0, got 0.0"),
        (FedYogi, {"lr": -1}, "FedYogi lr must be > 0"),
        (FedAdagrad, {"beta1": 1.0}, "FedAdagrad beta1 must be in [0, 1), got 1.0"),
        (FedAdam, {"beta1": -0.1}, "beta1 must be in [0, 1)"),
        (FedYogi, {"beta2": 1.0}, "FedYogi beta2 must be in [0, 1), got 1.0"),
        (FedAdam, {"tau": 0.0}, "FedAdam tau must be > 0"),
        (FedAdagrad, {"tau": -1e-3}, "FedAdagrad tau must be > 0"),
        (FedYogi, {"weight_decay": -1e-4}, "FedYogi weight_decay must be >= 0"),
        (FedAdam, {"lr": float("nan")}, "lr must be > 0, got nan"),
        (FedAdam, {"lr": "fast"}, "could not convert string to float"),
    ],
)
def test_bad_options_are_refused_by_name(cls, kwargs, message):
    with pytest.raises(ValueError) as err:
        cls(**kwargs)
    assert message in str(err.value)


def test_defaults_are_the_documented_ones():
    for cls in (FedAdam, FedYogi):
        o = cls()
        assert (o.lr, o.beta1, o.beta2, o.tau, o.weight_decay) == (0.01, 0.9, 0.99, 1e-3, 0.0)
    o = FedAdagrad()
    assert (o.lr, o.beta1, o.tau, o.weight_decay) == (0.1, 0.9, 1e-3, 0.0)
    with pytest.raises(TypeError):
        FedAdagrad(beta2=0.99)  # Adagrad has no second-moment decay


# --- config group --------------------------------------------------------------------------------

WITH_SERVER_OPT = [
    "fedavg", "fedprox", "robust", "floral", "fedau", "avg_participating", "avg_all", "known_prob",
    "fedvarp", "mifa", "fedbuff", "fedasync", "async_fedavg", "fedfix",
]  # fmt: skip


@pytest.mark.parametrize(
    "strategy,want",
    [
        ("fedavg", {"lr": 1.0, "momentum": 0.0, "weight_decay": 0.0}),
        ("fedprox", {"lr": 1.0, "momentum": 0.0, "weight_decay": 0.0}),
        ("floral", {"lr": 1.0, "momentum": 0.0, "weight_decay": 0.0}),
        ("fedau", {"lr": 1.0, "momentum": 0.0, "weight_decay": 0.0}),
        ("robust", {"lr": 0.1, "momentum": 0.0, "weight_decay": 1e-4}),
        ("avg_all", {"lr": 10.0, "momentum": 0.0, "weight_decay": 0.0}),
        ("avg_participating", {"lr": 1.78, "momentum": 0.0, "weight_decay": 0.0}),
        ("fedasync", {"lr": 0.6, "momentum": 0.0, "weight_decay": 0.0}),
    ],
)
def test_existing_strategies_keep_their_server_sgd(strategy, want):
    node = compose(f"strategy={strategy}").strategy.server_opt
    assert dict(node) == {"_target_": "strategies.server_opt.ServerSGD", **want}


@pytest.mark.parametrize("strategy", WITH_SERVER_OPT)
def test_every_strategy_with_a_server_optimizer_takes_fedyogi(strategy):
    cfg = compose(f"strategy={strategy}", "strategy/server_opt=fedyogi")
    assert cfg.hydra.runtime.choices["strategy/server_opt"] == "fedyogi"
    strat = make(cfg.strategy)
    assert isinstance(strat.server_opt, FedYogi) and strat.server_opt.beta2 == 0.99
    state = strat.init(torch.zeros(50), run_facts(20, probs=np.full(20, 0.5)))
    assert set(state["server_opt"]) == {"m", "v"}


def test_a_strategy_s_own_server_lr_stays_on_top_of_the_chosen_optimizer():
    """Values a strategy sets inline (fedasync's alpha, the FedAU baselines' tuned eta_g) are merged
    after the group option, as Hydra does; strategy=robust's SGD is an option of its own instead."""
    assert compose("strategy=fedasync", "strategy/server_opt=fedyogi").strategy.server_opt.lr == 0.6
    assert compose("strategy=avg_all", "strategy/server_opt=fedadam").strategy.server_opt.lr == 10.0
    robust = compose("strategy=robust", "strategy/server_opt=fedyogi").strategy.server_opt
    assert robust.lr == 0.01 and robust.weight_decay == 0.0


@pytest.mark.parametrize("option", ["sgd", "sgd_byzfl", "adam", "fedadam", "fedyogi", "fedadagrad"])
def test_every_server_opt_option_instantiates(option):
    strat = make(compose(f"strategy/server_opt={option}").strategy)
    want = {"sgd": ServerSGD, "sgd_byzfl": ServerSGD, "adam": ServerAdam}.get(option)
    want = want or {"fedadam": FedAdam, "fedyogi": FedYogi, "fedadagrad": FedAdagrad}[option]
    assert type(strat.server_opt) is want
    x = torch.ones(5)
    x1, _ = strat.server_opt.step(x, torch.full((5,), 0.5), strat.server_opt.init(x))
    assert bool((x1 < x).all())  # a positive direction is descended by every option


@pytest.mark.parametrize("name,cls", [("fedadam", FedAdam), ("fedyogi", FedYogi), ("fedadagrad", FedAdagrad)])
def test_new_strategies_are_fedavg_with_the_optimizer(name, cls):
    cfg = compose(f"strategy={name}")
    fedavg = compose("strategy=fedavg")
    assert {k: v for k, v in cfg.strategy.items() if k != "server_opt"} == {
        k: v for k, v in fedavg.strategy.items() if k != "server_opt"
    }
    assert type(make(cfg.strategy).server_opt) is cls
    # the command line still chooses: strategy=fedyogi strategy/server_opt=fedadam gives FedAdam
    assert compose(f"strategy={name}", "strategy/server_opt=fedadam").strategy.server_opt._target_.endswith("FedAdam")


def test_bad_option_values_are_config_errors():
    with pytest.raises(ConfigError, match="FedYogi tau must be > 0"):
        make(compose("strategy=fedyogi", "strategy.server_opt.tau=0").strategy)
    with pytest.raises(ConfigError, match="beta2"):
        make(compose("strategy=fedavg", "strategy/server_opt=fedadam", "strategy.server_opt.beta2=1.5").strategy)


def test_strategies_without_a_server_optimizer_refuse_the_group():
    from hydra.errors import ConfigCompositionException

    for strategy in ("monna", "vrls"):
        with pytest.raises(ConfigCompositionException, match="strategy/server_opt"):
            compose(f"strategy={strategy}", "strategy/server_opt=fedyogi")


# --- the command line ----------------------------------------------------------------------------


def fedsim(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "fedsim", *args], cwd=ROOT, env=env, text=True, capture_output=True, timeout=300
    )


TINY = ["dataset=digits", "num_nodes=6", "nodes_per_round=3", "rounds=3", "cluster=local", "logger=jsonl"]
NEW = {"fedadam": "FedAdam", "fedyogi": "FedYogi", "fedadagrad": "FedAdagrad"}


@pytest.mark.integration
def test_a_tiny_run_of_each_new_strategy(tmp_path):
    """One command, three real runs (a sweep, its jobs one after the other in this process)."""
    run = fedsim("-m", f"strategy={','.join(NEW)}", *TINY, "hydra/launcher=basic", f"hydra.sweep.dir={tmp_path}")
    assert run.returncode == 0, run.stderr
    for name, target in NEW.items():
        records = [
            json.loads(line) for line in (tmp_path / f"strategy={name}" / "metrics.jsonl").read_text().splitlines()
        ]
        start, rounds, end = records[0], [r for r in records if r["event"] == "round"], records[-1]
        assert start["names"]["strategy"] == name and start["names"]["strategy/server_opt"] == name
        assert start["config"]["strategy"]["server_opt"]["_target_"] == f"strategies.server_opt.{target}"
        assert [r["round"] for r in rounds] == [0, 1, 2]
        assert end["event"] == "run_end" and math.isfinite(end["eval/acc"]) and end["eval/acc"] > 0.1


@pytest.mark.integration
def test_a_bad_option_is_one_line_and_exit_code_2(tmp_path):
    run = fedsim("strategy=fedprox", "strategy/server_opt=fedyogi", "strategy.server_opt.tau=0", *TINY,
                 f"hydra.run.dir={tmp_path}")  # fmt: skip
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedsim: error: ") and "FedYogi tau must be > 0" in lines[0]
