"""Your own naturally federated data, with no code: one ``.npz``, ``.csv`` or Parquet file.

An ``.npz`` file (``numpy.savez``) holds arrays (N examples):

- ``x``: features, (N, ...) numbers (any shape per example; stored as float32);
- ``y``: labels, (N,) integers 0 .. C - 1;
- ``node``: the node (user) of each example, (N,) integers or strings;
- ``split`` (optional): (N,) 0 for training, 1 for test examples; without it `Natural` splits
  every node (``partition.train_fraction``, default 0.9);
- ``num_classes`` (optional): C, when some classes never occur (default: largest label + 1);
- ``sequence_gap`` (optional): set when each node's examples are overlapping windows of one
  sequence in time order (e.g. ``window - 1``): the split is then in time order, with that many
  examples left out between a node's training and test examples.

A ``.csv`` file (a header row, one example per row; also ``.csv.gz``) or a Parquet file
(``.parquet``/``.pq``; needs ``pyarrow``, ``pip install 'fedsim[parquet]'``) holds columns
instead: the node (``node_column``, default ``node``), the label (``label_column``, default
``y``), optionally the split (``split_column``, default ``split``: 0/1 or train/test), and the
features: the columns named in ``features``, default every other column, in file order (all
numeric; in Parquet a column may also hold equal-length lists of numbers, which are
flattened). ``shape`` reshapes each example's features (e.g. ``[1, 28, 28]``); ``num_classes`` and
``sequence_gap`` are options here.

Then ``python -m fedsim dataset=files dataset.path=my.npz partition=natural num_nodes=K``
(the first run names K). docs/data.md has an example.
"""

from __future__ import annotations

import csv
import gzip
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedsim.data.base import Dataset
from fedsim.data.leaf import is_integral
from fedsim.errors import ConfigError, DataUnavailable

REQUIRED = ("x", "y", "node")
OPTIONAL = ("split", "num_classes", "sequence_gap")
SUFFIXES = (".npz", ".csv", ".csv.gz", ".parquet", ".pq")


def load_files(
    *,
    path: str | None = None,
    name: str | None = None,
    node_column: str = "node",
    label_column: str = "y",
    split_column: str | None = "split",
    features: Sequence[str] | None = None,
    shape: Sequence[int] | None = None,
    num_classes: int | None = None,
    sequence_gap: int | None = None,
) -> Dataset:
    """The examples of one ``.npz``, ``.csv`` or Parquet file (see the module docstring), one
    node per distinct node value (numbered in sorted order of the values)."""
    if not path:
        raise ConfigError(
            "dataset=files needs dataset.path=FILE (.npz with arrays x, y, node; or .csv/.parquet with "
            "node and label columns; docs/data.md)"
        )
    file = Path(path).expanduser()
    label = name or file.name.split(".")[0]
    if not file.is_file():
        raise DataUnavailable(
            f"dataset.path={file}: no such file; give an .npz with arrays x, y, node, or a .csv/.parquet "
            "with node and label columns (docs/data.md)"
        )
    kind = next((sfx for sfx in SUFFIXES if file.name.lower().endswith(sfx)), None)
    if kind is None:
        raise ConfigError(f"{file}: not a file fedsim reads (its name must end in {', '.join(SUFFIXES)})")
    if kind == ".npz":
        tabular: list[tuple[str, Any, Any]] = [
            ("node_column", node_column, "node"),
            ("label_column", label_column, "y"),
        ]
        tabular += [("split_column", split_column, "split"), ("features", features, None)]
        changed = [key for key, value, default in tabular if value != default]
        if changed:
            raise ConfigError(
                f"{file}: dataset.{changed[0]} is for .csv and Parquet files; an .npz names its arrays x, y, node"
            )
        arrays = read_npz(file)
    else:
        columns = read_csv(file) if kind in (".csv", ".csv.gz") else read_parquet(file)
        arrays = from_columns(file, columns, node_column, label_column, split_column, features)
    if num_classes is not None:
        arrays["num_classes"] = np.asarray(num_classes)
    if sequence_gap is not None:
        arrays["sequence_gap"] = np.asarray(sequence_gap)
    if shape is not None:
        arrays["x"] = reshaped(file, arrays["x"], shape)
    return from_arrays(file, label, arrays)


