"""Devices in the engine: whole runs follow the device of their inputs, the device options
fail in one line, and (where a GPU exists) runs on it are deterministic, agree with the CPU to
float tolerance, and resume across devices.

The "follows its inputs" check needs no GPU: inside ``with torch.device("meta")`` a tensor
created without an explicit device is a meta tensor, and mixing it with CPU tensors raises (or
gives garbage). A run built normally and then run in that context must give the very bits of a
normal run; a constructor that forgot its device breaks that, and would put a tensor on the CPU
beside a GPU run's tensors."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from fedsim.checkpoint import params_sha256
from fedsim.errors import ConfigError
from fedsim.simulation import build, set_driver_threads
from tests.conftest import ROOT, compose

BASE = ("dataset=digits", "cluster=local", "rounds=2", "logger=console", "num_nodes=12", "nodes_per_round=6")

CASES = {
    "fedavg": [],
    "fedavg_vectorised": ["cluster.vectorize=true"],
    "momentum_vectorised": ["cluster.vectorize=true", "strategy.client.momentum=0.9"],
    "fedprox": ["strategy=fedprox", "strategy.client.mu=0.1"],
    "summed": ["num_nodes=100", "nodes_per_round=80"],
    "summed_vectorised": ["num_nodes=100", "nodes_per_round=80", "cluster.vectorize=true"],
    "scaffold_vectorised": ["strategy=scaffold", "cluster.vectorize=true"],
    "feddyn": ["strategy=feddyn"],
    "fednova": ["strategy=fednova"],
    "fedadam": ["strategy=fedadam"],
    "robust_alie": ["strategy=robust", "byzantine.num=2", "attack=alie", "strategy/aggregator=trimmed_mean"],
    "robust_vectorised": ["strategy=robust", "cluster.vectorize=true"],
    "top_k_ef21": ["compressor=top_k", "feedback=ef21"],
    "fedbuff": ["server=async", "strategy=fedbuff"],
    "fedau": ["strategy=fedau", "participation=bernoulli"],
    "monna_p2p": ["strategy=monna", "server=p2p", "byzantine.num=1", "attack=sign_flip", "nodes_per_round=12"],
    "vrls": [
        "strategy=vrls",
        "partition=vrls_5clients",
        "num_nodes=5",
        "nodes_per_round=5",
        "strategy.predictor_rounds=2",
        "strategy.calibration_rounds=1",
    ],
}


def final_params(overrides, *, meta: bool = False) -> str:
    set_driver_threads(1)
    sim = build(compose(*BASE, *overrides))
    try:
        if meta:
            with torch.device("meta"):
                state = sim.run()[0]
        else:
            state = sim.run()[0]
    finally:
        sim.close()
    assert state.params.device.type == "cpu"
    return params_sha256(state.params)


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_run_creates_no_tensor_off_its_inputs_device(case):
    overrides = CASES[case]
    assert final_params(overrides, meta=True) == final_params(overrides)


def test_device_options_fail_in_one_line():
    with pytest.raises(ConfigError, match="cluster.device=tpu"):
        build(compose(*BASE, "cluster.device=tpu"))
    with pytest.raises(ConfigError, match="server.device=gpu"):
        build(compose(*BASE, "server.device=gpu"))
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"cluster.device=cuda, but this machine's torch sees no GPU"):
            build(compose(*BASE, "cluster.device=cuda"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_a_gpu_is_one_line_and_exit_2(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "fedsim", "cluster=local", "cluster.device=cuda", f"hydra.run.dir={tmp_path / 'r'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "sees no GPU" in lines[0] and "cluster.device=cpu" in lines[0], out.stderr


def test_ray_device_choice_follows_the_clusters_gpus():
    from fedsim.execution.ray_executor import RayExecutor

    assert RayExecutor.gpu_choice("auto", 0) is False
    assert RayExecutor.gpu_choice("auto", 2) is True
    assert RayExecutor.gpu_choice("cpu", 2) is False
    assert RayExecutor.gpu_choice("cuda", 0.5) is True
    with pytest.raises(ConfigError, match="has no GPUs"):
        RayExecutor.gpu_choice("cuda", 0)
    with pytest.raises(ConfigError, match="Ray gives each actor its GPU"):
        RayExecutor.gpu_choice("cuda:1", 2)


def test_broadcast_bytes_counts_a_tensor_where_it_is():
    """A GPU broadcast is counted without a copy to the host (a meta tensor has no data)."""
    from fedsim.server.pipeline import broadcast_bytes

    assert broadcast_bytes({"c": torch.zeros(5, device="meta"), "n": 3, "none": None}) == 24
    assert broadcast_bytes({"c": torch.zeros(2, 3)}) == 24


def test_a_checkpoint_from_another_device_resumes_here_and_says_so(tmp_path):
    """A checkpoint whose run was on a GPU (its device field) resumes on this machine's CPU
    with server.device changed, says in one line that bits differ across devices, and ends
    with the same model as a run that never stopped (the state was on the CPU all along)."""
    import torch as _torch

    from fedsim import checkpoint

    run = tmp_path / "r"
    cli = [sys.executable, "-m", "fedsim", "cluster=local", "dataset=digits", "logger=jsonl", f"hydra.run.dir={run}"]
    first = subprocess.run(
        [*cli, "rounds=2", "checkpoint.every=1", "server.device=cpu"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert first.returncode == 0, first.stderr
    path = checkpoint.all_checkpoints(run)[-1][1]
    payload = _torch.load(path, map_location="cpu", weights_only=False)
    payload["device"] = "nodes on cuda (NVIDIA H200), server on cuda (NVIDIA H200)"
    checkpoint.write_atomic(path, payload)
    second = subprocess.run(
        [*cli, "rounds=3", "checkpoint.every=1", "server.device=auto", "resume=true"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert second.returncode == 0, second.stderr
    said = [line for line in second.stderr.splitlines() if "not bit for bit" in line]
    assert len(said) == 1 and "NVIDIA H200" in said[0] and "nodes on cpu, server on cpu" in said[0]
    straight = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedsim",
            "cluster=local",
            "dataset=digits",
            "logger=jsonl",
            "rounds=3",
            f"hydra.run.dir={tmp_path / 's'}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert straight.returncode == 0, straight.stderr
    from fedsim.results import load_run

    assert load_run(run).summary["params_sha256"] == load_run(tmp_path / "s").summary["params_sha256"]


def test_evaluator_node_accuracies_equal_the_per_node_means():
    """The batched count of correct rows per node gives each node's mean exactly."""
    import numpy as np

    from fedsim.evaluate import Evaluator
    from fedsim.models import MLP
    from fedsim.params import FlatModel

    g = np.random.default_rng(0)
    x, y = g.normal(size=(300, 6)).astype(np.float32), g.integers(0, 3, 300)
    nodes = [g.choice(300, size=n, replace=False) for n in (0, 1, 7, 50, 120)]
    ev = Evaluator(FlatModel(MLP((6,), 3, hidden=[5])), x, y, nodes)
    params = torch.randn(ev.model.dim, generator=torch.Generator().manual_seed(1))
    _, correct = ev.per_example(params)
    want = [float(correct[torch.from_numpy(ix)].float().mean()) for ix in nodes if len(ix)]
    assert ev.node_accuracies(correct) == want
    assert ev(params)["eval/node_acc_min"] == min(want)


