"""``python -m fedsim [hydra overrides]``: compose the config, build, run, log.

Bad input (unknown option, bad value, missing data) is one line on stderr and exit code 2.
A plain run is checked before Hydra starts, so a typo never costs a Ray start-up.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
from pathlib import Path
from typing import NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from fedsim.errors import ConfigError, FedsimError, Interrupted
from fedsim.errors import exit_with as _fail


def _conf_dir() -> Path:
    """The configs: ``conf/`` of a source checkout (editable install), else the copy a wheel
    installs as ``fedsim/conf``."""
    here = Path(__file__).resolve().parent
    checkout = here.parent / "conf"
    return checkout if (checkout / "config.yaml").is_file() else here / "conf"


CONF_DIR = _conf_dir()

_NEW_FOLDERS: list[Path] = []
"""Folders of the run directory that did not exist before this run (removed again after a usage error)."""


def one_line(exc: BaseException) -> str:
    """Hydra's multi-line composition errors, folded into one line with the available options."""
    text = str(exc).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    first = re.sub(r"^In '[^']*': ", "", lines[0])
    if "Available options in" in text:
        idx = next(i for i, ln in enumerate(lines) if ln.startswith("Available options in"))
        options = []
        for ln in lines[idx + 1 :]:
            if ln.startswith("Config search path") or ":" in ln or "=" in ln:
                break
            options.append(ln)
        if options:
            return f"{first}; available: {', '.join(options)}"
    override = re.match(r"Could not override '([^']+)'", first)
    if override:
        key = override.group(1)
        if key == "strategy/aggregator":
            return (
                "the chosen strategy has no aggregator to choose (its aggregation is part of the method); drop "
                "strategy/aggregator=..., which applies to fedavg, fedprox, robust, floral, monna, vrls and the "
                "asynchronous steps"
            )
        if key == "strategy/server_opt":
            return (
                "the chosen strategy has no server optimiser to choose (it builds its own step); drop "
                "strategy/server_opt=..., which applies to fedavg, fedprox, robust, floral, scaffold, fednova, "
                "feddyn, the fedau family and the asynchronous steps"
            )
        return f"there is no option '{key}'; check the spelling (a new key is added with +{key}=VALUE)"
    return first


def _numeric_option(argv: list[str]) -> str | None:
    """Hydra parses ``group=inf`` or ``group=1e3`` as a number and then rejects it; name the
    override and the group's options instead of Hydra's "must be a string" message."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for arg in argv:
        key, sep, value = arg.partition("=")
        group = CONF_DIR / key.lstrip("+~")
        if not sep or not group.is_dir():
            continue

        try:
            parsed = OverridesParser.create().parse_override(arg).value()
        except Exception:  # noqa: BLE001 - not this override's problem
            continue
        if not isinstance(parsed, (str, list)):
            options = ", ".join(sorted(p.stem for p in group.glob("*.yaml")))
            return f"{arg}: Hydra reads '{value}' as a number, not an option name; {key} options: {options}"
    return None


def _unparsable(argv: list[str]) -> str | None:
    """The first override Hydra's grammar cannot parse, as one line naming it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    for arg in argv:
        try:
            parser.parse_override(arg)
        except Exception as exc:  # noqa: BLE001 - the grammar's own error, folded into one line
            why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return (
                f"cannot read the override {arg} ({why}); quote values with brackets, commas or spaces, "
                "e.g. 'strategy.preaggregators=[nnm,bucketing]'"
            )
    return None


def _search_dirs(argv: list[str]) -> list[Path]:
    """The config folders a run composes from: the shipped ones and the user's own
    (``hydra.searchpath=[file://...]``)."""
    dirs = [CONF_DIR]
    for arg in argv:
        key, _, value = arg.partition("=")
        if key.lstrip("+~") == "hydra.searchpath":
            dirs += [Path(m) for m in re.findall(r"file://([^,\]'\"]+)", value)]
    return dirs


def group_overrides(argv: list[str]) -> list[str]:
    """The overrides of ``argv`` that choose a config group option (``strategy=fedau``,
    ``strategy/aggregator=median``, ``+experiment=...``) or add config folders: what fixes a
    config's defaults."""
    dirs = _search_dirs(argv)
    out = []
    for arg in argv:
        key = arg.partition("=")[0].lstrip("+~")
        if "=" in arg and (key == "hydra.searchpath" or any((d / key).is_dir() for d in dirs)):
            out.append(arg)
    return out


