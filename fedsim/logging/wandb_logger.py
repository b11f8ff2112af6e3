"""Weights & Biases logging. ``mode=offline`` (the default) needs no account: runs are written
under the run directory and can be uploaded later with ``python -m fedsim.sync RUN_DIR`` (a
resumed run's segments as one run, in order; ``fedsim.sync``).

Run name ``{strategy}-{dataset}-s{seed}``, group ``{dataset}-{partition}-{model}``, and the
strategy/dataset/partition as config and tags, so a dashboard grouped or filtered by them shows
strategies side by side. A resumed run continues the same W&B run id.

A streaming run (``mode=online``) needs an API key; ``credentials_problem`` finds out, without
going online, whether ``wandb.init`` would find one, so that the config check refuses such a run
before anything is created.

In a sweep, every job's run is in one group named after the experiment and the sweep
(``fedau_fmnist:fedau_fmnist``), every swept key is a top-level config field and a tag
(``participation: markov``, ``variant: mifa``), the chosen options are top-level fields too, the
resolved config is under ``cfg``, and the final metrics are in the run summary: grouping the runs
table by ``variant`` (or ``strategy``) shows mean ± std curves per method without any setup.

"""

from __future__ import annotations

import importlib.util
import math
import netrc
import os
import typing
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fedsim.errors import ConfigError
from fedsim.logging import Callback, RunMeta, scalars

DEFAULT_MODE = "offline"
"""The mode of a WandbLogger that does not set one: no account needed."""

_MODES = ("online", "offline", "shared", "disabled", "dryrun", "run")
"""The modes wandb accepts, where its own settings cannot be asked (``dryrun`` and ``run`` are its
old names for offline and online)."""

_NO_SERVER = ("offline", "dryrun", "disabled")
"""Modes that send nothing to a W&B server, hence need no API key."""

_FIX = (
    "run `wandb login` (or set WANDB_API_KEY) on this machine, or use {option}=offline and upload later "
    "with `python -m fedsim.sync RUN_DIR`"
)


def modes() -> tuple[str, ...]:
    """The run modes this wandb accepts (its settings' ``mode`` values)."""
    try:
        from wandb.sdk.wandb_settings import Settings

        found = tuple(str(m) for m in typing.get_args(Settings.model_fields["mode"].annotation))
    except Exception:  # noqa: BLE001 - another wandb version: the known list
        found = ()
    return found or _MODES


def _settings() -> Any:
    """wandb's settings as a run in this process would load them (its settings file, then the
    WANDB_* variables), read into a fresh object: wandb's process-wide setup is left alone, so the
    run's own ``wandb.init`` later starts exactly as it would have. None where this wandb version
    cannot be asked. Raises ValueError (pydantic's) for a setting wandb would refuse."""
    try:
        from wandb.sdk.wandb_settings import Settings

        settings = Settings(silent=True)  # silent: reading a settings file prints nothing
        config_dir = os.environ.get("WANDB_CONFIG_DIR")
        settings.settings_system = str(Path(config_dir or "~/.config/wandb").expanduser() / "settings")
        settings.update_from_system_settings()
        settings.update_from_env_vars(dict(os.environ))
    except (ImportError, AttributeError, TypeError):  # another wandb version: not this way
        return None
    return settings


def _netrc_path() -> Path:
    """The netrc file wandb reads: $NETRC, else ~/.netrc."""
    return Path(os.environ.get("NETRC") or "~/.netrc").expanduser()


def _key_problem(settings: Any, base_url: str) -> tuple[bool, str | None]:
    """Whether wandb would find credentials for ``base_url`` without asking, and what is wrong
    with the ones it would find (None: nothing). The order is wandb's: WANDB_API_KEY (or
    WANDB_IDENTITY_TOKEN_FILE), a ``wandb.login()`` of this process, the netrc entry for the
    server's host, the api_key of wandb's settings file. Nothing goes online."""
    key = os.environ.get("WANDB_API_KEY")
    token_file = os.environ.get("WANDB_IDENTITY_TOKEN_FILE")
    if key and token_file:
        return True, "both WANDB_API_KEY and WANDB_IDENTITY_TOKEN_FILE are set, which wandb refuses; unset one"
    try:
        from wandb.errors import AuthenticationError
        from wandb.sdk.lib import wbauth
    except ImportError:  # an older wandb: the environment and the netrc file, read here
        if key or token_file:
            return True, None
        hostname = urlsplit(base_url).hostname or ""
        try:
            entries = netrc.netrc(str(_netrc_path()))
        except (OSError, netrc.NetrcParseError):
            return False, None
        return any(entries.authenticators(h) for h in (hostname, "api.wandb.ai")), None
    if key:
        why = wbauth.check_api_key(key)
        return True, f"WANDB_API_KEY is not a W&B API key ({why.rstrip('.')})" if why else None
    if token_file:
        return True, None
    try:
        server = wbauth.HostUrl(base_url)
    except ValueError as exc:
        return True, f"WANDB_BASE_URL={base_url} is not a W&B server address ({str(exc).rstrip('.')})"
    if wbauth.session_credentials(host=server) is not None:
        return True, None
    try:
        if wbauth.read_netrc_auth(host=server):
            return True, None
    except AuthenticationError as exc:
        return True, f"the W&B API key in {_netrc_path()} is not valid ({str(exc).rstrip('.')})"
    api_key = getattr(settings, "api_key", None)
    return bool(api_key and server.is_same_url(settings.base_url)), None


