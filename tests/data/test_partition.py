import numpy as np
import pytest

from fedsim.data.partition import (
    IID,
    Dirichlet,
    DirichletPerNode,
    LabelDistribution,
    Shards,
    config_to_distribution,
    split_by_distributions,
)
from fedsim.errors import ConfigError
from fedsim.seeding import np_rng

Y_TRAIN = np.repeat(np.arange(10), 600)
Y_TEST = np.repeat(np.arange(10), 100)


def labels_per_node(part, y=Y_TRAIN):
    return [len(np.unique(y[ix])) for ix in part.train]


@pytest.mark.parametrize("partitioner", [IID(), Dirichlet(alpha=0.5), DirichletPerNode(alpha=0.1), Shards()])
def test_every_training_example_is_assigned_exactly_once(partitioner):
    part = partitioner(Y_TRAIN, Y_TEST, 20, np_rng(0, "partition"))
    everything = np.concatenate(part.train)
    assert len(everything) == len(Y_TRAIN) and len(np.unique(everything)) == len(Y_TRAIN)
    again = partitioner(Y_TRAIN, Y_TEST, 20, np_rng(0, "partition"))
    assert part.digest() == again.digest()
    assert part.digest() != partitioner(Y_TRAIN, Y_TEST, 20, np_rng(1, "partition")).digest()


def test_dirichlet_alpha_controls_skew():
    skewed = Dirichlet(alpha=0.05)(Y_TRAIN, Y_TEST, 20, np_rng(0, "p"))
    mixed = Dirichlet(alpha=100.0)(Y_TRAIN, Y_TEST, 20, np_rng(0, "p"))
    assert np.mean(labels_per_node(skewed)) < 5 < np.mean(labels_per_node(mixed))
    assert min(labels_per_node(mixed)) == 10


def test_shards_give_each_node_few_labels():
    part = Shards(shards_per_node=2)(Y_TRAIN, Y_TEST, 30, np_rng(0, "p"))
    assert max(labels_per_node(part)) <= 4  # 2 shards, each spanning at most 2 labels
    assert all(len(ix) == 200 for ix in part.train)  # 60 shards of 100


def test_matched_node_test_sets_follow_training_mix():
    part = Dirichlet(alpha=0.3)(Y_TRAIN, Y_TEST, 10, np_rng(2, "p"))
    tests = np.concatenate(part.test)
    assert len(tests) == len(np.unique(tests))  # each test example used at most once
    for tr, te in zip(part.train, part.test):
        p_train = np.bincount(Y_TRAIN[tr], minlength=10) / max(len(tr), 1)
        p_test = np.bincount(Y_TEST[te], minlength=10) / max(len(te), 1)
        if len(te) >= 50:
            assert np.abs(p_train - p_test).sum() < 0.2
    iid = IID(node_test="iid")(Y_TRAIN, Y_TEST, 10, np_rng(0, "p"))
    assert sorted(len(t) for t in iid.test) == [100] * 10


def test_config_to_distribution_spreads_the_rest():
    p = config_to_distribution({5: 0.95}, 10)
    assert p[5] == pytest.approx(0.95) and p[0] == pytest.approx(0.05 / 9) and p.sum() == pytest.approx(1)
    with pytest.raises(ConfigError):
        config_to_distribution({1: 0.7, 2: 0.6}, 10)


def test_vrls_5clients_reproduces_the_spec_sizes():
    # Fashion-MNIST has 6000 train and 1000 test examples per class.
    y_train, y_test = np.repeat(np.arange(10), 6000), np.repeat(np.arange(10), 1000)
    train_cfg = [{5 + k: 0.95} for k in range(5)]
    test_cfg = [{k: 0.95} for k in range(5)]
    part = LabelDistribution(train=train_cfg, test=test_cfg)(y_train, y_test, 5, np_rng(0, "p"))
    for k in range(5):
        tr = np.bincount(y_train[part.train[k]], minlength=10)
        te = np.bincount(y_test[part.test[k]], minlength=10)
        assert tr[5 + k] == 5862 and all(tr[c] == 34 for c in range(10) if c != 5 + k)
        assert te[k] == 977 and all(te[c] == 5 for c in range(10) if c != k)
    # Pieces are consecutive and disjoint within each class.
    flat = np.concatenate(part.train)
    assert len(np.unique(flat)) == len(flat)
    with pytest.raises(ConfigError, match="num_nodes=5"):
        LabelDistribution(train=train_cfg, test=test_cfg)(y_train, y_test, 4, np_rng(0, "p"))


def test_split_by_distributions_uses_the_first_examples_of_each_class():
    y = np.array([0, 1, 0, 1, 0, 1, 0])  # class 0 has 4, class 1 has 3 -> m_min = 3
    nodes = split_by_distributions(y, [{0: 1.0}, {1: 1.0}], 2)
    assert nodes[0].tolist() == [0, 2, 4] and nodes[1].tolist() == [1, 3, 5]


def test_bad_parameters_are_config_errors():
    with pytest.raises(ConfigError):
        Dirichlet(alpha=0)
    with pytest.raises(ConfigError):
        IID(node_test="nope")
    with pytest.raises(ConfigError, match="shards"):
        Shards(shards_per_node=2)(np.zeros(10, dtype=np.int64), Y_TEST, 10, np_rng(0, "p"))
