"""`dataset=files` with CSV and Parquet tables: the same data set as the equivalent .npz, the
options (columns, features, shape, split values), and one clear line for each kind of bad table."""

from __future__ import annotations

import csv
import gzip

import numpy as np
import pytest

from fedsim.data.files import load_files
from fedsim.data.natural import Natural
from fedsim.errors import ConfigError
from tests.data.natural_fixtures import write_npz


def write_csv(path, arrays: dict, *, split_words: bool = False, columns=("node", "y", "split"), opener=open) -> None:
    """The arrays of `write_npz` as a table: node, label, split, then f0 .. f3 (in that order)."""
    x = arrays["x"]
    names = [*columns[: 2 + ("split" in arrays)], *[f"f{j}" for j in range(x.shape[1])]]
    with opener(path, "wt", newline="") as handle:
        out = csv.writer(handle)
        out.writerow(names)
        for i in range(len(x)):
            row = [arrays["node"][i], int(arrays["y"][i])]
            if "split" in arrays:
                row.append(("train", "test")[arrays["split"][i]] if split_words else int(arrays["split"][i]))
            out.writerow(row + [repr(float(v)) for v in x[i]])


def same(a, b) -> None:
    """Equal data sets (features compared per example, whatever their shape)."""
    assert a.node_names == b.node_names and a.num_classes == b.num_classes
    for field in ("x_train", "y_train", "x_test", "y_test", "train_nodes", "test_nodes"):
        left, right = getattr(a, field), getattr(b, field)
        assert (left is None) == (right is None), field
        if left is not None:
            if field.startswith("x"):
                left, right = (v.reshape(len(v), int(np.prod(v.shape[1:]))) for v in (left, right))
            np.testing.assert_array_equal(left, right, err_msg=field)


@pytest.mark.parametrize("split_words", [False, True])
def test_csv_gives_the_npz_data_set(tmp_path, split_words):
    arrays = write_npz(tmp_path / "d.npz", nodes=5, per_node=12)
    write_csv(tmp_path / "d.csv", arrays, split_words=split_words)
    from_npz, from_csv = load_files(path=str(tmp_path / "d.npz")), load_files(path=str(tmp_path / "d.csv"))
    same(from_npz, from_csv)
    assert from_csv.name == "d" and from_csv.x_train.dtype == np.float32 and len(from_csv.x_test) > 0


def test_gzipped_csv_without_split_is_split_per_node(tmp_path):
    arrays = write_npz(tmp_path / "d.npz", nodes=4, per_node=20, split=False)
    write_csv(tmp_path / "d.csv.gz", arrays, opener=gzip.open)
    ds = load_files(path=str(tmp_path / "d.csv.gz"))
    same(load_files(path=str(tmp_path / "d.npz")), ds)
    ds2, part = Natural(train_fraction=0.75, sample_seed=1).split(ds, 4)
    assert [len(t) for t in part.train] == [15] * 4 and [len(t) for t in part.test] == [5] * 4


def test_numeric_node_ids_sort_as_numbers_and_columns_are_chosen(tmp_path):
    rows = [["who", "label", "a", "b", "c"]]
    rows += [[str(node), str(node % 2), str(i), str(-i), "7"] for i, node in enumerate([10, 2, 10, 2, 33, 2])]
    path = tmp_path / "t.csv"
    path.write_text("\n".join(",".join(r) for r in rows) + "\n")
    ds = load_files(path=str(path), node_column="who", label_column="label", features=["b", "a"], shape=[2, 1])
    assert ds.node_names == ("2", "10", "33")  # 2 < 10 as numbers, not as text
    np.testing.assert_array_equal(ds.train_nodes, [1, 0, 1, 0, 2, 0])
    assert ds.x_train.shape == (6, 2, 1)
    np.testing.assert_array_equal(ds.x_train[:, :, 0], [[-i, i] for i in range(6)])  # b before a, c left out
    np.testing.assert_array_equal(ds.y_train, [0, 0, 0, 0, 1, 0])


def test_parquet_gives_the_npz_data_set_with_list_columns_and_shape(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    arrays = write_npz(tmp_path / "d.npz", nodes=5, per_node=12)
    table = pa.table(
        {
            "node": arrays["node"].tolist(),
            "y": arrays["y"].tolist(),
            "split": arrays["split"].tolist(),
            "pixels": [row.tolist() for row in arrays["x"]],  # a list column: one vector per example
        }
    )
    pq.write_table(table, tmp_path / "d.parquet")
    ds = load_files(path=str(tmp_path / "d.parquet"), shape=[1, 2, 2])
    flat = load_files(path=str(tmp_path / "d.npz"))
    assert ds.x_train.shape[1:] == (1, 2, 2)
    same(flat, ds)
    pq.write_table(pa.table({"node": [1, 2], "y": [0, 1], "v": [[1.0, 2.0], [3.0]]}), tmp_path / "ragged.parquet")
    with pytest.raises(ConfigError, match="column 'v' holds lists of different lengths"):
        load_files(path=str(tmp_path / "ragged.parquet"))


BAD_TABLES = [
    ("node,y,f\n1,0,0.5\n2,1\n", {}, "line 3 has 2 fields, the header 3"),
    ("node,lab,f\n1,0,0.5\n", {}, "no column 'y' (columns: node, lab, f); set dataset.label_column"),
    ("node,y,f,color\n1,0,0.5,red\n", {}, "column 'color' is not numeric ('red' in example 1)"),
    ("node,y,f\n1,0,\n", {}, "column 'f' is not numeric ('' in example 1)"),
    ("node,y,f\n1,0.5,1\n", {}, "column 'y' must hold integer labels"),
    ("node,y,f\n1,-1,1\n", {}, "column 'y' must hold integer labels"),
    ("node,y,f,f\n1,0,1,2\n", {}, "the header names a column twice (f)"),
    ("node,y\n1,0\n", {}, "no feature columns"),
    ("node,y,f\n1,0,1\n", {"features": ["g"]}, "dataset.features names no column 'g'"),
    ("node,y,f\n1,0,1\n", {"features": ["node"]}, "dataset.features names 'node'"),
    ("node,y,f\n1,0,1\n", {"shape": [2, 2]}, "dataset.shape=[2, 2] does not hold the 1 features"),
    ("node,y,f,split\n1,0,1,maybe\n", {}, "column 'split' is not numeric ('maybe'"),
    ("node,y,f,split\n1,0,1,2\n", {}, "split must be 0 (train) or 1 (test)"),
    ("", {}, "is empty"),
]


@pytest.mark.parametrize("text,options,needle", BAD_TABLES)
def test_bad_tables_are_one_line(tmp_path, text, options, needle):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_files(path=str(path), **options)
    message = str(caught.value)
    assert needle in message and "\n" not in message and str(path) in message


def test_wrong_kind_of_file_and_options_are_refused(tmp_path):
    (tmp_path / "d.txt").write_text("node,y,f\n1,0,1\n")
    with pytest.raises(ConfigError, match=r"its name must end in \.npz, \.csv"):
        load_files(path=str(tmp_path / "d.txt"))
    write_npz(tmp_path / "d.npz")
    with pytest.raises(ConfigError, match="dataset.label_column is for .csv and Parquet files"):
        load_files(path=str(tmp_path / "d.npz"), label_column="label")
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    pytest.importorskip("pyarrow")
    with pytest.raises(ConfigError, match="not a readable Parquet file"):
        load_files(path=str(tmp_path / "junk.parquet"))
