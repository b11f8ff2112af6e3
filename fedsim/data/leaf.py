"""LEAF's JSON layout (Caldas et al. 2018), as written by LEAF's ``preprocess.sh``: each file
holds ``users`` (ids), ``num_samples`` (one count per user) and ``user_data`` ({id: {"x": [...],
"y": [...]}}); a split data set has the folders ``train/`` and ``test/``, an unsplit one
(``all_data/``) only JSON files. One node per user (FEMNIST: per writer).

FEMNIST itself cannot be downloaded here: point ``dataset.path`` at the ``data`` folder LEAF's
``data/femnist/preprocess.sh`` made (or at any folder of files in this layout).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from fedsim.data.base import Dataset
from fedsim.errors import ConfigError, DataUnavailable

FEMNIST_SHAPE = (1, 28, 28)
FEMNIST_CLASSES = 62


def is_integral(values: np.ndarray) -> bool:
    """Whether an array holds integers (of an integer type, or floats without a fraction)."""
    if values.dtype.kind in "iu":
        return True
    return values.dtype.kind == "f" and bool(np.all(np.isfinite(values))) and bool(np.all(np.mod(values, 1) == 0))


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("*.json") if p.is_file())


def _read(path: Path, name: str, dim: int, num_classes: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(user, x (n, dim) float32, y (n,) int64) of every user of one file, in the file's order."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{name}: cannot read {path} as JSON ({str(exc).splitlines()[0][:120]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{name}: {path} is not LEAF's layout: the file must hold one JSON object")
    for key in ("users", "user_data"):
        if key not in data:
            raise ConfigError(
                f"{name}: {path} is not LEAF's layout: no {key!r} key (need users, num_samples, user_data)"
            )
    users: list[Any] = data["users"]
    counts = data.get("num_samples")
    if counts is not None and len(counts) != len(users):
        raise ConfigError(f"{name}: {path} lists {len(users)} users but {len(counts)} num_samples")
    out = []
    for i, user in enumerate(users):
        entry = data["user_data"].get(str(user)) if isinstance(data["user_data"], dict) else None
        if not isinstance(entry, dict) or "x" not in entry or "y" not in entry:
            raise ConfigError(f"{name}: {path}: user {user!r} has no user_data entry with 'x' and 'y'")
        try:
            x = (
                np.asarray(entry["x"], dtype=np.float32).reshape(len(entry["x"]), -1)
                if entry["x"]
                else np.zeros((0, dim), np.float32)
            )
            y_raw = np.asarray(entry["y"])
        except (TypeError, ValueError):
            raise ConfigError(
                f"{name}: {path}: user {user!r}: x is not a list of equal-length lists of numbers"
            ) from None
        if len(x) != len(y_raw):
            raise ConfigError(f"{name}: {path}: user {user!r} has {len(x)} examples in x but {len(y_raw)} labels in y")
        if counts is not None and int(counts[i]) != len(y_raw):
            raise ConfigError(
                f"{name}: {path}: user {user!r}: num_samples says {counts[i]}, user_data has {len(y_raw)}"
            )
        if len(x) and x.shape[1] != dim:
            raise ConfigError(f"{name}: {path}: user {user!r}: an example has {x.shape[1]} values, expected {dim}")
        if len(y_raw) and not is_integral(y_raw):
            raise ConfigError(f"{name}: {path}: user {user!r}: labels must be integers")
        y = y_raw.astype(np.int64) if len(y_raw) else np.zeros(0, np.int64)
        if len(y) and (y.min() < 0 or y.max() >= num_classes):
            raise ConfigError(f"{name}: {path}: user {user!r}: labels must lie in 0 .. {num_classes - 1}")
        if not np.all(np.isfinite(x)):
            raise ConfigError(f"{name}: {path}: user {user!r}: features must be finite numbers")
        out.append((str(user), x, y))
    return out


def load_leaf_json(
    path: str | None, *, name: str = "leaf", shape: tuple[int, ...] | list[int], num_classes: int
) -> Dataset:
    """A data set in LEAF's JSON layout under ``path`` (``train/`` and ``test/``, or JSON files):
    features reshaped to ``shape``, one node per user, the users of both splits numbered in order
    of first appearance (train files first, files by name)."""
    shape = tuple(int(v) for v in shape)
    dim = int(np.prod(shape))
    if not path:
        raise ConfigError(f"{name}: set dataset.path to the folder holding LEAF's train/ and test/ JSON folders")
    root = Path(path).expanduser()
    split = (root / "train").is_dir() and (root / "test").is_dir()
    groups = [_files(root / "train"), _files(root / "test")] if split else [_files(root) if root.is_dir() else []]
    if not any(groups) or (split and not all(groups)):
        raise DataUnavailable(
            f"{name}: no LEAF JSON files at {root} (need train/*.json and test/*.json, or *.json); "
            "make them with LEAF's preprocess.sh and set dataset.path to its data folder"
        )
    index: dict[str, int] = {}
    parts: list[list[tuple[int, np.ndarray, np.ndarray]]] = [[] for _ in groups]
    for g, files in enumerate(groups):
        for file in files:
            for user, x, y in _read(file, name, dim, num_classes):
                parts[g].append((index.setdefault(user, len(index)), x, y))

    def stack(rows: list[tuple[int, np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if not rows:
            return np.zeros((0, *shape), np.float32), np.zeros(0, np.int64), np.zeros(0, np.int64)
        x = np.concatenate([r[1] for r in rows]).reshape(-1, *shape)
        y = np.concatenate([r[2] for r in rows])
        nodes = np.concatenate([np.full(len(r[2]), r[0], dtype=np.int64) for r in rows])
        return np.ascontiguousarray(x, dtype=np.float32), y, nodes

    x_tr, y_tr, n_tr = stack(parts[0])
    x_te, y_te, n_te = stack(parts[1]) if split else stack([])
    return Dataset(
        name,
        x_tr,
        y_tr,
        x_te,
        y_te,
        int(num_classes),
        train_nodes=n_tr,
        test_nodes=n_te if split else None,
        node_names=tuple(index),
    )


def load_femnist(*, path: str | None = None) -> Dataset:
    """FEMNIST in LEAF's layout: 28 x 28 images (784 values, as LEAF stores them) of 62 classes,
    one node per writer."""
    return load_leaf_json(path, name="femnist", shape=FEMNIST_SHAPE, num_classes=FEMNIST_CLASSES)
