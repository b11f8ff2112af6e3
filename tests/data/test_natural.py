"""Naturally federated data: the natural partition, the Shakespeare parse and cache, LEAF's JSON
layout, the .npz format, and LEAF's LSTM; on small generated inputs (the real Shakespeare cache
only where it has been built)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from fedsim.data import shakespeare as shk
from fedsim.data.base import Dataset
from fedsim.data.files import load_files
from fedsim.data.leaf import load_femnist, load_leaf_json
from fedsim.data.natural import Natural, group_rows
from fedsim.data.partition import IID, Dirichlet
from fedsim.errors import ConfigError, DataUnavailable
from fedsim.models import StackedLSTM, build_model
from fedsim.params import FlatModel
from tests.conftest import ROOT
from tests.data.natural_fixtures import write_leaf, write_npz, write_plays


def text_of(codes: np.ndarray) -> str:
    return "".join(shk.VOCAB[int(c)] for c in codes)


# ---------------------------------------------------------------- the Shakespeare parse


def test_speaker_lines_are_told_from_speech():
    for name in ("Lear.", "Alb. and Corn.", "FIRST LORD.", "THESEUS", "CAESAR, ANTONY, and LEPIDUS.", "1 Neighbour."):
        assert shk.is_speaker(name), name
    for line in ("Come hither, sir.", "Saddle my horse.", "II.", "ACT I.", "Scene II. A room.", "[Exit.]", "Go now"):
        assert not shk.is_speaker(line), line


def test_parse_keeps_speeches_continuations_and_drops_directions(tmp_path):
    plays = shk.read_plays(write_plays(tmp_path / "texts"))
    assert [p for p, _ in plays] == ["comedy", "testing"]  # the sonnets are no play
    roles = shk.parse_play(dict(plays)["testing"], "testing")
    assert roles["TESTING_ALPHA"] == [
        "First line of alpha,",
        "second line of alpha.",
        "Third speech of alpha at the caf\u00e9@home.",
    ]
    # the inline direction is cut, and the paragraph after "[Exit Alpha.]" continues Beta's speech
    assert roles["TESTING_BETA"] == [
        "Beta speaks once here",
        "and twice here-- and thrice.",
        "Still beta after the direction.",
    ]
    assert roles["TESTING_GAMMA"] == ["Gamma has one line only."]
    assert not any("Orphan" in line for lines in roles.values() for line in lines)  # after a heading: nobody's
    assert not any(k.endswith("_A_KING") or "PERSONS" in k for k in roles)  # the persons list is not parsed


def test_roles_are_encoded_with_leaf_vocabulary(tmp_path):
    enc = shk.build_roles(shk.read_plays(write_plays(tmp_path / "texts")))
    texts = dict(zip(enc.names, (text_of(t) for t in enc.texts)))
    assert "TESTING_GAMMA" not in texts  # 1 line: dropped (LEAF keeps roles with more than 2)
    assert set(texts) == {"COMEDY_DELTA", "COMEDY_FIRST_LORD", "TESTING_ALPHA", "TESTING_BETA"}
    # lines joined by one space; the accent dropped, "@" (outside the 80 symbols) removed
    assert texts["TESTING_ALPHA"] == "First line of alpha, second line of alpha. Third speech of alpha at the cafehome."
    assert enc.folded["\u00e9"] == 1 and enc.removed["@"] == 1
    assert all(set(t) <= set(shk.VOCAB) for t in texts.values())


def build_cache(tmp_path):
    root = tmp_path / "root"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "fedsim.data.shakespeare",
            "--texts",
            str(write_plays(tmp_path / "texts")),
            "--root",
            str(root),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    return root, run.stdout


def test_build_command_writes_the_cache_and_windows_follow_the_text(tmp_path):
    root, out = build_cache(tmp_path)
    assert "4 roles" in out and (root / shk.CACHE_NAME).is_file()
    seq = 7
    ds = shk.load_shakespeare(root=str(root), seq_len=seq)
    with np.load(root / shk.CACHE_NAME) as z:
        text, offsets, names = z["text"], z["offsets"], list(z["names"])
    assert ds.node_names == tuple(names) and ds.sequence_gap == seq - 1 and ds.num_classes == 80
    assert ds.x_train.dtype == np.float32 and len(ds.y_test) == 0
    for k in range(len(names)):
        rows = np.flatnonzero(ds.train_nodes == k)
        lo, hi = int(offsets[k]), int(offsets[k + 1])
        assert len(rows) == hi - lo - seq  # every window of the role whose next character is the role's
        for r in rows[[0, -1]]:
            assert np.array_equal(ds.x_train[r], text[r : r + seq]) and ds.y_train[r] == text[r + seq]
            assert lo <= r and r + seq < hi
    # rows whose window crosses into the next role belong to no node
    assert np.count_nonzero(ds.train_nodes == -1) == len(ds.y_train) - sum((offsets[1:] - offsets[:-1]) - seq)


def test_missing_cache_names_the_command(tmp_path):
    with pytest.raises(DataUnavailable, match="python -m fedsim.data.shakespeare"):
        shk.load_shakespeare(root=str(tmp_path))


@pytest.mark.skipif(
    not shk.cache_path().is_file(), reason="the Shakespeare cache is not built (python -m fedsim.data.shakespeare)"
)
def test_real_cache_is_close_to_leaf_statistics():
    ds = shk.load_shakespeare()
    d, p = Natural().split(ds, len(Natural().select(ds)[0]))
    windows = int((ds.train_nodes >= 0).sum())
    # LEAF (Caldas et al. 2018, Table 1): 1,129 users, 4,226,158 samples from its own edition
    assert abs(len(ds.node_names) - 1129) / 1129 < 0.1 and abs(windows - 4226158) / 4226158 < 0.1
    assert p.num_nodes <= len(ds.node_names) and len(d.y_test) > 0


# ---------------------------------------------------------------- the natural partition


def sequence_dataset(sizes, gap=3):
    names = tuple(f"n{k}" for k in range(len(sizes)))
    nodes = np.concatenate([np.full(s, k, dtype=np.int64) for k, s in enumerate(sizes)])
    n = len(nodes)
    x = np.arange(n, dtype=np.float32)[:, None]  # the row number, to follow rows
    return Dataset(
        "seq",
        x,
        np.arange(n, dtype=np.int64) % 5,
        np.zeros((0, 1), np.float32),
        np.zeros(0, np.int64),
        5,
        train_nodes=nodes,
        node_names=names,
        sequence_gap=gap,
    )


def test_sequences_split_in_time_order_with_a_gap():
    ds = sequence_dataset([20, 2, 1, 50], gap=3)
    out, part = Natural(train_fraction=0.8).split(ds, 4)
    for k, size in enumerate([20, 2, 1, 50]):
        tr = out.x_train[part.train[k], 0]
        te = out.x_test[part.test[k], 0]
        n_tr = 1 if size <= 2 else int(0.8 * size)
        assert len(tr) == n_tr and np.all(np.diff(tr) == 1)  # the first rows, in order
        if len(te):
            assert te[0] - tr[-1] == 3 + 1 and te[-1] == tr[0] + size - 1  # 3 rows left out, then the rest
        assert np.array_equal(out.y_train[part.train[k]], ds.y_train[tr.astype(int)])
    assert len(part.test[1]) == 0 and len(part.test[2]) == 0  # too short for a test window after the gap


def test_min_samples_fraction_and_num_nodes():
    ds = sequence_dataset([5, 40, 12, 70, 3, 30])
    nodes, *_ = Natural(min_samples=12).select(ds)
    assert nodes == [1, 2, 3, 5]
    with pytest.raises(ConfigError, match="keeps 4 nodes of seq .*set num_nodes=4"):
        Natural(min_samples=12).split(ds, 6)
    a, _, _, _ = Natural(fraction=0.5, sample_seed=1).select(ds)
    b, _, _, _ = Natural(fraction=0.5, sample_seed=1).select(ds)
    c = {tuple(Natural(fraction=0.5, sample_seed=s).select(ds)[0]) for s in range(8)}
    assert a == b and len(a) == 3 and len(c) > 1  # seeded by sample_seed, and it matters
    out, part = Natural(fraction=0.5, sample_seed=1).split(ds, 3)
    assert out.node_names == tuple(f"n{k}" for k in a) and len(out.y_train) == sum(part.sizes())


def test_non_sequences_split_at_random_and_a_given_split_is_kept(tmp_path):
    arrays = write_npz(tmp_path / "d.npz", split=False)
    ds = load_files(path=str(tmp_path / "d.npz"))
    out, part = Natural(train_fraction=0.8, sample_seed=3).split(ds, 5)
    assert [len(ix) for ix in part.train] == [24] * 5 and [len(ix) for ix in part.test] == [6] * 5
    rows = [out.x_train[part.train[0]], out.x_test[part.test[0]]]
    first = arrays["x"][arrays["node"] == "user00"]
    both = np.concatenate(rows)
    assert sorted(map(tuple, both)) == sorted(map(tuple, first))  # node 0's rows, split
    assert not np.array_equal(rows[0], first[:24])  # not simply the first 24
    write_npz(tmp_path / "s.npz", split=True)
    given = load_files(path=str(tmp_path / "s.npz"))
    out, part = Natural().split(given, 5)
    assert sum(len(ix) for ix in part.test) == len(given.y_test) and np.array_equal(
        out.x_test, given.x_test[np.argsort(given.test_nodes, kind="stable")]
    )
    with pytest.raises(ConfigError, match="train_fraction=null"):
        Natural(train_fraction=0.5).split(given, 5)


def test_natural_needs_node_ids_and_synthetic_partitions_need_a_test_split():
    plain = Dataset(
        "plain", np.zeros((4, 2), np.float32), np.arange(4) % 2, np.zeros((2, 2), np.float32), np.arange(2), 2
    )
    with pytest.raises(ConfigError, match="use partition=dirichlet"):
        Natural().split(plain, 2)
    ds = sequence_dataset([10, 10])
    for partitioner in (IID(), Dirichlet()):
        with pytest.raises(ConfigError, match="use partition=natural"):
            partitioner(ds.y_train, ds.y_test, 2, np.random.default_rng(0))
    assert [list(r) for r in group_rows(np.array([1, -1, 0, 1, 0]), 3)] == [[2, 4], [0, 3], []]


# ---------------------------------------------------------------- LEAF JSON (FEMNIST) and .npz


def test_femnist_reads_leaf_layout(tmp_path):
    files = write_leaf(tmp_path / "data")
    ds = load_femnist(path=str(tmp_path / "data"))
    assert ds.node_names == ("f0001_02", "f0002_17", "f0003_33") and ds.num_classes == 62
    assert ds.x_train.shape == (15, 1, 28, 28) and ds.x_test.shape == (6, 1, 28, 28)
    assert list(np.bincount(ds.train_nodes)) == [6, 4, 5] and list(np.bincount(ds.test_nodes)) == [2, 1, 3]
    u = files["train/b.json"]["user_data"]["f0003_33"]
    rows = np.flatnonzero(ds.train_nodes == 2)
    assert np.allclose(ds.x_train[rows].reshape(5, -1), np.array(u["x"], dtype=np.float32))
    assert list(ds.y_train[rows]) == u["y"]
    out, part = Natural().split(ds, 3)
    assert [len(ix) for ix in part.test] == [2, 1, 3]


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda d: d.pop("user_data"), "no 'user_data' key"),
        (lambda d: [row.pop() for row in d["user_data"]["f0003_33"]["x"]], "has 783 values, expected 784"),
        (lambda d: d["user_data"]["f0003_33"]["x"][0].pop(), "not a list of equal-length lists"),
        (lambda d: d["user_data"]["f0003_33"]["y"].append(1), "5 examples in x but 6 labels"),
        (lambda d: d["user_data"]["f0003_33"]["y"].__setitem__(0, 62), "labels must lie in 0 .. 61"),
    ],
)
def test_bad_leaf_files_are_one_line(tmp_path, mutate, needle):
    import json

    write_leaf(tmp_path / "data")
    path = tmp_path / "data" / "train" / "b.json"
    content = json.loads(path.read_text())
    mutate(content)
    path.write_text(json.dumps(content))
    with pytest.raises(ConfigError, match=needle) as info:
        load_femnist(path=str(tmp_path / "data"))
    assert "\n" not in str(info.value)
    with pytest.raises(DataUnavailable, match="no LEAF JSON files"):
        load_leaf_json(str(tmp_path / "nowhere"), shape=[784], num_classes=62)


def test_npz_nodes_are_the_sorted_distinct_values(tmp_path):
    arrays = write_npz(tmp_path / "d.npz", nodes=3, per_node=4)
    ds = load_files(path=str(tmp_path / "d.npz"))
    assert ds.node_names == ("user00", "user01", "user02") and ds.name == "d"
    te = arrays["split"].astype(bool)
    assert np.array_equal(ds.x_test, arrays["x"][te]) and np.array_equal(ds.test_nodes, np.repeat([0, 1, 2], 4)[te])


@pytest.mark.parametrize(
    "arrays, needle",
    [
        ({"x": np.zeros((3, 2)), "y": np.zeros(3, int)}, "no array node"),
        (
            {"x": np.zeros((3, 2)), "y": np.zeros(3, int), "node": np.zeros(2, int)},
            "node must give one node per example",
        ),
        ({"x": np.zeros((3, 2)), "y": np.array([0.5, 1, 2]), "node": np.zeros(3, int)}, "y must be integer labels"),
        ({"x": np.full((3, 2), np.nan), "y": np.zeros(3, int), "node": np.zeros(3, int)}, "x must be finite"),
        (
            {"x": np.zeros((3, 2)), "y": np.zeros(3, int), "node": np.zeros(3, int), "split": np.array([0, 2, 1])},
            "split must be 0",
        ),
        (
            {"x": np.zeros((3, 2)), "y": np.zeros(3, int), "node": np.zeros(3, int), "labels": np.zeros(3)},
            "unknown array labels",
        ),
        (
            {"x": np.zeros((3, 2)), "y": np.zeros(3, int), "node": np.array([{}, {}, {}], dtype=object)},
            "not a readable .npz",
        ),
    ],
)
def test_bad_npz_files_are_one_line(tmp_path, arrays, needle):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ConfigError, match=needle) as info:
        load_files(path=str(tmp_path / "bad.npz"))
    assert "\n" not in str(info.value)
    (tmp_path / "junk.npz").write_text("not a zip")
    with pytest.raises(ConfigError, match="not a readable .npz"):
        load_files(path=str(tmp_path / "junk.npz"))
    with pytest.raises(DataUnavailable, match="no such file"):
        load_files(path=str(tmp_path / "missing.npz"))


# ---------------------------------------------------------------- LEAF's models


def test_stacked_lstm_is_leafs_architecture():
    model = build_model(lambda s, c: StackedLSTM(s, c), (80,), 80, seed=0)
    h, e, c = 256, 8, 80
    leaf = c * e + ((e + h) * 4 * h + 4 * h) + ((h + h) * 4 * h + 4 * h) + (h * c + c)  # TF: one bias per layer
    assert FlatModel(model).dim == leaf + 2 * 4 * h  # torch: two bias vectors per layer
    assert torch.all(model.lstm.bias_ih_l0[h : 2 * h] == 1.0) and torch.all(model.lstm.bias_ih_l0[:h] == 0.0)
    x = torch.tensor([[3.0] * 80, [5.0] * 80])
    out = model(x)
    assert out.shape == (2, 80)
    x2 = x.clone()
    x2[0, 0] = 7.0  # the first character still matters at the last step
    assert not torch.equal(model(x2)[0], out[0]) and torch.equal(model(x2)[1], out[1])
    with pytest.raises(ConfigError, match="model=lstm needs sequences"):
        StackedLSTM((1, 28, 28), 10)


def test_femnist_cnn_is_leafs():
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    factory = instantiate(OmegaConf.load(ROOT / "conf" / "model" / "femnist_cnn.yaml"))
    dim = FlatModel(build_model(factory, (1, 28, 28), 62, seed=0)).dim
    assert dim == (25 * 32 + 32) + (25 * 32 * 64 + 64) + (7 * 7 * 64 * 2048 + 2048) + (2048 * 62 + 62)