# -- on a GPU (skipped without one) -----------------------------------------------------------

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device (torch.cuda.is_available() is False)"
)


def run_on(device: str, *overrides: str):
    set_driver_threads(1)
    sim = build(compose(*BASE, f"cluster.device={device}", f"server.device={device}", *overrides))
    try:
        state, summary = sim.run()
    finally:
        sim.close()
    return state, summary


@gpu
@needs_cuda
@pytest.mark.parametrize("case", ["fedavg", "fedavg_vectorised", "scaffold_vectorised", "robust_alie", "top_k_ef21"])
def test_gpu_runs_are_deterministic_and_agree_with_the_cpu(case):
    a, sa = run_on("cuda", *CASES[case])
    b, _ = run_on("cuda", *CASES[case])
    c, sc = run_on("cpu", *CASES[case])
    assert a.params.device.type == "cuda"
    assert params_sha256(a.params) == params_sha256(b.params)
    torch.testing.assert_close(a.params.cpu(), c.params, rtol=1e-3, atol=1e-4)
    assert abs(float(sa["eval/acc"]) - float(sc["eval/acc"])) <= 0.02


@gpu
@needs_cuda
def test_a_gpu_checkpoint_resumes_on_the_cpu(tmp_path):
    """Run 3 of 4 rounds on the GPU with a checkpoint, resume on the CPU through the CLI: the
    resume says that bits differ across devices, and ends near the all-GPU run."""
    common = ["dataset=digits", "logger=console", "checkpoint.every=1", f"hydra.run.dir={tmp_path / 'r'}"]
    first = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedsim",
            "cluster=local",
            "cluster.device=cuda",
            "server.device=cuda",
            *common,
            "rounds=3",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert first.returncode == 0, first.stderr
    second = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedsim",
            "cluster=local",
            "cluster.device=cpu",
            "server.device=cpu",
            *common,
            "rounds=4",
            "resume=true",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert second.returncode == 0, second.stderr
    assert "not bit for bit" in second.stderr
