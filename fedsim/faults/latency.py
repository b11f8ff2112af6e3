"""Latency models (config group ``latency``): the simulated time a node takes from receiving a
model to its update arriving at the server, used by ``server=async`` (shared/specs/async.md).

A model is bound to the run with ``bind(num_nodes=, seed=, sizes=)`` and then answers
``time(node, k)``, the duration of node's k-th job (k = 0, 1, ...), and ``mean_times()``, each
node's expected duration (the importance corrections of asynchronous FedAvg use it). Random
durations come from (seed, "latency", node, k), so they do not depend on event order.

- ``constant``: every job takes ``value``.
- ``linear`` (Fraboni et al. 2023, "F-X"): node i always takes 1 - i (X/100) / (N - 1), so the
  fastest node is X % faster than the slowest; X = ``spread``.
- ``lognormal``: ``mean`` x exp(sigma z - sigma^2/2), z standard normal per job (mean ``mean``).
- ``exponential``: exponential with mean ``mean`` per job.
- ``data``: proportional to the node's number of examples: ``scale`` x n_i / mean_j n_j.

``node_spread`` (lognormal and exponential) gives every node its own mean, ``mean`` x
exp(node_spread z_i - node_spread^2/2) with z_i drawn once from (seed, "latency", "nodes"), for
persistently slow and fast devices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from fedsim.errors import ConfigError
from fedsim.seeding import np_rng


@dataclass
class Latency:
    kind: str = "constant"
    value: float = 1.0
    spread: float = 0.0
    mean: float = 1.0
    sigma: float = 0.5
    node_spread: float = 0.0
    scale: float = 1.0
    seed: int = field(default=0, repr=False)
    base: np.ndarray | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        kinds = ("constant", "linear", "lognormal", "exponential", "data")
        if self.kind not in kinds:
            raise ConfigError(f"latency.kind={self.kind!r} must be one of {', '.join(kinds)}")
        if self.value <= 0 or self.mean <= 0 or self.scale <= 0:
            raise ConfigError("latency value, mean and scale must be > 0")
        if not 0.0 <= self.spread < 100.0:
            raise ConfigError(f"latency.spread={self.spread} must be in [0, 100) (percent faster, F-X)")
        if self.sigma < 0 or self.node_spread < 0:
            raise ConfigError("latency.sigma and latency.node_spread must be >= 0")

    def bind(self, *, num_nodes: int, seed: int, sizes: np.ndarray | None = None) -> Latency:
        """A copy with every node's mean duration fixed for the run."""
        n = int(num_nodes)
        if self.kind == "constant":
            base = np.full(n, float(self.value))
        elif self.kind == "linear":
            i = np.arange(n, dtype=np.float64)
            base = 1.0 - i * (self.spread / 100.0) / max(n - 1, 1)
        elif self.kind == "data":
            s = np.ones(n) if sizes is None else np.asarray(sizes, dtype=np.float64)
            base = self.scale * np.maximum(s, 1.0) / max(float(np.maximum(s, 1.0).mean()), 1e-12)
        else:
            z = np_rng(seed, "latency", "nodes").standard_normal(n)
            base = self.mean * np.exp(self.node_spread * z - self.node_spread**2 / 2)
        return replace(self, seed=int(seed), base=base)

    def mean_times(self) -> np.ndarray:
        if self.base is None:
            raise RuntimeError("latency model is not bound to a run; call bind() first")
        return self.base

    def time(self, node: int, k: int) -> float:
        """Duration of node's k-th job."""
        base = float(self.mean_times()[node])
        if self.kind in ("constant", "linear", "data"):
            return base
        rng = np_rng(self.seed, "latency", int(node), int(k))
        if self.kind == "exponential":
            return float(rng.exponential(base))
        return float(base * math.exp(self.sigma * rng.standard_normal() - self.sigma**2 / 2))
