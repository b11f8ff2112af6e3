"""``python -m fedsim.report <sweep dir or run dirs...>``: one table and a few plots for a comparison.

It reads every run's ``metrics.jsonl`` (and the sweep's ``sweep.json``, or each run's
``.hydra/overrides.yaml``), groups the runs by every swept key except the seed (with several
folders given, by the folder too), and writes, into ``--out`` (default: the first folder given):

- ``report.md`` and ``report.csv``: per group and per metric, mean ± std over the seeds and their
  number of each statistic asked for: ``final`` (the last logged value), ``best`` or ``max`` (the
  largest), ``min``, ``last:K`` (the mean of the last K), and for each ``--target`` the first round
  / simulated time / uplink bytes (``--x``) at which the metric reaches it (>=, or <= with
  ``--below``; the mean over the seeds that reach it, with how many did). The standard deviation is
  the population one (ddof 0). Runs that stopped early (diverged), did not finish or did not start
  are not counted; the report lists them.
- ``<metric>.png``: the metric against rounds, simulated time or uplink bytes, one line per group
  (the mean over seeds at the rounds they all logged) with a band of ± one standard deviation.

``--metric NAME:STAT`` gives that metric only the statistics named so (``rounds:final``), the others
get ``--stat``. ``--columns KEY`` lays each metric and statistic out as a matrix, the values of KEY
as columns.

The options that take lists add up when repeated (``--metric eval/acc --metric train/loss`` is
``--metric eval/acc train/loss``; likewise ``--stat``, ``--target``, ``--group-by``, ``--where``, whose
conditions must all hold, one per key); an option of one value (``--x``, ``--columns``, ``--out``,
``--name``, ``--title``, ``--digits``) given twice with different values stops with one line.
The table is also printed to stdout, then the paths written. A metric that gets no plot (every run
logged it at one round only, as with ``eval_every=0``; only at the end; at rounds its seeds do not
share), or a plot that lacks some group's line, is said on stderr and under the table.

Multi-phase strategies (VRLS: predictor, calibration, estimation, IW-ERM training) log their phase
every round (a metric whose name ends in ``/phase``, ``vrls/phase``). ``STAT@phaseK`` is a statistic
over the steps of phase K only (``best@phase3``); without ``--stat``, such runs get ``best@phaseK``
and ``final@phaseK`` for every phase in which the metric was logged, after the whole-run ``final``
and ``best``, and the plots mark where each phase begins (a dotted line labelled with its number).
"""

from __future__ import annotations

import argparse
import csv
import difflib
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from fedsim.results import read_records

X_KEYS = {"round": "round", "time": "time/simulated", "bytes": "comm/bytes_up_total"}
STATS = "final, best (the largest), max, min or last:K; STAT@phaseK over phase K of a multi-phase strategy"


