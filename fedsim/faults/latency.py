"""Latency models (config group ``latency``): the simulated time a node takes from receiving a
model to its update arriving at the server, used by ``server=async`` (docs/methods/async.md).

A model is bound to the run with ``bind(num_nodes=, seed=, sizes=)`` and then answers
``time(node, k)``, the duration of node's k-th job (k = 0, 1, ...), and ``mean_times()``, each
node's expected duration (the importance corrections of asynchronous FedAvg use it). Random
durations come from (seed, "latency", node, k), so they do not depend on event order.

- ``constant`` (`Constant`): every job takes ``value``.
- ``linear`` (`Linear`; Fraboni et al. 2023, "F-X"): node i always takes 1 - i (X/100) / (N - 1),
  so the fastest node is X % faster than the slowest; X = ``spread``.
- ``lognormal`` (`LogNormal`): ``mean`` x exp(sigma z - sigma^2/2), z standard normal per job
  (mean ``mean``).
- ``exponential`` (`Exponential`): exponential with mean ``mean`` per job.
- ``data`` (`Data`): proportional to the node's number of examples: ``scale`` x n_i / mean_j n_j.
- ``delayed`` (`Delayed`; Wang and Gao, arXiv 2309.13536): every job takes ``value``, those of the
  listed ``nodes`` take ``value + delay``. Listing the nodes that hold one class makes staleness
  and data intertwined (the authors delay the nodes of class 5 by 40 rounds); with a partition
  of known classes (``fedsim.data.partition.LabelDistribution``) the ids follow from it.

``node_spread`` (lognormal and exponential) gives every node its own mean, ``mean`` x
exp(node_spread z_i - node_spread^2/2) with z_i drawn once from (seed, "latency", "nodes"), for
persistently slow and fast devices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from fedsim.contract import Latency
from fedsim.errors import ConfigError
from fedsim.seeding import np_rng


@dataclass
class _Bound(Latency):
    """Shared: the per-node means fixed by ``bind``; fixed durations unless ``draw`` is random."""

    seed: int = field(default=0, repr=False)
    base: np.ndarray | None = field(default=None, repr=False)

    def means(self, n: int, seed: int, sizes: np.ndarray | None) -> np.ndarray:
        raise NotImplementedError

    def bind(self, *, num_nodes: int, seed: int, sizes: np.ndarray | None = None) -> _Bound:
        """A copy with every node's mean duration fixed for the run."""
        return replace(self, seed=int(seed), base=self.means(int(num_nodes), int(seed), sizes))

    def mean_times(self) -> np.ndarray:
        if self.base is None:
            raise RuntimeError("latency model is not bound to a run; call bind() first")
        return self.base

    def draw(self, mean: float, rng: np.random.Generator) -> float:
        return mean

    def time(self, node: int, k: int) -> float:
        """Duration of node's k-th job."""
        mean = float(self.mean_times()[node])
        if type(self).draw is _Bound.draw:
            return mean
        return self.draw(mean, np_rng(self.seed, "latency", int(node), int(k)))


def _positive(name: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"latency.{name}={value} must be > 0")


@dataclass
class Constant(_Bound):
    value: float = 1.0

    def __post_init__(self) -> None:
        _positive("value", self.value)

    def means(self, n: int, seed: int, sizes: np.ndarray | None) -> np.ndarray:
        return np.full(n, float(self.value))


@dataclass
class Linear(_Bound):
    spread: float = 80.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.spread < 100.0:
            raise ConfigError(f"latency.spread={self.spread} must be in [0, 100) (percent faster, F-X)")

    def means(self, n: int, seed: int, sizes: np.ndarray | None) -> np.ndarray:
        i = np.arange(n, dtype=np.float64)
        return 1.0 - i * (self.spread / 100.0) / max(n - 1, 1)


@dataclass
class Data(_Bound):
    scale: float = 1.0

    def __post_init__(self) -> None:
        _positive("scale", self.scale)

    def means(self, n: int, seed: int, sizes: np.ndarray | None) -> np.ndarray:
        s = np.ones(n) if sizes is None else np.asarray(sizes, dtype=np.float64)
        return self.scale * np.maximum(s, 1.0) / max(float(np.maximum(s, 1.0).mean()), 1e-12)


@dataclass
class _Random(_Bound):
    mean: float = 1.0
    node_spread: float = 0.0

    def __post_init__(self) -> None:
        _positive("mean", self.mean)
        if self.node_spread < 0:
            raise ConfigError(f"latency.node_spread={self.node_spread} must be >= 0")

    def means(self, n: int, seed: int, sizes: np.ndarray | None) -> np.ndarray:
        z = np_rng(seed, "latency", "nodes").standard_normal(n)
        return self.mean * np.exp(self.node_spread * z - self.node_spread**2 / 2)


@dataclass
class Exponential(_Random):
    def draw(self, mean: float, rng: np.random.Generator) -> float:
        return float(rng.exponential(mean))


@dataclass
class LogNormal(_Random):
    sigma: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sigma < 0:
            raise ConfigError(f"latency.sigma={self.sigma} must be >= 0")

    def draw(self, mean: float, rng: np.random.Generator) -> float:
        return float(mean * math.exp(self.sigma * rng.standard_normal() - self.sigma**2 / 2))


@dataclass
class Delayed(_Bound):
    value: float = 1.0
    delay: float = 40.0
    nodes: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        _positive("value", self.value)
        if self.delay < 0:
            raise ConfigError(f"latency.delay={self.delay} must be >= 0")
        self.nodes = [int(i) for i in self.nodes]
        if any(i < 0 for i in self.nodes):
            raise ConfigError(f"latency.nodes={self.nodes} must be node ids >= 0")

    def means(self, n: int, seed: int, sizes: np.ndarray | None) -> np.ndarray:
        late = [i for i in self.nodes if i >= n]
        if late:
            raise ConfigError(f"latency.nodes names nodes {late}, the run has {n} (ids 0..{n - 1})")
        out = np.full(n, float(self.value))
        out[self.nodes] += float(self.delay)
        return out
