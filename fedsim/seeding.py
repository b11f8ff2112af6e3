"""Every random stream is a pure function of (root seed, path).

A path is a tuple of ints and strings, e.g. ``(seed, "train", round, node_id)``. Strings are
hashed with a fixed hash (not Python's salted ``hash``), so the same path gives the same stream
in every process, on every machine. There is no global RNG anywhere in fedsim: code that needs
randomness asks for a generator for its own path.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

PathPart = int | str


def _word(part: PathPart) -> int:
    if isinstance(part, bool) or not isinstance(part, (int, np.integer, str)):
        raise TypeError(f"seed path parts must be int or str, got {type(part).__name__}")
    if isinstance(part, str):
        # Strings and ints must never collide: strings live above 2**32.
        return (1 << 32) + zlib.crc32(part.encode("utf-8"))
    value = int(part)
    if value < 0:
        raise ValueError(f"seed path parts must be non-negative, got {value}")
    return value


def seed_sequence(seed: int, *path: PathPart) -> np.random.SeedSequence:
    """The numpy SeedSequence for ``(seed, *path)``."""
    return np.random.SeedSequence(entropy=_word(seed), spawn_key=tuple(_word(p) for p in path))


def np_rng(seed: int, *path: PathPart) -> np.random.Generator:
    """A numpy Generator (PCG64) for ``(seed, *path)``."""
    return np.random.Generator(np.random.PCG64(seed_sequence(seed, *path)))


def torch_seed(seed: int, *path: PathPart) -> int:
    """A 63-bit integer seed for a torch.Generator, derived from ``(seed, *path)``."""
    state = seed_sequence(seed, *path).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def torch_rng(seed: int, *path: PathPart) -> torch.Generator:
    """A CPU torch.Generator for ``(seed, *path)``."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(torch_seed(seed, *path))
    return gen
