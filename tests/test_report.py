"""``fedsim.report`` on run folders laid out as fedsim writes them (``metrics.jsonl``, ``sweep.json``,
``.hydra/overrides.yaml``), for the cases a real sweep rarely produces on demand: runs that stopped
early or are still being written, jobs that never started, two sweeps of the same keys, seeds
logged at different rounds. (tests/test_sweep.py reports on real sweeps.)"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from fedsim import report


def write_run(folder: Path, accs: list[float | None], *, end: str = "run_end", overrides: tuple[str, ...] = ()) -> None:
    """A run that evaluated every 10 rounds: eval/acc, eval/loss = 1 - acc, bytes and rounds."""
    folder.mkdir(parents=True)
    recs: list[dict] = [{"event": "run_start"}]
    for i, acc in enumerate(accs):
        rec = {"event": "round", "round": 10 * i + 9, "comm/bytes_up_total": 100 * (i + 1)}
        if acc is not None:
            rec.update({"eval/acc": acc, "eval/loss": 1 - acc})
        recs.append(rec)
    if end == "run_end":
        recs.append({"event": "run_end", "rounds": 10 * len(accs)})
    elif end == "stopped":
        recs.append({"event": "stopped", "reason": "diverged in step 17"})
    lines = [json.dumps(r) for r in recs]
    if end == "torn":  # a line still being written
        lines.append('{"event": "round", "round": 99, "eval/a')
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if overrides:
        (folder / ".hydra").mkdir()
        (folder / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))


def write_sweep(folder: Path, jobs: dict[str, dict[str, str]]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    record = {"swept": sorted({k for v in jobs.values() for k in v}), "common": [], "jobs": []}
    record["jobs"] = [{"name": name, "values": values} for name, values in jobs.items()]
    (folder / "sweep.json").write_text(json.dumps(record))


def rows(path: Path) -> list[dict]:
    return list(csv.DictReader(path.open()))


def test_runs_that_stopped_or_are_unfinished_or_never_started_are_listed_and_not_counted(tmp_path, capsys):
    d = tmp_path / "sweep"
    write_sweep(d, {f"seed={s}": {"seed": str(s)} for s in range(4)})
    write_run(d / "seed=0", [0.5, 0.6])
    write_run(d / "seed=1", [0.5, 0.9], end="stopped")
    write_run(d / "seed=2", [0.5, 0.9], end="torn")
    report.main([str(d), "--stat", "final"])
    (row,) = rows(d / "report.csv")
    assert int(row["n"]) == 1 and float(row["mean"]) == 0.6
    text = (d / "report.md").read_text()
    assert "1 of 4 jobs not started (seed=3)" in text
    assert "seed=1: stopped: diverged in step 17" in text and "seed=2: not finished" in text
    assert "not counted" in capsys.readouterr().err


def test_two_sweeps_of_the_same_keys_are_grouped_apart_and_a_repeated_seed_is_flagged(tmp_path, capsys):
    for name, base in (("a", 0.5), ("b", 0.8)):
        write_sweep(tmp_path / "multirun" / name, {f"seed={s}": {"seed": str(s)} for s in range(2)})
        for s in range(2):
            write_run(tmp_path / "multirun" / name / f"seed={s}", [base, base + 0.01 * s])
    a, b = tmp_path / "multirun" / "a", tmp_path / "multirun" / "b"
    report.main([str(a), str(b), "--stat", "final", "--out", str(tmp_path / "two")])
    got = {r["sweep"]: (float(r["mean"]), int(r["n"])) for r in rows(tmp_path / "two" / "report.csv")}
    assert got == {"a": (pytest.approx(0.505), 2), "b": (pytest.approx(0.805), 2)}
    # the run folders of one sweep given one by one (a shell glob) pool their seeds
    report.main([str(a / "seed=0"), str(a / "seed=1"), "--stat", "final", "--out", str(tmp_path / "glob")])
    (row,) = rows(tmp_path / "glob" / "report.csv")
    assert int(row["n"]) == 2 and float(row["mean"]) == pytest.approx(0.505)

    # one folder above both sweeps: their runs meet in one group, and the report says so
    report.main([str(tmp_path / "multirun"), "--stat", "final", "--out", str(tmp_path / "one")])
    assert "holds seed 0, 1 more than once" in (tmp_path / "one" / "report.md").read_text()
    assert "warning" in capsys.readouterr().err


def test_mean_curves_average_the_seeds_at_the_rounds_they_all_logged():
    a = {r: (r + 1.0, 0.1 * (r + 1)) for r in range(5)}
    b = {r: (r + 1.0, 0.1 * (r + 1)) for r in (0, 2, 3, 4)}  # no value at round 1 (a NaN, dropped)
    xs, mean, std = report.mean_curve([a, b])
    assert xs.tolist() == [1.0, 3.0, 4.0, 5.0]
    assert np.allclose(mean, [0.1, 0.3, 0.4, 0.5]) and np.allclose(std, 0)
    xs, _, _ = report.mean_curve([])
    assert len(xs) == 0


def test_min_max_and_targets_below_for_losses(tmp_path):
    d = tmp_path / "sweep"
    write_sweep(d, {"seed=0": {"seed": "0"}, "seed=1": {"seed": "1"}})
    write_run(d / "seed=0", [0.5, 0.8, 0.7])
    write_run(d / "seed=1", [0.6, None, 0.9])
    report.main([str(d), "--metric", "eval/loss", "--stat", "min", "max", "best", "--target", "0.25", "--below"])
    got = {r["stat"]: (float(r["mean"]), int(r["n"])) for r in rows(d / "report.csv")}
    assert got["min"][0] == pytest.approx((0.2 + 0.1) / 2)
    assert got["max"][0] == pytest.approx((0.5 + 0.4) / 2) and got["best"] == got["max"]
    assert got["round_to_0.25"] == (pytest.approx(25.0), 2)  # seed 0 at round 20 (loss 0.2), seed 1 at 30 (0.1)
    assert "round to eval/loss ≤ 0.25" in (d / "report.md").read_text()


def test_columns_lay_out_every_metric_and_statistic(tmp_path):
    d = tmp_path / "sweep"
    jobs = {f"lr={lr},seed={s}": {"lr": lr, "seed": str(s)} for lr in ("0.1", "0.01") for s in range(2)}
    write_sweep(d, jobs)
    for name in jobs:
        write_run(d / name, [0.5, 0.6 if "0.1," in name else 0.7])
    report.main([str(d), "--metric", "eval/acc", "eval/loss:min", "--stat", "final", "best", "--columns", "lr"])
    text = (d / "report.md").read_text()
    for heading in ("## eval/acc, final", "## eval/acc, best", "## eval/loss, min"):
        assert heading in text
    assert text.index("lr=0.1 | lr=0.01") > 0  # the declared order, not sorted as text


def test_values_from_run_folders_sort_as_numbers_and_bad_axes_are_one_line(tmp_path, capsys):
    for lr in ("0.1", "1e-3", "0.01"):
        write_run(tmp_path / f"lr{lr}", [0.5, 0.6], overrides=(f"strategy.client.lr={lr}", "seed=0"))
    report.main([str(tmp_path), "--stat", "final", "--out", str(tmp_path / "out")])
    order = [r["strategy.client.lr"] for r in rows(tmp_path / "out" / "report.csv")]
    assert order == ["1e-3", "0.01", "0.1"]
    with pytest.raises(SystemExit) as stop:
        report.main([str(tmp_path), "--x", "time", "--out", str(tmp_path / "bad")])
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and err[-1].startswith("fedsim.report: error: --x time: no run logs time/simulated")
    assert not (tmp_path / "bad").exists()


def test_repeated_list_options_add_up_and_a_repeated_single_value_option_is_one_line(tmp_path, capsys):
    d = tmp_path / "sweep"
    jobs = {f"lr={lr},seed={s}": {"lr": lr, "seed": str(s)} for lr in ("0.1", "0.01") for s in range(2)}
    write_sweep(d, jobs)
    for name in jobs:
        write_run(d / name, [0.5, 0.6, 0.7])
    argv = [str(d), "--metric", "eval/acc", "--metric", "eval/loss:min", "--stat", "final", "--stat", "best"]
    report.main([*argv, "--target", "0.55", "--target", "0.65", "--where", "lr=0.1", "--where", "seed=0,1"])
    got = {(r["metric"], r["stat"]) for r in rows(d / "report.csv")}
    assert got == {
        ("eval/acc", "final"),
        ("eval/acc", "best"),
        ("eval/loss", "min"),
        ("eval/acc", "round_to_0.55"),
        ("eval/acc", "round_to_0.65"),
    }
    assert all(int(r["n"]) == 2 for r in rows(d / "report.csv"))  # one group: lr=0.1 (both --where hold)
    assert (d / "eval_acc_vs_round.png").exists() and (d / "eval_loss_vs_round.png").exists()
    report.main([str(d), "--stat", "final", "--group-by", "lr", "--group-by", "seed", "--name", "both"])
    assert len(rows(d / "both.csv")) == 4
    capsys.readouterr()

    for args, says in [
        (["--columns", "lr", "--columns", "seed"], "--columns takes one value, given lr and seed"),
        (["--x", "round", "--x", "bytes"], "--x takes one value, given round and bytes"),
        (["--where", "lr=0.1", "--where", "lr=0.01"], "one condition per key; for either, --where lr=0.1,0.01"),
    ]:
        with pytest.raises(SystemExit) as stop:
            report.main([str(d), *args, "--name", "bad"])
        err = capsys.readouterr().err.strip().splitlines()
        assert stop.value.code == 2 and len(err) == 1 and says in err[0], err
    assert not (d / "bad.md").exists()
    report.main([str(d), "--x", "round", "--x", "round", "--stat", "final", "--name", "same"])  # the same value twice
    assert (d / "same.md").exists()


def test_a_missing_plot_or_line_says_why_and_the_table_is_still_written(tmp_path, capsys):
    d = tmp_path / "once"  # eval_every=0: one evaluation per run
    write_sweep(d, {f"seed={s}": {"seed": str(s)} for s in range(2)})
    for s in range(2):
        write_run(d / f"seed={s}", [0.6 + 0.1 * s])
    report.main([str(d), "--metric", "eval/acc", "rounds:final"])
    err = capsys.readouterr().err.splitlines()
    assert (
        "fedsim.report: no plot of eval/acc: every run logged eval/acc at 1 round only (evaluate more often: eval_every=K)"
        in err
    )
    assert "fedsim.report: no plot of rounds: every run logged rounds only at the end of the run, not per round" in err
    assert not list(d.glob("*.png"))
    (row, *_) = rows(d / "report.csv")
    assert float(row["mean"]) == pytest.approx(0.65) and int(row["n"]) == 2
    assert "- no plot of eval/acc: every run logged eval/acc at 1 round only" in (d / "report.md").read_text()

    # a plot that lacks some groups' lines names them, and why
    e = tmp_path / "some"
    jobs = {f"lr={lr},seed={s}": {"lr": lr, "seed": str(s)} for lr in ("0.1", "0.01", "1") for s in range(2)}
    write_sweep(e, jobs)
    for s in range(2):
        write_run(e / f"lr=0.1,seed={s}", [0.5, 0.6, 0.7])
        write_run(e / f"lr=0.01,seed={s}", [0.5])
    write_run(e / "lr=1,seed=0", [0.5, 0.6, None, None])  # the seeds evaluated at different rounds
    write_run(e / "lr=1,seed=1", [None, None, 0.5, 0.6])
    report.main([str(e), "--stat", "final"])
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("fedsim.report: eval_acc_vs_round.png has no line for 2 groups: the runs of lr=0.01")
    assert "the runs of lr=1 logged eval/acc at rounds the seeds do not share" in line
    assert (e / "eval_acc_vs_round.png").exists()


def test_the_table_is_printed_then_the_paths_written(tmp_path, capsys):
    d = tmp_path / "sweep"
    jobs = {f"lr={lr},seed={s}": {"lr": lr, "seed": str(s)} for lr in ("0.1", "0.01") for s in range(2)}
    write_sweep(d, jobs)
    for name in jobs:
        write_run(d / name, [0.5, 0.6 if "0.1," in name else 0.7])
    for name, extra, first in [
        ("plain", [], "| lr | eval/acc final |"),
        ("cols", ["--columns", "lr", "--metric", "eval/acc", "eval/loss:min"], "## eval/acc, final"),
    ]:
        report.main([str(d), "--stat", "final", "--name", name, *extra])
        table, _, wrote = capsys.readouterr().out.rpartition("\n\n")
        assert table.startswith(first) and table in (d / f"{name}.md").read_text()  # the same text as the file's
        assert "| 0.01 |" in table or "| lr=0.1 | lr=0.01 |" in table
        plots = [f"wrote {p}" for p in sorted(d.glob(f"{name}_*.png"))]
        assert plots and wrote.splitlines() == [f"wrote {d / name}.md", f"wrote {d / name}.csv", *plots]
    assert "## eval/loss, min" in table  # every matrix of --columns


def test_a_multi_phase_strategy_gets_best_and_final_per_phase_and_its_boundaries_marked(tmp_path, capsys):
    """Real VRLS runs (predictor 4 rounds, calibration 2, estimate 1, IW-ERM 5, evaluated every
    round): the default statistics add best and final per phase, the phase restart is not the
    whole-run best's phase, and the plot marks where each phase begins."""
    from tests.test_faults import run

    phases = ["strategy=vrls", "strategy.predictor_rounds=4", "strategy.calibration_rounds=2", "rounds=5"]
    for seed in (0, 1):
        folder = tmp_path / "sweep" / f"seed{seed}"
        done = run(*phases, "cluster=local", "logger=jsonl", f"seed={seed}", f"hydra.run.dir={folder}")
        assert done.returncode == 0, done.stderr
    runs, _ = report.load([tmp_path / "sweep"])
    assert report.phase_key(runs) == "vrls/phase"
    (first, *_) = runs
    assert sorted(set(first.phases("vrls/phase").values())) == [0, 1, 2, 3]
    # predictor rounds 0-3, calibration 4-5, estimate 6, IW-ERM 7-11 (x: the 1-based round): boundaries
    # half a round before each phase's first x
    assert first.boundaries("vrls/phase", "round") == [(4.5, 1), (6.5, 2), (7.5, 3)]
    accs = {t: y for t, (_, y) in first.points("eval/acc", "round").items()}
    assert report.statistic(first, "eval/acc", "best@phase0", "vrls/phase") == max(accs[t] for t in range(4))
    assert report.statistic(first, "eval/acc", "final@phase3", "vrls/phase") == accs[11]
    assert report.statistic(first, "eval/acc", "best@phase3", "vrls/phase") == max(accs[t] for t in range(7, 12))
    assert np.isnan(report.statistic(first, "eval/acc", "best@phase7", "vrls/phase"))

    report.main([str(tmp_path / "sweep")])
    out = capsys.readouterr().out
    header = out.splitlines()[0]
    for stat in ("final", "best", "best@phase0", "final@phase0", "best@phase3", "final@phase3"):
        assert f"eval/acc {stat} |" in header
    md = (tmp_path / "sweep" / "report.md").read_text()
    assert "numbered by vrls/phase" in md
    stats = {row["stat"] for row in rows(tmp_path / "sweep" / "report.csv")}
    assert {"best@phase0", "final@phase3"} <= stats
    assert (tmp_path / "sweep" / "eval_acc_vs_round.png").exists()

    # an explicit --stat is kept as given, and may name a phase; a phase without a number is one line
    report.main([str(tmp_path / "sweep"), "--stat", "best@phase3", "--name", "p3"])
    assert {row["stat"] for row in rows(tmp_path / "sweep" / "p3.csv")} == {"best@phase3"}
    with pytest.raises(SystemExit):
        report.main([str(tmp_path / "sweep"), "--stat", "best@phaseX"])
    assert "a phase is named by its number" in capsys.readouterr().err


def test_runs_without_phases_keep_the_plain_statistics(tmp_path):
    write_run(tmp_path / "run", [0.5, 0.7, 0.6])
    runs, _ = report.load([tmp_path / "run"])
    assert report.phase_key(runs) is None
    report.main([str(tmp_path / "run")])
    assert {row["stat"] for row in rows(tmp_path / "run" / "report.csv")} == {"final", "best"}
