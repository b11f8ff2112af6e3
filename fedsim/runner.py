"""One run from a composed config, as the command line executes it: build the simulation, resume
it from its last checkpoint when asked, run it with its callbacks, write checkpoints between
steps, stop cleanly on SIGINT/SIGTERM, on divergence and on lost workers (a checkpoint of the last
complete step first), and close everything (Ray, log files, W&B) on every path."""

from __future__ import annotations

import re
import shlex
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fedsim import checkpoint, runfolder
from fedsim.config import one_element_lists
from fedsim.errors import ConfigError, FedsimError, Interrupted, NothingLearned
from fedsim.logging import Callback, RunMeta
from fedsim.state import RunState


class SignalGuard:
    """Turns the first SIGINT/SIGTERM into a request to stop at the next step boundary; a second
    SIGINT stops at once. Installed only in the main thread; restores the previous handlers."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum

    def install(self) -> None:
        """(Re)install the handlers: Ray's start-up installs its own, so this runs again after it."""
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous = signal.signal(sig, self._handle)
                self.previous.setdefault(sig, previous)

    def __enter__(self) -> SignalGuard:
        self.install()
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


class Saver:
    """Writes checkpoints of step-boundary states with the callbacks' log positions."""

    def __init__(
        self,
        run_dir: Path,
        callbacks: list[Callback],
        config: dict[str, Any],
        *,
        every: int,
        keep: int,
        device: str = "cpu",
    ):
        self.run_dir, self.callbacks, self.config, self.device = run_dir, callbacks, config, device
        self.every, self.keep = int(every), int(keep)
        self.last_round: int | None = None
        self.last_path: Path | None = None

    def save(self, state: RunState) -> Path:
        if self.last_round == state.round and self.last_path is not None:
            return self.last_path
        logs: dict[str, Any] = {}
        for cb in self.callbacks:
            logs.update(cb.position())
        self.last_path = checkpoint.save(
            self.run_dir, state, logs=logs, config=self.config, keep=self.keep, device=self.device
        )
        self.last_round = state.round
        return self.last_path

    def periodic(self, state: RunState) -> None:
        if self.every > 0 and state.round % self.every == 0:
            self.save(state)


def plain_config(cfg: DictConfig) -> dict[str, Any]:
    out = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(out, dict)
    return {str(k): v for k, v in out.items() if k != "hydra"}


def sweep_of(output_dir: Path, names: dict[str, str]) -> dict[str, Any] | None:
    """A sweep job's sweep (name: the experiment and the sweep folder) and swept values, from the
    sweep's ``sweep.json``; None for a single run."""
    import json

    index = output_dir.parent / "sweep.json"
    if not index.exists():
        return None
    for job in json.loads(index.read_text()).get("jobs", []):
        if job["name"] == output_dir.name:
            experiment = names.get("experiment")
            name = f"{experiment}:{output_dir.parent.name}" if experiment else output_dir.parent.name
            return {"name": name, "values": {str(k): str(v) for k, v in job["values"].items()}}
    return None


def resume_command(run_dir: Path) -> str:
    """The command that resumes this run: its overrides, plus resume and the run dir (for a sweep
    job: rerunning the sweep resumes it too)."""
    from hydra.core.hydra_config import HydraConfig

    given = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else sys.argv[1:]
    args = [shlex.quote(a) for a in given if not a.startswith(("resume=", "hydra.run.dir="))]
    where = f"hydra.run.dir={run_dir}" if re.fullmatch(r"[\w./-]+", str(run_dir)) else f"\"hydra.run.dir='{run_dir}'\""
    command = " ".join(["python -m fedsim", *args, "resume=true", where])

    return command + (" (or rerun the sweep)" if sweep_of(run_dir, {}) else "")


def execute(cfg: DictConfig, *, output_dir: Path, names: dict[str, str], sweep_job: bool = False) -> dict[str, object]:
    """Build and run one simulation in ``output_dir``, holding that folder's lock for the whole
    run; returns its summary (with ``params_sha256``).

    A plain run refuses a folder that holds a run unless ``resume`` (continue it) or ``overwrite``
    (replace it) is given. A sweep job (``sweep_job``) decides from what its folder holds once it
    has the lock, since another sweep driver may have run it meanwhile: finished there, it is left
    alone (`runfolder.Elsewhere`); with a checkpoint, resumed; with a run's files but no
    checkpoint, run again from the start."""
    lock = runfolder.claim(output_dir) if sweep_job else runfolder.acquire(output_dir)
    runfolder.say_took_over(lock)
    try:
        return _execute(cfg, output_dir=output_dir, names=names, sweep_job=sweep_job)
    finally:
        runfolder.release(output_dir)


