"""The fedsim sweeper (``hydra/sweeper=fedsim``, the default).

A sweep is the product of ``hydra.sweeper.params`` (and any sweep given on the command line, which
wins over the config's for the same key, as with Hydra's basic sweeper) with one more axis,
``hydra.sweeper.variants``: named sets of overrides for comparisons that are not products (e.g.
FedAU with and without a cutoff next to the baselines). A job's overrides are, in this order (the
last wins): the experiment's swept params, its variant's overrides, the command line's. Each job
gets a readable, stable folder name from its swept values (``participation=markov,seed=1,variant=mifa``:
the experiment's params in their config order, then the command line's swept keys sorted by name,
the variant last), so that running the same sweep again:

- skips jobs that finished (``run_end`` in their ``metrics.jsonl``);
- resumes unfinished jobs that have a checkpoint (``resume=true``);
- runs the rest;

and stops before anything runs when a job it would skip or resume ran with other settings: other
overrides, or another config composed from the same overrides (an edited experiment or group YAML).

Drivers cooperate: the same sweep started more than once on one sweep folder (from two terminals,
or on several machines that share the filesystem) splits its jobs. A job is claimed when it is
about to start, by taking its folder's lock (``fedsim.runfolder``); a job another driver holds or
has finished is left to it, and then decided only under the lock (finished: left alone; with a
checkpoint: resumed; with files but no checkpoint: run again), so no job runs twice. Each driver
prints a line per job it settles and a summary whose counts add up (done here, before, by other
drivers; failed; still running elsewhere).

A job that fails does not stop the others; the sweep prints one line per failed job and exits with
the number of failures (capped at 125); an interrupt (Ctrl-C, SIGTERM) ends the whole sweep (exit
130 or 143). ``sweep.json`` in the sweep folder lists the swept keys and every job's values
(``fedsim.report`` and the W&B logger read it); a later sweep into the same folder adds its jobs.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.launcher import Launcher
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

from fedsim.cli import group_overrides
from fedsim.config import check_types, validate
from fedsim.errors import FedsimError
from fedsim.errors import exit_with as _exit_with
from fedsim.runfolder import finished
from hydra_plugins.fedsim_plugins.launcher import RayLauncher, Tally, _placement, elsewhere

log = logging.getLogger(__name__)

SWEEP_FILE = "sweep.json"
NOT_COMPUTING = (
    "resume",
    "overwrite",
    "hydra",
    "logger",
    "checkpoint",
    "divergence",
    "eval_threads",
    "cluster.retain_memory",
)
"""Keys (top-level groups, or one dotted option) that say how a run is kept, logged, evaluated or
given memory, never what it computes: a job folder whose run differs from the sweep only in these
and in where it ran (`_placement`) is the same job."""
SECRETS = ("cluster.auth_token",)
"""Keys whose values the sweeper never writes (sweep.json, multirun.yaml); the jobs still get them."""


class SweepInterrupted(BaseException):
    """SIGINT or SIGTERM during a sweep job: it ends the whole sweep, not just the job (a
    BaseException, so that Hydra's ``run_job`` does not record it as the job's failure and the
    basic launcher does not go on to the next job)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def job_name(values: list[tuple[str, str]]) -> str:
    """A folder name from a job's swept values (``/`` in group paths becomes ``.``)."""
    return ",".join(f"{k.replace('/', '.')}={v}" for k, v in values).replace("/", "_") or "job"


def quoted(text: str) -> str:
    """``text`` as a single-quoted Hydra string (its quotes, and backslashes before a quote, escaped)."""
    text = re.sub(r"\\+$", lambda m: m.group(0) * 2, text)
    return "'" + re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", text) + "'"


def redacted(override: str) -> str:
    """An override with the value of a secret key (``cluster.auth_token``) replaced."""
    key, sep, _ = override.partition("=")
    return f"{key}=<redacted>" if sep and key.lstrip("+~") in SECRETS else override


def settings(overrides: list[str]) -> dict[str, str]:
    """What a job computes: its overrides as key -> value (the last wins), without those that only
    say where or how it executes or what it logs (``cluster`` placement and `NOT_COMPUTING`: a
    resumed run may change them too)."""
    parser = OverridesParser.create()
    out: dict[str, str] = {}
    for line in overrides:
        key, _, value = line.partition("=")
        try:
            parsed = parser.parse_override(line)
            key, value = parsed.key_or_group, parsed.get_value_element_as_str()
        except Exception:  # noqa: BLE001 - compared as written
            key = key.lstrip("+")
        if not _computes(key):
            continue
        out[key] = value
    return out


