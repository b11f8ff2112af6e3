"""Checkpoints: the whole state of a run at a step boundary, written atomically into the run
directory, and what a resumed run needs to continue bit for bit.

A checkpoint (``<run dir>/checkpoints/step-000123.pt``, ``torch.save`` of a dict) holds the
`RunState` (parameters, strategy, node, attack, uplink and server state, totals), the positions of
the run's logs (the byte offset of ``metrics.jsonl`` after the step, the W&B run id), the
resolved config and the fedsim version. It is written to a temporary file, flushed and fsynced,
then renamed over its final name (and the folder fsynced), so a crash leaves either the old or
the new checkpoint, never half of one. Only the last ``keep`` are kept.

RNG positions need no storage (every stream is a function of (seed, path)); participation
processes replay from round 0 when asked for a later round.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedsim.errors import ConfigError
from fedsim.state import RunState

FOLDER = "checkpoints"
_NAME = re.compile(r"^step-(\d+)\.pt$")

RESUMABLE = (
    "rounds",
    "eval_every",
    "logger",
    "checkpoint",
    "resume",
    "overwrite",
    "cluster",
    "divergence",
    "save_model",
    "eval_threads",
)
"""Top-level keys a resumed run may change (run length, logging, where it runs)."""
SERVER_RESUMABLE = ("rounds", "duration", "eval_every", "eval_interval", "eval_all_every", "device")
STRATEGY_RESUMABLE = ("log_weights_every",)
"""Strategy keys that only say what is logged (an experiment sets FedAU's to ``${rounds}``)."""


def params_sha256(params: torch.Tensor) -> str:
    """SHA-256 of the parameter vector's (or matrix's) float32 bytes: any two runs compare."""
    return hashlib.sha256(params.detach().contiguous().cpu().numpy().tobytes()).hexdigest()


@dataclass
class Checkpoint:
    state: RunState
    logs: dict[str, Any]
    config: dict[str, Any]
    path: Path
    device: str = ""
    """Where the run that wrote it ran (`fedsim.simulation.Simulation.where`; "" in older ones)."""

    @property
    def round(self) -> int:
        return int(self.state.round)


def folder(run_dir: Path) -> Path:
    return Path(run_dir) / FOLDER


def save(
    run_dir: Path,
    state: RunState,
    *,
    logs: dict[str, Any],
    config: dict[str, Any],
    keep: int = 2,
    device: str = "cpu",
) -> Path:
    """Write the checkpoint of ``state`` atomically; keep the newest ``keep``. Returns its path.
    Tensors are written where they are (a GPU's too) and always read onto the CPU (`latest`), so
    a checkpoint of a GPU run resumes on a machine without one."""
    from fedsim import __version__

    out = folder(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"step-{state.round:06d}.pt"
    payload = {
        "state": state,
        "logs": logs,
        "config": config,
        "version": __version__,
        "written": time.time(),
        "device": device,
    }
    write_atomic(path, payload)
    for old in sorted(all_checkpoints(run_dir))[:-keep] if keep > 0 else []:
        old[1].unlink(missing_ok=True)
    return path


def write_atomic(path: Path, payload: Any) -> None:
    """``torch.save`` to a temporary file, flushed and fsynced, renamed over ``path``, and the
    folder fsynced: a crash leaves the old file or the new one, never half of one."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "wb") as fh:
        torch.save(payload, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


MODEL = "model.pt"
"""The final model of a finished run (``save_model``): see `fedsim.results.load_run`."""


def save_model(run_dir: Path, params: torch.Tensor, *, input_shape: tuple[int, ...], num_classes: int) -> Path:
    """Write the run's final parameters (and what rebuilding the module needs) to ``model.pt``."""
    from fedsim import __version__

    path = Path(run_dir) / MODEL
    payload = {
        "params": params.detach().cpu().clone(),
        "params_sha256": params_sha256(params),
        "input_shape": tuple(int(n) for n in input_shape),
        "num_classes": int(num_classes),
        "version": __version__,
    }
    write_atomic(path, payload)
    return path


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def all_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    out = folder(run_dir)
    if not out.is_dir():
        return []
    found = []
    for p in out.iterdir():
        m = _NAME.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest(run_dir: Path) -> Checkpoint | None:
    """The newest checkpoint of ``run_dir`` (None when it has none)."""
    found = all_checkpoints(run_dir)
    if not found:
        return None
    path = found[-1][1]
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - a damaged file is a usage problem, said in one line
        raise ConfigError(
            f"cannot read the checkpoint {path}: {type(exc).__name__}: {exc}; delete it to resume from the one before"
        ) from None
    return Checkpoint(
        payload["state"], payload.get("logs", {}), payload.get("config", {}), path, str(payload.get("device", ""))
    )


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Config keys (dotted) whose values differ, except those a resumed run may change."""
    diffs: list[str] = []

    def walk(a: Any, b: Any, prefix: str) -> None:
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b), key=str):
                if not prefix and key in RESUMABLE:
                    continue
                if prefix == "server." and key in SERVER_RESUMABLE:
                    continue
                if prefix == "strategy." and key in STRATEGY_RESUMABLE:
                    continue

                walk(a.get(key, "<absent>"), b.get(key, "<absent>"), f"{prefix}{key}.")
        elif a != b:
            diffs.append(f"{prefix[:-1]}: {a!r} -> {b!r}")

    walk(old, new, "")
    return diffs
