"""The fedsim sweeper (``hydra/sweeper=fedsim``, the default).

A sweep is the product of ``hydra.sweeper.params`` (and any sweep given on the command line, which
wins over the config's for the same key, as with Hydra's basic sweeper) with one more axis,
``hydra.sweeper.variants``: named sets of overrides for comparisons that are not products (e.g.
FedAU with and without a cutoff next to the baselines). Each job gets a readable, stable folder
name from its swept values (``participation=markov,seed=1,variant=mifa``), so that running the same
sweep again:

- skips jobs that finished (``run_end`` in their ``metrics.jsonl``);
- resumes unfinished jobs that have a checkpoint (``resume=true``);
- runs the rest.

A job that fails does not stop the others; the sweep prints one line per failed job and exits with
the number of failures (capped at 125). ``sweep.json`` in the sweep folder lists the swept keys and
every job's values (``fedsim.report`` and the W&B logger read it).
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobReturn, JobStatus
from hydra.plugins.launcher import Launcher
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from fedsim.config import validate

log = logging.getLogger(__name__)

SWEEP_FILE = "sweep.json"


def finished(run_dir: Path) -> bool:
    """Whether the run in ``run_dir`` ended (its last metrics record is ``run_end``)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return False
    lines = path.read_text().strip().splitlines()
    try:
        return bool(lines) and json.loads(lines[-1]).get("event") == "run_end"
    except json.JSONDecodeError:
        return False


def job_name(values: list[tuple[str, str]]) -> str:
    """A folder name from a job's swept values (``/`` in group paths becomes ``.``)."""
    return ",".join(f"{k.replace('/', '.')}={v}" for k, v in values).replace("/", "_") or "job"


class FedsimSweeper(Sweeper):
    def __init__(self, params: Any = None, variants: Any = None) -> None:
        super().__init__()
        self.params = dict(_plain(params) or {})
        self.variants = dict(_plain(variants) or {})
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.launcher: Launcher | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from hydra.core.plugins import Plugins

        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    def grid(self, arguments: list[str]) -> tuple[list[str], list[list[tuple[str, str]]], list[str]]:
        """(swept keys, every job's swept (key, value) pairs, the overrides common to all jobs)."""
        loader = self.hydra_context.config_loader if self.hydra_context is not None else None
        parser = OverridesParser.create(config_loader=loader)

        given = [f"{k}={v}" for k, v in self.params.items()] + list(arguments)
        final: dict[str, list[str]] = {}
        for override in parser.parse_overrides(given):
            key = override.get_key_element()
            if override.is_sweep_override():
                if not override.is_discrete_sweep():
                    raise ValueError(f"the fedsim sweeper takes lists of values, not {override.input_line}")
                final[key] = list(override.sweep_string_iterator())
            else:
                final[key] = [override.get_value_element_as_str()]
        variants = list(self.variants)
        if self.variants and "variant" in final:  # variant=a,b on the command line picks variants
            chosen = final.pop("variant")
            unknown = [v for v in chosen if v not in self.variants]
            if unknown:
                raise ValueError(f"no variant {', '.join(unknown)} in this sweep; its variants: {', '.join(variants)}")
            variants = [v for v in variants if v in chosen]
        swept = [k for k, vals in final.items() if len(vals) > 1 or k in self.params]
        common = [f"{k}={vals[0]}" for k, vals in final.items() if k not in swept]
        jobs: list[list[tuple[str, str]]] = [[]]
        for key in swept:
            jobs = [[*job, (key, value)] for job in jobs for value in final[key]]
        if self.variants:
            swept = [*swept, "variant"]
            jobs = [[*job, ("variant", str(name))] for job in jobs for name in variants]

        return swept, jobs, common

    def overrides_of(self, job: list[tuple[str, str]], common: list[str]) -> list[str]:
        out = list(common)
        for key, value in job:
            if key == "variant":
                extra = self.variants[value]
                out += (
                    [str(x) for x in extra] if isinstance(extra, list) else [f"{k}={v}" for k, v in dict(extra).items()]
                )
                out.append(f"variant={value}")
            else:
                out.append(f"{key}={value}")
        out.append(f"hydra.sweep.subdir='{job_name(job)}'")
        return out

    def sweep(self, arguments: list[str]) -> Any:
        assert self.config is not None and self.launcher is not None and self.hydra_context is not None
        try:
            swept, jobs, common = self.grid(arguments)
        except ValueError as exc:  # the sweep itself is malformed (e.g. an unknown variant): a usage error
            print(f"fedsim: error: {exc}", file=sys.stderr)
            sys.exit(2)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        todo: list[list[str]] = []
        labels: list[str] = []
        failed: list[tuple[str, str]] = []
        skipped = 0
        for job in jobs:
            overrides = self.overrides_of(job, common)
            run_dir = sweep_dir / job_name(job)
            if finished(run_dir):
                skipped += 1
                continue
            if (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").glob("step-*.pt")):
                overrides.append("resume=true")
            try:  # a job whose config does not compose or validate fails alone, before anything runs
                validate(self.hydra_context.config_loader.load_sweep_config(self.config, overrides))
            except Exception as exc:  # noqa: BLE001 - reported as this job's failure
                failed.append((job_name(job), str(exc).strip().splitlines()[0]))
                continue
            todo.append(overrides)
            labels.append(job_name(job))
        if failed and not todo and not skipped:  # nothing can run: a usage error, as for a single run
            for label, why in failed:
                print(f"fedsim: error: {why}" + (f" (job {label})" if len(jobs) > 1 else ""), file=sys.stderr)
            sys.exit(2)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        record = {"swept": swept, "common": common, "jobs": [{"name": job_name(j), "values": dict(j)} for j in jobs]}
        (sweep_dir / SWEEP_FILE).write_text(json.dumps(record, indent=1))

        print(
            f"fedsim: sweep of {len(jobs)} jobs in {sweep_dir}: {skipped} done before, {len(todo)} to run, "
            f"{len(failed)} with a bad config",
            file=sys.stderr,
            flush=True,
        )
        results: list[JobReturn] = list(self.launcher.launch(todo, initial_job_idx=0)) if todo else []
        for label, ret in zip(labels, results):
            if ret.status != JobStatus.COMPLETED:
                failed.append((label, _reason(ret)))
        for label, why in failed:
            print(f"fedsim: job {label} failed: {why}", file=sys.stderr)
        done = skipped + len(results) - sum(1 for r in results if r.status != JobStatus.COMPLETED)
        print(
            f"fedsim: sweep finished: {done} of {len(jobs)} jobs done, {len(failed)} failed ({sweep_dir})",
            file=sys.stderr,
            flush=True,
        )
        if failed:
            sys.exit(min(len(failed), 125))
        return [results]


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node


def _reason(ret: JobReturn) -> str:

    value = ret._return_value
    if isinstance(value, BaseException):
        text = str(value).strip()
        return text.splitlines()[0] if text else type(value).__name__
    return str(value)
