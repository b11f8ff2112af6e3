"""Your own naturally federated data, with no code: one ``.npz`` file (``numpy.savez``).

Arrays in the file (N examples):

- ``x``: features, (N, ...) numbers (any shape per example; stored as float32);
- ``y``: labels, (N,) integers 0 .. C - 1;
- ``node``: the node (user) of each example, (N,) integers or strings;
- ``split`` (optional): (N,) 0 for training, 1 for test examples; without it `Natural` splits
  every node (``partition.train_fraction``, default 0.9);
- ``num_classes`` (optional): C, when some classes never occur (default: largest label + 1);
- ``sequence_gap`` (optional): set when each node's examples are overlapping windows of one
  sequence in time order (e.g. ``window - 1``): the split is then in time order, with that many
  examples left out between a node's training and test examples.

Then ``python -m fedsim dataset=files dataset.path=my.npz partition=natural num_nodes=K``
(the first run names K). docs/data.md has an example.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from fedsim.data.base import Dataset
from fedsim.data.leaf import is_integral
from fedsim.errors import ConfigError, DataUnavailable

REQUIRED = ("x", "y", "node")
OPTIONAL = ("split", "num_classes", "sequence_gap")


def load_files(*, path: str | None = None, name: str | None = None) -> Dataset:
    """The examples of one ``.npz`` file (see the module docstring), one node per distinct
    ``node`` value (numbered in sorted order of the values)."""
    if not path:
        raise ConfigError("dataset=files needs dataset.path=FILE.npz (arrays x, y, node; docs/data.md)")
    file = Path(path).expanduser()
    label = name or file.stem
    if not file.is_file():
        raise DataUnavailable(f"dataset.path={file}: no such file; give an .npz with arrays x, y, node (docs/data.md)")
    try:
        with np.load(file, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        why = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        hint = " (store strings as a fixed-width str array, not objects)" if "pickle" in why.lower() else ""
        raise ConfigError(f"{file}: not a readable .npz file ({why}){hint}; write it with numpy.savez") from None
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
