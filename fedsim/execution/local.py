"""In-process executor: the node-worker code without Ray (unit tests, ``cluster=local``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import torch

from fedsim import devices
from fedsim.data.base import FederatedData
from fedsim.execution.worker import NodeTask, NodeWorker, PreSum, RoundResult, WorkerSpec, round_tasks, vectorized


class LocalExecutor:
    """Runs every node in this process, one after another, with ``spec.threads`` torch threads
    (restored afterwards), which is what makes it bit-identical to the Ray executor."""

    def __init__(
        self,
        spec: WorkerSpec,
        data: FederatedData,
        *,
        vectorize: bool = False,
        cohort: int | None = None,
        device: str | None = "auto",
        retain_memory: bool = True,
    ) -> None:
        dev = devices.resolve(device)
        spec = vectorized(replace(spec, device=str(dev), retain_memory=bool(retain_memory)), vectorize, cohort)
        self.spec = spec

        ds = data.dataset
        test = (ds.x_test, data.partition.test) if spec.unlabelled else (None, None)
        self.worker = NodeWorker(spec, ds.x_train, ds.y_train, data.partition.train, *test)
        self.num_workers = 1
        self.description = "local (in-process)" + (f", on {devices.name_of(dev)}" if dev.type != "cpu" else "")

    def run_round(
        self,
        params: torch.Tensor | None,
        round_: int,
        tasks: Sequence[NodeTask],
        broadcast: dict | None = None,
        presum: PreSum | None = None,
    ) -> RoundResult:
        threads = torch.get_num_threads()
        ordered, _ = round_tasks(self.spec, tasks, presum)
        try:
            # in this process: the results stay on the worker's device (the server moves them if it is elsewhere)
            return RoundResult.merge([self.worker.run(params, round_, ordered, broadcast, presum, to_cpu=False)])
        finally:
            torch.set_num_threads(threads)

    def worker_nodes(self) -> list[str]:
        return [self.worker.ready()]

    def shutdown(self) -> None:
        pass
