"""Run folders: what a folder holds (nothing, a finished run, a run with a checkpoint, a run cut
short without one), and exclusive access to it: a run, a resume or a sweep job holds an OS-level
lock on its folder for its whole life, so that two processes never write one run's files.

The lock is ``<run dir>/.fedsim.lock``, locked with ``fcntl.flock`` (on Linux, NFS passes it
between machines as a POSIX lock; it belongs to the open file, so reading the file elsewhere in
the same process does not drop it) and holding a JSON line with the holder's
pid, host and start time. The operating system releases the lock when its process ends, however it
ends (``kill -9`` included), so a dead holder never blocks a folder. The JSON line says who holds
the lock now; a holder that ends cleanly empties it, so finding it filled when the lock is free
means the last holder died: the new holder takes over and says so.

A second lock on a held folder fails at once with `RunBusy` (a usage error: exit code 2), which
names the holder. Nothing in the folder is changed by a failed attempt.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsim.errors import ConfigError, FedsimError

LOCK_FILE = ".fedsim.lock"


class RunBusy(ConfigError):
    """The run folder is locked by another live process."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def holder_text(info: dict[str, Any]) -> str:
    """``pid 123 on host h (since 2026-12-04 11:02:03)``."""
    since = info.get("started")
    when = f" (since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(since))})" if since else ""
    return f"pid {info.get('pid', '?')} on host {info.get('host', '?')}{when}"


def busy_message(run_dir: Path, info: dict[str, Any]) -> str:
    return (
        f"the run folder {run_dir} is in use by {holder_text(info)}; wait for that run to end, or choose another "
        "folder (hydra.run.dir=...)"
    )


def _read(fd: int) -> dict[str, Any]:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = b""
    while chunk := os.read(fd, 4096):
        raw += chunk
    try:
        info = json.loads(raw.decode() or "{}")
    except (ValueError, UnicodeDecodeError):
        return {}
    return info if isinstance(info, dict) else {}


@dataclass
class RunLock:
    """A held lock on one run folder (release it with `release`, or let the process end)."""

    run_dir: Path
    fd: int
    took_over: dict[str, Any] | None = None
    """The earlier holder's record when its process had died without releasing the lock."""

    @property
    def path(self) -> Path:
        return self.run_dir / LOCK_FILE

    def release(self) -> None:
        """Empty the holder record and unlock (idempotent)."""
        if self.fd < 0:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)
        with contextlib.suppress(OSError):
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = -1


_HELD: dict[Path, RunLock] = {}
"""The locks this process holds, by resolved folder: a process asking again for a folder it holds
gets the same lock (the command line takes it before Hydra starts, the run keeps it)."""


def acquire(run_dir: Path, *, purpose: str = "run") -> RunLock:
    """Lock ``run_dir`` (created if missing) for this process; raise `RunBusy` naming the holder
    when another live process holds it."""
    run_dir = Path(run_dir)
    key = run_dir.resolve()
    if key in _HELD and _HELD[key].fd >= 0:
        return _HELD[key]
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        info = _read(fd)
        os.close(fd)
        raise RunBusy(busy_message(run_dir, info)) from None
    before = _read(fd)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(), "purpose": purpose}
    took_over = None
    if before.get("pid") and (before.get("pid"), before.get("host")) != (me["pid"], me["host"]):
        same_host = before.get("host") == me["host"]
        if same_host and _alive(int(before["pid"])) and not _is_zombie(int(before["pid"])):
            # the OS says free, the record says a live process holds it: a filesystem without locks
            os.close(fd)
            raise RunBusy(
                f"the run folder {run_dir} is in use by {holder_text(before)} (this filesystem does not pass "
                "file locks; the holder's record says so); wait for that run to end, or choose another folder"
            )
        took_over = before
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(me) + "\n").encode())
    os.fsync(fd)
    lock = RunLock(run_dir, fd, took_over)
    _HELD[key] = lock
    return lock


def _is_zombie(pid: int) -> bool:
    """A process that has ended but not been reaped (its locks are gone; ``kill 0`` still succeeds)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] == "Z"


def release(run_dir: Path) -> None:
    """Release this process's lock on ``run_dir``, if it holds one."""
    lock = _HELD.pop(Path(run_dir).resolve(), None)
    if lock is not None:
        lock.release()


