"""``python -m fedsim.sync PATH...``: upload the offline W&B data of a run folder, or of every run
under a sweep folder, each run whole and its segments in order.

A resumed run (``resume=true``) writes a new ``offline-run-*`` folder with the same W&B run id for
each part it ran (``<run dir>/wandb/offline-run-<time>-<id>``). Syncing them as unrelated runs can
let one segment replace the other (wandb#3841, #2858); they must go up as one run, in the order of
their rounds. This finds every segment under PATH, groups the segments by run id, orders each run's
segments by the first round they logged (their start time where none did), and runs, per run:

- with a wandb whose ``sync`` has ``--append`` (the legacy sync, wandb <= 0.29): ``wandb sync
  FIRST``, then ``wandb sync --append NEXT`` for every later segment;
- with the newer sync (no ``--append``): one ``wandb sync FIRST NEXT ...``, which syncs the segments
  of one run one after another.

``--dry-run`` prints the commands without running them (and without any network); ``--style``
builds them for the other kind of wandb (to run on another machine). The runs go in the order of
the sweep's jobs (``sweep.json``), else of their folders; a failing command stops with its exit code.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import shutil
import struct
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

SEGMENT_GLOB = "offline-run-*"
BLOCK = 32768
"""The block size of a .wandb file (a LevelDB-style log of protobuf records)."""


@dataclass
class Segment:
    """One ``offline-run-*`` folder: a part of a W&B run written by one process."""

    folder: Path
    run_id: str
    first_round: int | None
    """The first ``round`` it logged (None: it logged none)."""

    @property
    def started(self) -> str:
        """Its start time as in the folder's name (``offline-run-YYYYMMDD_HHMMSS-ID``)."""
        parts = self.folder.name.split("-")
        return parts[2] if len(parts) >= 4 else ""


@dataclass
class WandbRun:
    run_id: str
    owner: Path
    """The fedsim run folder holding its ``wandb/`` folder."""
    segments: list[Segment] = field(default_factory=list)


def records(path: Path) -> Iterator[object]:
    """The protobuf records of a ``.wandb`` file (wandb's own format: a 7-byte file header, then
    32 KiB blocks of chunks, each with a 7-byte header: CRC, length, kind: 1 full, 2 first, 3
    middle, 4 last). A torn tail (a run still being written) ends the records."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw = path.read_bytes()
    if raw[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file")
    pos, buf = 7, b""
    while pos + 7 <= len(raw):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        pos += 7
        if kind == 0 and length == 0:
            break
        if pos + length > len(raw):
            break
        buf += raw[pos : pos + length]
        pos += length
        if kind in (1, 4):
            rec = pb.Record()  # type: ignore[attr-defined]
            try:
                rec.ParseFromString(buf)
            except Exception:  # noqa: BLE001 - a torn record: the segment ends here
                break
            buf = b""
            yield rec


def first_round(path: Path) -> int | None:
    """The smallest ``round`` a segment's history holds (fedsim logs it with every step)."""
    rounds = []
    for rec in records(path):
        if rec.WhichOneof("record_type") != "history":  # type: ignore[attr-defined]
            continue
        for item in rec.history.item:  # type: ignore[attr-defined]
            key = item.key or "/".join(item.nested_key)
            if key == "round":
                with contextlib.suppress(ValueError, TypeError):
                    rounds.append(int(float(json.loads(item.value_json))))
    return min(rounds) if rounds else None


def segment(folder: Path) -> Segment | None:
    files = sorted(folder.glob("run-*.wandb"))
    if not files:
        return None
    run_id = files[0].stem[len("run-") :]
    return Segment(folder, run_id, first_round(files[0]))


def _job_order(sweep: Path) -> list[str]:
    index = sweep / "sweep.json"
    if not index.is_file():
        return []
    try:
        return [str(job["name"]) for job in json.loads(index.read_text()).get("jobs", [])]
    except (ValueError, KeyError, TypeError, AttributeError):
        return []


