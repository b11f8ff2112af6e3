"""Console progress bar (tqdm): round, accuracy, loss, elapsed."""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm

from fedsim.logging import Callback, RunMeta


class ProgressBar(Callback):
    def __init__(self, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self.bar: tqdm | None = None
        self.postfix: dict[str, str] = {}

    def on_run_start(self, meta: RunMeta) -> None:
        if not self.enabled:
            return
        print(
            f"fedsim: {meta.run_name} | {meta.info.get('executor', '')} | "
            f"{meta.info.get('num_params', '?')} params | output {meta.output_dir}",
            file=sys.stderr,
        )
        self.bar = tqdm(
            total=meta.rounds, initial=meta.start_round, desc="round", unit="rnd", file=sys.stderr, dynamic_ncols=True
        )

    def on_round_end(self, round_: int, metrics: dict[str, Any]) -> None:
        if self.bar is None:
            return
        if "eval/acc" in metrics:
            self.postfix["acc"] = f"{metrics['eval/acc']:.4f}"
        if "train/loss" in metrics:
            self.postfix["loss"] = f"{metrics['train/loss']:.4f}"
        self.bar.set_postfix(self.postfix, refresh=False)
        self.bar.update(1)

    def on_run_stop(self, reason: str) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def on_warning(self, round_: int, message: str) -> None:
        if not self.enabled:
            return
        line = f"fedsim: warning (step {round_}): {message}"
        if self.bar is not None:
            self.bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def on_run_end(self, summary: dict[str, Any]) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if not self.enabled:
            return
        parts = [
            f"{k}={summary[k]:.4f}" for k in ("eval/acc", "eval/node_acc_min", "eval/node_acc_mean") if k in summary
        ]
        rounds, skipped = summary.get("rounds"), summary.get("agg/skipped_total", 0)
        if skipped:
            parts.append(f"skipped {skipped} of {rounds} steps (too few rows for the rule)")
            if isinstance(rounds, int) and 2 * skipped > rounds:
                parts[-1] = f"SKIPPED {skipped} of {rounds} steps: {summary.get('agg/skip_cause', 'too few rows')}"
        print(
            f"fedsim: done, {rounds} rounds in {summary.get('time/elapsed_s', 0):.1f}s  " + "  ".join(parts),
            file=sys.stderr,
        )
