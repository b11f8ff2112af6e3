"""Naturally federated data end to end: Shakespeare (generated plays) with LEAF's LSTM, LEAF's
JSON layout and .npz files through `fedsim.simulation.build` and the command line, every kind of
strategy, server, attack and uplink on the LSTM, and bit-identical runs across executors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from fedsim.data import shakespeare as shk
from fedsim.errors import ConfigError
from fedsim.simulation import build, set_driver_threads
from tests.conftest import ROOT, compose
from tests.data.natural_fixtures import write_leaf, write_npz, write_plays

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("natural")
    roles = shk.build_roles(shk.read_plays(write_plays(base / "plays")))
    shk.write_cache(roles, shk.cache_path(str(base / "data")), source="generated plays")
    write_leaf(base / "femnist")
    write_npz(base / "mine.npz", nodes=6, per_node=40)
    return base


def shakespeare(root, *extra: str) -> list[str]:
    """4 roles (generated plays), windows of 8, a small LSTM; node count of the natural partition."""
    return [
        "dataset=shakespeare",
        f"dataset.root={root / 'data'}",
        "dataset.seq_len=8",
        "partition=natural",
        "partition.train_fraction=0.6",
        "model=lstm",
        "model.hidden=12",
        "num_nodes=4",
        "nodes_per_round=4",
        "rounds=2",
        "eval_every=1",
        "strategy.client.lr=0.8",
        "strategy.client.batch_size=10",
        "seed=3",
        *extra,
    ]


def cli(*args: str, cwd=ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "fedsim", *args], cwd=cwd, env=env, text=True, capture_output=True, timeout=300
    )


def one_line(run: subprocess.CompletedProcess, needle: str) -> None:
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2 and len(lines) == 1, run.stderr
    assert lines[0].startswith("fedsim: error: ") and needle in lines[0], run.stderr


def test_missing_cache_and_bad_files_are_one_line(tmp_path):
    one_line(cli(*shakespeare(tmp_path), "cluster=local", f"hydra.run.dir={tmp_path / 'a'}"), shk.BUILD_COMMAND)
    np.savez(tmp_path / "bad.npz", x=np.zeros((4, 2)), y=np.zeros(4, dtype=np.int64))
    args = ["dataset=files", f"dataset.path={tmp_path / 'bad.npz'}", "partition=natural", "cluster=local"]
    one_line(cli(*args, f"hydra.run.dir={tmp_path / 'b'}"), "no array node")
    needle = "use partition=dirichlet"
    one_line(cli("partition=natural", "cluster=local", f"hydra.run.dir={tmp_path / 'c'}"), needle)


def test_own_npz_runs_from_the_command_line_with_node_metrics(roots, tmp_path):
    args = ["dataset=files", f"dataset.path={roots / 'mine.npz'}", "partition=natural", "model=logreg", "rounds=5"]
    run = cli(*args, "nodes_per_round=3", "cluster=local", f"hydra.run.dir={tmp_path / 'n'}")
    one_line(run, "set num_nodes=6")  # the node count is named
    run = cli(
        *args,
        "num_nodes=6",
        "nodes_per_round=3",
        "strategy.client.lr=0.5",
        "strategy.client.epochs=5",
        "logger=jsonl",
        "cluster=local",
        f"hydra.run.dir={tmp_path}",
    )
    assert run.returncode == 0, run.stderr
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if r.get("event") == "round" and "eval/node_acc" in r][-1]
    assert (
        len(last["eval/node_acc"]) == 6
        and last["eval/node_acc_min"] <= last["eval/node_acc_mean"] <= last["eval/node_acc_max"]
    )
    assert last["eval/acc"] > 0.5  # the labels follow the features: logistic regression learns them


def test_the_lstm_trains_one_node_at_a_time_and_run_start_says_so(roots):
    sim = build(compose(*shakespeare(roots, "cluster=local", "cluster.vectorize=true")))
    try:
        assert sim.info()["vectorize"].startswith("one node at a time (StackedLSTM")
        assert not sim.executor.spec.blocked
        state, _ = sim.run()
        assert torch.isfinite(state.params).all()
    finally:
        sim.close()


def test_natural_split_reaches_the_run(roots):
    sim = build(compose(*shakespeare(roots, "cluster=local")))
    try:
        ds = sim.data.dataset
        assert sim.facts.num_nodes == 4 and len(ds.node_names) == 4
        for k in range(4):  # each node's rows are its role's windows, test after train and the gap
            tr, te = sim.data.partition.train[k], sim.data.partition.test[k]
            assert len(tr) > 0 and np.all(ds.train_nodes[tr] == k) and np.all(ds.test_nodes[te] == k)
        assert len(ds.y_test) == sum(len(ix) for ix in sim.data.partition.test)
    finally:
        sim.close()


def final(*overrides: str) -> tuple[torch.Tensor, dict]:
    set_driver_threads(1)
    sim = build(compose(*overrides))
    try:
        state, summary = sim.run()
        return state.params, summary
    finally:
        sim.close()


def test_lstm_is_bit_identical_across_executors(roots, ray_cluster):
    local, _ = final(*shakespeare(roots, "cluster=local"))
    two, _ = final(*shakespeare(roots, "cluster=ray", f"cluster.address={ray_cluster.address}", "cluster.num_actors=2"))
    assert torch.isfinite(local).all() and torch.equal(local, two)


CELLS = {
    "fedavg": [],
    "fedprox": ["strategy=fedprox"],
    "cluster.vectorize": ["cluster.vectorize=true"],
    "robust median + alie": ["strategy=robust", "strategy/aggregator=median", "attack=alie", "byzantine.num=1"],
    "label_flip": ["attack=label_flip", "byzantine.num=1"],
    "top_k + ef14": ["compressor=top_k", "compressor.ratio=0.1", "feedback=ef14"],
    "qsgd": ["compressor=qsgd"],
    "fedau bernoulli": ["strategy=fedau", "participation=bernoulli", "participation.p=0.5"],
    "fedbuff async": ["strategy=fedbuff", "server=async"],
    "monna p2p": ["strategy=monna", "server=p2p"],
    "vrls": ["strategy=vrls", "strategy.predictor_rounds=1", "strategy.calibration_rounds=1", "model.hidden=32"],
    "floral": ["strategy=floral"],
}


@pytest.mark.parametrize("cell", list(CELLS), ids=list(CELLS))
def test_lstm_runs_with_every_kind_of_strategy_server_attack_and_uplink(roots, cell):
    try:
        params, _ = final(*shakespeare(roots, "cluster=local", "eval_every=0", *CELLS[cell]))
    except ConfigError as exc:  # a combination without meaning is refused in one line
        assert "\n" not in str(exc) and str(exc)
        pytest.skip(f"refused: {exc}")
    assert torch.isfinite(params).all()


def test_femnist_layout_runs(roots):
    params, summary = final(
        "dataset=femnist",
        f"dataset.path={roots / 'femnist'}",
        "partition=natural",
        "model=femnist_cnn",
        "num_nodes=3",
        "nodes_per_round=3",
        "rounds=1",
        "cluster=local",
        "strategy.client.batch_size=4",
    )
    assert torch.isfinite(params).all() and math.isfinite(float(summary.get("eval/acc", 0.0)))
