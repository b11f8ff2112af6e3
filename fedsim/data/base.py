"""Data containers: a dataset as arrays, a partition as index arrays, and their pairing."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Dataset:
    """A labelled dataset held in memory: float32 features, int64 labels.

    A naturally federated dataset (docs/data.md) also brings its nodes: ``train_nodes`` and
    ``test_nodes`` give the node of every row (0 .. len(node_names) - 1; -1: a row of no node,
    never used), ``node_names`` name the nodes, and ``sequence_gap`` is set when each node's rows
    are overlapping windows of one sequence in time order: a split in time skips that many rows
    between a node's training and test rows so that no test window shares input with a training
    one. ``test_nodes`` is None when the dataset has no test split of its own (`Natural` then
    splits every node's rows). Datasets without nodes leave all four at their defaults.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    train_nodes: np.ndarray | None = None
    test_nodes: np.ndarray | None = None
    node_names: tuple[str, ...] = ()
    sequence_gap: int | None = None

    def __post_init__(self) -> None:
        for split, x, y in (("train", self.x_train, self.y_train), ("test", self.x_test, self.y_test)):
            if x.dtype != np.float32 or y.dtype != np.int64:
                raise TypeError(f"{self.name} {split}: need float32 features and int64 labels")
            if len(x) != len(y):
                raise ValueError(f"{self.name} {split}: {len(x)} features but {len(y)} labels")
        for split, nodes, y in (("train", self.train_nodes, self.y_train), ("test", self.test_nodes, self.y_test)):
            if nodes is None:
                continue
            if nodes.dtype != np.int64 or nodes.shape != (len(y),):
                raise TypeError(f"{self.name} {split}: need one int64 node id per row")
            if len(nodes) and (nodes.min() < -1 or nodes.max() >= len(self.node_names)):
                raise ValueError(f"{self.name} {split}: node ids must lie in -1 .. {len(self.node_names) - 1}")
        if self.test_nodes is not None and self.train_nodes is None:
            raise ValueError(f"{self.name}: test node ids without train node ids")

    @property
    def has_nodes(self) -> bool:
        """Whether the dataset brings its own nodes (a natural partition)."""
        return self.train_nodes is not None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


@dataclass(frozen=True)
class Partition:
    """Index arrays into the train split (one per node) and into the test split (one per node).

    Test index arrays may repeat indices or be empty; they select each node's own test set, whose
    label distribution may differ from the node's training one (label shift).
    """

    train: list[np.ndarray]
    test: list[np.ndarray]

    def __post_init__(self) -> None:
        if len(self.train) != len(self.test):
            raise ValueError("partition needs as many test index arrays as train index arrays")

    @property
    def num_nodes(self) -> int:
        return len(self.train)

    def sizes(self) -> np.ndarray:
        return np.array([len(ix) for ix in self.train], dtype=np.int64)

    def digest(self) -> str:
        """A short hash of all index arrays, recorded in run metadata."""
        h = hashlib.sha256()
        for ix in [*self.train, *self.test]:
            h.update(np.asarray(ix, dtype=np.int64).tobytes())
            h.update(b"|")
        return h.hexdigest()[:16]


@dataclass(frozen=True)
class FederatedData:
    """A dataset together with its partition over nodes."""

    dataset: Dataset
    partition: Partition

    @property
    def num_nodes(self) -> int:
        return self.partition.num_nodes

    def label_counts(self, split: str = "train") -> np.ndarray:
        """(num_nodes, num_classes) label histogram of each node's train or test set."""
        y = self.dataset.y_train if split == "train" else self.dataset.y_test
        index = self.partition.train if split == "train" else self.partition.test
        c = self.dataset.num_classes
        return np.stack([np.bincount(y[ix], minlength=c) for ix in index]).astype(np.int64)
