"""Top-level config validation: types and ranges, each failure one line saying how to fix it."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

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
    if per_round > num_nodes:
        raise ConfigError(
            f"nodes_per_round={per_round} exceeds num_nodes={num_nodes}; "
            f"set nodes_per_round<={num_nodes} or raise num_nodes"
        )
