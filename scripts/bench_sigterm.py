"""SIGTERM-to-exit time of a fedsim run, on a quiet machine or beside other simulations.

    .venv/bin/python scripts/bench_sigterm.py [--cluster ray|local] [--load N] [--repeats K]
        [--rounds-before R] [--logger jsonl|wandb] [--entry SCRIPT] [-- extra overrides ...]

Each trial starts ``python -m fedsim dataset=digits rounds=100000 checkpoint.every=0 cluster=...
logger=... hydra.run.dir=<tmp>`` in its own session, waits until ``metrics.jsonl`` holds
``--rounds-before`` step records, sends SIGTERM and measures, in seconds from the signal:

- ``ckpt_s``: the checkpoint file appears (the step in progress finished, then the checkpoint of
  the last complete step was written);
- ``stopped_s``: ``metrics.jsonl`` ends with its ``stopped`` record (the callbacks closed);
- ``line_s``: the ``fedsim: error: stopped by SIGTERM ...`` line is on stderr (the executor, and
  with it Ray, shut down);
- ``exit_s``: the process exited (after the interpreter's teardown and the atexit hooks);
- ``gone_s``: the last process of the run's session (its Ray processes) ended;

and checks the exit code (143), that one line, the checkpoint (its step is the stopped record's)
and whether processes of the run outlive it (``leftover``: there 0.5 s after the exit; killed
after ``--linger`` s). ``round_s`` is the median step time before the signal. ``--load N`` first
starts N other simulations (``cluster=local`` by default, many rounds) and kills them at the
end; ``--entry`` runs a script instead of ``-m fedsim`` (a wrapper that tries a change). Phase
times come from polling files and stderr every 5 ms. One line per trial, then median / max.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
POLL_S = 0.005


ENTRY = ["-m", "fedsim"]


def fedsim_cmd(*overrides: str) -> list[str]:
    return [sys.executable, *ENTRY, *overrides]


def environment() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_SILENT": "true", "WANDB_MODE": "offline"}


def start(cmd: list[str], *, stderr: int = subprocess.DEVNULL) -> subprocess.Popen:
    """A process in its own session (its Ray processes stay in it), so it can be killed whole."""
    return subprocess.Popen(
        cmd, cwd=ROOT, env=environment(), stdout=subprocess.DEVNULL, stderr=stderr, text=True, start_new_session=True
    )


def session_pids(sid: int) -> list[int]:
    """Live (not zombie) processes of session ``sid``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()  # state ppid pgrp session ...
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(entry.name))
    return pids


def command_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")[:40]
    except OSError:
        return "?"