def holder(run_dir: Path) -> dict[str, Any] | None:
    """The record of the live holder of ``run_dir``'s lock, or None when nobody holds it (tested
    with a lock attempt that is given back at once)."""
    path = Path(run_dir) / LOCK_FILE
    if not path.exists():
        return None
    if Path(run_dir).resolve() in _HELD:
        return _read(_HELD[Path(run_dir).resolve()].fd)
    fd = os.open(path, os.O_RDWR)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return _read(fd) or {"pid": "?", "host": "?"}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def took_over_line(lock: RunLock) -> str | None:
    """The one line saying that ``lock`` was taken over from a dead holder (None otherwise)."""
    if lock.took_over is None:
        return None
    return f"fedsim: taking over the run folder {lock.run_dir} from {holder_text(lock.took_over)}, which has ended"


def say_took_over(lock: RunLock) -> None:
    """Print `took_over_line` once (the command line and the run both hold the same lock)."""
    line = took_over_line(lock)
    if line:
        print(line, file=sys.stderr, flush=True)
        lock.took_over = None


# -- what a folder holds --------------------------------------------------------------------------

METRICS = "metrics.jsonl"
RUN_FILES = (METRICS, "checkpoints", "wandb")
"""What a run writes into its folder (besides Hydra's ``.hydra``): removed by ``overwrite=true``."""


def last_record(run_dir: Path) -> dict[str, Any] | None:
    """The last complete JSON record of ``run_dir``'s metrics.jsonl (read from the end), or None."""
    path = Path(run_dir) / METRICS
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            chunk = 1 << 16
            while True:
                start = max(0, size - chunk)
                fh.seek(start)
                lines = fh.read(size - start).splitlines()
                complete = lines if start == 0 else lines[1:]
                for line in reversed(complete):
                    if line.strip():
                        try:
                            record = json.loads(line)
                        except ValueError:
                            return None  # a torn last line: the run did not end
                        return record if isinstance(record, dict) else None
                if start == 0:
                    return None
                chunk *= 4
    except OSError:
        return None


def finished(run_dir: Path) -> bool:
    """Whether the run in ``run_dir`` ended (its last metrics record is ``run_end``)."""
    record = last_record(run_dir)
    return record is not None and record.get("event") == "run_end"


def has_checkpoint(run_dir: Path) -> bool:
    return any((Path(run_dir) / "checkpoints").glob("step-*.pt"))


def contents(run_dir: Path) -> str:
    """What ``run_dir`` holds: ``"finished"`` (a run that ended), ``"checkpoint"`` (a run that
    stopped or is running, with a checkpoint to resume from), ``"partial"`` (a run's files, no
    checkpoint) or ``"empty"`` (no run's files; Hydra's ``.hydra`` alone does not count)."""
    run_dir = Path(run_dir)
    if finished(run_dir):
        return "finished"
    if has_checkpoint(run_dir):
        return "checkpoint"
    if any((run_dir / name).exists() for name in RUN_FILES):
        return "partial"
    return "empty"


def clear(run_dir: Path) -> None:
    """Remove a run's files from ``run_dir`` (``overwrite=true``); the caller holds its lock."""
    import shutil

    for name in RUN_FILES:
        path = Path(run_dir) / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def occupied_message(run_dir: Path, what: str) -> str:
    """Why a fresh run may not start in ``run_dir`` (which holds ``what``, from `contents`)."""
    held = {
        "finished": "a finished run",
        "checkpoint": "a run that stopped before its end (with a checkpoint)",
        "partial": "the files of an earlier run",
    }[what]
    resume = "add resume=true to continue it, " if what == "checkpoint" else ""
    return (
        f"the run folder {run_dir} already holds {held}; {resume}choose another folder (hydra.run.dir=...), "
        "or add overwrite=true to replace it"
    )


class Elsewhere(FedsimError):
    """A sweep job that another sweep driver holds (``done`` False) or has finished (True): this
    driver leaves it alone and counts it as the other driver's."""

    def __init__(self, message: str, *, done: bool) -> None:
        super().__init__(message)
        self.done = done

    def __reduce__(self):  # survives pickling across Ray processes
        return (_elsewhere, (str(self), self.done))


def _elsewhere(message: str, done: bool) -> Elsewhere:
    return Elsewhere(message, done=done)


def claim(run_dir: Path) -> RunLock:
    """A sweep job's claim on its folder: the folder's lock, or `Elsewhere` when another driver
    holds it, or when the job's run there has already ended (a driver that claims a job decides
    what to do with it only once it holds the lock)."""
    try:
        lock = acquire(run_dir, purpose="sweep job")
    except RunBusy as exc:
        raise Elsewhere(str(exc), done=False) from None
    if finished(run_dir):
        release(run_dir)
        raise Elsewhere(f"the job in {run_dir} was finished by another sweep driver", done=True)
    return lock
