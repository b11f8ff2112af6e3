"""One JSON object per line: a ``run_start`` record, one record per round, a ``run_end`` record."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TextIO

from fedsim.logging import Callback, RunMeta


class JsonlLogger(Callback):
    def __init__(self, *, filename: str = "metrics.jsonl") -> None:
        self.filename = filename
        self.path: Path | None = None
        self.fh: TextIO | None = None

    def _write(self, record: dict[str, Any]) -> None:
        assert self.fh is not None
        self.fh.write(json.dumps(record, default=str) + "\n")
        self.fh.flush()

    def on_run_start(self, meta: RunMeta) -> None:
        meta.output_dir.mkdir(parents=True, exist_ok=True)
        self.path = meta.output_dir / self.filename
        self.fh = open(self.path, "w", encoding="utf-8")  # noqa: SIM115 - kept open for the run
        self._write(
            {
                "event": "run_start",
                "name": meta.run_name,
                "group": meta.group,
                "names": meta.names,
                "info": meta.info,
                "config": meta.config,
            }
        )

    def on_round_end(self, round_: int, metrics: dict[str, Any]) -> None:
        if self.fh is not None:
            self._write({"event": "round", **metrics})

    def on_run_end(self, summary: dict[str, Any]) -> None:
        if self.fh is not None:
            self._write({"event": "run_end", **summary})
            self.fh.close()
            self.fh = None
