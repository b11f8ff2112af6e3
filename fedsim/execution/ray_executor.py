"""Ray executor: a fixed pool of actors, each hosting many virtual nodes.

- Data is shipped once: the train arrays are put in the object store once; every actor on a
  machine maps the same shared-memory copy (zero-copy), and a machine fetches it once.
- The model (and the strategy's broadcast) is sent once per round (one ``ray.put`` each); each actor receives one call per
  round with its list of nodes and returns one stacked (k, d) tensor.
- Nodes are assigned to actors per round by longest-processing-time-first on their expected
  work, so a synchronous round is not held up by an unlucky draw. Because every actor can read
  every node's data and per-node state travels with the call, this assignment cannot change
  results (docs/design.md, "Determinism").
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from fedsim import devices
from fedsim.data.base import FederatedData
from fedsim.errors import ConfigError, FedsimError, Interrupted, NodeError, WorkersLost
from fedsim.execution import wire
from fedsim.execution.malloc import retain_freed_memory
from fedsim.execution.worker import (
    NodeTask,
    NodeWorker,
    PreSum,
    RoundResult,
    WorkerSpec,
    assign_blocks,
    assign_lpt,
    round_tasks,
    task_on,
    vectorized,
)

READY_TIMEOUT_S = 300.0
TOKEN_FILE = Path.home() / ".ray" / "auth_token"
SHUTDOWN_DEADLINE_S = 2.0
"""How long the shutdown of this run's own Ray may take before what is left of it is killed."""
TASK_EVENTS_FLUSH_MS = "500"
"""The most a driver's shutdown waits to send its task events to the GCS (Ray's default: 5 s).
They only feed Ray's dashboard and state API; the wait is the whole 5 s when the GCS is gone."""
AUXILIARY = ("monitor", "dashboard", "log_monitor", "ray_client_server")
"""Processes of a local Ray that only serve a live cluster; its shutdown may kill them at once."""
STOP_POLL_S = 0.1
"""How often a round in progress asks `RayExecutor.stop_requested` whether to stop."""


def _token_available() -> bool:
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    return bool(os.environ.get("RAY_AUTH_TOKEN")) or (Path(path).is_file() if path else TOKEN_FILE.is_file())


def resolve_address(address: str) -> str:
    """``auto``: the cluster ``ray start`` last started on this machine (RAY_ADDRESS or Ray's
    ``ray_current_cluster`` file); otherwise the address itself."""
    if address != "auto":
        return address
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    current = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    if current.is_file() and current.read_text().strip():
        return current.read_text().strip()
    raise ConfigError(
        "cluster.address=auto, but no Ray cluster was started on this machine (no RAY_ADDRESS, no "
        f"{current}); start one with `ray start --head`, or give cluster.address=HOST:PORT"
    )


def _refresh_ray_config() -> None:
    """Ray reads RAY_AUTH_MODE / RAY_AUTH_TOKEN into its C++ config at import; re-read them (as Ray
    itself does when it turns token mode on for a new local cluster)."""
    try:
        from ray._raylet import Config  # type: ignore[attr-defined]

    except ImportError:  # pragma: no cover - other Ray versions: the environment must be set before start
        return
    Config.initialize("")


