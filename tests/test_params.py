import pytest
import torch
from torch import nn

from fedsim.params import FlatModel


def test_load_and_vector_round_trip_and_no_aliasing():
    fm = FlatModel(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)))
    assert fm.dim == 3 * 4 + 4 + 4 * 2 + 2
    v = torch.arange(fm.dim, dtype=torch.float32)
    fm.load(v)
    assert torch.equal(fm.vector(), v)
    assert torch.equal(fm.module[0].bias.detach(), v[12:16])  # parameters are views of the vector
    v.zero_()
    assert fm.vector().abs().sum() > 0  # load copied
    out = fm.vector()
    out.zero_()
    assert fm.flat.abs().sum() > 0  # vector() copies


def test_gradients_land_in_the_flat_gradient():
    fm = FlatModel(nn.Linear(5, 3))
    fm.module(torch.ones(2, 5)).sum().backward()
    assert fm.flat_grad[:15].abs().sum() > 0
    assert torch.equal(fm.flat_grad[15:], torch.full((3,), 2.0))  # d(sum)/d(bias) over 2 rows
    fm.zero_grad()
    assert fm.flat_grad.abs().sum() == 0


def test_wrong_shape_and_buffers_are_rejected():
    fm = FlatModel(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="shape"):
        fm.load(torch.zeros(5))
    with pytest.raises(ValueError, match="GroupNorm"):
        FlatModel(nn.BatchNorm1d(3))
