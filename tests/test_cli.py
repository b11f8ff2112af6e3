"""The command line as a user runs it: a real subprocess, a real Ray cluster, real W&B offline."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.integration


def fedsim(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_SILENT": "true"}
    return subprocess.run(
        [sys.executable, "-m", "fedsim", *args], cwd=ROOT, env=env, text=True, capture_output=True, timeout=timeout
    )


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_end_to_end_digits_on_the_ray_cluster(ray_cluster, tmp_path):
    run = fedsim(
        "dataset=digits",
        "num_nodes=20",
        "nodes_per_round=10",
        "rounds=5",
        "strategy.client.epochs=5",
        "cluster=ray",
        f"cluster.address={ray_cluster.address}",
        "cluster.num_actors=2",
        "logger=jsonl",
        f"hydra.run.dir={tmp_path}",
    )
    assert run.returncode == 0, run.stderr
    records = read_jsonl(tmp_path / "metrics.jsonl")
    start, rounds, end = records[0], records[1:-1], records[-1]
    assert start["event"] == "run_start" and start["info"]["executor"].startswith("ray (2 actors")
    assert start["names"]["strategy"] == "fedavg" and start["config"]["num_nodes"] == 20
    assert [r["round"] for r in rounds] == [0, 1, 2, 3, 4]
    for r in rounds:
        for key in (
            "eval/acc",
            "eval/loss",
            "eval/node_acc_min",
            "eval/node_acc_mean",
            "eval/node_acc_max",
            "train/loss",
            "comm/bytes_up",
            "comm/bytes_down",
            "time/elapsed_s",
        ):
            assert key in r, key
        assert r["eval/node_acc_min"] <= r["eval/node_acc_mean"] <= r["eval/node_acc_max"]
        assert len(r["eval/node_acc"]) <= 20
        assert r["comm/bytes_up"] == 10 * 4 * start["info"]["num_params"]
    assert end["event"] == "run_end" and end["eval/acc"] > 0.5  # chance is 0.1
    assert rounds[-1]["train/loss"] < rounds[0]["train/loss"]


def test_default_run_shows_progress(tmp_path):
    run = fedsim("rounds=3", "cluster=local", f"hydra.run.dir={tmp_path}")
    assert run.returncode == 0, run.stderr
    assert "round" in run.stderr and "acc=" in run.stderr and "fedsim: done, 3 rounds" in run.stderr


@pytest.mark.parametrize(
    "args,needle",
    [
        (["strategy=nope"], "Could not find 'strategy/nope'; available: async_fedavg, avg_all"),
        (
            ["strategy=fedau", "attack=optimal_alie", "byzantine.num=2"],
            "attack=optimal_alie line-searches its strength against the aggregation, which strategy=fedau does not",
        ),
        (["compressor=top_k", "compressor.ratio=2"], "compressor.ratio=2"),
        (["participation=markov", "participation.transition=0"], "participation.transition=0"),
        (["strategy=known_prob", "participation=uniform", "strategy.weighting=bogus"], "strategy.weighting='bogus'"),
        (["nosuchkey=1"], "there is no option 'nosuchkey'"),
        (["num_nodes=-3"], "num_nodes=-3 must be >= 1"),
        (["nodes_per_round=50", "num_nodes=10"], "nodes_per_round=50 exceeds num_nodes=10"),
        (["dataset=cifar10", "dataset.root=/nonexistent/fedsim", "dataset.download=false"], "/nonexistent/fedsim"),
        (["model=cnn"], "too small"),
        (["strategy.client.lr=0"], "client lr=0 must be > 0"),
        (["partition=vrls_5clients", "num_nodes=7"], "set num_nodes=5"),
        (["byzantine.num=30"], "byzantine.num=30 exceeds num_nodes=20"),
        (["attack=sign_flip"], "needs faulty nodes; set byzantine.num >= 1"),
        (["strategy=robust", "attack=alie", "byzantine.num=5"], "trimmed_mean needs 2f < n, but f=5 and n=10"),
        (["strategy=robust", "strategy.preaggregators=[nmm]"], "unknown pre-aggregator 'nmm'"),
        (["strategy=monna"], "add server=p2p"),
        (["strategy=fedbuff"], "add server=async"),
        (["server=async", "latency=linear", "latency.spread=120"], "latency.spread=120"),
        (["attack=inf"], "attack=inf: Hydra reads 'inf' as a number, not an option name; attack options: alie"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(args, needle, tmp_path):
    run = fedsim(*args, "cluster=local", f"hydra.run.dir={tmp_path}")
    assert run.returncode == 2
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedsim: error: ") and needle in lines[0], run.stderr
    assert "Traceback" not in run.stdout + run.stderr


def test_issue_example_robust_run_logs_attack_metrics(tmp_path):
    run = fedsim(
        "strategy=robust",
        "strategy/aggregator=trimmed_mean",
        "strategy.preaggregators=[nnm]",
        "attack=alie",
        "byzantine.num=3",
        "rounds=4",
        "cluster=local",
        "logger=jsonl",
        f"hydra.run.dir={tmp_path}",
    )
    assert run.returncode == 0, run.stderr
    records = read_jsonl(tmp_path / "metrics.jsonl")
    rounds = records[1:-1]
    assert len(rounds) == 4 and len(records[0]["info"]["byzantine_ids"]) == 3
    assert all(r["attack/byzantine_rows"] == r["attack/byzantine_sampled"] for r in rounds)
    assert sum(r["attack/byzantine_rows"] for r in rounds) > 0


def test_bad_value_inside_a_multirun_job_exits_2(tmp_path):
    run = fedsim("-m", "nodes_per_round=30", "cluster=local", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert run.returncode == 2 and "nodes_per_round=30 exceeds num_nodes=20" in run.stderr
    assert "Traceback" not in run.stderr and len(run.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "sweep").exists()  # nothing ran, nothing left


def test_multirun_sweeps_strategies_and_seeds(tmp_path):
    run = fedsim("-m", "seed=0,1", "rounds=2", "cluster=local", "logger=jsonl", f"hydra.sweep.dir={tmp_path}")
    assert run.returncode == 0, run.stderr
    finals = [read_jsonl(tmp_path / d / "metrics.jsonl")[-1] for d in ("seed=0", "seed=1")]
    assert finals[0]["eval/loss"] != finals[1]["eval/loss"]


def wandb_records(path: Path):
    """Records of a W&B offline run file (LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw, pos, buf, block = path.read_bytes(), 7, b"", 32768
    assert raw[:4] == b":W&B"
    while pos + 7 <= len(raw):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        pos += 7
        if kind == 0 and length == 0:
            break
        buf += raw[pos : pos + length]
        pos += length
        if kind in (1, 4):  # full or last fragment
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            yield rec


def test_wandb_offline_run_is_written_with_names_for_comparison(tmp_path):
    run = fedsim("rounds=3", "cluster=local", "logger=wandb", f"hydra.run.dir={tmp_path}", timeout=600)
    assert run.returncode == 0, run.stderr
    files = list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    records = list(wandb_records(files[0]))
    (meta,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert meta.display_name == "fedavg-digits-s0" and meta.run_group == "digits-dirichlet-mlp"
    assert "strategy:fedavg" in meta.tags
    logged = set()
    for r in records:
        if r.WhichOneof("record_type") == "history":
            logged |= {i.key or "/".join(i.nested_key) for i in r.history.item}
    assert {"round", "eval/acc", "train/loss", "comm/bytes_up"} <= logged


def test_vrls_headline_command_on_cifar10_files(tmp_path):
    """`python -m fedsim strategy=vrls dataset=cifar10` runs every phase (on small files in the
    standard CIFAR-10 layout with every class present; the real set needs the network here)."""
    import pickle

    import numpy as np

    folder = tmp_path / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        entry = {"data": rng.integers(0, 256, (40, 3072), dtype=np.uint8), "labels": [i % 10 for i in range(40)]}
        with open(folder / name, "wb") as fh:
            pickle.dump(entry, fh)
    run = fedsim(
        "strategy=vrls",
        "dataset=cifar10",
        f"dataset.root={tmp_path / 'data'}",
        "dataset.download=false",
        "strategy.predictor_rounds=3",
        "strategy.calibration_rounds=2",
        "rounds=2",
        "cluster=local",
        "logger=jsonl",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    assert run.returncode == 0, run.stderr
    records = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    rounds = [r for r in records[1:-1] if r["event"] == "round"]
    assert [r["vrls/phase"] for r in rounds] == [0, 0, 0, 1, 1, 2, 3, 3]
    assert records[0]["config"]["num_nodes"] == 20 and records[-1]["rounds"] == 8
    assert "eval/node_acc_mean" in records[-1] and "vrls/ratio_mse_mean" in rounds[6]


def test_runs_and_sweeps_from_outside_the_checkout(tmp_path):
    """As an installed user runs it: another working folder and no PYTHONPATH, so Hydra's plugin
    scan alone would not see the checkout's hydra_plugins under setuptools' default editable
    install; the default sweeper and launcher must be there anyway."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["WANDB_SILENT"] = "true"
    base = [sys.executable, "-m", "fedsim"]
    common = ["rounds=1", "cluster=local", "logger=jsonl"]

    def outside(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*base, *args], cwd=tmp_path, env=env, text=True, capture_output=True, timeout=300)

    plain = outside(*common, f"hydra.run.dir={tmp_path / 'run'}")
    assert plain.returncode == 0, plain.stderr
    assert read_jsonl(tmp_path / "run" / "metrics.jsonl")[-1]["event"] == "run_end"
    sweep = outside("-m", *common, "seed=0,1", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert sweep.returncode == 0, sweep.stderr
    assert "2 of 2 jobs done" in sweep.stderr


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["seed=0,1", "cluster=local", "cluster.num_cpus=2"], "there is no option 'cluster.num_cpus'"),
        (["seed=0,1", "model=nope"], "Could not find 'model/nope'"),
        (["experiment=fedau_fmnist", "seed=0", "variant=nope"], "no variant nope in this sweep"),
        # a key of some options of a swept group: Hydra sets it before the group is picked
        (["strategy=fedau,mifa", "strategy.log_weights_every=4"], "write ++strategy.log_weights_every=4"),
        # the same bad value in every job: its reason once, with how many jobs it concerns
        (["dataset=digits", "seed=0,1,2", "num_nodes=-1"], "num_nodes=-1 must be >= 1 (all 3 jobs)"),
        # a value of the wrong kind, checked as a single run checks it (bool("maybe") would be True)
        (["seed=0,1", "cluster.retain_memory=maybe"], "cluster.retain_memory='maybe' must be true or false"),
        (["strategy=fedprox,fedavg", "strategy.client.lr=abc"], "strategy.client.lr='abc' must be a number"),
        # two jobs, one folder name: they would write into the same folder at once
        (["seed=0,1", "+tag=a/b,a_b"], "the jobs seed=0 +tag=a/b and seed=0 +tag=a_b would share the folder"),
        # no Ray node can hold a job: it would wait forever
        (
            ["dataset=digits", "seed=0,1", "cluster.num_cpus=1", "hydra.launcher.cpus_per_job=2"],
            "cpus_per_job=2 CPUs, but the largest Ray node has 1, so no job could start; lower",
        ),
    ],
)
def test_a_sweep_that_cannot_compose_is_one_line_and_exit_code_2(args, needle, tmp_path):
    run = fedsim("-m", *args, "rounds=1", f"hydra.sweep.dir={tmp_path / 'sweep'}")
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedsim: error:") and needle in lines[0], run.stderr
    assert not (tmp_path / "sweep").exists()