def reachable(address: str, timeout: float) -> str | None:
    """None when something listens at host:port, else why not (one phrase)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return f"'{address}' is not HOST:PORT"
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return None
    except OSError as exc:
        return exc.strerror or type(exc).__name__


def start_ray(
    *,
    address: str | None,
    num_cpus: int | None,
    runtime_env: dict[str, Any] | None = None,
    auth_token: str | None = None,
    connect_timeout: float = 30.0,
    quiet: bool = False,
) -> bool:
    """Join the cluster at ``address`` (``auto`` or host:port) or start this run's own local Ray
    with ``num_cpus`` (never an existing cluster on the machine). Returns whether this call
    started Ray (then closing the run shuts it down). Reuses an already initialised Ray (tests).

    Token authentication (Ray >= 2.59 turns it on for a ``ray start --head`` cluster when a token
    exists on that machine, ``~/.ray/auth_token``): ``auth_token`` is the cluster's token, or
    ``file`` for the token file (RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token); null leaves Ray's own
    setting (token mode only with RAY_AUTH_MODE=token in the environment). A driver in token mode
    cannot use a cluster without authentication, so fedsim never turns it on by itself."""

    import ray

    if ray.is_initialized():
        return False
    logging.getLogger("ray").setLevel(logging.ERROR)
    # SIGTERM is fedsim's to handle (stop at a step boundary), not a crash to dump a C++ stack for
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    # read when the driver connects: bounds the wait for the GCS in ray.shutdown()
    os.environ.setdefault("RAY_task_events_shutdown_flush_timeout_ms", TASK_EVENTS_FLUSH_MS)

    kwargs: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.ERROR, "log_to_driver": not quiet}

    if runtime_env:
        kwargs["runtime_env"] = dict(runtime_env)
    if not address:
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count() or 1, **kwargs)
        return True
    target = resolve_address(address)
    why = reachable(target, connect_timeout)
    if why is not None:
        raise ConfigError(
            f"cannot reach the Ray cluster at cluster.address={address} ({target}): {why}; start it "
            "with `ray start --head --port=PORT` there, or leave cluster.address unset for a local Ray"
        )
    if auth_token == "file":
        if not _token_available():
            raise ConfigError(
                f"cluster.auth_token=file, but there is no token file ({TOKEN_FILE}, or RAY_AUTH_TOKEN_PATH); "
                "copy the head's ~/.ray/auth_token here, or give the token itself"
            )
        os.environ["RAY_AUTH_MODE"] = "token"
    elif auth_token:
        os.environ["RAY_AUTH_TOKEN"] = str(auth_token)
        os.environ["RAY_AUTH_MODE"] = "token"
    if auth_token:
        _refresh_ray_config()

    try:
        ray.init(address=target, **kwargs)
    except Exception as exc:  # noqa: BLE001 - Ray raises several kinds here; all are one line for the user
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = (
            "if the cluster uses token authentication, give its token: cluster.auth_token=... or "
            "RAY_AUTH_TOKEN, or copy the head's ~/.ray/auth_token to this machine"
        )
        raise ConfigError(
            f"cannot join the Ray cluster at cluster.address={address} ({target}): {first}; {hint}"
        ) from None
    return False


class RayNodeWorker(NodeWorker):
    """The node worker as a Ray actor. It is created empty and ``load``s the shared arrays and
    the node index from the object store (zero-copy on its machine); the executor keeps those
    references alive and loads a restarted actor again before rerunning its part."""

    def __init__(self, spec: WorkerSpec) -> None:
        wire.register()  # results go back as numpy arrays
        self.spec = spec
        self.loaded = False

    def load(self, refs: dict[str, Any]) -> str:
        import ray

        values = dict(zip(refs, ray.get(list(refs.values()))))
        super().__init__(
            self.spec, values["x"], values["y"], values["index"], values.get("x_test"), values.get("test_index")
        )
        self.loaded = True
        return self.ready()


class RayExecutor:
    """Runs nodes on ``num_actors`` Ray actors (default: one per CPU of the cluster).

    Lost workers: actors restart when their process (or machine) dies (``max_restarts``), and the
    executor runs the dead actor's part of the round again on it; results depend only on their
    inputs, so the round is bit-identical. After ``max_failures`` failures in a row it gives up
    with `WorkersLost` (the run then writes a checkpoint and stops).

    Stopping: when ``stop_requested`` (set by the runner) returns a signal number while a round
    is in progress, the round is abandoned with `Interrupted` (its partial results discarded; the
    run's checkpoint is of the last complete step) instead of running to its end, so a run on a
    slow model stops within the scheduler's grace time too. The actors, killed by `shutdown`,
    stop their part at once."""

    stop_requested: Callable[[], int | None] | None = None

    def __init__(
        self,
        spec: WorkerSpec,
        data: FederatedData,
        *,
        address: str | None = None,
        num_cpus: int | None = None,
        num_actors: int | None = None,
        runtime_env: dict[str, Any] | None = None,
        auth_token: str | None = None,
        connect_timeout: float = 30.0,
        max_failures: int = 3,
        vectorize: bool = False,
        cohort: int | None = None,
        device: str | None = "auto",
        gpus_per_actor: float = 1.0,
        retain_memory: bool = True,
    ) -> None:
        import ray

        if not 0 < float(gpus_per_actor) <= 1:
            raise ConfigError(
                f"cluster.gpus_per_actor={gpus_per_actor} must be in (0, 1] (an actor trains on one GPU; "
                "0.25 puts four actors on each GPU)"
            )
        if num_cpus is not None and num_cpus < 1:
            raise ConfigError(f"cluster.num_cpus={num_cpus} must be >= 1")
        if num_actors is not None and num_actors < 1:
            raise ConfigError(f"cluster.num_actors={num_actors} must be >= 1")
        if max_failures < 0:
            raise ConfigError(f"cluster.max_failures={max_failures} must be >= 0")
        self.owns_ray = start_ray(
            address=address,
            num_cpus=num_cpus,
            runtime_env=runtime_env,
            auth_token=auth_token,
            connect_timeout=connect_timeout,
        )
        wire.register()  # parameters, broadcasts and node state go out as numpy arrays
        self.actors: list[Any] = []
        resources = ray.cluster_resources()
        cpus, gpus = int(resources.get("CPU", 0)), float(resources.get("GPU", 0))
        try:
            on_gpu = self.gpu_choice(device, gpus)
        except ConfigError:
            self.shutdown()
            raise
        share = float(gpus_per_actor)
        if on_gpu:
            n = num_actors or max(int(gpus / share + 1e-9), 1)
            if n * share > gpus + 1e-9:
                self.shutdown()
                raise ConfigError(
                    f"{n} actors x cluster.gpus_per_actor={share:g} need {n * share:g} GPUs but the Ray cluster has "
                    f"{gpus:g}; lower cluster.num_actors or cluster.gpus_per_actor"
                )
            spec = replace(spec, device="cuda", gpu_share=share)
        else:
            n = num_actors or max(cpus, 1)
            spec = replace(spec, device="cpu")
        if n > cpus:
            self.shutdown()
            raise ConfigError(
                f"cluster.num_actors={n} but the Ray cluster has {cpus} CPUs; "
                f"set cluster.num_actors<={cpus} or add CPUs (cluster.num_cpus)"
            )
        spec = replace(spec, retain_memory=bool(retain_memory))
        if spec.retain_memory:  # the driver aggregates and evaluates: the same steady allocations
            retain_freed_memory()
        try:
            spec = vectorized(spec, vectorize, cohort)
        except ConfigError:
            self.shutdown()
            raise
        self.spec = spec
        self.client_update = spec.client_update
        self.sizes = [len(ix) for ix in data.partition.train]
        self.max_failures = int(max_failures)
        ds = data.dataset
        # the arrays go into the object store once; the executor keeps the references alive, so a
        # restarted actor can map them again
        self.refs = {"x": ray.put(ds.x_train), "y": ray.put(ds.y_train), "index": ray.put(list(data.partition.train))}
        if spec.unlabelled:
            self.refs["x_test"] = ray.put(ds.x_test)
            self.refs["test_index"] = ray.put(list(data.partition.test))
        # Ray gives each GPU actor its own CUDA_VISIBLE_DEVICES, so "cuda" is that actor's GPU and
        # the pool spreads over every GPU of every machine
        actor_cls: Any = ray.remote(num_cpus=1, num_gpus=share if on_gpu else 0, max_restarts=-1, max_task_retries=0)(
            RayNodeWorker
        )
        self.actors = [actor_cls.remote(spec) for _ in range(n)]
        try:
            self.nodes = ray.get([a.load.remote(self.refs) for a in self.actors], timeout=READY_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            self.shutdown()
            raise FedsimError(
                f"{n} Ray actors did not start within {READY_TIMEOUT_S:.0f}s; check `ray status` for free "
                + ("GPUs" if on_gpu else "CPUs")
            ) from None
        except ray.exceptions.RayTaskError as exc:  # an actor refused its data (a GPU share too small)
            self.shutdown()
            if isinstance(exc.cause, FedsimError):
                raise exc.cause from None
            raise FedsimError(f"a Ray actor failed to start: {type(exc.cause).__name__}: {exc.cause}") from None
        self.num_workers = n
        self.restarts = 0
        where = f", {share:g} GPU each" if on_gpu else ""
        self.description = f"ray ({n} actors on {len(set(self.nodes))} machine(s){where})"

    @staticmethod
    def gpu_choice(device: str | None, gpus: float) -> bool:
        """Whether the actors train on GPUs: ``cluster.device`` against the GPUs Ray sees in the
        cluster (not on this machine: a driver without a GPU can use GPU workers)."""
        name = "auto" if device is None else str(device).strip().lower()
        if name == "auto":
            return gpus > 0
        if name == "cpu":
            return False
        if name.startswith("cuda:"):
            raise ConfigError(
                f"cluster.device={name}: with cluster=ray, Ray gives each actor its GPU; use cluster.device=cuda "
                "(or cluster=local for one chosen GPU)"
            )
        if name != "cuda":
            raise ConfigError(f"cluster.device={name} is not a device; use auto, cpu or cuda")
        if gpus <= 0:
            raise ConfigError(
                "cluster.device=cuda, but the Ray cluster has no GPUs (ray.cluster_resources() lists none); "
                "use cluster.device=cpu (or auto), or start Ray on machines with GPUs"
            )
        return True

    def run_round(
        self,
        params: torch.Tensor | None,
        round_: int,
        tasks: Sequence[NodeTask],
        broadcast: dict | None = None,
        presum: PreSum | None = None,
    ) -> RoundResult:
        import ray

        tasks, blocked = round_tasks(self.spec, tasks, presum)
        tasks = [task_on(t, devices.CPU) for t in tasks]  # what crosses Ray is on the CPU
        work = [self.client_update.work(self.sizes[t.node_id]) for t in tasks]
        plan = (assign_blocks if blocked else assign_lpt)(tasks, work, self.num_workers)
        # on the CPU: an actor may be on another device than the server (or have none)
        params_ref = ray.put(devices.to_cpu(params))
        # the strategy's broadcast, once through the object store like the model
        broadcast_ref: Any = ray.put(devices.to_cpu(broadcast)) if broadcast is not None else None
        pending = {i: (self.actors[i], part) for i, part in enumerate(plan) if part}
        futures = {
            i: actor.run.remote(params_ref, round_, part, broadcast_ref, presum) for i, (actor, part) in pending.items()
        }
        results: dict[int, RoundResult] = {}
        failures = 0
        while futures:
            i, fut = next(iter(futures.items()))
            try:
                results[i] = self.get(fut, round_)
                del futures[i]
            except ray.exceptions.RayTaskError as exc:
                cause = exc.cause
                if isinstance(cause, NodeError):
                    raise NodeError(cause.node_id, cause.round, cause.cause) from None
                raise FedsimError(f"a Ray worker failed in round {round_}: {type(cause).__name__}: {cause}") from None
            except ray.exceptions.RayActorError as exc:
                failures += 1
                ids = [t.node_id for t in pending[i][1]]
                if failures > self.max_failures:
                    raise WorkersLost(
                        f"Ray workers died {failures} times in a row in round {round_} (last while running nodes "
                        f"{ids[:8]}): {str(exc).splitlines()[0]}; check the cluster (`ray status`), or raise "
                        "cluster.max_failures"
                    ) from None
                futures[i] = self.rerun(i, params_ref, round_, pending[i][1], broadcast_ref, presum)
        return RoundResult.merge([results[i] for i in sorted(results)])

    def rerun(
        self, i: int, params_ref: Any, round_: int, part: list[NodeTask], broadcast_ref: Any, presum: PreSum | None
    ) -> Any:
        """Wait for actor ``i`` to come back (Ray restarts it) and run its part again."""
        import ray

        self.restarts += 1
        actor = self.actors[i]
        deadline = time.monotonic() + READY_TIMEOUT_S
        while True:
            try:
                self.get(actor.load.remote(self.refs), round_, timeout=max(1.0, deadline - time.monotonic()))
                break

            except ray.exceptions.RayActorError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        return actor.run.remote(params_ref, round_, part, broadcast_ref, presum)

    def get(self, ref: Any, round_: int, timeout: float | None = None) -> Any:
        """``ray.get(ref, timeout=timeout)``; with ``stop_requested`` set, it looks every
        `STOP_POLL_S` and raises `Interrupted` when a stop was requested (round ``round_``, the
        step in progress, is the number of steps complete)."""
        import ray

        if self.stop_requested is None:
            return ray.get(ref, timeout=timeout)
        end = None if timeout is None else time.monotonic() + timeout
        while True:
            left = STOP_POLL_S if end is None else min(STOP_POLL_S, max(0.0, end - time.monotonic()))
            ready, _ = ray.wait([ref], timeout=left)
            if ready:
                return ray.get(ref)
            signum = self.stop_requested()
            if signum is not None:
                raise Interrupted(signum, round_)
            if end is not None and time.monotonic() >= end:
                raise ray.exceptions.GetTimeoutError(f"not ready within {timeout:.0f}s")

    def worker_nodes(self) -> list[str]:
        return list(self.nodes)

    def shutdown(self) -> None:
        """Kill the actors (without waiting for them) and, when this run started Ray, stop it
        within about `SHUTDOWN_DEADLINE_S` (`stop_own_ray`)."""
        import ray

        for actor in self.actors:
            with contextlib.suppress(Exception):  # a dead actor or a lost connection: nothing to stop
                ray.kill(actor, no_restart=True)
        self.actors = []
        if self.owns_ray and ray.is_initialized():
            stop_own_ray()


def stop_own_ray(deadline: float = SHUTDOWN_DEADLINE_S) -> None:
    """``ray.shutdown()`` of the local Ray this process started, bounded (a run stopped by SIGTERM
    must exit before the scheduler's grace time, on a busy machine too).

    ``ray.shutdown()`` disconnects the driver, then stops the node's processes one after another,
    each with SIGTERM and up to 1 s to exit, then SIGKILL and up to 1 s more. The autoscaler
    monitor answers SIGTERM by reporting to the GCS, which is gone by then, so it always takes
    the whole second; it and the other processes that only serve a live cluster (`AUXILIARY`)
    are killed first, at once. The raylet (which stops its workers) and the GCS still get their
    graceful stop; if the shutdown runs past ``deadline`` seconds, a watchdog kills whatever is
    left of the node, so that Ray's waits for it return at once."""
    import ray

    try:
        from ray._private import worker as ray_worker

        node: Any = ray_worker._global_node
        processes = [(kind, info.process) for kind, infos in dict(node.all_processes).items() for info in infos]
    except (ImportError, AttributeError):  # pragma: no cover - another Ray: its own shutdown, unbounded
        processes = []

    def kill(kinds: tuple[str, ...] | None) -> None:
        for kind, process in processes:
            if (kinds is None or kind in kinds) and process.poll() is None:
                with contextlib.suppress(OSError):
                    process.kill()

    kill(AUXILIARY)
    watchdog = threading.Timer(deadline, kill, args=(None,))
    watchdog.daemon = True
    watchdog.start()
    try:
        ray.shutdown()
    finally:
        watchdog.cancel()
