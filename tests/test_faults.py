"""Runs that survive faults, tested the way they happen: real processes killed with SIGKILL and
SIGTERM, a real Ray worker process killed mid-round, a real two-raylet cluster started with
`ray start`, real checkpoint files; the resumed or recovered run must end bit-identical to an
undisturbed one (``params_sha256`` in ``run_end``)."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.integration

DIGITS = ["dataset=digits", "num_nodes=12", "nodes_per_round=6", "eval_every=10", "logger=jsonl", "seed=4"]


def cli(*args: str, env: dict[str, str] | None = None) -> list[str]:
    return [sys.executable, "-m", "fedsim", *args]


def environment(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_SILENT": "true", **extra}


def run(*args: str, timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(cli(*args), cwd=ROOT, env=environment(**env), text=True, capture_output=True, timeout=timeout)


def strict_records(path: Path) -> list[dict]:
    """Every line of metrics.jsonl, parsed as strict JSON (no NaN or Infinity tokens)."""

    def refuse(token: str) -> None:
        raise ValueError(f"non-JSON token {token}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def rounds_of(records: list[dict]) -> list[int]:
    return [r["round"] for r in records if r["event"] == "round"]


def start(*args: str) -> subprocess.Popen:
    """``python -m fedsim ARGS`` in the background (stderr kept, as text), as a user starts a run."""
    return subprocess.Popen(
        cli(*args), cwd=ROOT, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def wait_for_round(path: Path, target: int, proc: subprocess.Popen, limit: float = 240) -> bool:
    """Poll metrics.jsonl until a step >= target is logged; False if the process ended first."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if path.exists():
            lines = path.read_text().splitlines()
            for line in reversed(lines[-3:]):
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if rec.get("event") == "round" and rec["round"] >= target:
                    return True
        time.sleep(0.002)
    raise TimeoutError(f"no step {target} within {limit}s")


CASES = {
    "sync-fedavg": ["rounds=60"],
    "scaffold-ef21": [  # per-node control variates, the server's c, per-vector uplink state
        "rounds=60",
        "strategy=scaffold",
        "compressor=top_k",
        "compressor.ratio=0.1",
        "feedback=ef21",
        "nodes_per_round=5",
    ],
    "feddyn": ["rounds=60", "strategy=feddyn", "nodes_per_round=5"],
    "econtrol-topk": ["rounds=60", "compressor=top_k", "compressor.ratio=0.1", "feedback=econtrol"],
    "mifa-markov": ["rounds=60", "strategy=mifa", "participation=markov", "participation.p=0.5"],
    "fedbuff-lognormal": [
        "rounds=60",
        "server=async",
        "strategy=fedbuff",
        "strategy.buffer=3",
        "server.concurrency=6",
        "latency=lognormal",
    ],
    "monna-optimal-alie": [
        "rounds=40",
        "strategy=monna",
        "server=p2p",
        "nodes_per_round=12",
        "strategy.client.lr=0.1",
        "attack=optimal_alie",
        "byzantine.num=2",
    ],
    "vrls-phases": [
        "rounds=20",
        "strategy=vrls",
        "partition=vrls_5clients",
        "num_nodes=5",
        "nodes_per_round=5",
        "strategy.predictor_rounds=20",
        "strategy.calibration_rounds=4",
        "model=logreg",
    ],
    "centered-clipping": [
        "rounds=60",
        "strategy=robust",
        "strategy/aggregator=centered_clipping",
        "attack=alie",
        "byzantine.num=2",
        "nodes_per_round=12",
    ],
}


