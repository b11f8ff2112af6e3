"""Aggregation rules: pure functions ``(U, weights) -> vector`` on an (n, d) matrix."""

from __future__ import annotations

import torch


class Mean:
    """Weighted mean: sum_i w_i x_i / sum_i w_i (with w_i = examples of node i, FedAvg's
    sample-weighted mean; McMahan et al. 2017). Rows with zero weight do not count; if every
    weight is zero the result is the zero vector (no data, no update)."""

    def __call__(self, U: torch.Tensor, weights: torch.Tensor, /) -> torch.Tensor:
        if U.ndim != 2:
            raise ValueError(f"aggregators take an (n, d) matrix, got shape {tuple(U.shape)}")
        w = weights.to(dtype=torch.float64)
        total = w.sum()
        if U.shape[0] == 0 or total <= 0:
            return torch.zeros(U.shape[1], dtype=U.dtype)
        return ((w / total).to(U.dtype) @ U).contiguous()
