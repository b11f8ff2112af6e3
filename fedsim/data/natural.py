"""The natural partition: every node is one of the dataset's own users (a speaking role, a writer,
a row's node id in the user's file), instead of a share cut by a partitioner that sees labels.

`Natural.split(dataset, num_nodes)` keeps, samples and splits the dataset's nodes and returns a
new `Dataset` holding only the kept nodes' rows (so that evaluation runs on their test rows only)
with the `Partition` over it. The steps, in LEAF's order (sample, then drop small users, then
split each user's data; Caldas et al. 2018, ``data/utils``):

1. ``fraction``: keep round(fraction * K) of the K nodes, drawn without replacement from the
   stream (sample_seed, "natural", "sample") (LEAF's ``--sf`` samples users until a fraction of
   the *examples* is reached; here it is a fraction of the nodes);
2. ``min_samples``: drop nodes with fewer examples (train and test rows together; LEAF's ``-k``);
3. split each node into train and test: with ``train_fraction`` f, a node of n >= 2 examples
   trains on max(1, floor(f n)) of them (1 when n = 2; n = 1: that one, no test), as LEAF's
   ``split_data.py``. Sequences (``Dataset.sequence_gap`` set) split in time order and the test
   rows start ``gap`` rows after the last training row (default: the dataset's gap, 79 for
   windows of 80 characters), so that no test window shares an input character with a training
   window; other data split at random (stream (sample_seed, "natural", "split", node)). With
   ``train_fraction=null`` a dataset with its own per-node test split (LEAF's train/ and test/
   folders, a ``split`` column) keeps it; one without is split with LEAF's default 0.9.

The result is a function of the dataset and these options alone, not of the run's seed: every
seed of an experiment sees the same nodes.
"""

from __future__ import annotations

import numpy as np

from fedsim.data.base import Dataset, Partition
from fedsim.errors import ConfigError
from fedsim.seeding import np_rng

DEFAULT_TRAIN_FRACTION = 0.9  # LEAF's split_data.py default (--frac)


def group_rows(nodes: np.ndarray, num_nodes: int) -> list[np.ndarray]:
    """The row indices of each node 0 .. num_nodes - 1, each in row order (rows of node -1 are
    left out)."""
    order = np.argsort(nodes, kind="stable")
    counts = np.bincount(nodes[nodes >= 0], minlength=num_nodes)
    start = int(np.count_nonzero(nodes < 0))
    out = []
    for c in counts:
        out.append(order[start : start + int(c)].astype(np.int64))
        start += int(c)
    return out


