import numpy as np
import pytest
import torch

from fedsim.seeding import np_rng, torch_rng, torch_seed


def test_same_path_same_stream_and_paths_differ():
    a = np_rng(3, "train", 1, 5).random(8)
    assert np.array_equal(a, np_rng(3, "train", 1, 5).random(8))
    assert not np.array_equal(a, np_rng(3, "train", 1, 6).random(8))
    assert not np.array_equal(a, np_rng(4, "train", 1, 5).random(8))
    assert not np.array_equal(a, np_rng(3, "sample", 1, 5).random(8))


def test_strings_and_ints_do_not_collide():
    assert torch_seed(0, "0") != torch_seed(0, 0)


def test_torch_generator_is_reproducible():
    x = torch.randperm(50, generator=torch_rng(1, "train", 0, 2))
    y = torch.randperm(50, generator=torch_rng(1, "train", 0, 2))
    assert torch.equal(x, y)
    assert 0 <= torch_seed(1, "x") < 2**63


def test_bad_path_parts_are_rejected():
    with pytest.raises(TypeError):
        np_rng(0, 1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        np_rng(0, -1)
