"""Sweeps through the product: ``python -m fedsim -m ...`` with the fedsim sweeper and the Ray
launcher (the defaults), run as a user runs them, in a subprocess with its own local Ray.

Jobs run concurrently, a failing job fails alone and sets the exit code, rerunning skips finished
jobs and resumes interrupted ones from their checkpoints, a sweep job gives the same model as the
same run on its own, W&B runs of a sweep land in one group with the swept keys as config and tags,
and ``fedsim.report`` summarises the sweep. Every experiment config composes into valid jobs."""

from __future__ import annotations

import csv
import json
import math
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT
from tests.test_faults import DIGITS, cli, environment, run, strict_records, wait_for_round

pytestmark = pytest.mark.integration

SMALL = [*DIGITS, "eval_every=5", "cluster.num_cpus=2"]


def sweep(*args: str, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    return run("-m", *args, timeout=timeout, **env)


def final(folder: Path) -> dict:
    return strict_records(folder / "metrics.jsonl")[-1]


def watch_overlap(folders: list[Path], stop: threading.Event, seen: list[bool]) -> None:
    """Set seen[0] when two jobs are between run_start and run_end at the same moment."""
    while not stop.is_set() and not seen[0]:
        running = 0
        for f in folders:
            path = f / "metrics.jsonl"
            if path.exists():
                text = path.read_text()
                running += '"run_start"' in text and '"run_end"' not in text
        seen[0] = running >= 2
        time.sleep(0.01)


def test_a_sweep_runs_jobs_at_once_survives_a_failing_job_and_reruns_only_what_is_left(tmp_path):
    d = tmp_path / "sweep"
    args = [*SMALL, "rounds=40", "seed=0,1", "attack=none,not_a_number", "byzantine.num=3", f"hydra.sweep.dir={d}"]
    names = [f"attack={a},seed={s}" for a in ("none", "not_a_number") for s in (0, 1)]  # keys by name
    stop, seen = threading.Event(), [False]
    watcher = threading.Thread(target=watch_overlap, args=([d / n for n in names], stop, seen))
    watcher.start()
    try:
        first = sweep(*args)
    finally:
        stop.set()
        watcher.join()
    assert first.returncode == 2, first.stderr  # the exit code counts the failed jobs
    assert seen[0], "no two jobs ran at the same time"
    for name in names:
        records = strict_records(d / name / "metrics.jsonl")
        if "none" in name:
            assert records[-1]["event"] == "run_end"
        else:  # the NaN attack diverges the mean: this job fails, the sweep goes on
            assert records[-1]["event"] != "run_end"
            assert f"job {name} failed: the model became NaN" in first.stderr and "(or rerun the sweep)" in first.stderr
    assert "2 of 4 jobs done (2 here, 0 before), 2 failed" in first.stderr
    assert first.stderr.count("sweep: 2/4 done, 2 failed, 0 running, 0 queued") == 1  # the last line agrees
    index = json.loads((d / "sweep.json").read_text())
    assert index["swept"] == ["attack", "seed"] and [j["name"] for j in index["jobs"]] == names

    # a sweep job is the same run as on its own
    alone = run(*SMALL, "rounds=40", "seed=1", "attack=none", "byzantine.num=3", f"hydra.run.dir={tmp_path / 'alone'}")
    assert alone.returncode == 0, alone.stderr
    assert final(tmp_path / "alone")["params_sha256"] == final(d / "attack=none,seed=1")["params_sha256"]

    before = {n: (d / n / "metrics.jsonl").read_bytes() for n in names if "none" in n}
    swapped = [*args[:-4], "attack=none,not_a_number", "seed=0,1", *args[-2:]]  # folder names ignore the order
    again = sweep(*swapped)
    assert again.returncode == 2
    assert "4 jobs" in again.stderr and "2 done before, 2 to run" in again.stderr
    assert all((d / n / "metrics.jsonl").read_bytes() == b for n, b in before.items())  # not run again


def test_rerunning_a_sweep_resumes_an_interrupted_job_from_its_checkpoint(tmp_path):
    d = tmp_path / "sweep"
    common = [*SMALL, "rounds=60", "checkpoint.every=4"]
    clean = run(*common, "seed=2", f"hydra.run.dir={tmp_path / 'clean'}")
    assert clean.returncode == 0, clean.stderr
    # the job seed=2 was stopped mid-run (as by a SIGTERM to the sweep) and left its checkpoints
    job = d / "seed=2"
    proc = subprocess.Popen(
        cli(*common, "seed=2", f"hydra.run.dir='{job}'"),
        cwd=ROOT,
        env=environment(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert wait_for_round(job / "metrics.jsonl", 20, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    assert strict_records(job / "metrics.jsonl")[-1]["event"] != "run_end"
    done = sweep(*common, "seed=1,2", f"hydra.sweep.dir={d}")
    assert done.returncode == 0, done.stderr
    records = strict_records(job / "metrics.jsonl")
    assert any(r["event"] == "resume" for r in records)
    assert records[-1]["params_sha256"] == final(tmp_path / "clean")["params_sha256"]
    rounds = [r["round"] for r in records if r["event"] == "round"]
    assert rounds == sorted(set(rounds)) and rounds[-1] == 59  # every step once, no gap


def test_wandb_runs_of_a_sweep_share_a_group_with_the_swept_keys_as_config_tags_and_summary(tmp_path):
    from tests.test_cli import wandb_records

    d = tmp_path / "cmp"
    done = sweep(
        *SMALL,
        "rounds=6",
        "seed=0,1",
        "strategy=fedavg,fedprox",
        "logger=wandb",
        f"hydra.sweep.dir={d}",
        WANDB_MODE="offline",
    )
    assert done.returncode == 0, done.stderr
    runs = {}
    for path in d.glob("*/wandb/offline-run-*/run-*.wandb"):
        records = list(wandb_records(path))
        (meta,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        config = {item.key: json.loads(item.value_json) for item in meta.config.update}
        summary = {}
        for r in records:
            if r.WhichOneof("record_type") == "summary":
                summary |= {item.key: json.loads(item.value_json) for item in r.summary.update}
        runs[path.parents[2].name] = (meta, config, summary)
    assert sorted(runs) == sorted(f"seed={s},strategy={t}" for s in (0, 1) for t in ("fedavg", "fedprox"))
    for name, (meta, config, summary) in runs.items():
        seed, strategy = (part.split("=")[1] for part in name.split(","))
        assert meta.run_group == "cmp"  # one group per sweep (experiment:sweep when an experiment is chosen)
        assert config["strategy"] == strategy and str(config["seed"]) == seed
        assert f"strategy:{strategy}" in meta.tags and f"seed:{seed}" in meta.tags
        assert config["cfg"]["rounds"] == 6  # the whole config, for filters
        assert summary["eval/acc"] == pytest.approx(final(d / name)["eval/acc"])


def test_report_groups_a_sweep_over_seeds_and_computes_the_statistics(tmp_path):
    d = tmp_path / "sweep"
    done = sweep(*SMALL, "rounds=20", "seed=0,1,2", "strategy.client.lr=0.05,0.2", f"hydra.sweep.dir={d}")
    assert done.returncode == 0, done.stderr

    def report(*args):
        return subprocess.run(
            [*cli()[:2], "fedsim.report", str(d), *args],
            cwd=ROOT,
            env=environment(),
            capture_output=True,
            text=True,
            timeout=300,
        )

    out = report("--stat", "final", "best", "last:2", "--target", "0.5", "--x", "bytes")
    assert out.returncode == 0, out.stderr
    rows = list(csv.DictReader((d / "report.csv").open()))
    assert {r["strategy.client.lr"] for r in rows} == {"0.05", "0.2"} and "seed" not in rows[0]
    for lr in ("0.05", "0.2"):
        runs = [strict_records(d / f"seed={s},strategy.client.lr={lr}" / "metrics.jsonl") for s in range(3)]
        evals = [[r["eval/acc"] for r in rs if r["event"] == "round" and "eval/acc" in r] for rs in runs]
        expect = {
            "final": [e[-1] for e in evals],
            "best": [max(e) for e in evals],
            "last:2": [np.mean(e[-2:]) for e in evals],
        }
        for stat, values in expect.items():
            (row,) = [
                r for r in rows if r["strategy.client.lr"] == lr and r["metric"] == "eval/acc" and r["stat"] == stat
            ]
            assert float(row["mean"]) == pytest.approx(np.mean(values), abs=1e-12)
            assert float(row["std"]) == pytest.approx(np.std(values), abs=1e-12) and int(row["n"]) == 3
        hits = []
        for rs in runs:
            reached = [r["comm/bytes_up_total"] for r in rs if r["event"] == "round" and r.get("eval/acc", 0) >= 0.5]
            hits += reached[:1]
        (row,) = [r for r in rows if r["strategy.client.lr"] == lr and r["stat"] == "bytes_to_0.5"]
        assert int(row["n"]) == len(hits)
        if hits:
            assert float(row["mean"]) == pytest.approx(np.mean(hits))
    assert "strategy.client.lr" in (d / "report.md").read_text()
    assert (d / "eval_acc_vs_bytes.png").stat().st_size > 10_000

    # NAME:STAT pins a metric's statistics; the others take --stat
    out = report(
        "--metric",
        "eval/acc",
        "comm/bytes_up_total:final",
        "--stat",
        "best",
        "last:2",
        "--x",
        "bytes",
        "--name",
        "pinned",
    )
    assert out.returncode == 0, out.stderr
    pinned = list(csv.DictReader((d / "pinned.csv").open()))
    assert {(r["metric"], r["stat"]) for r in pinned} == {
        ("eval/acc", "best"),
        ("eval/acc", "last:2"),
        ("comm/bytes_up_total", "final"),
    }
    assert (d / "pinned_eval_acc_vs_bytes.png").exists()
    assert not (d / "pinned_comm_bytes_up_total_vs_bytes.png").exists()  # the x axis is not plotted against itself

    header = (d / "pinned.md").read_text().splitlines()[4]
    assert "comm/bytes_up_total final" in header and "comm/bytes_up_total best" not in header
    cols = report("--columns", "strategy.client.lr", "--stat", "last:2", "--name", "cols")
    assert cols.returncode == 0, cols.stderr
    assert "| strategy.client.lr=0.05 | strategy.client.lr=0.2 |" in (d / "cols.md").read_text()
    assert (d / "cols_eval_acc_vs_round.png").stat().st_size > 10_000  # one panel per column value
    pooled = report("--group-by", "--stat", "final", "--name", "pooled")  # no key: every run in one group
    assert pooled.returncode == 0, pooled.stderr
    (row,) = list(csv.DictReader((d / "pooled.csv").open()))
    assert int(row["n"]) == 6

    # bad input: one line naming the option and what would work, exit 2, nothing written
    for args, says in [
        (["--metric", "eval/acc:top"], "--metric eval/acc:top: the statistic is final, best or last:K"),
        (["--stat", "last:0"], "--stat last:0: the statistic is final, best or last:K"),
        (["--metric", "eval/accuracy"], "--metric eval/accuracy: no run logs it; did you mean eval/acc"),
        (["--group-by", "strategy.lr"], "--group-by: no run has the key 'strategy.lr'; the runs' keys: seed, strategy"),
        (["--where", "strategy.client.lr=0.1"], "no run matches; strategy.client.lr is one of 0.05, 0.2"),
        (["--x", "steps"], "argument --x: invalid choice: 'steps'"),
    ]:
        bad = report(*args, "--name", "bad")
        lines = bad.stderr.strip().splitlines()
        assert bad.returncode == 2 and len(lines) == 1 and says in lines[0], bad.stderr
    assert not (d / "bad.md").exists()


def test_fedau_weights_script_plots_the_last_logged_estimates_against_one_over_p(tmp_path):
    d = tmp_path / "sweep"
    args = [*SMALL, "rounds=30", "seed=0,1", "strategy=fedau", "strategy.cutoff=null,5", "participation=bernoulli"]
    done = sweep(*args, "participation.p=0.3", "strategy.log_weights_every=30", f"hydra.sweep.dir={d}")
    assert done.returncode == 0, done.stderr
    out = subprocess.run(
        [*cli()[:1], "scripts/fedau_weights.py", str(d), "--out", str(tmp_path / "plots")],
        cwd=ROOT,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "plots" / "fedau_weights.png").stat().st_size > 10_000
    for cutoff in ("null", "5"):
        errors = []
        for seed in (0, 1):
            last = final_round(d / f"seed={seed},strategy.cutoff={cutoff}")
            w = np.array([np.nan if x is None else x for x in last["fedau/estimates"]])
            p = np.array(last["fedau/rates"])
            seen = np.isfinite(w)
            errors.append(np.median(np.abs(w[seen] * p[seen] - 1)))
            assert errors[-1] == pytest.approx(last["fedau/estimate_rel_err"])  # the list agrees with the scalar
        (row,) = [ln for ln in out.stdout.splitlines() if ln.startswith(f"| strategy.cutoff={cutoff} |")]
        assert float(row.split("|")[2]) == pytest.approx(np.mean(errors), abs=5e-4)


def final_round(folder: Path) -> dict:
    return [r for r in strict_records(folder / "metrics.jsonl") if r["event"] == "round"][-1]


def experiment_jobs(name: str) -> list[list[str]]:
    """Every job of ``experiment=name`` as the sweeper makes it: the overrides of each job."""
    from hydra import compose, initialize_config_dir

    from fedsim.cli import CONF_DIR
    from hydra_plugins.fedsim_plugins.sweeper import FedsimSweeper

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"experiment={name}"], return_hydra_config=True)
    sweeper = FedsimSweeper(cfg.hydra.sweeper.params, cfg.hydra.sweeper.variants)
    _, jobs, common = sweeper.grid([])
    return [[f"experiment={name}", *sweeper.overrides_of(job, common)] for job in jobs]


EXPERIMENTS = sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_job_of_every_experiment_composes_and_passes_the_checks(name):
    """Compose each job, check its values' kinds as the sweeper does (against the defaults of its
    groups), and build seed 0's (data, partition, plug-ins and the compatibility check: what a run
    does before its first step) where its dataset is here."""
    from hydra import compose, initialize_config_dir

    from fedsim.cli import CONF_DIR, group_overrides
    from fedsim.config import check_types
    from fedsim.errors import DataUnavailable
    from fedsim.simulation import build

    jobs = experiment_jobs(name)
    assert len(jobs) >= 6
    built = 0
    references: dict = {}  # the defaults of a choice of groups, composed once
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for overrides in jobs:
            cfg = compose(config_name="config", overrides=[*overrides, "cluster=local"], return_hydra_config=True)
            assert cfg.hydra.sweep.dir == f"multirun/{name}"
            groups = tuple(group_overrides(overrides))
            if groups not in references:
                references[groups] = compose(config_name="config", overrides=list(groups))
            check_types(cfg, references[groups])
            if int(cfg.seed) != 0:
                continue
            try:
                build(cfg)
            except DataUnavailable as exc:
                pytest.skip(str(exc))
            built += 1
    assert built >= 2


def test_variant_on_the_command_line_picks_variants():
    jobs = experiment_jobs("fedau_fmnist")
    assert len(jobs) == 3 * 3 * 7
    from hydra import compose, initialize_config_dir

    from fedsim.cli import CONF_DIR
    from hydra_plugins.fedsim_plugins.sweeper import FedsimSweeper

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["experiment=fedau_fmnist"], return_hydra_config=True)
    sweeper = FedsimSweeper(cfg.hydra.sweeper.params, cfg.hydra.sweeper.variants)
    swept, picked, _ = sweeper.grid(["variant=mifa,fedau", "seed=0"])
    assert swept == ["participation", "seed", "variant"]
    assert [dict(j)["variant"] for j in picked] == ["fedau", "mifa"] * 3
    with pytest.raises(ValueError, match="no variant nope"):
        sweeper.grid(["variant=nope"])


def test_report_plots_give_every_group_its_own_colour_and_line_style():
    from fedsim.report import _styles

    two_keys = [(("latency", s), ("variant", v)) for s in ("0", "80") for v in "abcdef"]
    styles = _styles(two_keys)
    assert len(set(styles.values())) == 12
    assert {styles[(("latency", "0"), ("variant", v))][1] for v in "abcdef"} == {"-"}
    assert styles[(("latency", "0"), ("variant", "c"))][0] == styles[(("latency", "80"), ("variant", "c"))][0]
    one_key = [(("variant", str(i)),) for i in range(25)]
    assert len(set(_styles(one_key).values())) == 25
    many = [(("a", str(i)), ("b", str(j))) for i in range(5) for j in range(3)]  # 5 > 4 styles: cycle
    assert len(set(_styles(many).values())) == 15


def test_report_cells_print_counts_as_whole_numbers_and_the_rest_to_the_digits_asked():
    from fedsim.report import Cell

    assert Cell([60.0, 60.0, 60.0]).text(4) == "60 ± 0 (3)"
    assert Cell([12216000.0, 12216000.0]).text(4) == "12,216,000 ± 0 (2)"
    assert Cell([1.0, 2.0]).text(4) == "1.5 ± 0.5 (2)"
    assert Cell([0.5, 0.7, math.nan]).text(3) == "0.600 ± 0.100 (2)"
    assert Cell([24.0, 26.0, 24.0]).text(4, reached=True) == "24.7 (3/3)"
    assert Cell([12.7825, math.nan]).text(4, reached=True) == "12.78 (1/2)"
    assert Cell([math.nan, math.nan]).text(4, reached=True) == "- (0/2)"


def test_the_command_line_wins_over_a_variant_and_job_folders_do_not_depend_on_the_argument_order():
    from hydra import compose, initialize_config_dir

    from fedsim.cli import CONF_DIR
    from hydra_plugins.fedsim_plugins.sweeper import FedsimSweeper, job_name, quoted

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["experiment=async_fmnist"], return_hydra_config=True)
        sweeper = FedsimSweeper(cfg.hydra.sweeper.params, cfg.hydra.sweeper.variants)
        lrs = {}
        for given in ([], ["strategy.server_opt.lr=0.2"]):
            _, jobs, common = sweeper.grid(["experiment=async_fmnist", "seed=0", "variant=async_fedavg_lr0.1", *given])
            overrides = sweeper.overrides_of(jobs[0], common)
            job = compose(config_name="config", overrides=[o for o in overrides if not o.startswith("hydra.")])
            lrs[bool(given)] = job.strategy.server_opt.lr
        assert lrs == {False: 0.1, True: 0.2}  # the variant's lr, unless the command line sets it

    adhoc = FedsimSweeper()
    one = adhoc.grid(["seed=0,1", "strategy=fedavg,fedprox", "rounds=3"])
    other = adhoc.grid(["rounds=3", "strategy=fedavg,fedprox", "seed=0,1"])
    assert one[0] == other[0] == ["seed", "strategy"]
    assert one[1] == other[1] and job_name(one[1][1]) == "seed=0,strategy=fedprox"
    # a value given twice is one job; two values that name one folder are a usage error
    assert adhoc.grid(["seed=0,0,1", "lr=0.1,1e-1"])[1:] == ([[("seed", "0")], [("seed", "1")]], ["lr=0.1"])
    with pytest.raises(ValueError, match="jobs x=a/b and x=a_b would share the folder x=a_b"):
        adhoc.grid(["x=a/b,a_b"])
    # a folder name with quotes and spaces survives Hydra's parser as hydra.sweep.subdir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for name in ["x='a b',y=c", "it's\\", 'q="x"\\\'']:
        assert parser.parse_override(f"hydra.sweep.subdir={quoted(name)}").value() == name


def test_the_progress_line_counts_every_job_of_the_sweep_and_estimates_from_the_throughput(capsys):
    from hydra.core.utils import JobReturn, JobStatus

    from fedsim.runfolder import Elsewhere
    from hydra_plugins.fedsim_plugins.launcher import Tally, _failed, _progress

    ok = JobReturn()
    ok.status, ok.return_value = JobStatus.COMPLETED, 0.5
    tally = Tally(22, done=1, failed=1)  # one job done before, one with a bad config
    _progress(tally, 0, 0.0, 4)  # from the start
    tally.count(ok)
    _progress(tally, 1, 60.0, 4)  # one job ended after a minute: too early to tell
    for ret in (ok, _failed("boom"), _failed(Elsewhere("held", done=False))):
        tally.count(ret)
    _progress(tally, 4, 120.0, 4)  # 4 jobs returned in 2 minutes: 16 left take 8
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "sweep: 1/22 done, 1 failed, 4 running, 16 queued (4 at a time), ETA ? (after the first jobs)",
        "sweep: 2/22 done, 1 failed, 4 running, 15 queued (4 at a time), ETA ? (after the first jobs)",
        "sweep: 3/22 done, 2 failed, 1 with other drivers, 4 running, 12 queued (4 at a time), ETA 8.0 min",
    ]
    tally = Tally(3)
    for ret in (ok, ok):
        tally.count(ret)
    _progress(tally, 2, 36.0, 2)  # fewer jobs left than slots: all of them run
    assert capsys.readouterr().err.splitlines() == [
        "sweep: 2/3 done, 0 failed, 1 running, 0 queued (2 at a time), ETA 0.3 min"
    ]


