"""Finished runs from Python: ``fedsim.load_run(path)``.

A run folder holds ``.hydra/config.yaml`` (the composed config), ``metrics.jsonl`` (a
``run_start`` record, one record per step, ``warning`` records, and ``run_end`` or ``stopped``)
and, with ``save_model=true`` (the default), ``model.pt`` (the final parameters). `load_run` reads
them::

    run = fedsim.load_run("outputs/2026-12-04/10-00-00")
    run.config.strategy.client.lr         # the composed config (an OmegaConf DictConfig)
    df = run.metrics()                    # one row per step: a pandas DataFrame, or a list of dicts
    run.summary["eval/acc"]               # the run_end record
    model = run.model()                   # the final model as a torch nn.Module, in eval mode
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedsim.errors import ConfigError

if TYPE_CHECKING:  # torch is imported where a model is read, so fedsim.report does not load it
    import torch
    from torch import nn


@dataclass
class Run:
    """A run folder, read (see the module)."""

    path: Path
    config: Any
    """The composed config (``.hydra/config.yaml``, else the ``run_start`` record's)."""
    start: dict[str, Any]
    """The ``run_start`` record: config, option names, ``info`` (partition digest, executor, ...)."""
    records: list[dict[str, Any]]
    """One record per step (``event == "round"``), in order."""
    summary: dict[str, Any] | None
    """The ``run_end`` record (None for a run that has not finished)."""
    warnings: list[dict[str, Any]] = field(default_factory=list)
    stopped: dict[str, Any] | None = None
    """The ``stopped`` record of a run that stopped early (signal, error), if any."""

    @property
    def finished(self) -> bool:
        return self.summary is not None

    def metrics(self, *, frame: bool | None = None) -> Any:
        """The per-step records: a pandas DataFrame (one row per step, one column per metric) when
        pandas is installed, else the list of records. ``frame=False`` always gives the list;
        ``frame=True`` needs pandas."""
        rows = [{k: v for k, v in r.items() if k != "event"} for r in self.records]
        if frame is False:
            return rows
        try:
            import pandas as pd
        except ImportError:
            if frame:
                raise ConfigError("Run.metrics(frame=True) needs pandas: pip install pandas") from None
            return rows
        return pd.DataFrame(rows)

    def params(self) -> torch.Tensor:
        """The final parameter vector (or, peer to peer, the matrix of every member's model)."""
        return self._saved()["params"]

    def model(self, member: int = 0) -> nn.Module:
        """The final model as an ``nn.Module`` (eval mode), rebuilt from the run's model config
        and ``model.pt``; for a peer-to-peer run, the model of member row ``member``."""
        import torch

        from fedsim.models import build_model
        from fedsim.params import FlatModel
        from fedsim.simulation import make

        saved = self._saved()
        params = saved["params"]
        if params.dim() == 2:
            params = params[member]
        factory = make(self.config.model)
        module = build_model(factory, saved["input_shape"], saved["num_classes"], seed=int(self.config.seed))
        flat = FlatModel(module)
        with torch.no_grad():
            flat.load(params.to(flat.flat.dtype))
        return module.eval()

    def _saved(self) -> dict[str, Any]:
        import torch

        from fedsim.checkpoint import MODEL

        path = self.path / MODEL
        if not path.exists():
            why = "it has not finished" if not self.finished else "it ran with save_model=false"
            raise ConfigError(f"{self.path} has no {MODEL} ({why}); run it with save_model=true")
        return torch.load(path, map_location="cpu", weights_only=False)


def read_records(path: Path) -> list[dict[str, Any]] | None:
    """The records of a metrics.jsonl; None when a line does not parse (a run being written)."""
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError:
        return None


def load_run(path: str | Path) -> Run:
    """Read a run folder (see the module). A folder without ``metrics.jsonl`` is one error line."""
    from omegaconf import OmegaConf

    folder = Path(path)
    log = folder / "metrics.jsonl"
    if not log.exists():
        raise ConfigError(f"{folder} is not a run folder: it has no metrics.jsonl")
    every = read_records(log)
    if every is None:
        raise ConfigError(f"{log} has a line that is not JSON (a run still writing it?)")
    start: dict[str, Any] = {}
    records, warnings = [], []
    summary = stopped = None
    for rec in every:
        event = rec.get("event")
        if event == "run_start":
            start = rec
        elif event == "round":
            records.append(rec)
        elif event == "warning":
            warnings.append(rec)
        elif event == "run_end":
            summary = rec
        elif event == "stopped":
            stopped = rec
    hydra_config = folder / ".hydra" / "config.yaml"
    if hydra_config.exists():
        config = OmegaConf.load(hydra_config)
    else:
        config = OmegaConf.create(start.get("config", {}))
    return Run(folder, config, start, records, summary, warnings, stopped)
