"""Participation models: which nodes take part in round t.

A participation model is called as ``model(round, num_nodes, nodes_per_round, rng)`` and returns
the sorted node ids of the round; ``rng`` is the round's stream (seed, "sample", round).
"""

from __future__ import annotations

import numpy as np


class Uniform:
    """``nodes_per_round`` nodes drawn uniformly without replacement, independently each round
    (the sampling of McMahan et al. 2017)."""

    def __call__(self, round_: int, num_nodes: int, nodes_per_round: int, rng: np.random.Generator) -> np.ndarray:
        if nodes_per_round >= num_nodes:
            return np.arange(num_nodes)
        return np.sort(rng.choice(num_nodes, size=nodes_per_round, replace=False))