def kill_session(sid: int) -> None:
    for pid in session_pids(sid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written
            break
    return out


def round_count(path: Path) -> int:
    """Step records in metrics.jsonl (counted without parsing every line)."""
    try:
        return path.read_bytes().count(b'"event": "round"')
    except OSError:
        return 0


def ends_stopped(path: Path) -> bool:
    """metrics.jsonl's last complete line is the ``stopped`` record."""
    try:
        tail = path.read_bytes()[-1000:]
    except OSError:
        return False
    return tail.endswith(b"\n") and b'"event": "stopped"' in tail.splitlines()[-1]


@dataclass
class Trial:
    exit_s: float = float("nan")
    ckpt_s: float = float("nan")
    stopped_s: float = float("nan")
    line_s: float = float("nan")
    code: int | None = None
    step: int | None = None
    checkpoint: str = "-"
    round_s: float = float("nan")
    leftover: list[str] = field(default_factory=list)
    gone_s: float = float("nan")
    problems: list[str] = field(default_factory=list)


def trial(args: argparse.Namespace, run_dir: Path) -> Trial:
    out = Trial()
    overrides = [
        "dataset=digits",
        "rounds=100000",
        "checkpoint.every=0",
        f"cluster={args.cluster}",
        f"logger={args.logger}",
        f"hydra.run.dir={run_dir}",
        *args.overrides,
    ]
    proc = start(fedsim_cmd(*overrides), stderr=subprocess.PIPE)
    lines: list[tuple[float, str]] = []

    def read_stderr() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append((time.monotonic(), line.rstrip("\n")))

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + args.start_timeout
    while round_count(metrics) < args.rounds_before:
        if proc.poll() is not None or time.monotonic() > deadline:
            kill_session(proc.pid)
            proc.wait()
            reader.join(5)
            tail = " | ".join(line for _, line in lines[-5:])
            out.problems.append(f"did not reach {args.rounds_before} steps (exit {proc.returncode}): {tail}")
            return out
        time.sleep(0.05)
    steps = [r for r in records(metrics) if r.get("event") == "round"]
    times = [r["time/round_s"] for r in steps[-10:] if "time/round_s" in r]
    out.round_s = statistics.median(times) if times else float("nan")

    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    ckpts = run_dir / "checkpoints"
    while proc.poll() is None:
        now = time.monotonic() - t0
        if out.ckpt_s != out.ckpt_s and ckpts.is_dir() and any(p.suffix == ".pt" for p in ckpts.iterdir()):
            out.ckpt_s = now
        if out.stopped_s != out.stopped_s and ends_stopped(metrics):
            out.stopped_s = now
        if now > args.exit_timeout:
            out.problems.append(f"no exit {args.exit_timeout:.0f}s after SIGTERM: killed")
            kill_session(proc.pid)
        time.sleep(POLL_S)
    out.exit_s = time.monotonic() - t0
    out.code = proc.returncode
    reader.join(5)
    fedsim_lines = [(t - t0, line) for t, line in lines if line.startswith("fedsim: error:")]
    if fedsim_lines:
        out.line_s = fedsim_lines[-1][0]
    # what is left of the run's session (its Ray processes) once the driver exited: what is
    # there 0.5 s later, and when the last of it ended by itself (killed after --linger s)
    snapshot = None
    while True:
        left = session_pids(proc.pid)
        since_exit = time.monotonic() - t0 - out.exit_s
        if snapshot is None and (since_exit >= 0.5 or not left):
            snapshot = [command_of(pid) for pid in left]
        if not left:
            out.gone_s = time.monotonic() - t0
            break
        if since_exit > args.linger:
            out.problems.append(f"processes of the run still there {args.linger:.0f}s after its exit: killed")
            kill_session(proc.pid)
            break
        time.sleep(0.02)
    out.leftover = snapshot or []

    if out.code != 143:
        out.problems.append(f"exit code {out.code}")
    if len(fedsim_lines) != 1 or not re.search(r"stopped by SIGTERM after step \d+; checkpoint", fedsim_lines[0][1]):
        out.problems.append(f"stderr lines: {[line for _, line in fedsim_lines]}")
    elif "resume=true" not in fedsim_lines[0][1]:
        out.problems.append("no resume command")
    last = records(metrics)[-1:] or [{}]
    if last[0].get("event") != "stopped":
        out.problems.append(f"metrics.jsonl ends with {last[0].get('event')!r}, not 'stopped'")
    else:
        m = re.search(r"after step (\d+)", str(last[0].get("reason", "")))
        out.step = int(m.group(1)) if m else None
        rounds = [r["round"] for r in records(metrics) if r.get("event") == "round"]
        if out.step is not None and rounds and rounds[-1] + 1 != out.step:
            out.problems.append(f"stopped after step {out.step}, last logged step {rounds[-1]}")
    found = sorted(ckpts.glob("step-*.pt")) if ckpts.is_dir() else []
    if found:
        out.checkpoint = found[-1].name
        if out.step is not None and found[-1].name != f"step-{out.step:06d}.pt":
            out.problems.append(f"checkpoint {found[-1].name}, stopped after step {out.step}")
    else:
        out.problems.append("no checkpoint")
    if args.logger == "wandb":
        runs = list((run_dir / "wandb").glob("offline-run-*"))
        if not runs or not any(p.suffix == ".wandb" for p in runs[-1].iterdir()):
            out.problems.append("no W&B offline run")
    return out


def fmt(x: float) -> str:
    return "   -  " if x != x else f"{x:6.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cluster", choices=["ray", "local"], default="ray")
    parser.add_argument("--load", type=int, default=0, help="other simulations running alongside")
    parser.add_argument("--load-cluster", choices=["ray", "local"], default="local")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds-before", type=int, default=5, help="steps logged before SIGTERM")
    parser.add_argument("--logger", choices=["jsonl", "wandb"], default="jsonl")
    parser.add_argument("--start-timeout", type=float, default=300.0)
    parser.add_argument("--exit-timeout", type=float, default=60.0, help="SIGKILL the run after this long")
    parser.add_argument("--keep", action="store_true", help="keep the run folders")
    parser.add_argument("--linger", type=float, default=10.0, help="wait this long for the run's processes to end")
    parser.add_argument("--entry", help="a script run instead of `-m fedsim` (a wrapper that tries a change)")
    parser.add_argument("overrides", nargs="*", help="more fedsim overrides (after --)")
    args = parser.parse_args()
    if args.entry:
        ENTRY[:] = [args.entry]

    base = Path(tempfile.mkdtemp(prefix="fedsim-sigterm-"))
    load: list[subprocess.Popen] = []
    results: list[Trial] = []
    try:
        for i in range(args.load):
            load_dir = base / f"load-{i}"
            load.append(
                start(
                    [
                        sys.executable,
                        "-m",
                        "fedsim",
                        "dataset=digits",
                        "rounds=1000000",
                        "checkpoint.every=0",
                        f"cluster={args.load_cluster}",
                        "logger=jsonl",
                        f"seed={i + 1}",
                        f"hydra.run.dir={load_dir}",
                    ]
                )
            )
        for i, p in enumerate(load):  # the load is training before the first trial starts
            deadline = time.monotonic() + args.start_timeout
            while round_count(base / f"load-{i}" / "metrics.jsonl") < 3 and p.poll() is None:
                if time.monotonic() > deadline:
                    sys.exit(f"load {i} did not start")
                time.sleep(0.2)
            if p.poll() is not None:
                sys.exit(f"load {i} exited with {p.returncode}")
        print(
            f"cluster={args.cluster} load={args.load} ({args.load_cluster}) logger={args.logger} "
            f"cpus={os.cpu_count()} loadavg={os.getloadavg()[0]:.2f} command={' '.join(ENTRY)}",
            flush=True,
        )
        print("trial  exit_s  ckpt_s stopped_s line_s  gone_s  round_s code  step checkpoint        leftover problems")
        for k in range(args.repeats):
            t = trial(args, base / f"run-{k}")
            results.append(t)
            print(
                f"{k:5d} {fmt(t.exit_s)}  {fmt(t.ckpt_s)}  {fmt(t.stopped_s)}  {fmt(t.line_s)}  {fmt(t.gone_s)}  "
                f"{fmt(t.round_s)} "
                f"{t.code!s:>4} {t.step!s:>5} {t.checkpoint:17s} {len(t.leftover):8d} {'; '.join(t.problems) or 'ok'}"
                + (f" (left: {', '.join(t.leftover)})" if t.leftover else ""),
                flush=True,
            )
    finally:
        for p in load:
            kill_session(p.pid)
            p.wait()
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
        else:
            print(f"run folders kept in {base}")
    for name in ("exit_s", "ckpt_s", "stopped_s", "line_s", "gone_s", "round_s"):
        values = [getattr(t, name) for t in results if getattr(t, name) == getattr(t, name)]
        if values:
            print(f"{name:9s} median {statistics.median(values):6.2f}  max {max(values):6.2f}  (n={len(values)})")
    bad = sum(bool(t.problems) for t in results)
    print(f"{len(results) - bad}/{len(results)} trials ok")


if __name__ == "__main__":
    main()
