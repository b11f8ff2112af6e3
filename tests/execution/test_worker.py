"""The node worker and both executors, on real data (digits) and a real Ray cluster."""

from __future__ import annotations

import pytest
import torch

from fedsim.data.base import FederatedData
from fedsim.data.partition import Dirichlet
from fedsim.data.sources import load_digits
from fedsim.errors import NodeError
from fedsim.execution.local import LocalExecutor
from fedsim.execution.ray_executor import RayExecutor
from fedsim.execution.worker import NodeTask, RoundResult, WorkerSpec, assign_lpt
from fedsim.models import MLP, build_model
from fedsim.params import FlatModel
from fedsim.seeding import np_rng
from strategies.client import LocalSGD


@pytest.fixture(scope="module")
def digits_fed():
    ds = load_digits()
    return FederatedData(ds, Dirichlet(alpha=1.0)(ds.y_train, ds.y_test, 8, np_rng(0, "partition")))


def spec_for(update, seed=0) -> WorkerSpec:
    return WorkerSpec(MLP, (1, 8, 8), 10, update, seed)


def start_params() -> torch.Tensor:
    return FlatModel(build_model(MLP, (1, 8, 8), 10, seed=0)).vector()


def test_lpt_balances_and_covers_every_task():
    tasks = [NodeTask(i) for i in range(10)]
    work = [50, 10, 40, 30, 20, 60, 5, 5, 25, 15]
    plan = assign_lpt(tasks, work, 3)
    ids = sorted(t.node_id for part in plan for t in part)
    assert ids == list(range(10))
    loads = [sum(work[t.node_id] for t in part) for part in plan]
    assert max(loads) - min(loads) <= max(work) and max(loads) <= sum(work) / 3 + 10
    assert all(part == sorted(part, key=lambda t: t.node_id) for part in plan)


def test_merge_sorts_rows_by_node_id():
    a = RoundResult([4, 1], torch.tensor([[4.0], [1.0]]), [4, 1], [{}, {}], [None, None])
    b = RoundResult([2], torch.tensor([[2.0]]), [2], [{}], [None])
    merged = RoundResult.merge([a, b])
    assert merged.node_ids == [1, 2, 4] and merged.messages[:, 0].tolist() == [1.0, 2.0, 4.0]


def test_local_executor_runs_nodes_in_node_order(digits_fed):
    ex = LocalExecutor(spec_for(LocalSGD(lr=0.1)), digits_fed)
    res = ex.run_round(start_params(), 0, [NodeTask(5), NodeTask(2)])
    assert res.node_ids == [2, 5]
    sizes = digits_fed.partition.sizes()
    assert res.num_examples == [int(sizes[2]), int(sizes[5])]
    assert res.messages.shape == (2, start_params().numel()) and res.messages.abs().sum() > 0


class FailOnNode3(LocalSGD):
    def __call__(self, model, start, data, state, ctx):
        if ctx.node_id == 3:
            raise RuntimeError("boom")
        return super().__call__(model, start, data, state, ctx)


def test_a_failing_node_is_reported_by_id_locally(digits_fed):
    ex = LocalExecutor(spec_for(FailOnNode3()), digits_fed)
    with pytest.raises(NodeError, match="node 3 failed in round 2: RuntimeError: boom"):
        ex.run_round(start_params(), 2, [NodeTask(1), NodeTask(3)])


@pytest.mark.integration
def test_a_failing_node_is_reported_by_id_through_ray(ray_cluster, digits_fed):
    class FailOnNode6(LocalSGD):  # defined here so Ray ships it by value
        def __call__(self, model, start, data, state, ctx):
            if ctx.node_id == 6:
                raise ValueError("bad data")
            return super().__call__(model, start, data, state, ctx)

    ex = RayExecutor(spec_for(FailOnNode6()), digits_fed, num_actors=2)
    try:
        ok = ex.run_round(start_params(), 0, [NodeTask(0), NodeTask(1), NodeTask(2)])
        assert ok.node_ids == [0, 1, 2]
        with pytest.raises(NodeError) as err:
            ex.run_round(start_params(), 1, [NodeTask(0), NodeTask(6), NodeTask(7)])
        assert err.value.node_id == 6 and "ValueError: bad data" in str(err.value)
    finally:
        ex.shutdown()


@pytest.mark.integration
def test_per_node_state_travels_with_the_task(ray_cluster, digits_fed):
    class CountingSGD(LocalSGD):
        def __call__(self, model, start, data, state, ctx):
            res = super().__call__(model, start, data, state, ctx)
            res.state = {"calls": (state or {}).get("calls", 0) + 1, "last_round": ctx.round}
            return res

    ex = RayExecutor(spec_for(CountingSGD()), digits_fed, num_actors=2)
    try:
        states: dict[int, dict] = {}
        for r in range(3):
            res = ex.run_round(start_params(), r, [NodeTask(i, states.get(i)) for i in (0, 1, 2, 3)])
            states.update(dict(zip(res.node_ids, res.states)))
        assert all(states[i] == {"client": {"calls": 3, "last_round": 2}} for i in range(4))
    finally:
        ex.shutdown()
