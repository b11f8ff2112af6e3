"""Dataset loaders on real data where the machine has it, and on small files in the standard
layouts that the tests write."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from fedsim.data import sources
from fedsim.errors import ConfigError


def write_idx(path: Path, array: np.ndarray, *, gz: bool) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        with gzip.open(path, "wb") as fh:
            fh.write(raw)
    else:
        path.write_bytes(raw)


def make_idx_set(directory: Path, *, gz: bool, n_train: int = 12, n_test: int = 6) -> tuple[np.ndarray, np.ndarray]:
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    x_tr = rng.integers(0, 256, (n_train, 28, 28))
    y_tr = np.arange(n_train) % 10
    write_idx(directory / "train-images-idx3-ubyte", x_tr, gz=gz)
    write_idx(directory / "train-labels-idx1-ubyte", y_tr, gz=gz)
    write_idx(directory / "t10k-images-idx3-ubyte", rng.integers(0, 256, (n_test, 28, 28)), gz=gz)
    write_idx(directory / "t10k-labels-idx1-ubyte", np.arange(n_test) % 10, gz=gz)
    return x_tr, y_tr


def test_digits_is_embedded_and_split_is_fixed():
    a, b = sources.load_digits(), sources.load_digits()
    assert a.x_train.shape[1:] == (1, 8, 8) and a.num_classes == 10
    assert len(a.y_train) + len(a.y_test) == 1797
    assert np.array_equal(a.y_test, b.y_test) and 0.0 <= a.x_train.min() and a.x_train.max() <= 1.0


def test_synthetic_and_moons_shapes():
    s = sources.load_synthetic(num_classes=3, dim=5, n_train=30, n_test=9)
    assert s.x_train.shape == (30, 5) and set(s.y_train) == {0, 1, 2}
    img = sources.load_synthetic(n_train=20, n_test=10, shape=[1, 28, 28])
    assert img.x_train.shape == (20, 1, 28, 28)
    m = sources.load_moons(n_samples=100)
    assert m.x_train.shape[1] == 2 and m.num_classes == 2 and len(m.y_train) + len(m.y_test) == 100


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_reads_torchvision_raw_layout(tmp_path, gz):
    x_tr, y_tr = make_idx_set(tmp_path / "MNIST" / "raw", gz=gz)
    ds = sources.load_mnist(root=str(tmp_path), download=False)
    assert ds.x_train.shape == (12, 1, 28, 28) and ds.x_train.dtype == np.float32
    assert np.allclose(ds.x_train[:, 0] * 255.0, x_tr)
    assert np.array_equal(ds.y_train, y_tr) and len(ds.y_test) == 6


def test_fashion_mnist_reads_flat_gz_folder(tmp_path):
    make_idx_set(tmp_path, gz=True)
    ds = sources.load_fashion_mnist(root=str(tmp_path), download=False)
    assert ds.name == "fashion_mnist" and len(ds.y_train) == 12


def test_normalize_standardises_the_pixels_and_refuses_a_bad_pair(tmp_path):
    x_tr, _ = make_idx_set(tmp_path, gz=False)
    ds = sources.load_mnist(root=str(tmp_path), download=False, normalize=[0.1307, 0.3081])
    assert ds.x_train.dtype == np.float32
    assert np.allclose(ds.x_train[:, 0], (x_tr / 255.0 - 0.1307) / 0.3081, atol=1e-5)
    for bad in ([0.5], [0.1, 0.0], [0.1, float("nan")]):
        with pytest.raises(ConfigError, match=r"dataset.normalize=.* must be \[mean, std\] with std > 0"):
            sources.load_fashion_mnist(root=str(tmp_path), download=False, normalize=bad)


@pytest.mark.skipif(
    not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="Debian dataset-fashion-mnist not installed"
)
def test_fashion_mnist_found_in_debian_location(tmp_path):
    ds = sources.load_fashion_mnist(root=str(tmp_path / "empty"), download=False)
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert np.bincount(ds.y_train).tolist() == [6000] * 10


def test_missing_files_name_the_places_looked(tmp_path):
    with pytest.raises(ConfigError) as err:
        sources.load_mnist(root=str(tmp_path), download=False)
    msg = str(err.value)
    assert str(tmp_path / "MNIST" / "raw") in msg and "dataset.root" in msg and "\n" not in msg


def test_truncated_idx_is_reported(tmp_path):
    bad = tmp_path / "x"
    bad.write_bytes(struct.pack(">BBBBI", 0, 0, 8, 1, 100) + b"\x00" * 10)
    with pytest.raises(ConfigError, match="truncated"):
        sources.read_idx(bad)


def make_cifar_set(root: Path) -> Path:
    """Five training batches of 4 images and a test batch of 3, in torchvision's layout."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in [*[(f"data_batch_{i}", 4) for i in range(1, 6)], ("test_batch", 3)]:
        entry = {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": list(rng.integers(0, 10, n))}
        with open(folder / name, "wb") as fh:
            pickle.dump(entry, fh)
    return folder


def test_cifar10_reads_standard_layout(tmp_path):
    folder = make_cifar_set(tmp_path)
    ds = sources.load_cifar10(root=str(tmp_path), download=False)
    assert ds.x_train.shape == (20, 3, 32, 32) and ds.x_test.shape == (3, 3, 32, 32)
    raw = sources.load_cifar10(root=str(tmp_path), download=False, normalize=False)
    with open(folder / "data_batch_1", "rb") as fh:
        first = pickle.load(fh)["data"][0].reshape(3, 32, 32)
    assert np.allclose(raw.x_train[0] * 255.0, first)
    with pytest.raises(ConfigError, match="cifar-10-batches-py"):
        sources.load_cifar10(root=str(tmp_path / "nothing"), download=False)