def _execute(cfg: DictConfig, *, output_dir: Path, names: dict[str, str], sweep_job: bool) -> dict[str, object]:
    from fedsim.simulation import build, make, set_driver_threads

    set_driver_threads(1)
    one_element_lists(cfg)  # as the run builds it: the config saved and compared on resume is the one it ran
    config = plain_config(cfg)
    held = runfolder.contents(output_dir)
    resume = bool(cfg.get("resume"))
    if sweep_job:
        resume = held == "checkpoint"
        if held == "partial":
            runfolder.clear(output_dir)
    elif not resume and held != "empty":
        if not cfg.get("overwrite"):
            raise ConfigError(runfolder.occupied_message(output_dir, held))
        runfolder.clear(output_dir)
    ckpt = None
    if resume:
        ckpt = checkpoint.latest(output_dir)
        if ckpt is None:
            raise ConfigError(
                f"resume=true, but {checkpoint.folder(output_dir)} has no checkpoint; point "
                "hydra.run.dir at the run to resume, or run without resume=true"
            )
        diffs = checkpoint.differences(ckpt.config, config)
        if diffs:
            more = f" (and {len(diffs) - 1} more)" if len(diffs) > 1 else ""
            raise ConfigError(
                f"resume=true, but the config differs from the checkpoint's: {diffs[0]}{more}; only "
                f"{', '.join(checkpoint.RESUMABLE[:4])} and cluster may change"
            )
    guard = SignalGuard()
    guard.install()
    try:
        sim = build(cfg, names=names)
    except SystemExit as exc:  # Ray's own start-up handler turns SIGTERM into exit(15)
        guard.__exit__()
        if exc.code in (signal.SIGTERM, signal.SIGINT):
            raise Interrupted(int(exc.code), 0) from None
        raise
    except BaseException:
        guard.__exit__()
        raise
    guard.install()
    if guard.signum is not None:
        sim.close()
        guard.__exit__()
        raise Interrupted(guard.signum, 0)
    if hasattr(sim.executor, "stop_requested"):  # Ray: a step in progress is abandoned at a signal
        sim.executor.stop_requested = lambda: guard.signum
    callbacks: list[Callback] = []
    initial = checkpoint.params_sha256(sim.state.params)  # the model as built, before any resume
    try:
        if ckpt is not None:
            if tuple(ckpt.state.params.shape) != tuple(sim.state.params.shape):
                raise ConfigError(
                    f"the checkpoint {ckpt.path} holds a model of shape {tuple(ckpt.state.params.shape)}, "
                    f"this config builds {tuple(sim.state.params.shape)}"
                )
            if ckpt.round > sim.total_rounds:
                raise ConfigError(
                    f"the checkpoint {ckpt.path} is of step {ckpt.round}, past the {sim.total_rounds} steps this "
                    f"config runs; give rounds (and the phase lengths) that reach at least step {ckpt.round}"
                )
            sim.state = ckpt.state.to(sim.state.params.device)
            if ckpt.device and ckpt.device != sim.where:
                print(
                    f"fedsim: the checkpoint was written with {ckpt.device} and the run goes on with {sim.where}: "
                    "results agree to float tolerance, not bit for bit, with a run that stays where it was",
                    file=sys.stderr,
                    flush=True,
                )
            print(
                f"fedsim: resumed from step {ckpt.round} of {sim.total_rounds} ({ckpt.path})",
                file=sys.stderr,
                flush=True,
            )
        callbacks = list(make(cfg.logger.callbacks)) if cfg.logger.get("callbacks") else []
        meta = RunMeta(
            output_dir,
            config,
            sim.total_rounds,
            names,
            sim.info(),
            start_round=sim.state.round,
            resume=ckpt.logs if ckpt is not None else None,
            sweep=sweep_of(output_dir, names),
        )
        for cb in callbacks:
            cb.on_run_start(meta)
            for message in sim.warnings:
                cb.on_warning(sim.state.round, message)
        ck = cfg.get("checkpoint") or {}
        saver = Saver(
            output_dir,
            callbacks,
            config,
            every=int(ck.get("every", 0) or 0),
            keep=int(ck.get("keep", 2)),
            device=sim.where,
        )
        if ckpt is not None:
            saver.last_round, saver.last_path = ckpt.round, ckpt.path
        with guard:

            def on_boundary(state: RunState) -> None:
                saver.periodic(state)
                if guard.signum is not None:
                    raise Interrupted(guard.signum, state.round)

            divergence = cfg.get("divergence")
            pipeline = sim.pipeline(
                callbacks, divergence=None if divergence is None else float(divergence), on_boundary=on_boundary
            )
            try:
                state, summary = sim.server.run(sim.state, pipeline)
            except (FedsimError, KeyboardInterrupt) as exc:
                where = ""
                if pipeline.boundary is not None and pipeline.boundary.round > 0:
                    path = saver.save(pipeline.boundary)
                    where = f"; checkpoint of step {pipeline.boundary.round}: {path}; to resume: {resume_command(output_dir)}"
                reason = str(exc) or type(exc).__name__
                for cb in callbacks:
                    cb.on_run_stop(reason)
                callbacks = []
                if isinstance(exc, KeyboardInterrupt):
                    stop = Interrupted(signal.SIGINT, pipeline.boundary.round if pipeline.boundary else 0)
                    stop.args = (f"{stop}{where}",)
                    raise stop from None
                exc.args = (f"{reason}{where}",)
                raise
        sim.state = state
        summary = {**summary, "params_sha256": checkpoint.params_sha256(state.params)}
        if saver.every > 0:
            saver.save(state)
        if cfg.get("save_model", False):
            ds = sim.data.dataset
            checkpoint.save_model(output_dir, state.params, input_shape=ds.input_shape, num_classes=ds.num_classes)
        for cb in callbacks:
            cb.on_run_end(summary)
        callbacks = []
        skipped = summary.get("agg/skipped_total", 0)
        if isinstance(skipped, int) and skipped and summary["params_sha256"] == initial:
            raise NothingLearned(
                f"the model never changed: {skipped} of {state.round} steps were skipped for too few rows and the "
                f"others did not move it; {pipeline.skip_cause()}"
            )
        return summary
    finally:
        for cb in callbacks:  # an error before the run started: close the logs
            cb.on_run_stop("error")
        sim.close()
