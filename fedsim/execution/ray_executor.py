"""Ray executor: a fixed pool of actors, each hosting many virtual nodes.

- Data is shipped once: the train arrays are put in the object store once; every actor on a
  machine maps the same shared-memory copy (zero-copy), and a machine fetches it once.
- The model is broadcast once per round (one ``ray.put``); each actor receives one call per
  round with its list of nodes and returns one stacked (k, d) tensor.
- Nodes are assigned to actors per round by longest-processing-time-first on their expected
  work, so a synchronous round is not held up by an unlucky draw. Because every actor can read
  every node's data and per-node state travels with the call, this assignment cannot change
  results (docs/design.md, "Determinism").
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch

from fedsim.data.base import FederatedData
from fedsim.errors import ConfigError, FedsimError, NodeError
from fedsim.execution.worker import NodeTask, NodeWorker, RoundResult, WorkerSpec, assign_lpt

READY_TIMEOUT_S = 300.0


def start_ray(*, address: str | None, num_cpus: int | None, runtime_env: dict[str, Any] | None = None) -> None:
    """Connect to ``address`` (``auto`` or host:port) or start a local Ray with ``num_cpus``.
    Reuses an already initialised Ray (tests share one instance)."""
    import ray

    if ray.is_initialized():
        return
    logging.getLogger("ray").setLevel(logging.ERROR)
    kwargs: dict[str, Any] = dict(include_dashboard=False, logging_level=logging.ERROR, log_to_driver=True)
    if runtime_env:
        kwargs["runtime_env"] = dict(runtime_env)
    if address:
        try:
            ray.init(address=address, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(
                f"cannot join the Ray cluster at cluster.address={address}: {first}; "
                "start it with `ray start --head` or leave cluster.address unset for a local Ray"
            ) from None
    else:
        ray.init(num_cpus=num_cpus or os.cpu_count() or 1, **kwargs)


class RayExecutor:
    """Runs nodes on ``num_actors`` Ray actors (default: one per CPU of the cluster)."""

    def __init__(
        self,
        spec: WorkerSpec,
        data: FederatedData,
        *,
        address: str | None = None,
        num_cpus: int | None = None,
        num_actors: int | None = None,
        runtime_env: dict[str, Any] | None = None,
    ) -> None:
        import ray

        if num_cpus is not None and num_cpus < 1:
            raise ConfigError(f"cluster.num_cpus={num_cpus} must be >= 1")
        if num_actors is not None and num_actors < 1:
            raise ConfigError(f"cluster.num_actors={num_actors} must be >= 1")
        start_ray(address=address, num_cpus=num_cpus, runtime_env=runtime_env)
        cpus = int(ray.cluster_resources().get("CPU", 0))
        n = num_actors or max(cpus, 1)
        if n > cpus:
            raise ConfigError(
                f"cluster.num_actors={n} but the Ray cluster has {cpus} CPUs; "
                f"set cluster.num_actors<={cpus} or add CPUs (cluster.num_cpus)"
            )
        self.spec = spec
        self.client_update = spec.client_update
        self.sizes = [len(ix) for ix in data.partition.train]
        ds = data.dataset
        x_ref, y_ref = ray.put(ds.x_train), ray.put(ds.y_train)
        test = (ray.put(ds.x_test), list(data.partition.test)) if spec.unlabelled else (None, None)
        actor_cls: Any = ray.remote(num_cpus=1, max_restarts=0)(NodeWorker)
        self.actors: list[Any] = [
            actor_cls.remote(spec, x_ref, y_ref, list(data.partition.train), *test) for _ in range(n)
        ]
        try:
            self.nodes = ray.get([a.ready.remote() for a in self.actors], timeout=READY_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            raise FedsimError(
                f"{n} Ray actors did not start within {READY_TIMEOUT_S:.0f}s; check `ray status` for free CPUs"
            ) from None
        self.num_workers = n
        self.description = f"ray ({n} actors on {len(set(self.nodes))} machine(s))"

    def run_round(
        self, params: torch.Tensor | None, round_: int, tasks: Sequence[NodeTask], broadcast: dict | None = None
    ) -> RoundResult:
        import ray

        work = [self.client_update.work(self.sizes[t.node_id]) for t in tasks]
        plan = assign_lpt(tasks, work, self.num_workers)
        params_ref = ray.put(params)
        futures = [
            (actor, part, actor.run.remote(params_ref, round_, part, broadcast))
            for actor, part in zip(self.actors, plan)
            if part
        ]
        results = []
        for _actor, part, fut in futures:
            try:
                results.append(ray.get(fut))
            except ray.exceptions.RayTaskError as exc:
                cause = exc.cause
                if isinstance(cause, NodeError):
                    raise NodeError(cause.node_id, cause.round, cause.cause) from None
                raise FedsimError(f"a Ray worker failed in round {round_}: {type(cause).__name__}: {cause}") from None
            except ray.exceptions.RayActorError as exc:
                ids = [t.node_id for t in part]
                raise FedsimError(
                    f"a Ray worker died in round {round_} while running nodes {ids}: {str(exc).splitlines()[0]}"
                ) from None
        return RoundResult.merge(results)

    def worker_nodes(self) -> list[str]:
        return list(self.nodes)

    def shutdown(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
