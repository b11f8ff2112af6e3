"""``python -m fedsim [hydra overrides]``: compose the config, build, run, log.

Bad input (unknown option, bad value, missing data) is one line on stderr and exit code 2.
A plain run is checked before Hydra starts, so a typo never costs a Ray start-up.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from fedsim.errors import ConfigError, FedsimError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def _fail(message: str, code: int) -> None:
    print(f"fedsim: error: {message}", file=sys.stderr)
    sys.exit(code)


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


def _preflight(argv: list[str]) -> None:
    """Compose and validate the config of a plain run (no flags, no sweeps)."""
    from hydra import compose, initialize_config_dir

    from fedsim.config import validate

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=argv)
    except Exception as exc:  # noqa: BLE001 - every composition error becomes one line
        _fail(_numeric_option(argv) or one_line(exc), 2)
    try:
        validate(cfg)
    except ConfigError as exc:
        _fail(str(exc), 2)


def _is_plain_run(argv: list[str]) -> bool:
    return not any(a.startswith("-") for a in argv)


def run(cfg: DictConfig) -> dict[str, object]:
    """Build and run one simulation from a composed config; returns the run summary."""
    from fedsim.logging import RunMeta
    from fedsim.simulation import build, make, set_driver_threads

    set_driver_threads(1)
    if HydraConfig.initialized():
        hc = HydraConfig.get()
        output_dir = Path(hc.runtime.output_dir)
        names = {k: str(v) for k, v in hc.runtime.choices.items() if not k.startswith("hydra")}
    else:
        output_dir = Path(os.getcwd())
        names = {}
    sim = build(cfg)
    try:
        callbacks = list(make(cfg.logger.callbacks)) if cfg.logger.get("callbacks") else []
        config = OmegaConf.to_container(cfg, resolve=True)
        assert isinstance(config, dict)
        meta = RunMeta(output_dir, {str(k): v for k, v in config.items()}, sim.total_rounds, names, sim.info())
        for cb in callbacks:
            cb.on_run_start(meta)
        _, summary = sim.run(callbacks)
        for cb in callbacks:
            cb.on_run_end(summary)
    finally:
        sim.close()
    return summary


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _hydra_main(cfg: DictConfig) -> float | None:
    try:
        summary = run(cfg)
    except FedsimError as exc:
        _fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    acc = summary.get("eval/acc")
    return float(acc) if isinstance(acc, (int, float)) else None


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if _is_plain_run(argv):
        _preflight(argv)
    sys.argv = [sys.argv[0], *argv]
    _hydra_main()