@dataclass
class Run:
    folder: Path
    values: dict[str, str]
    """The swept keys' values of this run (the seed included)."""
    records: list[dict[str, Any]] = field(default_factory=list)
    end: dict[str, Any] = field(default_factory=dict)
    declared: bool = False
    """Whether ``values`` come from the sweep's ``sweep.json`` (their order is the declared one)."""

    def points(self, metric: str, x: str) -> dict[int, tuple[float, float]]:
        """round -> (x, y) over the steps that logged a finite ``metric`` (x: 1-based round,
        simulated time or uplink bytes)."""
        out = {}
        for rec in self.records:
            y = rec.get(metric)
            if not isinstance(y, (int, float)) or isinstance(y, bool) or not math.isfinite(y):
                continue
            xv = rec["round"] + 1 if x == "round" else rec.get(X_KEYS[x], math.nan)
            out[int(rec["round"])] = (float(xv) if isinstance(xv, (int, float)) else math.nan, float(y))
        return out

    def series(self, metric: str, x: str, phase: tuple[str, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) over the steps that logged ``metric``, in order; with ``phase`` (key, value), only
        the steps of that phase."""
        pts = self.points(metric, x)
        if phase is not None:
            of = self.phases(phase[0])
            pts = {t: p for t, p in pts.items() if of.get(t) == phase[1]}
        values = list(pts.values())
        return np.asarray([p[0] for p in values], dtype=float), np.asarray([p[1] for p in values], dtype=float)

    def phases(self, key: str) -> dict[int, int]:
        """round -> phase, from the steps that logged the phase metric ``key`` (``vrls/phase``)."""
        return {
            int(rec["round"]): int(rec[key])
            for rec in self.records
            if "round" in rec and isinstance(rec.get(key), (int, float)) and not isinstance(rec.get(key), bool)
        }

    def boundaries(self, key: str, x: str) -> list[tuple[float, int]]:
        """(x, phase) where a phase begins after another: the x of its first step (a round's x is
        its 1-based number, so the boundary sits half a round before it)."""
        of = self.phases(key)
        xs = {int(rec["round"]): rec for rec in self.records if "round" in rec}
        out = []
        prev = None
        for t in sorted(of):
            if prev is not None and of[t] != prev:
                if x == "round":
                    out.append((t + 0.5, of[t]))
                else:
                    xv = xs[t].get(X_KEYS[x])
                    if isinstance(xv, (int, float)):
                        out.append((float(xv), of[t]))
            prev = of[t]
        return out


def _overrides(folder: Path) -> dict[str, str]:
    path = folder / ".hydra" / "overrides.yaml"
    if not path.exists():
        return {}
    from omegaconf import OmegaConf

    out = {}
    for item in OmegaConf.to_container(OmegaConf.load(path)) or []:
        key, _, value = str(item).partition("=")
        key = key.lstrip("+~")
        if not key.startswith("hydra.") and key != "resume":
            out[key] = value
    return out


def _sweep_values(folder: Path) -> tuple[dict[str, str], list[str]] | None:
    """A sweep job's swept values and the sweep's swept keys, from the sweep's ``sweep.json``."""
    index = folder.parent / "sweep.json"
    if not index.exists():
        return None
    sweep = json.loads(index.read_text())
    for job in sweep.get("jobs", []):
        if job["name"] == folder.name:
            return {k: str(v) for k, v in job["values"].items()}, list(sweep.get("swept", []))
    return None


def load(paths: Sequence[Path], left_out: list[str] | None = None) -> tuple[list[Run], list[str]]:
    """The finished runs under ``paths`` and the keys that distinguish them: a sweep's swept keys
    (its ``sweep.json``), else the command-line overrides whose values differ between the runs.

    With more than one path, every run also gets the key ``sweep`` (the folder it came from), so
    that two sweeps of the same keys are not pooled as if they were more seeds. Runs that are not
    counted (stopped early, unfinished, not started) are described in ``left_out``."""
    notes = left_out if left_out is not None else []
    found: list[tuple[Path, Path]] = []  # (source, run folder)
    for p in paths:
        if (p / "metrics.jsonl").exists():
            found.append((p, p))
        elif (p / "sweep.json").exists():  # the sweep's own job order (values as declared)
            jobs = json.loads((p / "sweep.json").read_text()).get("jobs", [])
            missing = [j["name"] for j in jobs if not (p / j["name"] / "metrics.jsonl").exists()]
            if missing:
                notes.append(f"{p}: {len(missing)} of {len(jobs)} jobs not started ({_few(missing)})")
            found += [(p, p / j["name"]) for j in jobs if j["name"] not in missing]
        else:
            found += [(p, f.parent) for f in sorted(p.rglob("metrics.jsonl"))]
    # with several paths, a run's source is the folder that holds it (its sweep), named as briefly
    # as stays unique: run folders of one sweep given one by one still pool their seeds
    parents = list(dict.fromkeys(str(folder.parent) for _, folder in found))
    short = {q: Path(q).name for q in parents}
    if len(set(short.values())) < len(short):
        short = {q: q for q in parents}
    runs: list[Run] = []
    for _, folder in found:
        records = read_records(folder / "metrics.jsonl")
        last = records[-1] if records else {}
        if last.get("event") != "run_end":
            why = f"stopped: {last.get('reason', '?')}" if last.get("event") == "stopped" else "not finished"
            notes.append(f"{folder}: {why}")
            continue
        assert records is not None
        rounds = [r for r in records if r.get("event") == "round"]
        swept = _sweep_values(folder)
        values = swept[0] if swept else _overrides(folder)
        if len(paths) > 1:
            values = {"sweep": short[str(folder.parent)], **values}

        runs.append(Run(folder, values, rounds, last, declared=swept is not None))
    keys: list[str] = []
    for run in runs:
        for key in run.values:
            if key not in keys and len({r.values.get(key) for r in runs}) > 1:
                keys.append(key)
    return runs, keys


def mean_curve(curves: list[dict[int, tuple[float, float]]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean x, mean y and std of y over runs, at the rounds that every run logged."""
    shared = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    xs = np.array([[c[t][0] for t in shared] for c in curves]).reshape(len(curves), len(shared))
    ys = np.array([[c[t][1] for t in shared] for c in curves]).reshape(len(curves), len(shared))
    if not curves:
        return np.zeros(0), np.zeros(0), np.zeros(0)
    return xs.mean(0), ys.mean(0), ys.std(0)


def _few(names: list[str], most: int = 3) -> str:

    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


PHASE_SUFFIX = "@phase"


def split_stat(stat: str) -> tuple[str, int | None]:
    """``best@phase3`` -> ("best", 3); ``best`` -> ("best", None)."""
    base, sep, phase = stat.partition(PHASE_SUFFIX)
    return (base, int(phase)) if sep and phase.isdigit() else (stat, None)


def phase_key(runs: list[Run]) -> str | None:
    """The metric that numbers a multi-phase strategy's phases (a logged key ending in ``/phase``,
    such as VRLS's ``vrls/phase``) when some run goes through more than one phase; else None."""
    for key in sorted(k for k in _logged(runs) if k.endswith("/phase")):
        if any(len(set(r.phases(key).values())) > 1 for r in runs):
            return key
    return None


def statistic(run: Run, metric: str, stat: str, phase_metric: str | None = None) -> float:
    """``stat`` of ``metric`` over the run's steps; ``STAT@phaseK``: over the steps of phase K only
    (``phase_metric`` numbers them; NaN when the run logged ``metric`` in no step of K)."""
    stat, phase = split_stat(stat)
    if phase is not None:
        if phase_metric is None:
            return math.nan
        _, y = run.series(metric, "round", (phase_metric, phase))
        if len(y) == 0:
            return math.nan
    else:
        _, y = run.series(metric, "round")
    if len(y) == 0:
        value = run.end.get(metric)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan
    if stat == "final":
        return float(y[-1])
    if stat in ("best", "max"):
        return float(y.max())
    if stat == "min":
        return float(y.min())
    if stat.startswith("last:"):
        return float(np.mean(y[-int(stat.split(":")[1]) :]))
    raise ValueError(f"unknown statistic {stat!r}: {STATS}")


def reach(run: Run, metric: str, target: float, x: str, below: bool = False) -> float:
    """The first x at which ``metric`` reaches ``target`` (>= it, or <= it with ``below``)."""
    xs, ys = run.series(metric, x)
    hit = np.flatnonzero(ys <= target if below else ys >= target)
    return float(xs[hit[0]]) if len(hit) else math.nan


@dataclass
class Cell:
    values: list[float]

    @property
    def ok(self) -> list[float]:
        return [v for v in self.values if math.isfinite(v)]

    def text(self, digits: int, *, reached: bool = False) -> str:
        """``mean ± std (n)``; counts (rounds, bytes: every value whole) in whole numbers with
        thousands separators, others to ``digits`` decimals (or significant digits for a target)."""
        ok = self.ok
        whole = bool(ok) and all(float(v).is_integer() for v in ok)

        def num(v: float, fmt: str) -> str:
            if not whole:
                return format(v, fmt)
            return f"{v:,.0f}" if float(v).is_integer() else f"{v:,.1f}"

        if reached:
            n = f"({len(ok)}/{len(self.values)})"
            return f"{num(float(np.mean(ok)), f'.{digits}g')} {n}" if ok else f"- {n}"
        if not ok:
            return "-"
        return f"{num(float(np.mean(ok)), f'.{digits}f')} ± {num(float(np.std(ok)), f'.{digits}f')} ({len(ok)})"


def group_runs(runs: list[Run], keys: list[str]) -> dict[tuple[tuple[str, str], ...], list[Run]]:
    groups: dict[tuple[tuple[str, str], ...], list[Run]] = {}
    for run in runs:
        label = tuple((k, run.values.get(k, "")) for k in keys)
        groups.setdefault(label, []).append(run)
    return groups


def label_text(label: tuple[tuple[str, str], ...]) -> str:
    return ", ".join(f"{k}={v}" for k, v in label) or "all runs"


def write(runs: list[Run], keys: list[str], args: argparse.Namespace, table: list[str] | None = None) -> list[Path]:
    """Write the report's table (NAME.md, NAME.csv) and plots into ``args.out``; the paths written.
    ``table`` receives the markdown table's lines (with ``--columns``, each matrix under its heading)."""
    order = _orderer(runs)
    group_keys = [k for k in keys if k != "seed"] if args.group_by is None else args.group_by
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    written = []
    md = [f"# Report: {len(runs)} runs, grouped by {', '.join(group_keys) or 'nothing'}", ""]
    if args.title:
        md += [args.title, ""]
    md.append(
        f"Mean ± std over seeds (population std), with the number of seeds; sources: "
        f"{', '.join(str(p) for p in args.paths)}."
    )
    md.append("")
    if getattr(args, "phase_key", None):
        md += [
            f"Phases: the runs go through phases numbered by {getattr(args, 'phase_key', None)}; STAT@phaseK is over the steps "
            "of phase K only (a whole-run best may come from another phase than the last); the plots mark "
            "where a phase begins.",
            "",
        ]
    rows_csv: list[dict[str, Any]] = []
    groups = sorted(group_runs(runs, group_keys).items(), key=lambda kv: tuple(order(k, v) for k, v in kv[0]))
    for label, members in groups:
        seeds = [r.values.get("seed") for r in members if "seed" in r.values]
        twice = sorted({str(s) for s in seeds if seeds.count(s) > 1}, key=_one)
        if twice:
            line = (
                f"{label_text(label)} holds seed {', '.join(map(str, twice))} more than once: each run counts as a seed"
            )
            print(f"fedsim.report: warning: {line}", file=sys.stderr)
            md += [f"Warning: {line}.", ""]
    start = len(md)
    if args.columns:
        col_key = args.columns
        row_keys = [k for k in group_keys if k != col_key]
        cols = sorted({r.values.get(col_key, "") for r in runs}, key=lambda v: order(col_key, v))
        rows = sorted(group_runs(runs, row_keys).items(), key=lambda kv: tuple(order(k, v) for k, v in kv[0]))
        for metric in args.metric:
            for stat in args.pinned.get(metric, args.stat):
                md += [f"## {metric}, {stat}", ""]
                md.append("| " + " | ".join([*row_keys, *[f"{col_key}={c}" for c in cols]]) + " |")
                md.append("|" + "---|" * (len(row_keys) + len(cols)))
                for label, members in rows:
                    cells = []
                    for c in cols:
                        vals = [
                            statistic(r, metric, stat, getattr(args, "phase_key", None))
                            for r in members
                            if r.values.get(col_key, "") == c
                        ]
                        cells.append(Cell(vals).text(args.digits) if vals else "")
                        rows_csv.append({**dict(label), col_key: c, "metric": metric, "stat": stat, **_csv(vals)})
                    md.append("| " + " | ".join([*(v for _, v in label), *cells]) + " |")
                md.append("")
    else:
        header = list(group_keys)
        columns: list[tuple[str, str, float | None]] = [
            (m, s, None) for m in args.metric for s in args.pinned.get(m, args.stat)
        ]
        columns += [(args.metric[0], "reach", t) for t in args.target]
        sign = "≤" if args.below else "≥"
        names = [f"{m} {s}" if t is None else f"{args.x} to {m} {sign} {t:g}" for m, s, t in columns]
        md.append("| " + " | ".join([*header, *names]) + " |")
        md.append("|" + "---|" * (len(header) + len(names)))
        for label, members in groups:
            cells = []
            for metric, stat, target in columns:
                if target is None:
                    vals = [statistic(r, metric, stat, getattr(args, "phase_key", None)) for r in members]
                    cells.append(Cell(vals).text(args.digits))
                else:
                    vals = [reach(r, metric, target, args.x, args.below) for r in members]
                    cells.append(Cell(vals).text(args.digits, reached=True))
                name = stat if target is None else f"{args.x}_to_{target:g}"
                rows_csv.append({**dict(label), "metric": metric, "stat": name, **_csv(vals)})
            md.append("| " + " | ".join([*(v for _, v in label), *cells]) + " |")
        md.append("")
    if table is not None:
        table += md[start:-1]
    if args.left_out:
        md += ["Not counted (the table covers finished runs only):", ""]
        md += [f"- {note}" for note in args.left_out] + [""]
    notes: list[str] = []
    plots = plot(runs, group_keys, args, notes)
    for note in notes:
        print(f"fedsim.report: {note}", file=sys.stderr)
    if notes:
        md += ["Plots:", ""] + [f"- {note}" for note in notes] + [""]
    for p in plots:
        md.append(f"![{p.stem}]({p.name})")
    (out / f"{args.name}.md").write_text("\n".join(md) + "\n")
    written.append(out / f"{args.name}.md")
    with open(out / f"{args.name}.csv", "w", newline="") as fh:
        fields = sorted({k for row in rows_csv for k in row}, key=lambda k: (k in ("mean", "std", "n", "values"), k))
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows_csv)
    written.append(out / f"{args.name}.csv")
    return written + plots


def _csv(values: list[float]) -> dict[str, Any]:
    ok = [v for v in values if math.isfinite(v)]
    return {
        "mean": float(np.mean(ok)) if ok else "",
        "std": float(np.std(ok)) if ok else "",
        "n": len(ok),
        "values": " ".join(f"{v:.6g}" for v in values),
    }


def _one(text: str) -> tuple[int, float, str]:
    """Numbers sort as numbers, the rest as text."""
    try:
        return (0, float(text), "")
    except ValueError:
        return (1, 0.0, text)


def _sort_key(label: Any) -> Any:
    if isinstance(label, tuple):  # a group label: ((key, value), ...)
        return tuple(_one(str(v)) for _, v in label)
    return _one(str(label))


def _orderer(runs: list[Run]) -> Callable[[str, str], tuple[int, Any]]:
    """Values sort in the order the runs first show them (a sweep's declared order), else as
    numbers or text."""
    seen: dict[tuple[str, str], int] = {}
    for run in runs:  # a sweep's declared order; the sources in the order given
        for key, value in run.values.items():
            if run.declared or key == "sweep":
                seen.setdefault((key, value), len(seen))

    def key_of(key: str, value: str) -> tuple[int, Any]:
        index = seen.get((key, value))
        return (0, index) if index is not None else (1, _one(value))

    return key_of


LINESTYLES = ("-", "--", ":", "-.")


def _styles(labels: list[tuple[tuple[str, str], ...]]) -> dict[tuple[tuple[str, str], ...], tuple[str, str]]:
    """A colour and a line style per group, so that no two groups look alike (up to 40 groups).

    With two or more grouping keys whose first key takes at most 4 values and the others at most 10
    combinations, the first key picks the line style and the rest the colour (latency 0 solid,
    latency 80 dashed, one colour per method); otherwise colours cycle and the style changes every
    10 groups."""
    firsts = list(dict.fromkeys(label[0][1] for label in labels if label))
    rests = list(dict.fromkeys(label[1:] for label in labels))
    split = bool(labels) and len(labels[0]) >= 2 and len(firsts) <= len(LINESTYLES) and len(rests) <= 10
    styles = {}
    for i, label in enumerate(labels):
        if split:
            styles[label] = (f"C{rests.index(label[1:])}", LINESTYLES[firsts.index(label[0][1])])
        else:
            styles[label] = (f"C{i % 10}", LINESTYLES[(i // 10) % len(LINESTYLES)])
    return styles


def _no_line(members: list[Run], metric: str, curves: list[dict[int, tuple[float, float]]]) -> str | None:
    """Why a group's runs (their ``curves`` of ``metric``) give no line, None when they give one:
    ``none`` (no run of the group logs it), ``end`` (only in the runs' final record), ``once`` (no
    run logged it at 2 rounds or more), ``apart`` (the seeds share fewer than 2 of its rounds)."""
    if not any(curves):
        return "end" if any(metric in r.end for r in members) else "none"
    if all(len(c) < 2 for c in curves):
        return "once"
    xs, _, _ = mean_curve([c for c in curves if len(c) > 1])
    return "apart" if len(xs) < 2 else None


def _why(metric: str, missing: list[tuple[str, str]], every: bool) -> str:
    """One line on the groups (label, reason) that give ``metric`` no line; ``every``: they are
    all the groups."""
    phrases = {
        "none": "did not log {m}",
        "end": "logged {m} only at the end of the run, not per round",
        "once": "logged {m} at 1 round only",
        "apart": "logged {m} at rounds the seeds do not share (fewer than 2 in common)",
    }
    parts = []
    for code, phrase in phrases.items():
        labels = [f"({label})" if ", " in label else label for label, why in missing if why == code]
        if labels:
            who = "every run" if every and len(labels) == len(missing) else f"the runs of {_few(labels)}"
            more = " (evaluate more often: eval_every=K)" if code == "once" and metric.startswith("eval/") else ""
            parts.append(f"{who} {phrase.format(m=metric)}{more}")
    return "; ".join(parts)


def plot(
    runs: list[Run], group_keys: list[str], args: argparse.Namespace, notes: list[str] | None = None
) -> list[Path]:
    """One PNG per metric. With ``--columns KEY`` one panel per value of KEY (the table's layout),
    the other keys' groups as lines; the legend goes beside the axes when it is long.

    A metric that gets no plot, or a plot without some group's line, is described in ``notes``
    (one line each): every run logged it at one round only (``eval_every=0``), only at the end,
    or its seeds share fewer than two logged rounds; or it is the x axis."""
    notes = notes if notes is not None else []
    order = _orderer(runs)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    col_key = args.columns if args.columns in group_keys else None
    line_keys = [k for k in group_keys if k != col_key]
    panels = sorted({r.values.get(col_key, "") for r in runs}, key=lambda v: order(col_key, v)) if col_key else [None]
    groups = sorted(group_runs(runs, line_keys).items(), key=lambda kv: tuple(order(k, v) for k, v in kv[0]))
    style = _styles([label for label, _ in groups])
    paths = []
    for metric in args.metric:
        if metric == X_KEYS[args.x]:
            notes.append(f"no plot of {metric}: it is the x axis (--x {args.x})")
            continue  # the x axis against itself
        ncols = min(len(panels), 3)
        nrows = -(-len(panels) // ncols)
        outside = len(groups) > 10 or col_key is not None  # the legend beside the axes, the figure wider
        width = (7.5 if ncols == 1 else 4.2 * ncols) + (3.5 if outside else 0)
        fig, axes = plt.subplots(
            nrows,
            ncols,
            figsize=(width, 4.8 if nrows == 1 else 3.6 * nrows),
            sharey=True,
            squeeze=False,
            layout="constrained",
        )
        handles: dict[str, Any] = {}
        missing: list[tuple[str, str]] = []  # (group, why) without a line
        for ax, panel in zip(axes.flat, panels, strict=False):
            for label, members in groups:
                if col_key:
                    members = [r for r in members if r.values.get(col_key, "") == panel]
                if not members:
                    continue
                pts = [r.points(metric, args.x) for r in members]
                why = _no_line(members, metric, pts)
                if why is not None:
                    where = ([f"{col_key}={panel}"] if col_key else []) + (
                        [label_text(label)] if label or not col_key else []
                    )
                    missing.append((", ".join(where), why))
                    continue
                curves = [c for c in pts if len(c) > 1]
                xs, mean, std = mean_curve(curves)

                color, dashes = style[label]
                name = f"{label_text(label)} ({len(curves)})" if not col_key else label_text(label)
                (line,) = ax.plot(xs, mean, color=color, linestyle=dashes, label=name)
                ax.fill_between(xs, mean - std, mean + std, alpha=0.15, color=color)
                handles.setdefault(name, line)
            phases = getattr(args, "phase_key", None)
            if phases:
                shown = [r for r in runs if not col_key or r.values.get(col_key, "") == panel]
                starts = sorted({b for r in shown for b in r.boundaries(phases, args.x)})
                for xb, phase in starts:
                    ax.axvline(xb, color="0.45", linestyle=":", linewidth=1)
                    ax.annotate(
                        f"phase {phase}",
                        (xb, 1.0),
                        xycoords=("data", "axes fraction"),
                        fontsize=7,
                        color="0.35",
                        rotation=90,
                        ha="right",
                        va="top",
                    )
            if col_key:
                ax.set_title(f"{col_key}={panel}", fontsize=9)
            ax.set_xlabel({"round": "round", "time": "simulated time", "bytes": "uplink bytes (cumulative)"}[args.x])
            if args.logx:
                ax.set_xscale("log")
            ax.grid(alpha=0.3)
        for ax in axes.flat[len(panels) :]:
            ax.set_visible(False)
        if not handles:
            plt.close(fig)
            notes.append(f"no plot of {metric}: {_why(metric, missing, every=True)}")
            continue
        for ax in axes[:, 0]:
            ax.set_ylabel(metric)
        if outside:
            fig.legend(handles.values(), handles.keys(), fontsize=7, loc="outside right upper")
        else:
            axes[0, 0].legend(fontsize=7, loc="best")
        prefix = "" if args.name == "report" else f"{args.name}_"
        path = args.out / f"{prefix}{metric.replace('/', '_')}_vs_{args.x}.png"
        if missing:
            n = len(missing)
            notes.append(f"{path.name} has no line for {n} group{'s' * (n > 1)}: {_why(metric, missing, every=False)}")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


class _Once(argparse.Action):
    """An option of one value: given again with another value, it stops with one line (exit 2)
    instead of silently replacing the first."""

    GIVEN = "_given_once"

    def __init__(self, *args: Any, hint: str = "", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hint = hint

    def __call__(
        self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any, option: str | None = None
    ) -> None:
        given = vars(namespace).setdefault(self.GIVEN, {})
        if self.dest in given and given[self.dest] != values:
            parser.error(f"{option} takes one value, given {given[self.dest]} and {values}{self.hint}")
        given[self.dest] = values
        setattr(namespace, self.dest, values)


class _Parser(argparse.ArgumentParser):
    """Bad input is one line on stderr (no usage block) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        print(f"fedsim.report: error: {message} (see python -m fedsim.report --help)", file=sys.stderr)
        sys.exit(2)


def _logged(runs: list[Run]) -> set[str]:
    """Every numeric metric that some run logs (per step or in its run_end record)."""
    names: set[str] = set()
    for run in runs:
        for rec in [*run.records, run.end]:
            names.update(k for k, v in rec.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
    return names - {"round"}


def _check(ap: argparse.ArgumentParser, runs: list[Run], args: argparse.Namespace) -> list[Run]:
    """Keep the runs ``--where`` selects; stop with one line at a key or metric that no run has."""
    known = sorted({k for r in runs for k in r.values})
    asked = [("--group-by", k) for k in args.group_by or []] + ([("--columns", args.columns)] if args.columns else [])
    conds: dict[str, str] = {}
    for cond in args.where:
        key, sep, values = cond.partition("=")
        if not sep:
            ap.error(f"--where {cond}: use KEY=VALUE or KEY=A,B")
        if conds.get(key) == cond:
            continue
        if key in conds:
            both = ",".join(dict.fromkeys([*conds[key].partition("=")[2].split(","), *values.split(",")]))
            ap.error(
                f"--where {conds[key]} and --where {cond}: one condition per key; for either, --where {key}={both}"
            )
        conds[key] = cond
        asked.append((f"--where {cond}", key))
    for option, key in asked:
        if key not in known:
            ap.error(f"{option}: no run has the key {key!r}; the runs' keys: {', '.join(known) or 'none'}")
    for cond in args.where:
        key, _, values = cond.partition("=")
        kept = [r for r in runs if r.values.get(key) in values.split(",")]
        if not kept:
            present = sorted({str(r.values.get(key)) for r in runs})
            ap.error(f"--where {cond}: no run matches; {key} is one of {', '.join(present)}")
        runs = kept
    logged = _logged(runs)
    x_key = X_KEYS[args.x]
    if args.x != "round" and x_key not in logged:
        ap.error(f"--x {args.x}: no run logs {x_key}; use --x round" + (" or bytes" if args.x == "time" else ""))
    if args.columns and args.target:
        ap.error("--target does not combine with --columns (a matrix holds one statistic); run the report twice")
    for metric in args.metric:
        if metric not in logged:
            close = difflib.get_close_matches(metric, sorted(logged), n=3)
            hint = (
                f"did you mean {' or '.join(close)}?" if close else f"the runs log {', '.join(sorted(logged)[:12])} ..."
            )
            ap.error(f"--metric {metric}: no run logs it; {hint}")
    return runs


def main(argv: list[str] | None = None) -> None:
    ap = _Parser(prog="python -m fedsim.report", description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="+", type=Path, help="sweep folders or run folders")
    many = "; repeatable, the values add up"
    ap.add_argument(
        "--metric",
        nargs="+",
        action="extend",
        help=f"metrics (default: eval/acc); NAME:STAT gives NAME that statistic only{many}",
    )
    ap.add_argument("--stat", nargs="+", action="extend", help=f"{STATS} (default: final best){many}")
    ap.add_argument(
        "--target",
        nargs="*",
        action="extend",
        type=float,
        default=[],
        help=f"values of the first metric to reach{many}",
    )
    ap.add_argument("--below", action="store_true", help="a target is reached at or below it (losses, errors)")
    ap.add_argument("--x", action=_Once, choices=list(X_KEYS), default="round", help="x axis of plots and targets")
    ap.add_argument(
        "--group-by",
        nargs="*",
        action="extend",
        default=None,
        help=f"keys to group by (default: every swept key but seed; none: pool all runs){many}",
    )
    ap.add_argument(
        "--columns",
        action=_Once,
        default=None,
        hint="; a matrix has one column key, the other keys are its rows",
        help="lay each metric/stat out with this key's values as columns (one key)",
    )
    ap.add_argument(
        "--digits", action=_Once, type=int, default=4, help="decimals in the table (significant digits of targets)"
    )
    ap.add_argument("--logx", action="store_true", help="a logarithmic x axis on the plots")
    ap.add_argument(
        "--out", action=_Once, type=Path, default=None, help="folder to write into (default: the first path)"
    )
    ap.add_argument("--name", action=_Once, default="report", help="file name of the table (NAME.md, NAME.csv)")
    ap.add_argument("--title", action=_Once, default=None, help="a line under the report's heading")
    ap.add_argument(
        "--where",
        nargs="*",
        action="extend",
        default=[],
        metavar="KEY=VALUES",
        help=f"keep runs whose KEY is one of VALUES (a,b){many}, every condition holds (one per key)",
    )
    ap.epilog = (
        "A list option given twice adds up (--metric a --metric b is --metric a b); an option of one value "
        "(--x, --columns, --out, --name, --title, --digits) given twice with another value is an error."
    )
    args = ap.parse_args(argv)
    vars(args).pop(_Once.GIVEN, None)
    stat_given = bool(args.stat)
    args.stat = list(dict.fromkeys(args.stat or ["final", "best"]))
    args.target = list(dict.fromkeys(args.target))
    args.pinned = {}
    metrics = []
    for entry in args.metric or ["eval/acc"]:
        name, sep, stat = entry.partition(":")
        if sep and stat not in args.pinned.get(name, []):
            args.pinned.setdefault(name, []).append(stat)
        if name not in metrics:
            metrics.append(name)
    args.metric = metrics
    asked = [(f"--stat {s}", s) for s in args.stat]
    asked += [(f"--metric {m}:{s}", s) for m, stats in args.pinned.items() for s in stats]
    for where, stat in asked:
        base, phase = split_stat(stat)
        if PHASE_SUFFIX in stat and phase is None:
            ap.error(f"{where}: a phase is named by its number, as in best@phase3")
        if base not in ("final", "best", "max", "min") and not (
            base.startswith("last:") and base[5:].isdigit() and int(base[5:])
        ):
            ap.error(f"{where}: the statistic is final, best or last:K (K ≥ 1), min or max, optionally @phaseK")
    missing = [p for p in args.paths if not p.exists()]
    if missing:
        ap.error(f"no such folder: {missing[0]}")
    args.left_out = []
    runs, keys = load(args.paths, args.left_out)
    for note in args.left_out:
        print(f"fedsim.report: not counted: {note}", file=sys.stderr)
    if not runs:
        ap.error(f"no finished run (metrics.jsonl ending in run_end) under {', '.join(map(str, args.paths))}")
    runs = _check(ap, runs, args)
    keys = [k for k in keys if len({r.values.get(k) for r in runs}) > 1]
    args.phase_key = phase_key(runs)
    if args.phase_key and not stat_given:  # best and final per phase (where the metric was logged)
        for metric in args.metric:
            if metric in args.pinned:
                continue
            seen = sorted(
                {p for r in runs for t, p in r.phases(args.phase_key).items() if t in r.points(metric, "round")}
            )
            per_phase = [f"{s}{PHASE_SUFFIX}{p}" for p in seen for s in ("best", "final")]
            args.pinned[metric] = [*args.stat, *per_phase]
    args.out = args.out or args.paths[0]
    table: list[str] = []
    written = write(runs, keys, args, table)
    print("\n".join(table), end="\n\n")
    for path in written:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