def find_runs(paths: Sequence[Path]) -> list[WandbRun]:
    """Every W&B run whose offline segments lie under ``paths`` (a run folder, its ``wandb/``
    folder, a sweep folder, or any folder above them), its segments in the order of their rounds."""
    runs: dict[tuple[Path, str], WandbRun] = {}
    order: list[tuple[Path, str]] = []
    for path in paths:
        folders = [path] if path.name.startswith("offline-run-") else sorted(path.rglob(SEGMENT_GLOB))
        jobs = _job_order(path)

        def rank(folder: Path, jobs: list[str] = jobs, path: Path = path) -> tuple[int, str]:
            owner = folder.parent.parent
            try:
                name = owner.relative_to(path).parts[0] if owner != path else ""
            except ValueError:
                name = ""
            return (jobs.index(name) if name in jobs else len(jobs), str(owner))

        for folder in sorted((f for f in folders if f.is_dir()), key=rank):
            seg = segment(folder)
            if seg is None:
                continue
            key = (folder.parent.parent, seg.run_id)
            if key not in runs:
                runs[key] = WandbRun(seg.run_id, folder.parent.parent)
                order.append(key)
            if all(s.folder != folder for s in runs[key].segments):
                runs[key].segments.append(seg)
    for run in runs.values():
        run.segments.sort(key=lambda s: (s.first_round is None, s.first_round or 0, s.started, s.folder.name))
    return [runs[k] for k in order]


def supports_append(wandb_cmd: Sequence[str]) -> bool:
    """Whether this wandb's ``sync`` has ``--append`` (the legacy sync)."""
    try:
        out = subprocess.run([*wandb_cmd, "sync", "--help"], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "--append" in out.stdout


def commands(
    runs: Sequence[WandbRun],
    *,
    style: str,
    wandb_cmd: Sequence[str] = ("wandb",),
    project: str | None = None,
    entity: str | None = None,
) -> list[list[str]]:
    """The ``wandb sync`` commands that upload ``runs``: ``style`` ``append`` (one command per
    segment, ``--append`` after the first) or ``together`` (one command per run, its segments in
    order)."""
    if style not in ("append", "together"):
        raise ValueError(f"style {style!r}: append or together")
    extra = [*(["--project", project] if project else []), *(["--entity", entity] if entity else [])]
    out: list[list[str]] = []
    for run in runs:
        folders = [str(s.folder) for s in run.segments]
        if style == "together":
            out.append([*wandb_cmd, "sync", *extra, *folders])
        else:
            out.append([*wandb_cmd, "sync", *extra, folders[0]])
            out += [[*wandb_cmd, "sync", "--append", *extra, f] for f in folders[1:]]
    return out


def _wandb_cmd() -> list[str]:
    """This environment's wandb command (next to its Python, else on PATH)."""
    beside = Path(sys.executable).parent / "wandb"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("wandb")
    return [found] if found else [sys.executable, "-m", "wandb"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m fedsim.sync",
        description="Upload the offline W&B data of fedsim runs (a run folder or a sweep), each run whole, "
        "the segments of a resumed run in the order of their rounds.",
    )
    ap.add_argument("paths", nargs="+", type=Path, help="run folders, sweep folders, or folders above them")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    ap.add_argument(
        "--style",
        choices=["auto", "append", "together"],
        default="auto",
        help="append: `wandb sync FIRST` then `wandb sync --append NEXT` (wandb <= 0.29); together: one "
        "`wandb sync FIRST NEXT ...` per run (newer wandb); auto: what this wandb's sync supports",
    )
    ap.add_argument("--project", default=None, help="upload into this W&B project (default: the run's own)")
    ap.add_argument("--entity", default=None, help="upload under this W&B entity (default: the run's own)")
    args = ap.parse_args(argv)
    missing = [p for p in args.paths if not p.exists()]
    if missing:
        ap.exit(2, f"fedsim.sync: error: no such folder: {missing[0]}\n")
    runs = find_runs(args.paths)
    if not runs:
        ap.exit(
            2,
            f"fedsim.sync: error: no offline W&B run under {', '.join(map(str, args.paths))} "
            "(runs with logger=wandb write <run dir>/wandb/offline-run-*)\n",
        )
    wandb_cmd = _wandb_cmd()
    style = args.style
    if style == "auto":
        style = "append" if supports_append(wandb_cmd) else "together"
    cmds = commands(runs, style=style, wandb_cmd=wandb_cmd, project=args.project, entity=args.entity)
    segs = sum(len(r.segments) for r in runs)
    resumed = sum(len(r.segments) > 1 for r in runs)
    print(
        f"fedsim.sync: {len(runs)} W&B run(s), {segs} segment(s) ({resumed} resumed run(s)); "
        f"{len(cmds)} command(s), style {style}",
        file=sys.stderr,
    )
    for cmd in cmds:
        print(shlex.join(cmd), flush=True)
        if args.dry_run:
            continue
        done = subprocess.run(cmd)
        if done.returncode != 0:
            print(f"fedsim.sync: error: `{shlex.join(cmd)}` failed (exit code {done.returncode})", file=sys.stderr)
            sys.exit(done.returncode)


if __name__ == "__main__":
    main()