def test_a_sweep_into_an_existing_folder_adds_its_jobs_and_refuses_to_mix_settings(tmp_path):
    d = tmp_path / "sweep"
    token = "s3cret-token"
    # where the run executes (cluster=ray, its token) is the launcher's; how it trains reaches the jobs
    where = ["cluster=ray", f"cluster.auth_token={token}", "cluster.retain_memory=false", "cluster.device=cpu"]
    base = [*SMALL, "rounds=3", *where, f"hydra.sweep.dir={d}"]
    first = sweep(*base, "variant='a b',c")  # a value with a space and quotes
    assert first.returncode == 0, first.stderr
    assert final(d / "variant='a b'")["event"] == "run_end" and final(d / "variant=c")["event"] == "run_end"
    config = strict_records(d / "variant='a b'" / "metrics.jsonl")[0]["config"]
    assert config["variant"] == "a b"
    assert config["cluster"]["_target_"] == "fedsim.execution.local.LocalExecutor"
    assert config["cluster"]["retain_memory"] is False and config["cluster"]["device"] == "cpu"
    index = json.loads((d / "sweep.json").read_text())
    assert "cluster.auth_token=<redacted>" in index["common"]
    for path in d.rglob("*"):  # the token reaches the jobs, not the files
        assert not path.is_file() or token.encode() not in path.read_bytes(), path

    # a subset with one more job (and a checkpoint interval and a memory setting, which a rerun
    # may change: they do not change what a job computes): the finished one is skipped,
    # sweep.json keeps every job
    more = sweep(*base, "variant=c,d", "checkpoint.every=2", "cluster.retain_memory=true")

    assert more.returncode == 0, more.stderr
    assert "2 jobs" in more.stderr and "1 done before, 1 to run" in more.stderr
    index = json.loads((d / "sweep.json").read_text())
    assert [j["name"] for j in index["jobs"]] == ["variant='a b'", "variant=c", "variant=d"]
    assert index["swept"] == ["variant"]
    assert "variant='a b',c" in (d / "multirun.yaml").read_text()  # the first sweep's config is kept
    assert "variant=c,d" in (d / "multirun.1.yaml").read_text()
    base = [*base, "checkpoint.every=2"]

    # other settings for a finished job: one line, exit 2, nothing runs, nothing is rewritten
    saved = {p: p.read_bytes() for p in d.rglob("*") if p.is_file()}
    changed = sweep(*base, "variant=c,e", "rounds=4")
    lines = changed.stderr.strip().splitlines()
    assert changed.returncode == 2 and len(lines) == 1, changed.stderr
    assert f"the job folder {d / 'variant=c'} holds a run with other settings" in lines[0]
    assert "rounds=3 there, rounds=4 now" in lines[0] and "another hydra.sweep.dir" in lines[0]
    assert {p: p.read_bytes() for p in d.rglob("*") if p.is_file()} == saved
    assert not (d / "variant=e").exists()

    # the same overrides, but the config they compose to has changed since (an edited experiment
    # YAML; here the finished job's saved config says so): stopped the same way, naming the key
    saved_config = d / "variant=c" / ".hydra" / "config.yaml"
    text = saved_config.read_text()
    assert "\nrounds: 3\n" in text
    saved_config.write_text(text.replace("\nrounds: 3\n", "\nrounds: 5\n"))
    saved = {p: p.read_bytes() for p in d.rglob("*") if p.is_file()}
    edited = sweep(*base, "variant=c,d")
    lines = edited.stderr.strip().splitlines()
    assert edited.returncode == 2 and len(lines) == 1, edited.stderr
    assert f"the job folder {d / 'variant=c'} holds a run with other settings" in lines[0]
    assert "its config has rounds=5, this sweep's rounds=3" in lines[0]
    assert {p: p.read_bytes() for p in d.rglob("*") if p.is_file()} == saved


