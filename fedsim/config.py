"""Top-level config validation: types and ranges, each failure one line saying how to fix it."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from fedsim.errors import ConfigError

GROUPS = (
    "dataset",
    "partition",
    "model",
    "strategy",
    "attack",
    "compressor",
    "feedback",
    "participation",
    "latency",
    "server",
    "cluster",
    "logger",
)


def _int(cfg: DictConfig, key: str, *, minimum: int, prefix: str = "") -> int:
    value: Any = cfg.get(key)
    name = prefix + key
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name}={value!r} must be an integer, e.g. {name}={max(minimum, 1)}")
    if value < minimum:
        raise ConfigError(f"{name}={value} must be >= {minimum}")
    return value


def check_types(cfg: DictConfig, reference: DictConfig) -> None:
    """Raise ConfigError where a value overridden on the command line has the wrong kind: text
    where the option's default is a number or a flag (``strategy.client.lr=abc``)."""

    def walk(value: Any, default: Any, key: str) -> None:
        if isinstance(default, dict) and isinstance(value, dict):
            for k, v in value.items():
                if k in default:
                    walk(v, default[k], f"{key}{k}.")
            return
        name = key[:-1]
        if isinstance(default, bool) and not isinstance(value, bool):
            raise ConfigError(f"{name}={value!r} must be true or false (default {default})")
        number = isinstance(default, (int, float)) and not isinstance(default, bool)
        if number and isinstance(value, str) and not value.startswith("${"):
            raise ConfigError(f"{name}={value!r} must be a number, e.g. {name}={default}")

    plain = OmegaConf.to_container(cfg, resolve=False)
    walk(
        {k: v for k, v in plain.items() if k != "hydra"} if isinstance(plain, dict) else {},
        OmegaConf.to_container(reference, resolve=False),
        "",
    )


def choices(cfg: DictConfig) -> dict[str, str]:
    """Config group -> chosen option (e.g. ``{"strategy": "fedbuff"}``): from the running Hydra
    job, or from a config composed with ``return_hydra_config=True``; empty otherwise."""
    from hydra.core.hydra_config import HydraConfig

    node: Any = None
    if "hydra" in cfg:
        node = cfg.hydra.runtime.choices
    elif HydraConfig.initialized():
        node = HydraConfig.get().runtime.choices
    if node is None:
        return {}
    return {str(k): str(v) for k, v in node.items() if not str(k).startswith("hydra") and v is not None}


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError for the first problem found in the composed config."""
    for group in GROUPS:
        if cfg.get(group) is None:
            raise ConfigError(f"config group '{group}' is missing; choose one, e.g. {group}=<option>")
    _int(cfg, "seed", minimum=0)
    num_nodes = _int(cfg, "num_nodes", minimum=1)
    per_round = _int(cfg, "nodes_per_round", minimum=1)
    _int(cfg, "rounds", minimum=1)
    _int(cfg, "eval_every", minimum=0)
    byz = cfg.get("byzantine")
    if byz is None:
        raise ConfigError("config section 'byzantine' is missing; add byzantine.num=0")
    num_byz = _int(byz, "num", minimum=0, prefix="byzantine.") if byz.get("num") is not None else 0
    if num_byz > num_nodes:
        raise ConfigError(f"byzantine.num={num_byz} exceeds num_nodes={num_nodes}; lower byzantine.num")
    if byz.get("declared") is not None:
        _int(byz, "declared", minimum=0, prefix="byzantine.")
    if not isinstance(cfg.get("resume", False), bool):
        raise ConfigError(f"resume={cfg.get('resume')!r} must be true or false")
    ck = cfg.get("checkpoint")
    if ck is not None:
        _int(ck, "every", minimum=0, prefix="checkpoint.")
        _int(ck, "keep", minimum=1, prefix="checkpoint.")
    div = cfg.get("divergence")
    if div is not None and (isinstance(div, bool) or not isinstance(div, (int, float)) or div <= 1):
        raise ConfigError(f"divergence={div!r} must be a factor > 1, or null to switch the guard off")
    if per_round > num_nodes:
        raise ConfigError(
            f"nodes_per_round={per_round} exceeds num_nodes={num_nodes}; "
            f"set nodes_per_round<={num_nodes} or raise num_nodes"
        )
