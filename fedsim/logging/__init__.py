"""Run callbacks: console progress, JSONL metrics, Weights & Biases.

A callback has three hooks, each optional: ``on_run_start(meta)``, ``on_round_end(round,
metrics)``, ``on_run_end(summary)``. Metric keys are namespaced: ``train/``, ``eval/``,
``agg/``, ``comm/``, ``time/``.
"""

from __future__ import annotations

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


def scalars(metrics: dict[str, Any]) -> dict[str, float | int]:
    """The scalar entries of a metrics dict (lists such as per-node accuracies dropped)."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
