"""Executors run the node-worker code for the nodes of a round: in-process (`LocalExecutor`) or
on a fixed pool of Ray actors (`RayExecutor`). Both return the same `RoundResult`."""

from fedsim.execution.worker import NodeTask, NodeWorker, RoundResult, WorkerSpec

__all__ = ["NodeTask", "NodeWorker", "RoundResult", "WorkerSpec"]