def kill_and_resume(name: str, tmp: Path) -> tuple[str, str, list[int], int]:
    """(undisturbed sha, resumed sha, logged steps, step killed at) of one case."""
    args = [*DIGITS, *CASES[name], "cluster=local", "checkpoint.every=4"]
    clean = run(*args, f"hydra.run.dir={tmp / 'clean'}")
    assert clean.returncode == 0, clean.stderr
    total = strict_records(tmp / "clean" / "metrics.jsonl")[-1]["rounds"]
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    target = int(rng.integers(6, total - 8))
    d = tmp / "killed"
    proc = subprocess.Popen(
        cli(*args, f"hydra.run.dir={d}"), cwd=ROOT, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    assert wait_for_round(d / "metrics.jsonl", target, proc), "the run ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = rounds_of(strict_records(d / "metrics.jsonl"))[-1]
    resumed = run(*args, "resume=true", f"hydra.run.dir={d}")
    assert resumed.returncode == 0, resumed.stderr
    records = strict_records(d / "metrics.jsonl")
    return (
        strict_records(tmp / "clean" / "metrics.jsonl")[-1]["params_sha256"],
        records[-1]["params_sha256"],
        rounds_of(records),
        killed_at,
    )


def test_kill_9_then_resume_is_bit_identical(tmp_path):
    """SIGKILL of the driver at a random step, then the same command with resume=true: the final
    parameters equal an undisturbed run's, and metrics.jsonl holds every step exactly once."""
    names = list(CASES)
    with ThreadPoolExecutor(2) as pool:
        outcomes = dict(zip(names, pool.map(lambda n: kill_and_resume(n, tmp_path / n), names)))
    for name, (clean, resumed, steps, killed_at) in outcomes.items():
        assert resumed == clean, f"{name}: killed at step {killed_at}, resumed to a different model"
        assert steps == list(range(len(steps))) and killed_at < len(steps) - 1, name


def test_sigterm_stops_at_a_step_boundary_with_a_checkpoint(tmp_path):
    args = [*DIGITS, "rounds=400", "cluster=local"]
    proc = start(*args, f"hydra.run.dir={tmp_path}")
    assert wait_for_round(tmp_path / "metrics.jsonl", 10, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143
    lines = [ln for ln in err.splitlines() if ln.startswith("fedsim:")]
    assert len(lines) == 1 and "stopped by SIGTERM after step" in lines[0] and "resume=true" in lines[0], err
    records = strict_records(tmp_path / "metrics.jsonl")  # strict JSON, every line
    assert records[-1]["event"] == "stopped"
    last = rounds_of(records)[-1]
    assert (tmp_path / "checkpoints" / f"step-{last + 1:06d}.pt").exists()
    resumed = run(*args, "rounds=30", "resume=true", f"hydra.run.dir={tmp_path}")
    assert resumed.returncode == 0, resumed.stderr
    run(*args, "rounds=30", f"hydra.run.dir={tmp_path / 'clean'}")
    assert (
        strict_records(tmp_path / "metrics.jsonl")[-1]["params_sha256"]
        == strict_records(tmp_path / "clean" / "metrics.jsonl")[-1]["params_sha256"]
    )


def worker_pids(tag: str) -> list[int]:
    """Ray actor processes (ray::RayNodeWorker) started under the environment tag ``tag``."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if not (proc / "cmdline").read_bytes().startswith(b"ray::RayNodeWorker"):
                continue
            if f"FEDSIM_TEST_TAG={tag}".encode() in (proc / "environ").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


@pytest.mark.ray
def test_a_killed_ray_worker_is_replaced_and_the_result_is_identical(tmp_path):
    args = [*DIGITS, "rounds=50"]
    tag = secrets.token_hex(4)
    d = tmp_path / "ray"
    proc = subprocess.Popen(
        cli(*args, "cluster=ray", "cluster.num_cpus=2", f"hydra.run.dir={d}"),
        cwd=ROOT,
        env=environment(FEDSIM_TEST_TAG=tag),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert wait_for_round(d / "metrics.jsonl", 15, proc)
    pids = worker_pids(tag)
    assert pids, "no Ray worker of this run found"
    os.kill(pids[0], signal.SIGKILL)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    local = run(*args, "cluster=local", f"hydra.run.dir={tmp_path / 'local'}")
    assert local.returncode == 0, local.stderr
    assert (
        strict_records(d / "metrics.jsonl")[-1]["params_sha256"]
        == strict_records(tmp_path / "local" / "metrics.jsonl")[-1]["params_sha256"]
    )
    assert rounds_of(strict_records(d / "metrics.jsonl")) == list(range(50))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.ray
def test_a_two_raylet_cluster_started_with_ray_start_gives_the_local_result(tmp_path):
    """As a user joins a cluster: `ray start --head` and `ray start --address` on 127.0.0.1, with
    token authentication on (the token in the environment of both), then cluster.address and
    cluster.auth_token; without the token the run stops with one line naming the address."""
    ray_bin = str(Path(sys.executable).parent / "ray")
    port, token, temp = free_port(), secrets.token_hex(16), Path(f"/tmp/fedsim-ray-{secrets.token_hex(3)}")
    env = environment(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    try:
        head = subprocess.run(
            [
                ray_bin,
                "start",
                "--head",
                f"--port={port}",
                "--num-cpus=1",
                "--include-dashboard=false",
                f"--temp-dir={temp}",
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert head.returncode == 0, head.stderr
        worker = subprocess.run(
            [ray_bin, "start", f"--address=127.0.0.1:{port}", "--num-cpus=1"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert worker.returncode == 0, worker.stderr
        args = [*DIGITS, "rounds=8"]
        joined = run(
            *args,
            "cluster=ray",
            f"cluster.address=127.0.0.1:{port}",
            f"cluster.auth_token={token}",
            "cluster.num_actors=2",
            f"hydra.run.dir={tmp_path / 'joined'}",
        )
        assert joined.returncode == 0, joined.stderr
        start = strict_records(tmp_path / "joined" / "metrics.jsonl")[0]
        assert start["info"]["executor"] == "ray (2 actors on 2 machine(s))"
        refused = run(
            *args, "cluster=ray", f"cluster.address=127.0.0.1:{port}", f"hydra.run.dir={tmp_path / 'no'}", timeout=180
        )
        lines = [ln for ln in refused.stderr.splitlines() if ln.startswith("fedsim:")]
        assert refused.returncode == 2 and len(lines) == 1, refused.stderr
        assert f"cluster.address=127.0.0.1:{port}" in lines[0] and "auth_token" in lines[0]
        # a sweep on the same cluster: its two jobs run at once, one per raylet (1 CPU each)
        swept = run(
            "-m",
            *args,
            "seed=4,5",
            f"cluster.address=127.0.0.1:{port}",
            f"cluster.auth_token={token}",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        )
        assert swept.returncode == 0, swept.stderr
        assert "jobs per Ray node (2 node(s))" in swept.stderr
    finally:
        for proc in Path("/proc").iterdir():  # stop this cluster's processes only (not the test session's Ray)
            try:
                if proc.name.isdigit() and str(temp).encode() in (proc / "cmdline").read_bytes():
                    os.kill(int(proc.name), signal.SIGKILL)
            except OSError:
                continue
    run(*args, "cluster=local", f"hydra.run.dir={tmp_path / 'local'}")
    local = strict_records(tmp_path / "local" / "metrics.jsonl")[-1]["params_sha256"]
    assert strict_records(tmp_path / "joined" / "metrics.jsonl")[-1]["params_sha256"] == local
    assert strict_records(tmp_path / "sweep" / "seed=4" / "metrics.jsonl")[-1]["params_sha256"] == local


def test_an_unreachable_address_is_one_line_at_once():
    t0 = time.monotonic()
    done = run("cluster=ray", "cluster.address=127.0.0.1:1", "cluster.connect_timeout=5")
    assert done.returncode == 2 and time.monotonic() - t0 < 60
    assert (
        done.stderr.strip()
        .splitlines()[-1]
        .startswith("fedsim: error: cannot reach the Ray cluster at cluster.address=127.0.0.1:1")
    )


@pytest.mark.parametrize(
    "extra,cause",
    [
        (["strategy.client.lr=1e6"], "learning rates"),
        (["attack=not_a_number", "byzantine.num=2"], "Byzantine rows"),
    ],
)
def test_divergence_stops_with_its_likely_cause_and_a_checkpoint(tmp_path, extra, cause):
    done = run(*DIGITS, "rounds=40", "cluster=local", *extra, f"hydra.run.dir={tmp_path}")
    lines = [ln for ln in done.stderr.splitlines() if ln.startswith("fedsim:")]
    assert done.returncode == 1 and len(lines) == 1 and cause in lines[0], done.stderr
    records = strict_records(tmp_path / "metrics.jsonl")
    assert records[-1]["event"] == "stopped"
    steps = rounds_of(records)
    if steps:  # the last finite state is checkpointed (none when the very first step diverged)
        assert (tmp_path / "checkpoints" / f"step-{steps[-1] + 1:06d}.pt").exists()


@pytest.mark.parametrize(
    "args,needle",
    [
        (["strategy.client.lr=[1,"], "cannot read the override strategy.client.lr=[1,"),
        (["strategy.client.lr=abc"], "strategy.client.lr='abc' must be a number"),
        (["num_nodes=5000", "nodes_per_round=10"], "num_nodes=5000 exceeds the 1348 training examples"),
        (["resume=true"], "has no checkpoint"),
    ],
)
def test_bad_input_leaves_nothing_behind(tmp_path, args, needle):
    target = tmp_path / "run"
    done = run(*args, "cluster=local", f"hydra.run.dir={target}")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and needle in lines[0], done.stderr
    assert not target.exists()


def test_unwritable_run_dir_is_one_line():
    done = run("cluster=local", "hydra.run.dir=/proc/fedsim-cannot-write")
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "fedsim: error: cannot create the run folder hydra.run.dir=/proc/fedsim-cannot-write: "
        "No such file or directory; choose a writable folder"
    )


def test_resume_refuses_another_config_and_continues_wandb(tmp_path):
    args = [*DIGITS, "rounds=4", "cluster=local", "checkpoint.every=2", "logger=wandb", f"hydra.run.dir={tmp_path}"]
    first = run(*args)
    assert first.returncode == 0, first.stderr
    other = run(*args, "rounds=6", "resume=true", "strategy.client.lr=0.5")
    assert other.returncode == 2 and "strategy.client.lr: 0.1 -> 0.5" in other.stderr
    more = run(*args, "rounds=6", "resume=true")
    assert more.returncode == 0, more.stderr
    assert rounds_of(strict_records(tmp_path / "metrics.jsonl")) == list(range(6))
    from tests.test_cli import wandb_records

    ids = set()
    for path in (tmp_path / "wandb").glob("offline-run-*/run-*.wandb"):
        ids |= {r.run.run_id for r in wandb_records(path) if r.WhichOneof("record_type") == "run"}
    assert len(ids) == 1 and len(list((tmp_path / "wandb").glob("offline-run-*"))) == 2
