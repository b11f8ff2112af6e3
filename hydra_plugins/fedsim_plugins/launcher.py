"""The Ray launcher (``hydra/launcher=ray``, the default for sweeps): the jobs of a sweep run
concurrently as Ray tasks on the cluster that fedsim uses, a local Ray by default (``cluster.num_cpus``)
or a running one (``cluster.address``, with ``cluster.auth_token``).

Each job is one Ray task that reserves ``hydra.launcher.cpus_per_job`` CPUs (1) and runs its
simulation in its own worker process with the in-process executor (``cluster=local``), so the
jobs, not the nodes of one run, share the cluster's CPUs: a 2-core machine runs 2 jobs at a time,
a cluster of 64 CPUs 64. Results do not depend on the executor (docs/design.md, "Determinism").
A failing job is reported and the others go on. One progress line shows jobs done, failed and
running and queued, and an estimate of the time left. A job that reserves more CPUs than the
largest node has stops the sweep before it starts. Ray reuses its worker processes: a job runs in
a Ray worker process, not necessarily a fresh one.
"""

from __future__ import annotations

import functools
import logging
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

from fedsim.errors import exit_with

log = logging.getLogger(__name__)


def _run_job(
    hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig, singleton_state: dict[Any, Any]
) -> tuple[JobReturn, str]:
    """Runs inside a Ray worker: one Hydra job, its failure (even an exit) kept as its result; and
    the Ray node it ran on."""
    import ray

    from fedsim import runfolder

    setup_globals()
    Singleton.set_state(singleton_state)
    node = ray.get_runtime_context().get_node_id()
    job_dir = Path(str(config.hydra.sweep.dir)) / str(config.hydra.sweep.subdir)  # as Hydra's run_job makes it
    try:  # claimed before Hydra writes into the folder: another driver of this sweep may hold it
        runfolder.claim(job_dir)
    except runfolder.Elsewhere as exc:
        return _failed(exc), node
    try:
        ret = run_job(
            hydra_context=hydra_context,
            task_function=task_function,
            config=config,
            job_dir_key="hydra.sweep.dir",
            job_subdir_key="hydra.sweep.subdir",
        )
    except BaseException as exc:  # noqa: BLE001 - SystemExit and friends are this job's failure
        from hydra_plugins.fedsim_plugins.sweeper import SweepInterrupted

        ret = _failed(str(exc) if isinstance(exc, SweepInterrupted) else f"{type(exc).__name__}: {exc}")
    finally:
        runfolder.release(job_dir)  # a Ray worker process outlives the job
    return ret, node


def _failed(why: str | BaseException) -> JobReturn:
    ret = JobReturn()
    ret.status = JobStatus.FAILED
    ret.return_value = why if isinstance(why, BaseException) else RuntimeError(why)
    return ret


def elsewhere(ret: JobReturn) -> bool | None:
    """For a job that another driver of the sweep holds or finished: whether it is finished
    there (True) or still running (False); None for a job of this driver."""
    from fedsim.runfolder import Elsewhere

    value = ret._return_value
    return value.done if isinstance(value, Elsewhere) else None


