"""The synchronous loop on the local executor: evaluation schedule, state, metrics, failures."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from fedsim.errors import FedsimError
from fedsim.execution.local import LocalExecutor
from fedsim.simulation import build, set_driver_threads
from strategies.client import LocalSGD
from tests.conftest import Recorder, compose

BASE = ["cluster=local", "num_nodes=6", "nodes_per_round=3", "rounds=4"]


def test_eval_schedule_comm_accounting_and_sampling():
    set_driver_threads(1)
    sim = build(compose(*BASE, "eval_every=3"))
    rec = Recorder()
    state, summary = sim.run([rec])
    assert [("eval/acc" in m) for m in rec.rounds] == [False, False, True, True]  # every 3rd and the last
    d = sim.num_params
    assert all(m["comm/bytes_down"] == 3 * 4 * d and m["comm/bytes_up"] == 3 * 4 * d for m in rec.rounds)
    assert rec.rounds[-1]["comm/bytes_up_total"] == 4 * 3 * 4 * d == summary["comm/bytes_up_total"]
    assert state.round == 4 and state.version == 4 and summary["eval/acc"] == rec.rounds[-1]["eval/acc"]
    assert all(m["train/samples"] > 0 for m in rec.rounds)


class Diverging(LocalSGD):
    def __call__(self, model, start, data, state, ctx):
        res = super().__call__(model, start, data, state, ctx)
        res.message = res.message * 1e38 * 1e38 if ctx.round == 1 else res.message
        return res


def test_a_non_finite_update_is_reported_with_its_node():
    sim = build(compose(*BASE))
    sim.strategy.client = Diverging()
    sim.executor = LocalExecutor(replace(sim.executor.spec, client_update=sim.strategy.client), sim.data)
    with pytest.raises(FedsimError, match="round 1: update contains NaN or Inf"):
        sim.run()


def test_state_is_a_plain_dump():
    sim = build(compose(*BASE, "strategy.server_opt.momentum=0.9"))
    state, _ = sim.run()
    dump = state.as_dict()
    assert dump["round"] == 4 and torch.equal(dump["params"], state.params)
    assert dump["strategy_state"]["server_opt"]["velocity"].shape == state.params.shape
