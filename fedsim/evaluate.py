"""Evaluation of the global model: on the whole test split and on each node's own test set.

Node test sets are index arrays into the test split, so one pass over the test split gives the
global metrics and every node's accuracy (by indexing the per-example results). On a GPU the
test split is uploaded once and every node's count of correct answers comes from one
``index_add`` over all nodes, read back in one copy.

On the CPU the batches of the test split are spread over ``threads`` threads (``eval_threads``),
each running torch with the calling thread's thread count (one, on the driver): each batch is the
same rows through the same kernels whichever thread takes it, and the results are joined in
batch order, so the metrics do not depend on the number of threads. A model whose forward pass
draws random numbers (dropout, noise) is evaluated in one thread: the first evaluation runs its
first batch alone and falls back to one thread if torch's random state moved.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F

from fedsim.errors import ConfigError
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
        device: torch.device | str = "cpu",
        threads: int = 1,
    ) -> None:
        if int(threads) < 1:
            raise ConfigError(f"eval_threads={threads} must be >= 1 (or null: the CPUs this run may use)")
        self.device = torch.device(device)
        self.model = model.to(self.device)
        self.x = torch.from_numpy(x_test).to(self.device)
        self.y = torch.from_numpy(y_test).to(self.device)
        self.node_test = [torch.from_numpy(np.asarray(ix, dtype=np.int64)) for ix in node_test]
        self.batch_size = int(batch_size)
        # every node's test rows, concatenated, and the node each belongs to (nodes with rows only)
        sizes = [len(ix) for ix in self.node_test]
        self.node_sizes = torch.tensor([n for n in sizes if n > 0], dtype=torch.int64)
        self.node_rows = torch.cat([ix for ix in self.node_test if len(ix)] or [torch.zeros(0, dtype=torch.int64)])
        self.row_node = torch.repeat_interleave(torch.arange(len(self.node_sizes)), self.node_sizes)
        if self.device.type != "cpu":
            self.node_rows, self.row_node = self.node_rows.to(self.device), self.row_node.to(self.device)
        batches = -(-len(self.y) // self.batch_size)
        self.threads = 1 if self.device.type != "cpu" else max(1, min(int(threads), batches))
        self.pool: ThreadPoolExecutor | None = None
        self.checked = False  # whether the model was seen to leave torch's random state alone

    def per_example(self, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, correct) of every test example under ``params`` (on the evaluator's device)."""
        self.model.load(params)
        starts = list(range(0, len(self.y), self.batch_size))
        parts = []
        if self.threads > 1 and not self.checked:  # a random forward pass: one thread, in order
            state = torch.get_rng_state()
            parts.append(self.batch(starts.pop(0)))
            self.checked = True
            if not torch.equal(state, torch.get_rng_state()):
                self.threads = 1
        if self.threads > 1:
            if self.pool is None:
                threads = torch.get_num_threads()  # a new thread would start with torch's default
                self.pool = ThreadPoolExecutor(
                    self.threads,
                    thread_name_prefix="fedsim-eval",
                    initializer=torch.set_num_threads,
                    initargs=(threads,),
                )
            parts += self.pool.map(self.batch, starts)
        else:
            parts += [self.batch(i) for i in starts]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def batch(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, correct) of the test rows ``i`` ... ``i + batch_size - 1``."""
        with torch.inference_mode():  # per thread: each thread enters it itself
            logits = self.model.module(self.x[i : i + self.batch_size])
            yb = self.y[i : i + self.batch_size]
            return F.cross_entropy(logits, yb, reduction="none"), logits.argmax(1) == yb

    def close(self) -> None:
        """Stop the evaluation threads (they are started again if the evaluator is used again)."""
        if self.pool is not None:
            self.pool.shutdown(wait=True)
            self.pool = None

    def __call__(self, params: torch.Tensor) -> dict[str, object]:
        loss, correct = self.per_example(params)
        node_acc = self.node_accuracies(correct)
        acc_loss = torch.stack([correct.float().mean(), loss.mean()]).tolist()  # one read
        out: dict[str, object] = {
            "eval/acc": float(acc_loss[0]),
            "eval/loss": float(acc_loss[1]),
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

    def node_accuracies(self, correct: torch.Tensor) -> list[float]:
        """Each node's accuracy on its own test rows (nodes without test rows left out): its
        count of correct rows over its number of rows, in float32, which is exactly the float32
        mean of its 0/1 results (the count is exact)."""
        if not len(self.node_sizes):
            return []
        hits = torch.zeros(len(self.node_sizes), dtype=torch.int64, device=correct.device)
        hits.index_add_(0, self.row_node, correct.index_select(0, self.node_rows).to(torch.int64))
        return (hits.cpu().to(torch.float32) / self.node_sizes.to(torch.float32)).tolist()
