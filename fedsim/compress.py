"""Uplink compressors (config group ``compressor``), all *contractive*:
E||C(v) - v||^2 <= (1 - delta) ||v||^2 for some delta in (0, 1] (docs/methods/econtrol.md,
"Compressors"). Error feedback (strategies/compression.py) relies on that property; the scaled
(d/k) random-k and plain unbiased quantisers are not contractive and are deliberately absent.

Interface: ``compress(v, rng, sizes=None) -> payload``,
``decompress(payload) -> v`` and ``nbytes(payload)``. ``sizes`` are the model's per-tensor
lengths; with ``layerwise=True`` each tensor is compressed on its own (top-k keeps
k_l = ceil(ratio * d_l) per tensor), otherwise the flat vector is compressed as one.

Byte counts are what an encoder that knows d would send, rounded up to whole bytes per
(layer) message:

- identity: d float32 values, 4d bytes;
- top-k and random-k: k values plus k indices, k * (32 + ceil(log2 d)) bits. Random-k is charged
  its indices too, although a shared seed could regenerate them;
- scaled sign: d sign bits plus one float32 scale;
- QSGD with s levels: one float32 norm plus, per coordinate, a sign bit and a fixed-length level
  of ceil(log2(s + 1)) bits. QSGD's Elias coding would be shorter; this is the plain encoding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fedsim.errors import ConfigError


@dataclass(frozen=True)
class Payload:
    """One compressed vector: the dense decompressed values (what the simulator ships; the
    receiver would rebuild exactly these) and the number of bytes the encoded message takes."""

    values: torch.Tensor
    nbytes: int


def _index_bits(d: int) -> int:
    return max(1, math.ceil(math.log2(d))) if d > 1 else 1


def _segments(d: int, sizes: Sequence[int] | None, layerwise: bool) -> list[int]:
    if not layerwise or sizes is None:
        return [d]
    if sum(sizes) != d:
        raise ValueError(f"layer sizes sum to {sum(sizes)}, the vector has {d} entries")
    return [int(s) for s in sizes if int(s) > 0]


class Compressor:
    """Base: split into segments (one, or one per layer), compress each with `_one`."""

    name = "compressor"
    layerwise = False

    def _one(self, v: torch.Tensor, rng: torch.Generator | None) -> tuple[torch.Tensor, int]:
        raise NotImplementedError

    def compress(
        self, v: torch.Tensor, rng: torch.Generator | None = None, sizes: Sequence[int] | None = None
    ) -> Payload:
        d = int(v.numel())
        parts, total = [], 0
        offset = 0
        for n in _segments(d, sizes, self.layerwise):
            out, nbytes = self._one(v[offset : offset + n], rng)
            parts.append(out)
            total += nbytes
            offset += n
        return Payload(parts[0] if len(parts) == 1 else torch.cat(parts), total)

    @staticmethod
    def decompress(payload: Payload) -> torch.Tensor:
        return payload.values

    @staticmethod
    def nbytes(payload: Payload) -> int:
        return payload.nbytes

    @property
    def is_identity(self) -> bool:
        return False


class Identity(Compressor):
    """No compression: the float32 vector itself, 4 bytes per entry (delta = 1)."""

    name = "identity"

    def _one(self, v: torch.Tensor, rng: torch.Generator | None) -> tuple[torch.Tensor, int]:
        return v.clone(), 4 * int(v.numel())

    @property
    def is_identity(self) -> bool:
        return True


class _Sparse(Compressor):
    def __init__(self, *, ratio: float | None = None, k: int | None = None, layerwise: bool = False) -> None:
        if (ratio is None) == (k is None):
            raise ConfigError(
                f"{self.name}: set exactly one of compressor.ratio (fraction kept) and compressor.k (entries kept)"
            )
        if ratio is not None and not 0.0 < float(ratio) <= 1.0:
            raise ConfigError(f"{self.name}: compressor.ratio={ratio} must be in (0, 1]")
        if k is not None and int(k) < 1:
            raise ConfigError(f"{self.name}: compressor.k={k} must be >= 1")
        if k is not None and layerwise:
            raise ConfigError(f"{self.name}: layerwise compression takes compressor.ratio, not a fixed k")
        self.ratio = None if ratio is None else float(ratio)
        self.k = None if k is None else int(k)
        self.layerwise = bool(layerwise)

    def keep(self, d: int) -> int:
        """Entries kept of a d-vector: ceil(ratio * d), or min(k, d)."""
        if self.k is not None:
            return min(self.k, d)
        assert self.ratio is not None
        return max(1, min(d, math.ceil(self.ratio * d - 1e-9)))

    def _indices(self, v: torch.Tensor, k: int, rng: torch.Generator | None) -> torch.Tensor:
        raise NotImplementedError

    def _one(self, v: torch.Tensor, rng: torch.Generator | None) -> tuple[torch.Tensor, int]:
        d = int(v.numel())
        k = self.keep(d)
        out = torch.zeros_like(v)
        idx = self._indices(v, k, rng)
        out[idx] = v[idx]
        return out, math.ceil(k * (32 + _index_bits(d)) / 8)


class TopK(_Sparse):
    """Keep the k entries of largest magnitude, zero the rest (delta = k/d)."""

    name = "top_k"

    def _indices(self, v: torch.Tensor, k: int, rng: torch.Generator | None) -> torch.Tensor:
        return torch.topk(v.abs(), k, sorted=False).indices


class RandK(_Sparse):
    """Keep k uniformly random entries, zero the rest, *unscaled* (contractive, delta = k/d in
    expectation). Draws from the node's compression stream."""

    name = "rand_k"

    def _indices(self, v: torch.Tensor, k: int, rng: torch.Generator | None) -> torch.Tensor:
        if rng is None:
            raise ValueError("rand_k needs a random generator")
        # drawn from the CPU stream (the same entries on any device), moved once
        return torch.randperm(int(v.numel()), generator=rng, device="cpu")[:k].to(v.device)


