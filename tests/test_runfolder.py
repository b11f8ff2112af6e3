"""Run folders that cannot be corrupted and runs that cannot fail silently, with real processes:
a run holds its folder's lock for its whole life, a second run or resume into it is refused with
one line, a fresh run never replaces a run unless told to, a dead holder's lock is taken over,
two drivers of one sweep share its jobs, and a run whose model never changed exits non-zero."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from fedsim import runfolder
from tests.conftest import ROOT
from tests.test_faults import DIGITS, cli, environment, rounds_of, run, start, strict_records, wait_for_round

pytestmark = pytest.mark.integration

LONG = [*DIGITS, "rounds=4000", "cluster=local", "checkpoint.every=20"]


def files(folder: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.name != runfolder.LOCK_FILE}


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("fedsim: error: "), proc.stderr
    return lines[0]


def test_a_busy_folder_refuses_a_second_run_and_a_resume_and_keeps_the_first_runs_records(tmp_path):
    folder = tmp_path / "R"
    first = start(*LONG, f"hydra.run.dir={folder}")
    try:
        assert wait_for_round(folder / "metrics.jsonl", 40, first)
        config = (folder / ".hydra" / "config.yaml").read_bytes()
        for extra in (["resume=true"], [], ["overwrite=true"]):
            second = run(*LONG, f"hydra.run.dir={folder}", *extra)
            assert second.returncode == 2, second.stderr
            line = one_error_line(second)
            assert f"the run folder {folder} is in use by pid {first.pid} on host" in line, line
        assert (folder / ".hydra" / "config.yaml").read_bytes() == config  # Hydra never wrote into it
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=120) == 143
    records = strict_records(folder / "metrics.jsonl")
    assert [r["event"] for r in records].count("run_start") == 1 and records[-1]["event"] == "stopped"
    steps = rounds_of(records)
    assert steps == list(range(len(steps)))  # the first run's records, each step once
    step = int(records[-1]["reason"].split("after step ")[1])
    resumed = run(
        *LONG[:-3],
        f"rounds={step + 5}",
        "cluster=local",
        "checkpoint.every=20",
        f"hydra.run.dir={folder}",
        "resume=true",
    )
    assert resumed.returncode == 0, resumed.stderr  # the lock went with the first run
    assert f"fedsim: resumed from step {step} of {step + 5}" in resumed.stderr


def test_a_fresh_run_into_a_finished_folder_is_refused_until_overwrite(tmp_path):
    folder = tmp_path / "done"
    args = [*DIGITS, "rounds=3", "cluster=local", f"hydra.run.dir={folder}"]
    assert run(*args).returncode == 0
    before = files(folder)
    again = run(*args, "seed=5")
    assert again.returncode == 2
    line = one_error_line(again)
    assert f"the run folder {folder} already holds a finished run" in line and "overwrite=true" in line
    assert files(folder) == before  # nothing changed, Hydra's files included
    replaced = run(*args, "seed=5", "overwrite=true")
    assert replaced.returncode == 0, replaced.stderr
    records = strict_records(folder / "metrics.jsonl")
    assert records[0]["config"]["seed"] == 5 and [r["event"] for r in records].count("run_start") == 1


def test_a_stopped_run_suggests_resume_and_a_killed_holders_lock_is_taken_over(tmp_path):
    folder = tmp_path / "killed"
    proc = start(*LONG, f"hydra.run.dir={folder}")
    assert wait_for_round(folder / "metrics.jsonl", 45, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert runfolder.holder(folder) is None  # the OS released the lock with the process
    fresh = run(*LONG, f"hydra.run.dir={folder}")
    assert fresh.returncode == 2
    assert "holds a run that stopped before its end (with a checkpoint); add resume=true" in one_error_line(fresh)
    resumed = run(
        *LONG[:-3], "rounds=60", "cluster=local", "checkpoint.every=20", f"hydra.run.dir={folder}", "resume=true"
    )
    assert resumed.returncode == 0, resumed.stderr
    taken = [ln for ln in resumed.stderr.splitlines() if "taking over the run folder" in ln]
    assert len(taken) == 1 and f"from pid {proc.pid} on host" in taken[0] and "which has ended" in taken[0]
    assert any(ln.startswith("fedsim: resumed from step 40 of 60") for ln in resumed.stderr.splitlines())
    records = strict_records(folder / "metrics.jsonl")
    assert records[-1]["event"] == "run_end" and rounds_of(records) == list(range(60))


def test_resuming_past_the_configured_rounds_is_refused(tmp_path):
    folder = tmp_path / "short"
    args = [*DIGITS, "cluster=local", "checkpoint.every=10", f"hydra.run.dir={folder}"]
    assert run(*args, "rounds=20").returncode == 0
    shorter = run(*args, "rounds=5", "resume=true")
    assert shorter.returncode == 2
    assert "is of step 20, past the 5 steps this config runs" in one_error_line(shorter)


def test_two_drivers_of_one_sweep_share_its_jobs_and_give_one_drivers_results(tmp_path):
    grid = [*DIGITS, "rounds=60", "eval_every=20", "seed=0,1,2,3", "cluster.num_cpus=1"]
    shared, alone = tmp_path / "shared", tmp_path / "alone"
    drivers = [
        subprocess.Popen(
            cli("-m", *grid, f"hydra.sweep.dir={shared}"),
            cwd=ROOT,
            env=environment(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [d.communicate(timeout=600)[1] for d in drivers]
    assert [d.returncode for d in drivers] == [0, 0], outputs
    ran = [
        [ln.split()[2] for ln in out.splitlines() if ln.startswith("fedsim: job ") and " done" in ln] for out in outputs
    ]
    assert sorted(ran[0] + ran[1]) == [f"seed={s}" for s in range(4)], outputs  # every job exactly once
    for out, mine in zip(outputs, ran):
        summary = next(ln for ln in out.splitlines() if ln.startswith("fedsim: sweep finished"))
        assert f"({len(mine)} here, 0 before" in summary, summary
    for job in (f"seed={s}" for s in range(4)):
        events = [r["event"] for r in strict_records(shared / job / "metrics.jsonl")]
        assert events.count("run_start") == 1 and events[-1] == "run_end", (job, events)
    one = subprocess.run(
        cli("-m", *grid, f"hydra.sweep.dir={alone}"), cwd=ROOT, env=environment(), capture_output=True, text=True
    )
    assert one.returncode == 0, one.stderr
    for job in (f"seed={s}" for s in range(4)):
        assert (
            strict_records(shared / job / "metrics.jsonl")[-1]["params_sha256"]
            == strict_records(alone / job / "metrics.jsonl")[-1]["params_sha256"]
        )


def test_a_run_whose_model_never_changed_exits_3_with_the_rule_and_the_count(tmp_path):
    # trimmed mean with f=2 needs 5 rows; 20 nodes at p=0.05 send about 1 per step
    args = [
        "dataset=digits",
        "num_nodes=20",
        "strategy=robust",
        "byzantine.declared=2",
        "participation=bernoulli",
        "participation.rates=constant",
        "participation.p=0.05",
        "rounds=6",
        "cluster=local",
        f"hydra.run.dir={tmp_path / 'void'}",
    ]
    void = run(*args)
    assert void.returncode == 3, void.stderr
    lines = void.stderr.strip().splitlines()
    assert "fedsim: warning (step 0): about 1.0 nodes take part in a step on average" in void.stderr
    records = strict_records(tmp_path / "void" / "metrics.jsonl")
    skipped = records[-1]["agg/skipped_total"]  # the other steps had no row at all
    assert records[-1]["event"] == "run_end" and skipped > 3
    assert lines[-1].startswith(f"fedsim: error: the model never changed: {skipped} of 6 steps were skipped"), lines
    assert "trimmed_mean needs 2f < n, but f=2" in lines[-1] and "raise participation.p" in lines[-1]
    assert f"SKIPPED {skipped} of 6 steps" in lines[-2]
    assert any(r["event"] == "warning" for r in records)


def test_a_rule_that_no_step_can_ever_feed_is_refused_before_start_and_a_starved_one_is_warned():
    import numpy as np
    from hydra.utils import instantiate

    from fedsim import compat
    from fedsim.compress import Identity
    from fedsim.errors import ConfigError
    from fedsim.faults.byzantine import Byzantine
    from fedsim.server.sync import SyncServer
    from fedsim.uplink import Uplink
    from strategies.feedback import NoFeedback
    from tests.conftest import compose, run_facts

    strategy = instantiate(compose("strategy=robust", "byzantine.declared=2").strategy)  # trimmed mean: needs 5 rows
    server = SyncServer(rounds=5, nodes_per_round=8, num_nodes=8, seed=0)

    def plan(probs: list[float], fixed: bool = False) -> compat.Plan:
        facts = run_facts(8, probs=np.array(probs))
        uplink = Uplink(Identity(), NoFeedback())
        names = {"participation": "bernoulli"}
        return compat.Plan(strategy, server, Byzantine(), uplink, facts, 8, names, fixed_count=fixed)

    four = [0.5, 0.5, 0.5, 0.5, 0.0, 0.0, 0.0, 0.0]  # four nodes never take part
    with pytest.raises(ConfigError, match="under participation=bernoulli at most 4 nodes can take part in a step"):
        compat.check(plan(four))
    compat.check(plan(four, fixed=True))  # a fixed count of 8 per step feeds it
    starved = plan([0.1] * 8)  # 0.8 nodes per step on average
    compat.check(starved)
    (warning,) = compat.warnings(starved)
    assert warning.startswith("about 0.8 nodes take part in a step on average under participation=bernoulli")
    assert compat.warnings(plan([0.9] * 8)) == []
