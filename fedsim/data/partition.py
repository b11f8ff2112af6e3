"""Partitioners: split a dataset's train (and test) split over nodes.

Each partitioner is a callable ``(y_train, y_test, num_nodes, rng) -> Partition``. The recipes
are docs/methods/partitioning.md; each class names the variant it implements, because four
different procedures are all called "Dirichlet(alpha)" in the literature.

Per-node test sets (``node_test``):
- ``matched``: each class's test examples are split over the nodes in proportion to how many
  training examples of that class each node holds, so a node's test label mix equals its
  training label mix and every test example is used once (as in Fraboni et al.'s D3b, but
  without sampling);
- ``iid``: the test split is shuffled and cut into equal parts (a uniform test mix per node).
`LabelDistribution` instead gives explicit, different train and test mixes per node (VRLS).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fedsim.data.base import Partition
from fedsim.errors import ConfigError

_NODE_TEST = ("matched", "iid")


def _check_node_test(node_test: str) -> str:
    if node_test not in _NODE_TEST:
        raise ConfigError(f"partition.node_test={node_test!r} is not one of {', '.join(_NODE_TEST)}")
    return node_test


def _class_indices(y: np.ndarray, num_classes: int, rng: np.random.Generator | None) -> list[np.ndarray]:
    """Indices of each class, in dataset order, or shuffled within the class when rng is given."""
    out = []
    for c in range(num_classes):
        ix = np.flatnonzero(y == c)
        if rng is not None:
            ix = rng.permutation(ix)
        out.append(ix)
    return out


def _split_by_proportions(ix: np.ndarray, props: np.ndarray) -> list[np.ndarray]:
    """Cut ``ix`` at floor(cumsum(props)[:-1] * len(ix)), props summing to 1."""
    cuts = (np.cumsum(props)[:-1] * len(ix)).astype(np.int64)
    return np.split(ix, cuts)


def _gather(pieces: list[list[np.ndarray]], num_nodes: int) -> list[np.ndarray]:
    """Concatenate, per node, its pieces from every class; sorted for a stable layout."""
    return [np.sort(np.concatenate([p[k] for p in pieces])).astype(np.int64) for k in range(num_nodes)]


def _node_test_sets(
    node_test: str, train: list[np.ndarray], y_train: np.ndarray, y_test: np.ndarray, rng: np.random.Generator
) -> list[np.ndarray]:
    num_nodes = len(train)
    if node_test == "iid":
        return [np.sort(p).astype(np.int64) for p in np.array_split(rng.permutation(len(y_test)), num_nodes)]
    num_classes = int(max(y_train.max(initial=0), y_test.max(initial=0))) + 1
    counts = np.stack([np.bincount(y_train[ix], minlength=num_classes) for ix in train]).astype(np.float64)
    pieces = []
    for c, ix in enumerate(_class_indices(y_test, num_classes, rng)):
        total = counts[:, c].sum()
        if total == 0:
            pieces.append([ix[:0]] * num_nodes)
        else:
            pieces.append(_split_by_proportions(ix, counts[:, c] / total))
    return _gather(pieces, num_nodes)


def _need_test_split(y_test: np.ndarray) -> None:
    if len(y_test) == 0:
        raise ConfigError(
            "the dataset has no test split of its own: a naturally federated dataset (shakespeare, or femnist/files "
            "without test rows) is split per node by partition=natural; use partition=natural"
        )


def _num_classes(y_train: np.ndarray, y_test: np.ndarray) -> int:
    return int(max(y_train.max(initial=0), y_test.max(initial=0))) + 1


class IID:
    """Shuffle the train split and cut it into ``num_nodes`` near-equal parts."""

    def __init__(self, *, node_test: str = "matched") -> None:
        self.node_test = _check_node_test(node_test)

    def __call__(self, y_train: np.ndarray, y_test: np.ndarray, num_nodes: int, rng: np.random.Generator) -> Partition:
        _need_test_split(y_test)
        train = [np.sort(p).astype(np.int64) for p in np.array_split(rng.permutation(len(y_train)), num_nodes)]
        return Partition(train, _node_test_sets(self.node_test, train, y_train, y_test, rng))


class Dirichlet:
    """Label skew, variant D1 of partitioning.md (per-class Dirichlet over nodes; Hsu et al. 2019,
    ByzFL ``dirichlet_niid``).

    For each class c: p_c ~ Dir(alpha * 1_K); the class's examples, shuffled, are cut at
    floor(cumsum(p_c)[:-1] * n_c) and node k takes piece k. Every example is assigned once; node
    sizes vary and a node may get no data at all (it then trains on nothing and carries zero
    weight). Small alpha concentrates each class on few nodes.
    """

    def __init__(self, *, alpha: float = 0.5, node_test: str = "matched") -> None:
        if not alpha > 0:
            raise ConfigError(f"partition.alpha={alpha} must be > 0")
        self.alpha = float(alpha)
        self.node_test = _check_node_test(node_test)

    def __call__(self, y_train: np.ndarray, y_test: np.ndarray, num_nodes: int, rng: np.random.Generator) -> Partition:
        _need_test_split(y_test)
        pieces = []
        for ix in _class_indices(y_train, _num_classes(y_train, y_test), rng):
            p = rng.dirichlet(np.full(num_nodes, self.alpha))
            pieces.append(_split_by_proportions(ix, p))
        train = _gather(pieces, num_nodes)
        return Partition(train, _node_test_sets(self.node_test, train, y_train, y_test, rng))


class DirichletPerNode:
    """Label skew, variant D2 of partitioning.md (FedAU's ``util.partition``).

    Each node k draws q_k ~ Dir(alpha * 1_C); each class's examples (dataset order) are split over
    the nodes in proportion to q_{k,c} / sum_j q_{j,c}, with cut points
    round(n_c * sum_{j<=k} q_{j,c} / sum_j q_{j,c}). Every example is assigned once.
    """

    def __init__(self, *, alpha: float = 0.1, node_test: str = "matched") -> None:
        if not alpha > 0:
            raise ConfigError(f"partition.alpha={alpha} must be > 0")
        self.alpha = float(alpha)
        self.node_test = _check_node_test(node_test)

    def __call__(self, y_train: np.ndarray, y_test: np.ndarray, num_nodes: int, rng: np.random.Generator) -> Partition:
        _need_test_split(y_test)
        num_classes = _num_classes(y_train, y_test)
        q = rng.dirichlet(np.full(num_classes, self.alpha), size=num_nodes)  # (K, C)
        pieces = []
        for c, ix in enumerate(_class_indices(y_train, num_classes, None)):
            share = np.cumsum(q[:, c]) / q[:, c].sum()
            cuts = np.round(share[:-1] * len(ix)).astype(np.int64)
            pieces.append(np.split(ix, cuts))
        train = _gather(pieces, num_nodes)
        return Partition(train, _node_test_sets(self.node_test, train, y_train, y_test, rng))


class Shards:
    """McMahan et al. (2017) shards: sort by label, cut into ``shards_per_node * K`` equal shards,
    give each node ``shards_per_node`` random shards. Ties within a label are in random order."""

    def __init__(self, *, shards_per_node: int = 2, node_test: str = "matched") -> None:
        if shards_per_node < 1:
            raise ConfigError(f"partition.shards_per_node={shards_per_node} must be >= 1")
        self.shards_per_node = int(shards_per_node)
        self.node_test = _check_node_test(node_test)

    def __call__(self, y_train: np.ndarray, y_test: np.ndarray, num_nodes: int, rng: np.random.Generator) -> Partition:
        _need_test_split(y_test)
        num_shards = self.shards_per_node * num_nodes
        if num_shards > len(y_train):
            raise ConfigError(
                f"{num_shards} shards need at least that many training examples, the dataset has "
                f"{len(y_train)}; lower num_nodes or partition.shards_per_node"
            )
        shuffled = rng.permutation(len(y_train))
        order = shuffled[np.argsort(y_train[shuffled], kind="stable")]
        shards = np.array_split(order, num_shards)
        assignment = rng.permutation(num_shards).reshape(num_nodes, self.shards_per_node)
        train = [np.sort(np.concatenate([shards[s] for s in row])).astype(np.int64) for row in assignment]
        return Partition(train, _node_test_sets(self.node_test, train, y_train, y_test, rng))


def config_to_distribution(config: Mapping[int, float], num_classes: int) -> np.ndarray:
    """VRLS ``config_to_distribution``: listed classes get their probability, the remaining mass
    is split evenly over the unlisted classes."""
    p = np.zeros(num_classes)
    listed = {int(c): float(v) for c, v in config.items()}
    for c, v in listed.items():
        if not 0 <= c < num_classes:
            raise ConfigError(f"label distribution names class {c}, the dataset has {num_classes} classes")
        if v < 0:
            raise ConfigError(f"label distribution gives class {c} a negative probability {v}")
        p[c] = v
    rest = 1.0 - p.sum()
    if rest < -1e-9:
        raise ConfigError(f"label distribution {listed} sums to {p.sum():.4f} > 1")
    unlisted = [c for c in range(num_classes) if c not in listed]
    if unlisted:
        p[unlisted] = max(rest, 0.0) / len(unlisted)
    return p


def split_by_distributions(y: np.ndarray, configs: Sequence[Mapping[int, float]], num_classes: int) -> list[np.ndarray]:
    """VRLS ``split_dataset`` (partitioning.md, "VRLS intra- and inter-node label shift"):
    truncate every class to its first m_min examples (dataset order), build P (K x C) from the
    configs, normalise P by its largest column sum, and cut each class's pool into consecutive
    pieces of floor(P[k, c] * m_min). Leftovers are discarded. Deterministic: no RNG."""
    pools = _class_indices(y, num_classes, None)
    m_min = min(len(p) for p in pools)
    if m_min == 0:
        raise ConfigError("label-distribution partition needs every class present in the split")
    P = np.stack([config_to_distribution(c, num_classes) for c in configs])
    P = P / P.sum(axis=0).max()
    sizes = np.floor(P * m_min + 1e-9).astype(np.int64)
    nodes = []
    for k in range(len(configs)):
        parts = []
        for c in range(num_classes):
            start = int(sizes[:k, c].sum())
            parts.append(pools[c][start : start + sizes[k, c]])
        nodes.append(np.concatenate(parts).astype(np.int64))
    return nodes


class LabelDistribution:
    """Explicit per-node train and test label distributions (VRLS ``target_shift.py``).

    ``train`` and ``test`` are lists (one entry per node) of partial configs {class: prob}; see
    `split_by_distributions`. The presets ``vrls_5clients`` and ``vrls_10clients_v2`` give intra-node
    shift (a node's test majority is a training minority) and inter-node shift.
    """

    def __init__(self, *, train: Sequence[Mapping[int, float]], test: Sequence[Mapping[int, float]]) -> None:
        if len(train) != len(test):
            raise ConfigError(f"partition.train has {len(train)} nodes but partition.test has {len(test)}")
        self.train = [dict(c) for c in train]
        self.test = [dict(c) for c in test]

    def __call__(self, y_train: np.ndarray, y_test: np.ndarray, num_nodes: int, rng: np.random.Generator) -> Partition:
        _need_test_split(y_test)
        if num_nodes != len(self.train):
            raise ConfigError(
                f"this label-distribution partition defines {len(self.train)} nodes; set num_nodes={len(self.train)}"
            )
        num_classes = _num_classes(y_train, y_test)
        return Partition(
            split_by_distributions(y_train, self.train, num_classes),
            split_by_distributions(y_test, self.test, num_classes),
        )
