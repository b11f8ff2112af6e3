"""Dataset loaders. Each returns a `Dataset` of float32 features and int64 labels.

Image datasets keep (C, H, W) features. Offline first: every loader looks for the standard
files on disk before it tries the network, and fails with one line naming where it looked and how
to provide the files.
"""

from __future__ import annotations

import functools
import gzip
import os
import pickle
import socket
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedsim.data.base import Dataset
from fedsim.errors import ConfigError, DataUnavailable
from fedsim.seeding import np_rng

DEFAULT_ROOT = "~/.cache/fedsim/data"

_CIFAR_MEAN = np.array([0.4914, 0.4822, 0.4465], dtype=np.float32)
_CIFAR_STD = np.array([0.2023, 0.1994, 0.2010], dtype=np.float32)


def data_root(root: str | os.PathLike[str] | None) -> Path:
    """``root``, else $FEDSIM_DATA, else ~/.cache/fedsim/data."""
    return Path(os.path.expanduser(str(root or os.environ.get("FEDSIM_DATA") or DEFAULT_ROOT)))


def _split(name: str, x: np.ndarray, y: np.ndarray, num_classes: int, test_fraction: float, split_seed: int) -> Dataset:
    """A stratified-by-chance train/test split with its own fixed seed (not the run seed), so the
    test set is the same in every run."""
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"dataset.test_fraction={test_fraction} must be in (0, 1)")
    perm = np_rng(split_seed, "split", name).permutation(len(y))
    n_test = max(1, int(round(test_fraction * len(y))))
    te, tr = perm[:n_test], perm[n_test:]
    return Dataset(name, x[tr], y[tr], x[te], y[te], num_classes)


def load_digits(*, test_fraction: float = 0.25, split_seed: int = 0) -> Dataset:
    """scikit-learn's bundled 8x8 digits (1797 images, 10 classes), as (1, 8, 8) in [0, 1]."""
    x, y = _digits_arrays()
    return _split("digits", x, y, 10, test_fraction, split_seed)


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Parsed once per process (sklearn reads them from a compressed CSV); never written to."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[:, None, :, :]
    y = bunch.target.astype(np.int64)
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


def load_moons(
    *, n_samples: int = 2000, noise: float = 0.2, test_fraction: float = 0.25, data_seed: int = 0
) -> Dataset:
    """scikit-learn's two interleaving half-moons (binary, 2 features)."""
    from sklearn.datasets import make_moons

    if n_samples < 4:
        raise ConfigError(f"dataset.n_samples={n_samples} is too small; use at least 4")
    x, y = make_moons(n_samples=n_samples, noise=noise, random_state=int(data_seed))
    return _split("moons", x.astype(np.float32), y.astype(np.int64), 2, test_fraction, data_seed)


def load_synthetic(
    *,
    num_classes: int = 10,
    dim: int = 20,
    n_train: int = 10000,
    n_test: int = 2000,
    separation: float = 3.0,
    noise: float = 1.0,
    data_seed: int = 0,
    shape: list[int] | None = None,
) -> Dataset:
    """A Gaussian mixture: class c has mean mu_c ~ N(0, (separation**2 / dim) I), so two class
    means lie about ``separation * sqrt(2)`` apart, plus isotropic N(0, noise**2 I) noise.
    Balanced classes; any size. ``shape`` (e.g. [1, 28, 28]) makes image-shaped features of
    prod(shape) dimensions instead of ``dim``."""
    if shape is not None:
        shape = [int(v) for v in shape]
        dim = int(np.prod(shape))
    for key, value in (("num_classes", num_classes), ("dim", dim), ("n_train", n_train), ("n_test", n_test)):
        if value < 1:
            raise ConfigError(f"dataset.{key}={value} must be positive")
    rng = np_rng(data_seed, "synthetic")
    means = rng.standard_normal((num_classes, dim)) * (separation / np.sqrt(dim))

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.arange(n) % num_classes
        rng.shuffle(y)
        x = means[y] + noise * rng.standard_normal((n, dim))
        return x.astype(np.float32), y.astype(np.int64)

    x_tr, y_tr = draw(n_train)
    x_te, y_te = draw(n_test)
    if shape is not None:
        x_tr, x_te = x_tr.reshape(-1, *shape), x_te.reshape(-1, *shape)
    return Dataset("synthetic", x_tr, y_tr, x_te, y_te, num_classes)


# ---------------------------------------------------------------- IDX (MNIST, Fashion-MNIST)

_IDX_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped) into a numpy array of its stored dtype."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        raw = fh.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ConfigError(f"{path} is not an IDX file (bad magic number)")
    dtypes: dict[int, Any] = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    dtype = dtypes.get(raw[2])
    if dtype is None:
        raise ConfigError(f"{path}: unknown IDX element type {raw[2]:#x}")
    ndim = raw[3]
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=dtype, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ConfigError(f"{path} is truncated: header says {shape}, file has {data.size} values")
    return data.reshape(shape)


def _find_idx(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem.replace("-idx", ".idx")):
        for suffix in ("", ".gz"):
            candidate = directory / (name + suffix)
            if candidate.is_file():
                return candidate
    return None


def _idx_dirs(root: Path, folder: str, system_dirs: tuple[str, ...]) -> list[Path]:
    return [root, root / folder / "raw", root / folder, *map(Path, system_dirs)]


def _normalizer(name: str, normalize: Sequence[float] | None) -> tuple[float, float] | None:
    """``dataset.normalize`` = [mean, std] (pixels in [0, 1] become (x - mean) / std), or None."""
    if normalize is None:
        return None
    values = [float(v) for v in normalize]
    if len(values) != 2 or not values[1] > 0 or not all(np.isfinite(values)):
        raise ConfigError(f"{name}: dataset.normalize={list(normalize)} must be [mean, std] with std > 0, or null")
    return values[0], values[1]


