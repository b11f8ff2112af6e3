"""Shared fixtures. One Ray instance for the whole session: a two-node cluster on 127.0.0.1
(head with 2 logical CPUs, worker with 1), so multi-machine placement is tested for real."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"

os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def pytest_collection_modifyitems(config, items):
    """Tests that use the session's Ray cluster are marked ``ray`` (``-m "not ray"`` skips them)."""
    for item in items:
        if "ray_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.ray)


@pytest.fixture(scope="session")
def ray_cluster():
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "object_store_memory": 300 * 1024**2, "include_dashboard": False},
    )
    cluster.add_node(num_cpus=1, object_store_memory=300 * 1024**2)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, include_dashboard=False, logging_level="ERROR")
    yield cluster
    ray.shutdown()
    cluster.shutdown()


class Recorder:
    """A run callback keeping every round's metrics (``rounds``, in order); the other callback
    hooks do nothing."""

    def __init__(self) -> None:
        self.rounds: list[dict] = []

    def on_run_start(self, meta) -> None:
        pass

    def on_warning(self, round_: int, message: str) -> None:
        pass

    def on_round_end(self, round_: int, metrics: dict) -> None:
        self.rounds.append(dict(metrics))

    def on_run_end(self, summary: dict) -> None:
        pass


def compose(*overrides: str):
    """The composed config for ``overrides``, as the CLI would build it (outside a Hydra run)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


def run_facts(n: int, *, classes: int = 10, sizes=None, probs=None, server: str = "sync", **extra):
    """`RunFacts` of an n-node run for unit tests that drive strategies by hand."""
    import numpy as np

    from fedsim.contract import RunFacts

    sizes = np.ones(n, dtype=np.int64) if sizes is None else np.asarray(sizes)
    counts = np.full((n, classes), 5, dtype=np.int64)
    return RunFacts(
        num_nodes=n,
        num_classes=classes,
        seed=0,
        server=server,
        sizes=sizes,
        train_label_counts=extra.pop("train_label_counts", counts),
        test_label_counts=extra.pop("test_label_counts", counts),
        participation_probs=np.full(n, 1.0) if probs is None else np.asarray(probs),
        node_times=extra.pop("node_times", np.ones(n)),
        members=tuple(range(n)),
        **extra,
    )