class Natural:
    """Nodes are the dataset's own users; see the module docstring for the steps."""

    takes_dataset = True
    """Read by ``fedsim.simulation.build``: call `split` with the whole dataset, not the
    label-only ``(y_train, y_test, num_nodes, rng)`` of the synthetic partitioners."""

    def __init__(
        self,
        *,
        min_samples: int = 0,
        fraction: float = 1.0,
        train_fraction: float | None = None,
        gap: int | None = None,
        sample_seed: int = 0,
    ) -> None:
        if min_samples < 0:
            raise ConfigError(f"partition.min_samples={min_samples} must be >= 0")
        if not 0.0 < fraction <= 1.0:
            raise ConfigError(f"partition.fraction={fraction} must be in (0, 1]")
        if train_fraction is not None and not 0.0 < train_fraction < 1.0:
            raise ConfigError(f"partition.train_fraction={train_fraction} must be in (0, 1), or null")
        if gap is not None and gap < 0:
            raise ConfigError(f"partition.gap={gap} must be >= 0, or null (the dataset's own)")
        self.min_samples = int(min_samples)
        self.fraction = float(fraction)
        self.train_fraction = None if train_fraction is None else float(train_fraction)
        self.gap = None if gap is None else int(gap)
        self.sample_seed = int(sample_seed)

    def __call__(self, y_train: np.ndarray, y_test: np.ndarray, num_nodes: int, rng: np.random.Generator) -> Partition:
        raise ConfigError(
            "partition=natural needs the dataset's node ids, and this fedsim's simulation.build passes a partitioner "
            "only the labels; it must call Natural.split(dataset, num_nodes) (docs/data.md)"
        )

    def describe(self) -> str:
        tf = "the dataset's own split" if self.train_fraction is None else f"train_fraction={self.train_fraction}"
        return f"min_samples={self.min_samples}, fraction={self.fraction}, {tf}"

    def select(self, dataset: Dataset) -> tuple[list[int], list[np.ndarray], list[np.ndarray], bool]:
        """The kept node ids (original numbering, ascending) and, per kept node, its train and test
        rows; the last value says whether the test rows index the test split (else the train split)."""
        if not dataset.has_nodes:
            raise ConfigError(
                f"partition=natural needs a dataset that brings its own nodes (shakespeare, femnist, files); "
                f"{dataset.name} has none: use partition=dirichlet, iid or shards"
            )
        assert dataset.train_nodes is not None
        K = len(dataset.node_names)
        train_rows = group_rows(dataset.train_nodes, K)
        own = dataset.test_nodes is not None
        test_rows = group_rows(dataset.test_nodes, K) if dataset.test_nodes is not None else [r[:0] for r in train_rows]
        sizes = np.array([len(a) + len(b) for a, b in zip(train_rows, test_rows)], dtype=np.int64)
        nodes = np.arange(K)
        if self.fraction < 1.0:
            take = max(1, int(round(self.fraction * K)))
            nodes = np.sort(np_rng(self.sample_seed, "natural", "sample").choice(K, size=take, replace=False))
        nodes = nodes[(sizes[nodes] >= self.min_samples) & (sizes[nodes] > 0)]
        keep_given = own and self.train_fraction is None
        frac = self.train_fraction if self.train_fraction is not None else DEFAULT_TRAIN_FRACTION
        gap = None
        if dataset.sequence_gap is not None:
            gap = self.gap if self.gap is not None else int(dataset.sequence_gap)
        tr_out: list[np.ndarray] = []
        te_out: list[np.ndarray] = []
        for k in nodes.tolist():
            if keep_given:
                tr_out.append(train_rows[k])
                te_out.append(test_rows[k])
                continue
            if own:  # re-split the node's rows of both splits: train rows, then test rows
                raise ConfigError(
                    f"{dataset.name} has its own per-node test split; set partition.train_fraction=null to keep it "
                    "(re-splitting rows of both splits is not supported)"
                )
            rows = train_rows[k]
            n = len(rows)
            n_tr = n if n < 2 else (1 if n == 2 else max(1, int(frac * n)))
            if gap is not None:
                tr_out.append(rows[:n_tr])
                te_out.append(rows[n_tr + gap :])
            else:
                perm = np_rng(self.sample_seed, "natural", "split", k).permutation(n)
                tr_out.append(np.sort(rows[perm[:n_tr]]))
                te_out.append(np.sort(rows[perm[n_tr:]]))
        return nodes.tolist(), tr_out, te_out, keep_given

    def split(self, dataset: Dataset, num_nodes: int) -> tuple[Dataset, Partition]:
        """The dataset restricted to the kept nodes' rows (train rows, then test rows, node by node)
        and the partition over it. ``num_nodes`` must equal the number of kept nodes."""
        nodes, tr, te, test_from_test = self.select(dataset)
        if len(nodes) != num_nodes:
            raise ConfigError(
                f"partition=natural keeps {len(nodes)} nodes of {dataset.name} ({self.describe()}); "
                f"set num_nodes={len(nodes)}"
                + ("" if len(nodes) else ": none is left, lower partition.min_samples or raise partition.fraction")
            )
        tr_all = np.concatenate(tr) if tr else np.zeros(0, dtype=np.int64)
        te_all = np.concatenate(te) if te else np.zeros(0, dtype=np.int64)
        x_src, y_src = (dataset.x_test, dataset.y_test) if test_from_test else (dataset.x_train, dataset.y_train)
        tr_sizes = np.array([len(r) for r in tr], dtype=np.int64)
        te_sizes = np.array([len(r) for r in te], dtype=np.int64)
        ids = np.arange(len(nodes), dtype=np.int64)
        out = Dataset(
            dataset.name,
            np.ascontiguousarray(dataset.x_train[tr_all]),
            dataset.y_train[tr_all],
            np.ascontiguousarray(x_src[te_all]),
            y_src[te_all],
            dataset.num_classes,
            train_nodes=np.repeat(ids, tr_sizes),
            test_nodes=np.repeat(ids, te_sizes),
            node_names=tuple(dataset.node_names[k] for k in nodes),
            sequence_gap=None,
        )
        tr_cuts = np.concatenate([[0], np.cumsum(tr_sizes)])
        te_cuts = np.concatenate([[0], np.cumsum(te_sizes)])
        partition = Partition(
            [np.arange(tr_cuts[i], tr_cuts[i + 1], dtype=np.int64) for i in range(len(nodes))],
            [np.arange(te_cuts[i], te_cuts[i + 1], dtype=np.int64) for i in range(len(nodes))],
        )
        return out, partition


def summary(dataset: Dataset, partition: Partition) -> dict[str, object]:
    """Counts of a naturally partitioned dataset, for the set-up step and the docs."""
    tr = partition.sizes()
    te = np.array([len(ix) for ix in partition.test], dtype=np.int64)
    total = tr + te
    return {
        "nodes": int(partition.num_nodes),
        "train_examples": int(tr.sum()),
        "test_examples": int(te.sum()),
        "examples_per_node_mean": float(total.mean()) if len(total) else 0.0,
        "examples_per_node_std": float(total.std()) if len(total) else 0.0,
        "examples_per_node_median": float(np.median(total)) if len(total) else 0.0,
        "nodes_without_test_examples": int(np.count_nonzero(te == 0)),
    }