@pytest.mark.parametrize(
    ("launcher", "sig", "code"),
    [
        (["cluster=local", "hydra/launcher=basic"], signal.SIGINT, 130),  # Ctrl-C: not just the job
        # Ray's own SIGTERM handler in the sweep's process would exit at once (code 15), killing
        # the running jobs with no checkpoint; the launcher interrupts them instead
        (["cluster.num_cpus=1"], signal.SIGTERM, 143),
    ],
)
def test_a_signal_ends_the_whole_sweep_after_the_running_job_saves_a_checkpoint(tmp_path, launcher, sig, code):
    d = tmp_path / "sweep"
    args = [*DIGITS, "rounds=3000", "checkpoint.every=50", *launcher, "seed=0,1", f"hydra.sweep.dir={d}"]
    proc = subprocess.Popen(
        cli("-m", *args), cwd=ROOT, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    assert wait_for_round(d / "seed=0" / "metrics.jsonl", 60, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == code, err
    assert "sweep interrupted" in err
    last = strict_records(d / "seed=0" / "metrics.jsonl")[-1]
    assert last["event"] == "stopped", last
    step = int(last["reason"].split("after step ")[1])
    assert (d / "seed=0" / "checkpoints" / f"step-{step:06d}.pt").exists()  # it resumes from where it stopped
    assert not (d / "seed=1" / "metrics.jsonl").exists()  # the next job never started


def test_an_experiment_that_logs_at_its_last_round_can_still_be_extended_on_resume():
    """fedau_fmnist logs FedAU's weights at ``${rounds}``: a longer run resumed from its checkpoint
    changes that key with ``rounds``, which only says what is logged."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from fedsim.checkpoint import differences
    from fedsim.cli import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        short, long = (compose("config", ["experiment=fedau_fmnist_long", f"rounds={r}"]) for r in (400, 800))
    old, new = (OmegaConf.to_container(c, resolve=True) for c in (short, long))
    assert old["strategy"]["log_weights_every"] == 400 and new["strategy"]["log_weights_every"] == 800
    assert differences(old, new) == []
    assert differences(old, {**new, "seed": 5}) == ["seed: 0 -> 5"]