def read_npz(file: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(file, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        why = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        hint = " (store strings as a fixed-width str array, not objects)" if "pickle" in why.lower() else ""
        raise ConfigError(f"{file}: not a readable .npz file ({why}){hint}; write it with numpy.savez") from None


def read_csv(file: Path) -> dict[str, np.ndarray]:
    """Columns of a CSV file with a header row, as arrays of strings (``from_columns`` converts)."""
    try:
        opener: Any = gzip.open if file.name.lower().endswith(".gz") else open
        with opener(file, "rt", encoding="utf-8", newline="") as handle:
            rows = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError, csv.Error, EOFError) as exc:
        why = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise ConfigError(f"{file}: not a readable CSV file ({why}); write UTF-8 text with a header row") from None
    rows = [row for row in rows if row]  # blank lines
    if not rows:
        raise ConfigError(f"{file}: is empty; it needs a header row and one row per example")
    header = [h.strip() for h in rows[0]]
    if len(set(header)) != len(header):
        twice = sorted({h for h in header if header.count(h) > 1})
        raise ConfigError(f"{file}: the header names a column twice ({', '.join(twice)})")
    for i, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise ConfigError(f"{file}: line {i} has {len(row)} fields, the header {len(header)}")
    body = np.asarray(rows[1:], dtype=str).reshape(len(rows) - 1, len(header))
    return {h: np.char.strip(body[:, j]) for j, h in enumerate(header)}


def read_parquet(file: Path) -> dict[str, np.ndarray]:
    """Columns of a Parquet file as numpy arrays (list columns as (N, k) arrays)."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(
            f"{file}: reading Parquet needs pyarrow; pip install 'fedsim[parquet]' (or pyarrow), or save a .csv/.npz"
        ) from None
    try:
        table = pq.read_table(file)
    except (OSError, pa.ArrowException) as exc:
        why = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise ConfigError(f"{file}: not a readable Parquet file ({why})") from None
    out: dict[str, np.ndarray] = {}
    for name, column in zip(table.column_names, table.columns):
        kind = column.type
        if pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind):
            values = column.to_pylist()
            widths = {len(v) if v is not None else -1 for v in values}
            if len(widths) != 1 or -1 in widths:
                raise ConfigError(f"{file}: column '{name}' holds lists of different lengths (or nulls)")
            try:
                out[name] = np.asarray(values, dtype=np.float64)
            except (TypeError, ValueError):
                raise ConfigError(f"{file}: column '{name}' holds lists of something other than numbers") from None
            continue
        if column.null_count:
            raise ConfigError(f"{file}: column '{name}' has {column.null_count} empty values")
        array = column.to_numpy()
        out[name] = array.astype(str) if array.dtype == object else array
    return out


def _numbers(file: Path, name: str, values: np.ndarray) -> np.ndarray:
    """A column as numbers (CSV columns are text), or one line naming the first bad value."""
    if values.dtype.kind in "biuf":
        return values
    try:
        return values.astype(np.float64)
    except ValueError:
        for i, v in enumerate(values):
            try:
                float(v)
            except ValueError:
                raise ConfigError(
                    f"{file}: column '{name}' is not numeric ('{v}' in example {i + 1}); leave it out with "
                    "dataset.features=[...], or encode it as numbers"
                ) from None
        raise


def from_columns(
    file: Path,
    columns: dict[str, np.ndarray],
    node_column: str,
    label_column: str,
    split_column: str | None,
    features: Sequence[str] | None,
) -> dict[str, np.ndarray]:
    """The arrays x, y, node (and split) of a table's columns."""
    names = list(columns)
    for key, column in (("node_column", node_column), ("label_column", label_column)):
        if column not in columns:
            raise ConfigError(
                f"{file}: no column '{column}' (columns: {', '.join(names[:12])}{' ...' if len(names) > 12 else ''}); "
                f"set dataset.{key}"
            )
    if node_column == label_column:
        raise ConfigError(f"{file}: dataset.node_column and dataset.label_column are both '{node_column}'")
    has_split = split_column is not None and split_column in columns
    reserved = {node_column, label_column, *([split_column] if has_split else [])}
    if features is None:
        chosen = [n for n in names if n not in reserved]
    else:
        chosen = [str(f) for f in features]
        unknown = [f for f in chosen if f not in columns]
        if unknown:
            raise ConfigError(f"{file}: dataset.features names no column '{unknown[0]}' (columns: {', '.join(names)})")
        clash = [f for f in chosen if f in reserved]
        if clash:
            raise ConfigError(f"{file}: dataset.features names '{clash[0]}', the node, label or split column")
    if not chosen:
        raise ConfigError(f"{file}: no feature columns (every column is the node, label or split)")
    parts = [_numbers(file, f, columns[f]) for f in chosen]
    x = np.concatenate([p.reshape(len(p), -1).astype(np.float64) for p in parts], axis=1)
    y = columns[label_column]
    if y.dtype.kind not in "biuf":
        y = _numbers(file, label_column, y)
    if y.ndim != 1 or not is_integral(y) or (len(y) and y.min() < 0):
        raise ConfigError(
            f"{file}: column '{label_column}' must hold integer labels 0, 1, 2, ... (dataset.label_column)"
        )
    node = columns[node_column]
    if node.dtype.kind == "f" and is_integral(node):
        node = node.astype(np.int64)
    if node.dtype.kind in "US":  # text ids; numbers written as text sort as numbers
        try:
            as_int = node.astype(np.int64)
            if (as_int.astype(str) == node).all():
                node = as_int
        except ValueError:
            pass
    out = {"x": x, "y": y, "node": node}
    if has_split:
        assert split_column is not None
        split = columns[split_column]
        if split.dtype.kind in "US":
            low = np.char.lower(split.astype(str))
            if np.isin(low, ("train", "test")).all():
                split = (low == "test").astype(np.int64)
            else:
                split = _numbers(file, split_column, split)
        out["split"] = split
    return out


def reshaped(file: Path, x: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    dims = tuple(int(d) for d in shape)
    if any(d < 1 for d in dims) or int(np.prod(dims)) != int(np.prod(x.shape[1:])):
        raise ConfigError(
            f"{file}: dataset.shape={list(dims)} does not hold the {int(np.prod(x.shape[1:]))} features of an example"
        )
    return x.reshape(len(x), *dims)


def from_arrays(file: Path, label: str, arrays: dict[str, np.ndarray]) -> Dataset:
    """The data set of the arrays x, y, node (optional split, num_classes, sequence_gap)."""
    missing = [k for k in REQUIRED if k not in arrays]
    if missing:
        raise ConfigError(
            f"{file}: no array {', '.join(missing)} (need x, y, node; optional split, num_classes, sequence_gap)"
        )
    unknown = sorted(set(arrays) - set(REQUIRED) - set(OPTIONAL))
    if unknown:
        raise ConfigError(f"{file}: unknown array {', '.join(unknown)} (known: {', '.join(REQUIRED + OPTIONAL)})")
    x, y, node = arrays["x"], arrays["y"], arrays["node"]
    n = len(y) if y.ndim else -1
    if y.ndim != 1:
        raise ConfigError(f"{file}: y must be one label per example (shape (N,)), it has shape {y.shape}")
    if x.ndim < 2 or len(x) != n:
        raise ConfigError(f"{file}: x must hold one feature row per label: shape (N, ...) with N={n}, it has {x.shape}")
    if node.shape != (n,):
        raise ConfigError(f"{file}: node must give one node per example (shape ({n},)), it has shape {node.shape}")
    if x.dtype.kind not in "biuf" or not np.all(np.isfinite(x)):
        raise ConfigError(f"{file}: x must be finite numbers")
    if not is_integral(y) or (n and y.min() < 0):
        raise ConfigError(f"{file}: y must be integer labels 0, 1, 2, ...")
    if node.dtype.kind not in "iuUS":
        raise ConfigError(f"{file}: node must be integers or strings, it is {node.dtype}")
    if n == 0:
        raise ConfigError(f"{file}: holds no examples")
    y = y.astype(np.int64)
    classes = int(y.max()) + 1
    if "num_classes" in arrays:
        classes = int(arrays["num_classes"])
        if classes <= int(y.max()):
            raise ConfigError(f"{file}: num_classes={classes} but a label is {int(y.max())}")
    names_raw, ids = np.unique(node, return_inverse=True)
    ids = ids.astype(np.int64).reshape(-1)
    x = np.ascontiguousarray(x, dtype=np.float32)
    gap = None
    if "sequence_gap" in arrays:
        gap = int(arrays["sequence_gap"])
        if gap < 0:
            raise ConfigError(f"{file}: sequence_gap={gap} must be >= 0")
    names = tuple(str(v) for v in names_raw.tolist())
    if "split" not in arrays:
        empty = np.zeros((0, *x.shape[1:]), dtype=np.float32)
        return Dataset(
            label, x, y, empty, np.zeros(0, np.int64), classes, train_nodes=ids, node_names=names, sequence_gap=gap
        )
    split = arrays["split"]
    if split.shape != (n,) or not is_integral(split) or not np.isin(split, (0, 1)).all():
        raise ConfigError(f"{file}: split must be 0 (train) or 1 (test) for each of the {n} examples")
    te = split.astype(bool)
    return Dataset(
        label,
        x[~te],
        y[~te],
        x[te],
        y[te],
        classes,
        train_nodes=ids[~te],
        test_nodes=ids[te],
        node_names=names,
        sequence_gap=gap,
    )