class FedsimSweeper(Sweeper):
    def __init__(self, params: Any = None, variants: Any = None) -> None:
        super().__init__()
        self.params = dict(_plain(params) or {})
        self.variants = dict(_plain(variants) or {})
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.launcher: Launcher | None = None
        self.command_line: set[str] = set()

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def check(self, overrides: list[str], references: dict[tuple[str, ...], DictConfig]) -> None:
        """Raise where a job's config has a value of the wrong kind (as a single run checks it,
        against the defaults of the same groups, composed once per choice of groups) or does not
        validate."""
        assert self.config is not None and self.hydra_context is not None
        load = self.hydra_context.config_loader.load_sweep_config
        cfg = load(self.config, overrides)
        groups = tuple(group_overrides(overrides))
        if groups not in references:
            references[groups] = load(self.config, list(groups))
        check_types(cfg, references[groups])
        validate(cfg)

    def grid(self, arguments: list[str]) -> tuple[list[str], list[list[tuple[str, str]]], list[str]]:
        """(swept keys, every job's swept (key, value) pairs, the overrides common to all jobs)."""
        loader = self.hydra_context.config_loader if self.hydra_context is not None else None
        parser = OverridesParser.create(config_loader=loader)

        final: dict[str, list[str]] = {}
        self.command_line = set()  # the keys the command line sets (its values win over the variants')
        for given in ([f"{k}={v}" for k, v in self.params.items()], arguments):
            for override in parser.parse_overrides(given):
                key = override.get_key_element()
                if override.is_sweep_override():
                    if not override.is_discrete_sweep():
                        raise ValueError(f"the fedsim sweeper takes lists of values, not {override.input_line}")
                    final[key] = list(dict.fromkeys(override.sweep_string_iterator()))  # a value twice: one job
                else:
                    final[key] = [override.get_value_element_as_str()]
                if given is arguments:
                    self.command_line.add(key)
        variants = list(self.variants)
        if self.variants and "variant" in final:  # variant=a,b on the command line picks variants
            chosen = final.pop("variant")
            unknown = [v for v in chosen if v not in self.variants]
            if unknown:
                raise ValueError(f"no variant {', '.join(unknown)} in this sweep; its variants: {', '.join(variants)}")
            variants = [v for v in variants if v in chosen]
        # the experiment's params in their config order, then the command line's swept keys by name
        swept = [k for k in final if k in self.params]
        swept += sorted((k for k, vals in final.items() if len(vals) > 1 and k not in self.params), key=_bare)
        common = [f"{k}={vals[0]}" for k, vals in final.items() if k not in swept]
        jobs: list[list[tuple[str, str]]] = [[]]
        for key in swept:
            jobs = [[*job, (key, value)] for job in jobs for value in final[key]]
        if self.variants:
            swept = [*swept, "variant"]
            jobs = [[*job, ("variant", str(name))] for job in jobs for name in variants]
        folders: dict[str, list[tuple[str, str]]] = {}
        for job in jobs:
            other = folders.setdefault(job_name(job), job)
            if other is not job:
                raise ValueError(
                    f"the jobs {_text(other)} and {_text(job)} would share the folder {job_name(job)} (a job "
                    "folder names its swept values, / as _); give values that differ in their names"
                )
        return swept, jobs, common

    def overrides_of(self, job: list[tuple[str, str]], common: list[str]) -> list[str]:
        """A job's overrides: the experiment's swept params, then its variant's overrides (which win
        over those), then the command line's (which win over both), then its name and folder."""
        variant = dict(job).get("variant") if self.variants else None
        pairs = [(k, v) for k, v in job if variant is None or k != "variant"]
        own = [f"{k}={v}" for k, v in pairs if k not in self.command_line]
        given = [f"{k}={v}" for k, v in pairs if k in self.command_line]
        extra: list[str] = []
        if variant is not None:
            spec = self.variants[variant]
            extra = [str(x) for x in spec] if isinstance(spec, list) else [f"{k}={v}" for k, v in dict(spec).items()]
            given.append(f"variant={variant}")
        return [*own, *extra, *common, *given, f"hydra.sweep.subdir={quoted(job_name(job))}"]

    def sweep(self, arguments: list[str]) -> Any:
        assert self.config is not None and self.launcher is not None and self.hydra_context is not None
        try:
            swept, jobs, common = self.grid(arguments)
        except ValueError as exc:  # the sweep itself is malformed (e.g. an unknown variant): a usage error
            _exit_with(str(exc))
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        todo: list[list[str]] = []
        labels: list[str] = []
        failed: list[tuple[str, str]] = []
        changed: list[tuple[Path, str]] = []
        skipped = 0
        references: dict[tuple[str, ...], DictConfig] = {}
        for job in jobs:
            overrides = self.overrides_of(job, common)
            run_dir = sweep_dir / job_name(job)
            done = finished(run_dir)
            resumable = not done and any((run_dir / "checkpoints").glob("step-*.pt"))
            difference = _difference(run_dir, overrides) if done or resumable else None
            if (done or resumable) and not difference:  # the same overrides; the YAML files may have changed
                difference = _config_difference(
                    run_dir, lambda o=overrides: self.hydra_context.config_loader.load_sweep_config(self.config, o)
                )
            if difference:
                changed.append((run_dir, difference))
                continue
            if done:
                skipped += 1
                continue
            try:  # a job whose config does not compose or validate fails alone, before anything runs
                self.check(overrides, references)
            except Exception as exc:  # noqa: BLE001 - reported as this job's failure
                failed.append((job_name(job), str(exc).strip().splitlines()[0]))
                continue
            todo.append(overrides)
            labels.append(job_name(job))
        if changed:  # skipping or resuming it would mix two settings in one sweep
            run_dir, difference = changed[0]
            more = f" (and {len(changed) - 1} more job folders)" if len(changed) > 1 else ""
            _exit_with(
                f"the job folder {run_dir} holds a run with other settings than this sweep gives it{more}: "
                f"{difference}; use another hydra.sweep.dir, or remove that job's folder to run it again"
            )
        if failed and not todo and not skipped:  # nothing can run: a usage error, as for a single run
            reasons: dict[str, list[str]] = {}
            for label, why in failed:
                reasons.setdefault(why, []).append(label)
            for why, which in reasons.items():
                where = f" ({_few(which, len(jobs))})" if len(jobs) > 1 else ""
                print(f"fedsim: error: {why}{where}", file=sys.stderr)
            sys.exit(2)
        record = self._record(sweep_dir, swept, jobs, common)
        start = getattr(self.launcher, "start", None)
        if todo and start is not None:  # the launcher's own checks (Ray, CPUs) before anything is written
            try:
                start()
            except FedsimError as exc:
                _exit_with(str(exc), exc.exit_code)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        self._save_config(sweep_dir)
        (sweep_dir / f".{SWEEP_FILE}.tmp").write_text(json.dumps(record, indent=1))
        (sweep_dir / f".{SWEEP_FILE}.tmp").replace(sweep_dir / SWEEP_FILE)

        print(
            f"fedsim: sweep of {len(jobs)} jobs in {sweep_dir}: {skipped} done before, {len(todo)} to run, "
            f"{len(failed)} with a bad config",
            file=sys.stderr,
            flush=True,
        )
        if isinstance(self.launcher, RayLauncher):
            self.launcher.before = Tally(len(jobs), skipped, len(failed))
        try:
            results: list[JobReturn] = list(self.launcher.launch(todo, initial_job_idx=0)) if todo else []
        except (KeyboardInterrupt, SweepInterrupted) as exc:  # Ctrl-C or SIGTERM: the whole sweep stops
            code = exc.exit_code if isinstance(exc, SweepInterrupted) else 130
            print(
                f"fedsim: sweep interrupted; rerun it (the same hydra.sweep.dir={sweep_dir}) to resume",
                file=sys.stderr,
                flush=True,
            )
            sys.exit(code)
        tally = Tally(len(jobs))
        for label, ret in zip(labels, results):
            tally.count(ret)
            if ret.status != JobStatus.COMPLETED and elsewhere(ret) is None:
                failed.append((label, _reason(ret)))
        for label, why in failed:
            print(f"fedsim: job {label} failed: {why}", file=sys.stderr)
        ok = skipped + tally.done + tally.other_done
        where = f"{tally.done} here, {skipped} before"
        if tally.other_done or tally.other_running:
            where += f", {tally.other_done} by other drivers of this sweep"
        running = f"; {tally.other_running} still running in other drivers" if tally.other_running else ""
        print(
            f"fedsim: sweep finished: {ok} of {len(jobs)} jobs done ({where}), {len(failed)} failed{running} "
            f"({sweep_dir})",
            file=sys.stderr,
            flush=True,
        )
        if failed:
            sys.exit(min(len(failed), 125))
        return [results]

    def _record(
        self, sweep_dir: Path, swept: list[str], jobs: list[list[tuple[str, str]]], common: list[str]
    ) -> dict[str, Any]:
        """sweep.json: this sweep's keys and jobs, added to those of earlier sweeps into the folder
        (their jobs kept, in their order; "common": the overrides common to all of them)."""
        record: dict[str, Any] = {
            "swept": swept,
            "common": [redacted(o) for o in common],
            "jobs": [{"name": job_name(j), "values": dict(j)} for j in jobs],
        }
        path = sweep_dir / SWEEP_FILE
        if not path.exists():
            return record
        try:
            old = json.loads(path.read_text())
            names = {job["name"] for job in old["jobs"]}
        except (ValueError, KeyError, TypeError, OSError) as exc:
            _exit_with(f"cannot read {path} ({exc}); repair it or remove it (fedsim.report reads it)")
        return {
            "swept": [*old.get("swept", []), *(k for k in swept if k not in old.get("swept", []))],
            "common": [o for o in old.get("common", []) if o in record["common"]],
            "jobs": [*old["jobs"], *(job for job in record["jobs"] if job["name"] not in names)],
        }

    def _save_config(self, sweep_dir: Path) -> None:
        """multirun.yaml (secrets redacted): the first sweep's; a later sweep into the same folder
        with other settings adds multirun.1.yaml, multirun.2.yaml, ... (a rerun of the same adds nothing)."""
        assert self.config is not None
        config = OmegaConf.create(OmegaConf.to_container(self.config, resolve=False))
        with open_dict(config):
            config.hydra.overrides.task = [redacted(str(o)) for o in config.hydra.overrides.task]
            dirname = config.hydra.job.get("override_dirname")
            if isinstance(dirname, str):  # the overrides joined with commas
                config.hydra.job.override_dirname = ",".join(redacted(o) for o in dirname.split(","))
            for key in SECRETS:
                if OmegaConf.select(config, key, throw_on_missing=False) is not None:
                    OmegaConf.update(config, key, "<redacted>")
        text = OmegaConf.to_yaml(config)
        saved = [sweep_dir / "multirun.yaml", *sorted(sweep_dir.glob("multirun.*.yaml"))]
        if any(p.exists() and p.read_text() == text for p in saved):
            return
        path = sweep_dir / "multirun.yaml"
        n = 0
        while path.exists():
            n += 1
            path = sweep_dir / f"multirun.{n}.yaml"
        path.write_text(text)


