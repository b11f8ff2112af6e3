"""``cluster=auto`` (the default): in-process for a run that fits one process, Ray otherwise, with
the same results either way."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from fedsim.errors import ConfigError
from fedsim.execution.auto import Estimate, estimate
from fedsim.execution.local import LocalExecutor
from fedsim.execution.ray_executor import RayExecutor
from fedsim.simulation import build, set_driver_threads
from tests.conftest import compose

SMALL = ["num_nodes=12", "nodes_per_round=6", "rounds=3", "eval_every=0", "partition.alpha=0.3", "seed=7"]
LONGER = [*SMALL, "strategy.client.epochs=5"]  # enough training that Ray saves more than its per-round cost


def run(*overrides: str):
    set_driver_threads(1)
    sim = build(compose(*overrides))
    try:
        state, _ = sim.run()
        return state.params, sim.executor
    finally:
        sim.close()


def test_the_default_is_auto_and_runs_the_default_digits_run_in_process():
    cfg = compose()
    assert cfg.cluster._target_ == "fedsim.execution.auto.AutoExecutor"
    sim = build(cfg)
    try:
        assert isinstance(sim.executor, LocalExecutor)
        text = sim.executor.description
        assert "cluster=auto" in text and "less than its" in text and "cluster.ray_startup_s=15" in text
    finally:
        sim.close()


def test_the_estimate_grows_with_rounds_nodes_and_the_model():
    small = build(compose(*SMALL, "cluster=local"))
    big = build(compose(*SMALL, "cluster=local", "model=lenet"))
    try:
        base = estimate(small.executor.spec, small.data, rounds=10, nodes_per_round=6)
        assert estimate(small.executor.spec, small.data, rounds=20, nodes_per_round=6).seconds == pytest.approx(
            2 * base.seconds
        )
        assert estimate(small.executor.spec, small.data, rounds=10, nodes_per_round=12).seconds > base.seconds
        conv = estimate(big.executor.spec, big.data, rounds=10, nodes_per_round=6)
        params = big.executor.worker.model.dim
        assert conv.forward_flops > 3 * params  # a convolution's weights count once per position
        assert conv.seconds > base.seconds
    finally:
        small.close()
        big.close()


def test_estimating_leaves_the_torch_rng_alone():
    sim = build(compose(*SMALL, "cluster=local"))
    try:
        torch.manual_seed(5)
        before = torch.random.get_rng_state()
        estimate(sim.executor.spec, sim.data, rounds=3, nodes_per_round=6)
        assert torch.equal(before, torch.random.get_rng_state())
    finally:
        sim.close()


def test_ray_only_when_it_saves_more_than_it_costs():
    guess = Estimate(seconds=100.0, forward_flops=1, examples_per_round=1.0, rounds=10)
    assert guess.ray_pays(2, 15.0)[0]  # saves 50 s, costs 15.2 s
    assert not guess.ray_pays(1, 0.0)[0]  # one CPU saves nothing
    assert not guess.ray_pays(4, 80.0)[0]  # saves 75 s, costs 80.2 s
    assert not Estimate(seconds=1.0, forward_flops=1, examples_per_round=1.0, rounds=1000).ray_pays(64, 0.0)[0]


def test_a_negative_start_up_cost_is_refused():
    with pytest.raises(ConfigError, match="ray_startup_s=-1 must be >= 0"):
        build(compose(*SMALL, "cluster=auto", "cluster.ray_startup_s=-1"))


def test_auto_uses_ray_when_it_pays_or_with_an_address_and_is_bit_identical(ray_cluster):
    local, _ = run(*LONGER, "cluster=local")
    in_process, ex = run(*LONGER)
    assert isinstance(ex, LocalExecutor)
    on_ray, ex = run(*LONGER, "cluster.ray_startup_s=0", "cluster.num_cpus=2", "cluster.num_actors=2")
    assert isinstance(ex, RayExecutor) and "more than its" in ex.description
    joined, ex = run(*LONGER, f"cluster.address={ray_cluster.address}", "cluster.num_actors=3")
    assert isinstance(ex, RayExecutor) and f"cluster.address={ray_cluster.address}" in ex.description
    assert len(set(ex.worker_nodes())) == 2
    for other in (in_process, on_ray, joined):
        assert torch.equal(local, other)


def _count(into: list[int], module: torch.nn.Module, _inputs: object, out: object) -> None:
    from fedsim.execution.auto import _layer_flops

    into.append(_layer_flops(module, out))


def test_the_layer_count_agrees_with_torchs_flop_counter():
    """The hooks count what torch's FlopCounterMode counts (matmuls and convolutions), without
    its first-use cost; an LSTM counts every weight once per time step."""
    from torch.utils.flop_counter import FlopCounterMode

    for model, x in (
        (torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU()), torch.zeros(1, 1, 8, 8)),
        (torch.nn.Conv2d(3, 8, 3, padding=1, groups=1), torch.zeros(1, 3, 16, 16)),
        (torch.nn.Conv2d(8, 8, 3, groups=4), torch.zeros(1, 8, 10, 10)),
        (torch.nn.LSTM(16, 32, batch_first=True), torch.zeros(1, 20, 16)),
    ):
        counted: list[int] = []
        hook = partial(_count, counted)
        handles = [m.register_forward_hook(hook) for m in model.modules()]
        with torch.no_grad():
            model(x)
        for h in handles:
            h.remove()
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(x)
        if isinstance(model, torch.nn.LSTM):  # torch's counter does not see the fused LSTM kernel
            assert sum(counted) == 2 * (4 * 32 * 16 + 4 * 32 * 32) * 20
        else:
            assert sum(counted) == counter.get_total_flops()
