"""Evaluation of the global model: on the whole test split and on each node's own test set.

Node test sets are index arrays into the test split, so one pass over the test split gives the
global metrics and every node's accuracy (by indexing the per-example results).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from fedsim.params import FlatModel


class Evaluator:
    def __init__(
        self,
        model: FlatModel,
        x_test: np.ndarray,
        y_test: np.ndarray,
        node_test: Sequence[np.ndarray],
        *,
        batch_size: int = 1024,
    ) -> None:
        self.model = model
        self.x = torch.from_numpy(x_test)
        self.y = torch.from_numpy(y_test)
        self.node_test = [torch.from_numpy(np.asarray(ix, dtype=np.int64)) for ix in node_test]
        self.batch_size = int(batch_size)

    def per_example(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, correct) of every test example under ``params``."""
        self.model.load(params)
        losses, correct = [], []
        with torch.inference_mode():
            for i in range(0, len(self.y), self.batch_size):
                logits = self.model.module(self.x[i : i + self.batch_size])
                yb = self.y[i : i + self.batch_size]
                losses.append(F.cross_entropy(logits, yb, reduction="none"))
                correct.append(logits.argmax(1) == yb)
        return torch.cat(losses), torch.cat(correct)

    def __call__(self, params: torch.Tensor) -> dict[str, object]:
        loss, correct = self.per_example(params)
        node_acc = [float(correct[ix].float().mean()) for ix in self.node_test if len(ix) > 0]
        out: dict[str, object] = {
            "eval/acc": float(correct.float().mean()),
            "eval/loss": float(loss.mean()),
        }
        if node_acc:
            acc = np.array(node_acc)
            out.update(
                {
                    "eval/node_acc_min": float(acc.min()),
                    "eval/node_acc_mean": float(acc.mean()),
                    "eval/node_acc_max": float(acc.max()),
                    "eval/node_acc": [round(a, 6) for a in node_acc],
                }
            )
        return out