class RayLauncher(Launcher):
    def __init__(
        self, address: Any = None, num_cpus: Any = None, auth_token: Any = None, cpus_per_job: int = 1
    ) -> None:
        super().__init__()
        self.address = address
        self.num_cpus = num_cpus
        self.auth_token = auth_token
        self.cpus_per_job = int(cpus_per_job)
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None
        self.owns: bool | None = None
        """Whether this launcher started Ray (None: not started yet)."""
        self.before = Tally()
        """The sweep's jobs settled before launch (the sweeper sets it): the progress line counts
        all the jobs of the sweep, as the sweeper's summary does."""

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def start(self) -> None:
        """Start (or join) Ray and check that a job fits on one of its nodes: a job that asks for more
        CPUs than any node has would wait forever. The sweeper calls it before it writes anything."""
        import ray

        from fedsim.execution.ray_executor import start_ray

        if self.owns is not None:
            return
        self.owns = start_ray(address=self.address, num_cpus=self.num_cpus, auth_token=self.auth_token, quiet=True)
        largest = max((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")), default=0.0)
        if largest == 0:  # a cluster that adds CPU nodes on demand: the jobs wait for them
            print("fedsim: warning: no Ray node has CPUs yet; the jobs wait for one", file=sys.stderr, flush=True)
            return
        if largest < self.cpus_per_job:
            if self.owns:
                ray.shutdown()
            self.owns = None
            exit_with(
                f"a job reserves hydra.launcher.cpus_per_job={self.cpus_per_job} CPUs, but the largest Ray node has "
                f"{largest:g}, so no job could start; lower hydra.launcher.cpus_per_job or raise cluster.num_cpus "
                "(or join a cluster with larger nodes)"
            )

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import ray

        setup_globals()
        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        self.start()
        owns, self.owns = self.owns, None
        slots = max(1, int(ray.cluster_resources().get("CPU", 1)) // max(self.cpus_per_job, 1))
        remote = ray.remote(num_cpus=self.cpus_per_job, max_retries=0)(_run_job)
        futures: dict[Any, int] = {}
        names: list[str] = []
        for i, overrides in enumerate(job_overrides):
            idx = initial_job_idx + i
            own = [o for o in overrides if not _placement(o)]

            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, [*own, "cluster=local"])

            with open_dict(sweep_config):
                sweep_config.hydra.job.id = idx
                sweep_config.hydra.job.num = idx
            names.append(str(sweep_config.hydra.sweep.subdir))
            ref = remote.remote(self.hydra_context, self.task_function, sweep_config, Singleton.get_state())
            futures[ref] = i
        results: list[JobReturn | None] = [None] * len(job_overrides)
        start = time.monotonic()
        nodes: dict[str, int] = {}
        tally = Tally(self.before.total or len(job_overrides), self.before.done, self.before.failed)
        pending = list(futures)
        _progress(tally, 0, time.monotonic() - start, slots)
        # Ray's driver handler for SIGTERM exits at once (no job would checkpoint): ours interrupts
        main = threading.current_thread() is threading.main_thread()
        _TERMINATED.clear()
        previous = signal.signal(signal.SIGTERM, _on_sigterm) if main else None
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                for ref in ready:
                    try:
                        ret, node = ray.get(ref)
                        nodes[node] = nodes.get(node, 0) + 1
                    except Exception as exc:  # noqa: BLE001 - its worker died (killed, out of memory)
                        ret = _failed(f"its Ray worker died ({type(exc).__name__}); rerun the sweep to resume it")
                    results[futures[ref]] = ret
                    tally.count(ret)
                    _job_line(names[futures[ref]], ret)
                _progress(tally, len(job_overrides) - len(pending), time.monotonic() - start, slots)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the running jobs checkpoint, then the sweep stops
            for ref in pending:
                ray.cancel(ref)
            ray.wait(pending, num_returns=len(pending), timeout=60)
            from hydra_plugins.fedsim_plugins.sweeper import SweepInterrupted

            term = _TERMINATED.is_set()
            raise SweepInterrupted("terminated" if term else "interrupted", 143 if term else 130) from None
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
            if sys.stderr.isatty():
                print(file=sys.stderr, flush=True)
            if nodes:
                spread = ", ".join(f"{node[:8]}: {count}" for node, count in sorted(nodes.items()))
                print(f"fedsim: jobs per Ray node ({len(nodes)} node(s)): {spread}", file=sys.stderr, flush=True)
            if owns:
                ray.shutdown()
        return [r for r in results if r is not None]


_TERMINATED = threading.Event()
"""Set by SIGTERM in the sweep's own process, which is then handled like Ctrl-C (exit code 143);
a flag, since Ray's blocking calls turn the exception raised in the handler into a plain
KeyboardInterrupt."""


def _on_sigterm(signum: int, frame: Any) -> None:
    _TERMINATED.set()
    raise KeyboardInterrupt


class Tally:
    """The jobs of a sweep by outcome: ``done`` (here or before), ``failed``, and those another
    driver of the same sweep finished (``other_done``) or still runs (``other_running``). (A
    plain class: Hydra's plugin scan runs this module outside ``sys.modules``, where
    ``@dataclass`` fails.)"""

    def __init__(self, total: int = 0, done: int = 0, failed: int = 0) -> None:
        self.total, self.done, self.failed = total, done, failed
        self.other_done = self.other_running = 0

    def count(self, ret: JobReturn) -> None:
        there = elsewhere(ret)
        if there is True:
            self.other_done += 1
        elif there is False:
            self.other_running += 1
        elif ret.status == JobStatus.COMPLETED:
            self.done += 1
        else:
            self.failed += 1

    @property
    def settled(self) -> int:
        return self.done + self.failed + self.other_done + self.other_running


def _job_line(name: str, ret: JobReturn) -> None:
    """One line per job as it ends: its result here, or the other driver that has it."""
    there = elsewhere(ret)
    if there is not None:
        what = "finished by another driver of this sweep" if there else "running in another driver of this sweep"
        line = f"fedsim: job {name}: {what}"
    elif ret.status == JobStatus.COMPLETED:
        value = ret._return_value
        line = f"fedsim: job {name} done" + (f": eval/acc={value:.4f}" if isinstance(value, float) else "")
    else:
        text = str(ret._return_value).strip()
        line = f"fedsim: job {name} failed: {text.splitlines()[0] if text else type(ret._return_value).__name__}"
    print(("\r" if sys.stderr.isatty() else "") + line, file=sys.stderr, flush=True)


def _progress(tally: Tally, returned: int, elapsed: float, slots: int) -> None:
    """The sweep's one progress line, from the start: rewritten in place on a terminal, else
    printed at the start and every 5 %. It counts every job of the sweep, as the sweeper's
    summary does. Every job is submitted at once, so of the jobs not settled ``slots`` (the jobs the
    cluster's CPUs hold at a time) are running and the rest queued (on a cluster whose CPUs other
    work also uses, some counted as running may still wait for a CPU). The ETA is the throughput
    so far applied to the jobs left, once ``slots`` jobs have returned here."""
    left = tally.total - tally.settled
    running = min(slots, left)
    eta = elapsed / returned * left if returned >= slots else float("nan")
    eta_txt = f"{eta / 60:.1f} min" if eta == eta else "? (after the first jobs)"
    other = tally.other_done + tally.other_running
    line = (
        f"sweep: {tally.done}/{tally.total} done, {tally.failed} failed, "
        + (f"{other} with other drivers, " if other else "")
        + f"{running} running, {left - running} queued ({slots} at a time), ETA {eta_txt}"
    )
    if sys.stderr.isatty():
        print(f"\r{line}   ", end="", file=sys.stderr, flush=True)
    elif left == 0 or returned == 0 or returned % max(1, tally.total // 20) == 0:
        print(line, file=sys.stderr, flush=True)


@functools.cache
def _local_keys() -> frozenset[str]:
    """The options of the in-process executor (``conf/cluster/local.yaml``): how a job trains
    (``cluster.vectorize``, ``cluster.cohort``, ``cluster.device``, ``cluster.retain_memory``)."""
    from fedsim.cli import CONF_DIR

    local = OmegaConf.load(CONF_DIR / "cluster" / "local.yaml")
    assert isinstance(local, DictConfig)
    keys = [str(k) for k in local]
    return frozenset(f"cluster.{k}" for k in keys if not k.startswith("_"))


def _placement(override: str) -> bool:
    """Whether an override says where a run executes (the job runs ``cluster=local`` in its Ray
    task instead); the in-process executor's own options (how it trains) are kept."""
    key = override.split("=")[0].lstrip("+~")
    return key.startswith("cluster") and key not in _local_keys()