def _bare(key: str) -> str:
    return key.lstrip("+~")


def _text(job: list[tuple[str, str]]) -> str:
    return " ".join(f"{k}={v}" for k, v in job)


def _few(names: list[str], total: int) -> str:
    """Which jobs a line concerns: all of them, or the first few names."""
    if len(names) == total:
        return f"all {total} jobs" if total > 1 else f"job {names[0]}"
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return f"{len(names)} jobs: {', '.join(names[:3])}{more}" if len(names) > 1 else f"job {names[0]}"


def _difference(run_dir: Path, overrides: list[str]) -> str | None:
    """How the overrides a job's folder ran with (``.hydra/overrides.yaml``) differ from ``overrides``
    in what they compute (None when they do not, or when the folder holds no run)."""
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.exists():
        return None
    before, now = settings([str(o) for o in OmegaConf.load(path)]), settings(overrides)
    keys = [*before, *(k for k in now if k not in before)]
    diffs = [k for k in keys if before.get(k) != now.get(k)]
    if not diffs:
        return None
    return f"{_side(before, diffs)} there, {_side(now, diffs)} now"


def _side(values: dict[str, Any], keys: list[str]) -> str:
    """``keys`` as they are in ``values``: "k=v" each, or "no k" where it has none."""
    return " ".join(f"{k}={values[k]}" if k in values else f"no {k}" for k in keys)