def credentials_problem(mode: Any, *, option: str = "mode") -> str | None:
    """Why a W&B run with ``mode`` (None: wandb's own choice, WANDB_MODE or else ``online``) could
    not start on this machine, as one line naming ``option`` and the fix; None when it can.

    Looks where ``wandb.init`` looks, without prompting and without network access: wandb's
    settings, then, for a mode that streams to a server, the credentials. Offline and disabled
    runs need none."""
    if importlib.util.find_spec("wandb") is None:
        return f"{option}: the wandb package is not installed; pip install wandb, or choose logger=console"
    try:
        settings = _settings()
    except ValueError as exc:  # pydantic's ValidationError: a WANDB_* variable wandb refuses
        errors: list[Any] = list(getattr(exc, "errors", list)())
        if errors:
            field = ".".join(str(p) for p in errors[0].get("loc", ())) or "?"
            given = errors[0].get("input")
            return (
                f"wandb refuses the setting {field}={given!r} (from WANDB_{field.upper()} or its settings file): "
                f"{str(errors[0].get('msg', '')).rstrip('.')}; fix or unset it"
            )
        return f"wandb refuses its settings: {str(exc).splitlines()[0]}; fix the WANDB_* variables"
    valid = modes()
    effective = mode
    if mode is None:
        effective = getattr(settings, "mode", None) or os.environ.get("WANDB_MODE") or "online"
    if effective not in valid:
        given = f"{option}={mode!r}" if mode is not None else f"WANDB_MODE={effective!r}"
        return f"{given} is not a W&B mode; use one of {', '.join(valid)}"
    if effective in _NO_SERVER:
        return None
    base_url = str(getattr(settings, "base_url", None) or os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai")
    found, problem = _key_problem(settings, base_url)
    fix = _FIX.format(option=option)
    if problem:
        return f"{option}={effective} streams the run to W&B, but {problem}; {fix}"
    if not found:
        return (
            f"{option}={effective} streams the run to W&B ({base_url}), but no W&B API key is set up here "
            f"(none in WANDB_API_KEY or {_netrc_path()}); {fix}"
        )
    return None


class WandbLogger(Callback):
    def __init__(
        self,
        *,
        project: str = "fedsim",
        entity: str | None = None,
        mode: str | None = DEFAULT_MODE,
        tags: list[str] | None = None,
    ) -> None:
        self.project = project
        self.entity = entity
        self.mode = mode
        self.tags = [tags] if isinstance(tags, str) else list(tags or [])  # one tag given as text: that tag
        self.run: Any = None

    def on_run_start(self, meta: RunMeta) -> None:
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        resumed = (meta.resume or {}).get("wandb_id")
        swept = dict(meta.sweep["values"]) if meta.sweep else {}

        try:
            self.run = wandb.init(
                id=resumed,
                resume="allow" if resumed else None,
                project=self.project,
                entity=self.entity,
                mode=self.mode,  # type: ignore[arg-type]  # checked by wandb itself
                dir=str(meta.output_dir),
                name=meta.run_name if meta.sweep is None else f"{meta.run_name}-{meta.output_dir.name}",
                group=meta.group if meta.sweep is None else meta.sweep["name"],
                job_type=meta.names.get("strategy"),
                tags=[*self.tags, *(f"{k}:{v}" for k, v in sorted({**meta.names, **swept}.items()))],
                config={**meta.names, **swept, "cfg": meta.config, "info": meta.info},
                reinit="finish_previous",
            )
        except (wandb.errors.UsageError, wandb.errors.AuthenticationError) as exc:  # the config check's safety net
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            about_key = isinstance(exc, wandb.errors.AuthenticationError) or "api key" in first.lower()
            fix = f"; {_FIX.format(option='mode')}" if about_key else ""
            raise ConfigError(f"W&B could not start the run: {first.rstrip('.')}{fix}") from None
        self.run.define_metric("round")
        self.run.define_metric("*", step_metric="round")

    def on_round_end(self, round_: int, metrics: dict[str, Any]) -> None:
        if self.run is not None:
            import wandb

            record: dict[str, Any] = dict(scalars(metrics))
            for key, value in metrics.items():  # per-node lists (node accuracies, FedAU weights)
                if isinstance(value, list) and value and all(isinstance(x, (int, float)) for x in value):
                    finite = [x for x in value if math.isfinite(x)]
                    if finite:
                        record[key] = wandb.Histogram(finite)
            self.run.log(record)

    def position(self) -> dict[str, Any]:
        return {"wandb_id": self.run.id} if self.run is not None else {}

    def on_run_stop(self, reason: str) -> None:
        if self.run is not None:
            self.run.summary["stopped"] = reason
            self.run.finish(exit_code=1)
            self.run = None

    def on_run_end(self, summary: dict[str, Any]) -> None:
        if self.run is not None:
            for key, value in scalars(summary).items():
                self.run.summary[key] = value
            self.run.finish()
            self.run = None
