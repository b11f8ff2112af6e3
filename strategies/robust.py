"""Byzantine-robust D-SGD (``strategy=robust``): FedAvg's loop with unweighted robust aggregation
(robust rules treat every row alike, as in ByzFL), usually with the ``WorkerMomentum`` client:
the worker-momentum D-SGD that ByzFL benchmarks (docs/methods/robust_aggregation.md)."""

from __future__ import annotations

from typing import Any

from strategies.fedavg import FedAvg


class RobustDSGD(FedAvg):
    """FedAvg with ``weighted=False`` by default; configure with ``strategy=robust``."""

    def __init__(self, *, weighted: bool = False, **kwargs: Any) -> None:
        super().__init__(weighted=weighted, **kwargs)