def _load_idx_dataset(
    name: str,
    folder: str,
    root: Path,
    download: bool,
    system_dirs: tuple[str, ...],
    normalize: Sequence[float] | None = None,
) -> Dataset:
    dirs = _idx_dirs(root, folder, system_dirs)
    norm = _normalizer(name, normalize)

    def locate() -> dict[str, Path] | None:
        for d in dirs:
            found = {k: _find_idx(d, stem) for k, stem in _IDX_FILES.items()}
            if all(found.values()):
                return found  # type: ignore[return-value]
        return None

    files, failure = _locate_or_download(locate, download, folder, root)
    if files is None:
        looked = ", ".join(str(d) for d in dirs)
        raise DataUnavailable(
            f"{name}: IDX files ({_IDX_FILES['train_x']}[.gz] etc.) not found in {looked} ({failure})"
            + "; put them in one of these folders or set dataset.root=DIR"
            + ("" if download else " or dataset.download=true")
        )
    x_tr = read_idx(files["train_x"]).astype(np.float32)[:, None, :, :] / 255.0
    x_te = read_idx(files["test_x"]).astype(np.float32)[:, None, :, :] / 255.0
    y_tr = read_idx(files["train_y"]).astype(np.int64)
    y_te = read_idx(files["test_y"]).astype(np.int64)
    if norm is not None:
        mean, std = np.float32(norm[0]), np.float32(norm[1])
        x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    return Dataset(name, x_tr, y_tr, x_te, y_te, 10)


def _torchvision_download(folder: str, root: Path, timeout: float = 30.0) -> str:
    """Try torchvision's downloader. Returns "" on success, else a short reason (the caller
    reports where it looked)."""
    import torchvision.datasets as tvd

    cls = {"MNIST": tvd.MNIST, "FashionMNIST": tvd.FashionMNIST, "CIFAR10": tvd.CIFAR10}[folder]
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(timeout)
    try:
        root.mkdir(parents=True, exist_ok=True)
        for train in (True, False):
            cls(str(root), train=train, download=True)
    except Exception as exc:  # noqa: BLE001 - offline or blocked: the caller reports it
        return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
    finally:
        socket.setdefaulttimeout(old)
    return ""


def _locate_or_download(locate, download: bool, folder: str, root: Path):
    """``locate()``; if nothing is found and ``download`` is on, download and look again.
    Returns (what locate found or None, why nothing was found)."""
    found = locate()
    if found is not None or not download:
        return found, "download disabled"
    reason = _torchvision_download(folder, root)
    return locate(), "download failed: " + (reason or "files still missing")


def load_mnist(*, root: str | None = None, download: bool = True, normalize: Sequence[float] | None = None) -> Dataset:
    """MNIST from IDX files (raw or .gz) in ``root``, ``root/MNIST/raw`` (torchvision's layout)
    or /usr/share/datasets/mnist; downloads with torchvision when allowed and nothing is found.
    Pixels in [0, 1], or standardised with ``normalize`` = [mean, std]."""
    return _load_idx_dataset("mnist", "MNIST", data_root(root), download, ("/usr/share/datasets/mnist",), normalize)


def load_fashion_mnist(
    *, root: str | None = None, download: bool = True, normalize: Sequence[float] | None = None
) -> Dataset:
    """Fashion-MNIST from IDX files in ``root``, ``root/FashionMNIST/raw`` or
    /usr/share/datasets/fashion-mnist (Debian's dataset-fashion-mnist package). Pixels in
    [0, 1], or standardised with ``normalize`` = [mean, std]."""
    return _load_idx_dataset(
        "fashion_mnist",
        "FashionMNIST",
        data_root(root),
        download,
        ("/usr/share/datasets/fashion-mnist",),
        normalize,
    )


# ---------------------------------------------------------------- CIFAR-10 (python pickles)

_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_TRAIN = [f"data_batch_{i}" for i in range(1, 6)]
_CIFAR_TEST = ["test_batch"]


def _read_cifar_batches(directory: Path, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for name in names:
        with open(directory / name, "rb") as fh:
            entry = pickle.load(fh, encoding="latin1")
        xs.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        ys.append(np.asarray(entry.get("labels", entry.get("fine_labels")), dtype=np.int64))
    return np.concatenate(xs), np.concatenate(ys)


def load_cifar10(*, root: str | None = None, download: bool = True, normalize: bool = True) -> Dataset:
    """CIFAR-10 from torchvision's folder layout (``root/cifar-10-batches-py/data_batch_1..5``,
    ``test_batch``), normalised per channel with the usual mean/std."""
    base = data_root(root)
    dirs = [base / _CIFAR_DIR, base]

    def locate() -> Path | None:
        for d in dirs:
            if all((d / n).is_file() for n in _CIFAR_TRAIN + _CIFAR_TEST):
                return d
        return None

    found, failure = _locate_or_download(locate, download, "CIFAR10", base)
    if found is None:
        raise DataUnavailable(
            f"cifar10: {_CIFAR_DIR}/data_batch_1..5 and test_batch not found under {base} ({failure})"
            + "; extract cifar-10-python.tar.gz there or set dataset.root=DIR"
        )
    x_tr, y_tr = _read_cifar_batches(found, _CIFAR_TRAIN)
    x_te, y_te = _read_cifar_batches(found, _CIFAR_TEST)

    def scale(x: np.ndarray) -> np.ndarray:
        out = x.astype(np.float32) / 255.0
        if normalize:
            out = (out - _CIFAR_MEAN[None, :, None, None]) / _CIFAR_STD[None, :, None, None]
        return out.astype(np.float32)

    return Dataset("cifar10", scale(x_tr), y_tr, scale(x_te), y_te, 10)
