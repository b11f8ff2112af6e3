"""Tiny generated inputs for the naturally federated datasets: plays in the layout of the
Gutenberg editions, LEAF JSON folders, and .npz files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

PLAY_A = """THE TRAGEDY OF TESTING

by Nobody


Persons Represented.

Alpha, a king.
Beta, his friend.

ACT I.

Scene I. A room.

[Enter Alpha and
Beta.]

Alpha.
First line of alpha,
second line of alpha.

Beta.
Beta speaks once here
and twice here--[Aside.] and thrice.

[Exit Alpha.]

Still beta after the direction.

Alpha.
Third speech of alpha at the caf\u00e9@home.

Gamma.
Gamma has one line only.

ACT II.

Orphan paragraph without a speaker.
"""

PLAY_B = """A COMEDY

DRAMATIS PERSONAE

DELTA, a clown

ACT I.

SCENE I. A street.

DELTA
One, two, three, four, five, six, seven.
Eight nine ten eleven twelve thirteen.
Fourteen fifteen sixteen.

FIRST LORD.
A lord speaks, the first line,
and the second line,
and the third line of the lord.
"""


def write_plays(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "testing_gut.txt").write_text(PLAY_A, encoding="latin-1")
    (folder / "comedy_gut.txt").write_text(PLAY_B, encoding="latin-1")
    (folder / "sonnets_gut.txt").write_text("THE SONNETS\n\nI\n\nFrom fairest creatures.\n", encoding="latin-1")
    return folder


def leaf_user_data(rng: np.random.Generator, users: list[str], sizes: list[int], dim: int, classes: int) -> dict:
    data = {}
    for u, n in zip(users, sizes):
        data[u] = {"x": rng.random((n, dim)).round(3).tolist(), "y": rng.integers(0, classes, n).tolist()}
    return {"users": users, "num_samples": sizes, "user_data": data}


def write_leaf(root: Path, *, dim: int = 784, classes: int = 62, seed: int = 0) -> dict[str, dict]:
    """LEAF's split layout: train/ (two files) and test/ (one file); returns what was written."""
    rng = np.random.default_rng(seed)
    (root / "train").mkdir(parents=True)
    (root / "test").mkdir(parents=True)
    files = {
        "train/a.json": leaf_user_data(rng, ["f0001_02", "f0002_17"], [6, 4], dim, classes),
        "train/b.json": leaf_user_data(rng, ["f0003_33"], [5], dim, classes),
        "test/a.json": leaf_user_data(rng, ["f0001_02", "f0002_17", "f0003_33"], [2, 1, 3], dim, classes),
    }
    for name, content in files.items():
        (root / name).write_text(json.dumps(content))
    return files


def write_npz(
    path: Path, *, nodes: int = 5, per_node: int = 30, classes: int = 3, split: bool = True, seed: int = 0
) -> dict:
    """A learnable node-keyed set: each node's label depends on the sign of a feature, with a
    node-specific label mix."""
    rng = np.random.default_rng(seed)
    n = nodes * per_node
    node = np.repeat(np.array([f"user{k:02d}" for k in range(nodes)]), per_node)
    x = rng.standard_normal((n, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64) + (x[:, 1] > 1).astype(np.int64)
    arrays = {"x": x, "y": y, "node": node}
    if split:
        arrays["split"] = (rng.random(n) < 0.25).astype(np.int64)
    np.savez(path, **arrays)
    return arrays