def _computes(key: str) -> bool:
    """Whether a dotted key can change what a job computes (not `NOT_COMPUTING`, not placement)."""
    return not (_placement(key) or key in NOT_COMPUTING or key.split(".")[0] in NOT_COMPUTING)


def _computing(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """A composed config as dotted key -> value (interpolations unresolved), without what only
    says where or how a run executes or what it logs (as `settings` leaves out of overrides)."""
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if not _computes(name):
            continue
        if isinstance(value, dict):
            out.update(_computing(value, f"{name}."))
        else:
            out[name] = value
    return out


def _config_difference(run_dir: Path, compose: Any) -> str | None:
    """How the config a job's folder ran with (``.hydra/config.yaml``) differs from the one this
    sweep composes for it now (``compose()``) in what it computes: a changed experiment or group
    YAML, not only changed overrides. A key that one side lacks and the other has as null is a new
    option at its default, not a difference. None when equal, or when the folder holds no run."""
    path = run_dir / ".hydra" / "config.yaml"
    if not path.exists():
        return None
    try:
        before = _computing(OmegaConf.to_container(OmegaConf.load(path), resolve=False))
        now = _computing(OmegaConf.to_container(compose(), resolve=False))
    except Exception:  # noqa: BLE001 - a config that does not compose fails later, as that job's error
        return None
    keys = [*before, *(k for k in now if k not in before)]
    diffs = [k for k in keys if before.get(k) != now.get(k)]
    if not diffs:
        return None
    more = f" (and {len(diffs) - 3} more keys)" if len(diffs) > 3 else ""
    return f"its config has {_side(before, diffs[:3])}, this sweep's {_side(now, diffs[:3])}{more}"


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def _reason(ret: JobReturn) -> str:

    value = ret._return_value
    if isinstance(value, BaseException):
        text = str(value).strip()
        return text.splitlines()[0] if text else type(value).__name__
    return str(value)