class Sign(Compressor):
    """(||v||_1 / d) * sign(v) (delta = ||v||_1^2 / (d ||v||_2^2) >= 1/d); d bits + one float."""

    name = "sign"

    def __init__(self, *, layerwise: bool = False) -> None:
        self.layerwise = bool(layerwise)

    def _one(self, v: torch.Tensor, rng: torch.Generator | None) -> tuple[torch.Tensor, int]:
        d = int(v.numel())
        scale = v.abs().sum() / d
        return torch.sign(v) * scale, math.ceil(d / 8) + 4


class QSGD(Compressor):
    """QSGD quantisation (Alistarh et al. 2017) with s levels, made contractive by 1/(1 + omega):
    Q(v)_j = ||v||_2 sign(v_j) xi_j / s with xi_j the stochastic rounding of s|v_j|/||v||_2,
    unbiased with variance factor omega = min(d/s^2, sqrt(d)/s); C(v) = Q(v) / (1 + omega),
    delta = 1/(1 + omega) (docs/methods/econtrol.md, "Compressors")."""

    name = "qsgd"

    def __init__(self, *, levels: int = 16, layerwise: bool = False) -> None:
        if int(levels) < 1:
            raise ConfigError(f"qsgd: compressor.levels={levels} must be >= 1")
        self.levels = int(levels)
        self.layerwise = bool(layerwise)

    def omega(self, d: int) -> float:
        s = self.levels
        return min(d / s**2, math.sqrt(d) / s)

    def _one(self, v: torch.Tensor, rng: torch.Generator | None) -> tuple[torch.Tensor, int]:
        if rng is None:
            raise ValueError("qsgd needs a random generator")
        d = int(v.numel())
        s = self.levels
        nbytes = 4 + math.ceil(d * (1 + _index_bits(s + 1)) / 8)
        norm = v.norm()
        if float(norm) == 0.0:
            return torch.zeros_like(v), nbytes
        scaled = v.abs() / norm * s
        low = torch.floor(scaled)
        u = torch.rand(d, generator=rng, dtype=v.dtype, device="cpu").to(v.device)  # the CPU stream, moved
        xi = low + (u < (scaled - low)).to(v.dtype)
        q = norm * torch.sign(v) * xi / s
        return q / (1.0 + self.omega(d)), nbytes