def _run_dir_problem(cfg: DictConfig) -> str | None:
    """Why the run folder cannot be created (None when it can); creates nothing that stays."""
    try:
        run_dir = Path(str(cfg.hydra.run.dir))
    except Exception:  # noqa: BLE001 - an unresolvable dir is Hydra's to report
        return None
    missing = [p for p in [run_dir, *run_dir.parents] if not p.exists()]
    _NEW_FOLDERS[:] = missing
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".fedsim-write-test"
        probe.touch()
        probe.unlink()
    except OSError as exc:
        return f"cannot create the run folder hydra.run.dir={run_dir}: {exc.strerror or exc}; choose a writable folder"
    finally:
        for p in missing:  # leave nothing behind: Hydra makes it again when the run starts
            with contextlib.suppress(OSError):
                p.rmdir()
    return None


def _preflight(argv: list[str]) -> None:
    """Compose and validate the config of a plain run (no flags, no sweeps)."""
    from hydra import compose, initialize_config_dir

    from fedsim.config import check_types, validate

    bad = _unparsable(argv)
    if bad:
        _fail(bad, 2)
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=argv, return_hydra_config=True)
            reference = compose(config_name="config", overrides=group_overrides(argv))
    except Exception as exc:  # noqa: BLE001 - every composition error becomes one line
        _fail(_numeric_option(argv) or one_line(exc), 2)
    try:
        check_types(cfg, reference)  # first: it needs no import of the plug-ins, so a typo is fast
        validate(cfg)
    except ConfigError as exc:
        _fail(str(exc), 2)
    problem = _run_dir_problem(cfg)
    if problem:
        _fail(problem, 2)
    _claim_run_dir(Path(str(cfg.hydra.run.dir)), resume=bool(cfg.get("resume")), overwrite=bool(cfg.get("overwrite")))


