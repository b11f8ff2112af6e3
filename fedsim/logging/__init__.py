"""Run callbacks: console progress, JSONL metrics, Weights & Biases.

A callback has these hooks, each optional: ``on_run_start(meta)``, ``on_round_end(round,
metrics)``, ``on_run_end(summary)``, ``on_run_stop(reason)`` (the run stops early: a signal, a
divergence, lost workers, an error), ``on_warning(round, message)`` (something the user should
know now, e.g. a degenerate estimate; a strategy raises one by returning ``warnings``, a list of
one-line texts, among a step's metrics), and for resumable runs ``position()``, what it needs to
continue after a checkpoint (``meta.resume`` hands it back). Metric keys are namespaced:
``train/``, ``eval/``, ``agg/``, ``comm/``, ``time/``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class RunMeta:
    """What a callback learns at the start of a run."""

    output_dir: Path
    config: dict[str, Any]
    rounds: int
    names: dict[str, str] = field(default_factory=dict)  # config group -> chosen option
    info: dict[str, Any] = field(default_factory=dict)  # partition digest, model size, executor...
    start_round: int = 0
    """The step the run starts at (> 0 when it resumes from a checkpoint)."""
    resume: dict[str, Any] | None = None
    """The callbacks' positions saved with the checkpoint the run resumes from (None: a new run)."""
    sweep: dict[str, Any] | None = None
    """For a job of a sweep: ``{"name": ..., "values": {swept key: value}}`` (None otherwise)."""

    @property
    def run_name(self) -> str:
        seed = self.config.get("seed", 0)
        return f"{self.names.get('strategy', 'run')}-{self.names.get('dataset', 'data')}-s{seed}"

    @property
    def group(self) -> str:
        """Runs that differ only in strategy and seed share a group (one W&B panel)."""
        return "-".join(self.names.get(k, "?") for k in ("dataset", "partition", "model"))


class Callback:
    def on_run_start(self, meta: RunMeta) -> None:
        pass

    def on_round_end(self, round_: int, metrics: dict[str, Any]) -> None:
        pass

    def on_run_end(self, summary: dict[str, Any]) -> None:
        pass

    def on_run_stop(self, reason: str) -> None:
        pass

    def on_warning(self, round_: int, message: str) -> None:
        pass

    def position(self) -> dict[str, Any]:
        return {}


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float as None (strict JSON has no NaN or Infinity)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def scalars(metrics: dict[str, Any]) -> dict[str, float | int]:
    """The scalar entries of a metrics dict (lists such as per-node accuracies dropped)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
