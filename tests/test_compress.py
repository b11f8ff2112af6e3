"""Compressors: exact byte counts, contractiveness, what each one keeps."""

from __future__ import annotations

import math

import pytest
import torch

from fedsim.compress import QSGD, Identity, RandK, Sign, TopK
from fedsim.errors import ConfigError


def vec(d: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(d, generator=torch.Generator().manual_seed(seed))


def gen(seed: int = 1) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# Byte formulas of docs/methods/econtrol.md, computed here independently of fedsim.compress.
def sparse_bytes(k: int, d: int) -> int:
    return math.ceil(k * (32 + math.ceil(math.log2(d))) / 8)


@pytest.mark.parametrize(
    "compressor,expected",
    [
        (Identity(), 4 * 1000),
        (TopK(ratio=0.01), sparse_bytes(10, 1000)),  # 10 * 42 bits = 53 bytes
        (TopK(k=7), sparse_bytes(7, 1000)),
        (RandK(ratio=0.1), sparse_bytes(100, 1000)),
        (Sign(), 1000 // 8 + 4),
        (QSGD(levels=16), 4 + math.ceil(1000 * (1 + 5) / 8)),  # sign + 5-bit level (0..16)
        (QSGD(levels=1), 4 + math.ceil(1000 * 2 / 8)),
    ],
    ids=["identity", "top1%", "top7", "rand10%", "sign", "qsgd16", "qsgd1"],
)
def test_flat_byte_counts_are_exact(compressor, expected):
    payload = compressor.compress(vec(1000), gen())
    assert compressor.nbytes(payload) == expected
    assert compressor.decompress(payload).shape == (1000,)


def test_layerwise_counts_each_tensor_with_its_own_k_and_index_width():
    v = vec(1000)
    sizes = [600, 390, 10]
    top = TopK(ratio=0.01, layerwise=True)
    p = top.compress(v, gen(), sizes)
    # k_l = ceil(0.01 d_l) = 6, 4, 1; index widths ceil(log2 d_l) = 10, 9, 4 bits
    assert p.nbytes == sparse_bytes(6, 600) + sparse_bytes(4, 390) + sparse_bytes(1, 10)
    nonzero = [int((p.values[a:b] != 0).sum()) for a, b in ((0, 600), (600, 990), (990, 1000))]
    assert nonzero == [6, 4, 1]
    sign = Sign(layerwise=True).compress(v, None, sizes)
    assert sign.nbytes == (75 + 4) + (49 + 4) + (2 + 4)
    # per-layer scaling: each segment has its own ||v_l||_1 / d_l
    assert torch.allclose(sign.values[600:990].abs(), v[600:990].abs().mean().expand(390))
    with pytest.raises(ValueError, match="sum to"):
        top.compress(v, gen(), [10, 20])


def test_top_k_keeps_the_largest_entries():
    v = torch.tensor([0.1, -5.0, 0.3, 2.0, -0.2, 0.0])
    out = TopK(k=2).compress(v).values
    assert out.tolist() == [0.0, -5.0, 0.0, 2.0, 0.0, 0.0]


@pytest.mark.parametrize(
    "compressor", [TopK(ratio=0.05), RandK(ratio=0.05), Sign(), QSGD(levels=4)], ids=["top_k", "rand_k", "sign", "qsgd"]
)
def test_compressors_are_contractive(compressor):
    """E||C(v) - v||^2 <= (1 - delta)||v||^2 with the documented delta (averaged over draws for the
    random ones)."""
    d = 400
    v = vec(d, 3) ** 3  # heavy-tailed, so top-k and sign differ clearly from rand-k
    draws = [compressor.compress(v, gen(s)).values for s in range(200)]
    err = torch.stack([(c - v).pow(2).sum() for c in draws]).mean()
    norm2 = v.pow(2).sum()
    if isinstance(compressor, QSGD):
        delta = 1 / (1 + compressor.omega(d))
    elif isinstance(compressor, Sign):
        delta = float(v.abs().sum() ** 2 / (d * norm2))
        assert torch.allclose(err, norm2 * (1 - delta), rtol=1e-4)  # equality for sign
    else:
        delta = 20 / d
    slack = 1.03 if isinstance(compressor, (RandK, QSGD)) else 1.0 + 1e-6
    assert err <= (1 - delta) * norm2 * slack
    if isinstance(compressor, TopK):  # top-k beats its worst-case delta on heavy tails
        assert err < 0.5 * norm2


def test_random_compressors_follow_their_generator():
    v = vec(300)
    for c in (RandK(k=10), QSGD(levels=2)):
        a, b = c.compress(v, gen(5)).values, c.compress(v, gen(5)).values
        assert torch.equal(a, b)
        assert not torch.equal(a, c.compress(v, gen(6)).values)
    with pytest.raises(ValueError, match="generator"):
        RandK(k=3).compress(v, None)


def test_qsgd_is_unbiased_before_scaling():
    v = vec(50)
    q = QSGD(levels=2)
    mean = torch.stack([q.compress(v, gen(s)).values for s in range(4000)]).mean(0) * (1 + q.omega(50))
    assert torch.allclose(mean, v, atol=0.12)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({}, "exactly one"),
        ({"ratio": 0.1, "k": 3}, "exactly one"),
        ({"ratio": 1.5}, "ratio"),
        ({"k": 0}, "k=0"),
        ({"k": 3, "layerwise": True}, "layerwise"),
    ],
)
def test_sparse_options_are_checked(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        TopK(**kwargs)