def _claim_run_dir(run_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Take the run folder's lock before Hydra writes into it (the run keeps it until it ends),
    and refuse a fresh run into a folder that holds a run: a second process, or a new run over an
    old one, never touches a run's files. Checked again by the run itself, under the lock."""
    from fedsim import runfolder

    holder = runfolder.holder(run_dir)  # asked first, so a refusal leaves no lock file behind
    if holder is not None:
        _fail(runfolder.busy_message(run_dir, holder), 2)
    held = runfolder.contents(run_dir)
    if not resume and not overwrite and held != "empty":
        _fail(runfolder.occupied_message(run_dir, held), 2)
    try:
        lock = runfolder.acquire(run_dir)
    except runfolder.RunBusy as exc:
        _fail(str(exc), 2)
    runfolder.say_took_over(lock)


def _sweep_precheck(argv: list[str]) -> None:
    """A sweep (``-m``) whose overrides cannot even compose (an unknown key, a missing group
    option) fails as one line, exit 2, before Hydra prints its own several-line message: the
    config is composed with the first value of every swept key. Bad values in some jobs only
    are the sweeper's to report, job by job."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    overrides = [a for a in argv if a not in ("-m", "--multirun")]
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception:  # noqa: BLE001 - a syntax error is Hydra's to report, with its position
        return
    first: list[str] = [
        str(o.input_line) if not o.is_sweep_override() else f"{o.get_key_element()}={next(o.sweep_string_iterator())}"
        for o in parsed
    ]
    swept = [str(o.input_line) for o in parsed if o.is_sweep_override()]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        try:
            compose(config_name="config", overrides=first)
        except Exception as exc:  # noqa: BLE001 - every composition error becomes one line
            _fail(one_line(exc), 2)
        try:  # as Hydra composes a sweep's config once: the swept keys left out (their groups at the default)
            compose(config_name="config", overrides=[str(o.input_line) for o in parsed if not o.is_sweep_override()])
        except Exception as exc:  # noqa: BLE001
            key, cause = "", exc
            while cause is not None and not key:  # omegaconf names the key it could not set
                key = str(getattr(cause, "full_key", "") or "")
                cause = cause.__cause__ or cause.__context__  # type: ignore[assignment]
            if not key:
                _fail(one_line(exc), 2)

            value = next((o.value() for o in parsed if not o.is_sweep_override() and o.key_or_group == key), "VALUE")
            _fail(
                f"there is no option '{key}' before the sweep picks {' '.join(swept)} (Hydra applies the overrides "
                f"that are not swept first, with every group at its default); write ++{key}={value} to set it in "
                f"every job (adding it where an option lacks it)",
                2,
            )


def _is_sweep(argv: list[str]) -> bool:
    flags = [a for a in argv if a.startswith("-")]
    return bool(flags) and all(a in ("-m", "--multirun") for a in flags)


def _is_plain_run(argv: list[str]) -> bool:
    return not any(a.startswith("-") for a in argv)


def run(cfg: DictConfig) -> dict[str, object]:
    """Build and run one simulation from a composed config; returns the run summary. A sweep
    job claims its folder first (`fedsim.runfolder.claim`): drivers of one sweep share its jobs."""
    from fedsim.runner import execute

    if HydraConfig.initialized():
        hc = HydraConfig.get()
        output_dir = Path(hc.runtime.output_dir)
        names = {k: str(v) for k, v in hc.runtime.choices.items() if not k.startswith("hydra") and v is not None}
    else:
        output_dir = Path(os.getcwd())
        names = {}
    return execute(cfg, output_dir=output_dir, names=names, sweep_job=_in_sweep())


def _leave_nothing(output_dir: Path) -> None:
    """After a usage error, remove the run folder Hydra made if nothing but its own files is in it
    (and the parent folders it made for it, when they are empty)."""
    if not output_dir.is_dir():
        return
    ours = {".hydra", "cli.log", "main.log", "__main__.log", ".fedsim.lock"}
    if all(p.name in ours for p in output_dir.iterdir()):
        shutil.rmtree(output_dir, ignore_errors=True)
        for folder in _NEW_FOLDERS:
            with contextlib.suppress(OSError):
                folder.rmdir()


class JobFailed(Exception):
    """A sweep job's failure, as one line (the sweep goes on and counts it)."""


def _in_sweep() -> bool:
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    try:
        summary = run(cfg)
    except (FedsimError, KeyboardInterrupt) as exc:
        from fedsim.runfolder import Elsewhere

        if isinstance(exc, Elsewhere) and _in_sweep():
            raise  # another driver of this sweep runs (or ran) the job: the sweeper counts it as theirs
        if isinstance(exc, ConfigError) and HydraConfig.initialized():
            _leave_nothing(Path(HydraConfig.get().runtime.output_dir))
        message = str(exc) if isinstance(exc, FedsimError) else "interrupted"
        code = exc.exit_code if isinstance(exc, FedsimError) else 130
        if _in_sweep():
            print(f"fedsim: error: {message}", file=sys.stderr)
            if isinstance(exc, (Interrupted, KeyboardInterrupt)):  # Ctrl-C stops the sweep, not just this job
                from hydra_plugins.fedsim_plugins.sweeper import SweepInterrupted

                raise SweepInterrupted(message, code) from None
            raise JobFailed(message) from None  # the job fails alone; the sweeper reports it and goes on
        _fail(message, code)
    acc = summary.get("eval/acc")
    return float(acc) if isinstance(acc, (int, float)) else None


def _register_plugins() -> None:
    """fedsim's sweeper and launcher, registered by hand as well: Hydra finds plugins by listing
    the ``hydra_plugins`` namespace package's folders, which setuptools' default editable install
    (``pip install -e .``) hides behind an import hook, so outside the checkout the scan misses
    them and ``hydra/sweeper=fedsim`` (the default) would not exist."""
    from hydra.core.plugins import Plugins

    from hydra_plugins.fedsim_plugins.launcher import RayLauncher  # importing the package stores their configs
    from hydra_plugins.fedsim_plugins.sweeper import FedsimSweeper

    for plugin in (FedsimSweeper, RayLauncher):
        Plugins.instance().register(plugin)


def _help(argv: list[str]) -> NoReturn:
    """``--help`` (or ``--help GROUP``): the config groups with their one-line meanings, written
    as comments in conf/ (fedsim.confdoc), instead of Hydra's list of names; ``--hydra-help``
    stays Hydra's."""
    from fedsim.confdoc import help_text

    rest = [a for a in argv if a not in ("--help", "-h", "-m", "--multirun")]
    try:
        sys.stdout.write(help_text(CONF_DIR, rest[0] if len(rest) == 1 and "=" not in rest[0] else None))
    except KeyError as exc:
        _fail(str(exc.args[0]), 2)
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> None:
    command = argv is None  # the `fedsim` command / `python -m fedsim`, not a call from Python (tests)
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if "--help" in argv or "-h" in argv:
            _help(argv)
        _register_plugins()
        if _is_plain_run(argv):
            _preflight(argv)
        elif _is_sweep(argv):
            _sweep_precheck(argv)
        sys.argv = [sys.argv[0], *argv]
        _hydra_main()
    except SystemExit as exc:
        if not command:
            raise
        _exit_now(exc.code)
    if command:
        _exit_now(0)


def _exit_now(code: object) -> NoReturn:
    """End the command without Python's interpreter teardown, which frees torch's, Ray's and
    Hydra's objects one by one (about 1 s on a quiet machine, 3-4 s on a busy one: it pushed the
    exit after SIGTERM past a batch scheduler's grace time). Non-daemon threads are joined, the
    atexit handlers (Ray's, W&B's, logging's) run and the output is flushed first; the run's
    files (checkpoint fsynced, metrics.jsonl and W&B closed) are complete before this point."""
    import atexit
    import threading

    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:
        print(code, file=sys.stderr)
        status = 1
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)
