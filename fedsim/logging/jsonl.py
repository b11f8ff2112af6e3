"""One JSON object per line: a ``run_start`` record, one record per step, a ``run_end`` record
(with ``params_sha256``), or ``stopped`` when the run stops early; ``warning`` records (round,
message) come between the steps. Strict JSON: non-finite numbers
are written as null. A resumed run cuts the file back to the checkpoint's offset (dropping the
steps it will redo), notes a ``resume`` record and appends, so every step appears exactly once."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TextIO

from fedsim.logging import Callback, RunMeta, json_safe


class JsonlLogger(Callback):
    def __init__(self, *, filename: str = "metrics.jsonl") -> None:
        self.filename = filename
        self.path: Path | None = None
        self.fh: TextIO | None = None

    def _write(self, record: dict[str, Any]) -> None:
        assert self.fh is not None
        self.fh.write(json.dumps(json_safe(record), default=str, allow_nan=False) + "\n")
        self.fh.flush()

    def on_run_start(self, meta: RunMeta) -> None:
        meta.output_dir.mkdir(parents=True, exist_ok=True)
        self.path = meta.output_dir / self.filename
        offset = (meta.resume or {}).get("jsonl_offset")
        if offset is not None and self.path.exists():
            with open(self.path, "r+b") as raw:
                raw.truncate(int(offset))
            self.fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - kept open for the run
            self._write({"event": "resume", "round": meta.start_round})
            return
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

    def position(self) -> dict[str, Any]:
        if self.fh is None:
            return {}
        self.fh.flush()
        return {"jsonl_offset": self.fh.tell()}

    def on_round_end(self, round_: int, metrics: dict[str, Any]) -> None:
        if self.fh is not None:
            self._write({"event": "round", **metrics})

    def on_warning(self, round_: int, message: str) -> None:
        if self.fh is not None:
            self._write({"event": "warning", "round": round_, "message": message})

    def on_run_end(self, summary: dict[str, Any]) -> None:
        if self.fh is not None:
            self._write({"event": "run_end", **summary})
            self.fh.close()
            self.fh = None

    def on_run_stop(self, reason: str) -> None:
        if self.fh is not None:
            self._write({"event": "stopped", "reason": reason})
            self.fh.close()
            self.fh = None
