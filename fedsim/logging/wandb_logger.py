"""Weights & Biases logging. ``mode=offline`` (the default) needs no account: runs are written
under the run directory and can be uploaded later with ``wandb sync``.

Run name ``{strategy}-{dataset}-s{seed}``, group ``{dataset}-{partition}-{model}``, and the
strategy/dataset/partition as config and tags, so a dashboard grouped or filtered by them shows
strategies side by side. A resumed run continues the same W&B run id.

In a sweep, every job's run is in one group named after the experiment and the sweep
(``fedau_fmnist:fedau_fmnist``), every swept key is a top-level config field and a tag
(``participation: markov``, ``variant: mifa``), the chosen options are top-level fields too, the
resolved config is under ``cfg``, and the final metrics are in the run summary: grouping the runs
table by ``variant`` (or ``strategy``) shows mean ± std curves per method without any setup.

"""

from __future__ import annotations

import math
import os
from typing import Any

from fedsim.logging import Callback, RunMeta, scalars


class WandbLogger(Callback):
    def __init__(
        self,
        *,
        project: str = "fedsim",
        entity: str | None = None,
        mode: str = "offline",
        tags: list[str] | None = None,
    ) -> None:
        self.project = project
        self.entity = entity
        self.mode = mode
        self.tags = list(tags or [])
        self.run: Any = None

    def on_run_start(self, meta: RunMeta) -> None:
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        resumed = (meta.resume or {}).get("wandb_id")
        swept = dict(meta.sweep["values"]) if meta.sweep else {}

        self.run = wandb.init(
            id=resumed,
            resume="allow" if resumed else None,
            project=self.project,
            entity=self.entity,
            mode=self.mode,  # type: ignore[arg-type]  # checked by wandb itself
            dir=str(meta.output_dir),
            name=meta.run_name if meta.sweep is None else f"{meta.run_name}-{meta.output_dir.name}",
            group=meta.group if meta.sweep is None else meta.sweep["name"],
            job_type=meta.names.get("strategy"),
            tags=[*self.tags, *(f"{k}:{v}" for k, v in sorted({**meta.names, **swept}.items()))],
            config={**meta.names, **swept, "cfg": meta.config, "info": meta.info},
            reinit="finish_previous",
        )
        self.run.define_metric("round")
        self.run.define_metric("*", step_metric="round")

    def on_round_end(self, round_: int, metrics: dict[str, Any]) -> None:
        if self.run is not None:
            import wandb

            record: dict[str, Any] = dict(scalars(metrics))
            for key, value in metrics.items():  # per-node lists (node accuracies, FedAU weights)
                if isinstance(value, list) and value and all(isinstance(x, (int, float)) for x in value):
                    finite = [x for x in value if math.isfinite(x)]
                    if finite:
                        record[key] = wandb.Histogram(finite)
            self.run.log(record)

    def position(self) -> dict[str, Any]:
        return {"wandb_id": self.run.id} if self.run is not None else {}

    def on_run_stop(self, reason: str) -> None:
        if self.run is not None:
            self.run.summary["stopped"] = reason
            self.run.finish(exit_code=1)
            self.run = None

    def on_run_end(self, summary: dict[str, Any]) -> None:
        if self.run is not None:
            for key, value in scalars(summary).items():
                self.run.summary[key] = value
            self.run.finish()
            self.run = None
