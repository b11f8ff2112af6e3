"""Structured configs of the sweeper and the launcher."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class SweeperConf:
    _target_: str = "hydra_plugins.fedsim_plugins.sweeper.FedsimSweeper"
    params: Any = None
    """Like Hydra's basic sweeper: key -> comma-separated values; the product of all keys."""
    variants: Any = None
    """Named sets of overrides, one more axis of the product: {name: [override, ...]}; a job's
    name is recorded as the top-level key ``variant``."""


@dataclass
class RayLauncherConf:
    _target_: str = "hydra_plugins.fedsim_plugins.launcher.RayLauncher"
    address: Any = "${oc.select:cluster.address,null}"
    """The Ray cluster the jobs run on (null: a local Ray with num_cpus)."""
    num_cpus: Any = "${oc.select:cluster.num_cpus,null}"
    auth_token: Any = "${oc.select:cluster.auth_token,null}"
    cpus_per_job: int = 1
    """CPUs each job reserves; a job runs its simulation in its own process (cluster=local)."""
