"""Top-level config validation: types and ranges, each failure one line saying how to fix it.

`validate` also refuses a W&B run that would stream without credentials (before any run folder
exists) and turns one value given for a list option into a one-element list (`one_element_lists`).
"""

from __future__ import annotations

import collections.abc
import functools
import inspect
import types
import typing
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict, read_write

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
    where the option's default is a number or a flag (``strategy.client.lr=abc``), or one value
    where it is a list that the value cannot be the one element of (``model.hidden=abc``)."""

    def walk(value: Any, default: Any, key: str, target: Any = None) -> None:
        if isinstance(default, dict) and isinstance(value, dict):
            inner = value.get("_target_")
            inner = inner if isinstance(inner, str) and not inner.startswith("${") else None
            for k, v in value.items():
                if k in default:
                    walk(v, default[k], f"{key}{k}.", inner)
            return
        name = key[:-1]
        if isinstance(default, bool) and not isinstance(value, bool):
            raise ConfigError(f"{name}={value!r} must be true or false (default {default})")
        number = isinstance(default, (int, float)) and not isinstance(default, bool)
        if number and isinstance(value, str) and not value.startswith("${"):
            raise ConfigError(f"{name}={value!r} must be a number, e.g. {name}={default}")
        scalar = isinstance(value, (str, int, float)) and not (isinstance(value, str) and value.startswith("${"))
        if isinstance(default, list) and scalar and not _takes_as_list(target, name.rsplit(".", 1)[-1], value):
            simple = bool(default) and all(isinstance(v, (str, int, float)) for v in default)
            example = ",".join(str(v) for v in default) if simple else str(value)
            raise ConfigError(f"{name}={value!r} must be a list, e.g. '{name}=[{example}]'")

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


_NOT_A_LIST = object()
"""`_element`'s answer for a type that is not a list type."""

_SEQUENCES = (
    list,
    tuple,
    collections.abc.Sequence,
    collections.abc.MutableSequence,
    collections.abc.Collection,
    collections.abc.Iterable,
)


def _element(hint: Any) -> Any:
    """The element type of ``hint`` when it is a list type (``Sequence[int]``, ``list[str]``;
    ``Any`` when it does not say), else ``_NOT_A_LIST``. Fixed-length tuples
    (``tuple[float, float]``) are not lists: one value cannot fill them."""
    if hint in _SEQUENCES:
        return Any
    origin = typing.get_origin(hint)
    if origin in _SEQUENCES:
        args = typing.get_args(hint)
        if origin is tuple:
            return args[0] if len(args) == 2 and args[1] is Ellipsis else _NOT_A_LIST
        return args[0] if args else Any
    return _NOT_A_LIST


def _wants_list(hint: Any, value: Any) -> bool:
    """Whether a parameter annotated ``hint`` takes ``value`` only as a one-element list: none of
    its kinds takes the value as it is, and a list kind takes it as an element
    (``nodes: str | list[int] | None`` leaves ``'all'`` alone and makes ``3`` ``[3]``)."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    kinds = [k for k in (typing.get_args(hint) if union else (hint,)) if k is not type(None)]
    if any(_element(k) is _NOT_A_LIST and _fits(value, k) for k in kinds):
        return False
    return any(_element(k) is not _NOT_A_LIST and _fits(value, _element(k)) for k in kinds)


def _fits(value: Any, element: Any) -> bool:
    """Whether the single value ``value`` is a valid element of type ``element``."""
    if element is Any or element is object:
        return True
    if typing.get_origin(element) in (typing.Union, types.UnionType):
        return any(_fits(value, arg) for arg in typing.get_args(element))
    if isinstance(value, bool):
        return element is bool
    if element is float:
        return isinstance(value, (int, float))
    return isinstance(element, type) and isinstance(value, element)


@functools.cache
def _locate(path: str) -> Any:
    """The object a ``_target_`` names, or None where it cannot be imported (instantiation says why)."""
    from hydra.utils import get_object

    try:
        return get_object(path)
    except Exception:  # noqa: BLE001 - reported where the config is instantiated
        return None


@functools.cache
def _annotation(target: Any, key: str) -> Any:
    """The type annotation of ``target``'s keyword ``key`` (None where it has none or it cannot be
    read), following ``**kwargs`` up the classes' ``__init__``s."""
    functions = (
        [k.__dict__["__init__"] for k in target.__mro__ if "__init__" in k.__dict__]
        if isinstance(target, type)
        else [target]
    )
    for function in functions:
        try:
            params = inspect.signature(function).parameters
        except (TypeError, ValueError):
            return None
        if key in params:
            hint = params[key].annotation
            if isinstance(hint, str):  # postponed annotations (from __future__ import annotations)
                try:
                    hint = eval(hint, getattr(function, "__globals__", {}))  # noqa: S307 - the module's own annotation
                except Exception:  # noqa: BLE001 - a name only imported for type checking
                    return None
            return None if hint is inspect.Parameter.empty else hint
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
            return None
    return None


def _takes_as_list(path: str | None, key: str, value: Any) -> bool:
    """Whether the ``_target_`` at ``path`` takes keyword ``key`` as a list that ``value`` can be
    the one element of (`one_element_lists` then makes it that list)."""
    target = _locate(path) if path else None
    hint = _annotation(target, key) if target is not None else None
    return hint is not None and _wants_list(hint, value)


def one_element_lists(cfg: DictConfig) -> None:
    """Where an option that takes a list was given one value (``strategy.preaggregators=nnm``,
    ``model.hidden=64``), make it that value's one-element list, in place, before anything is
    built. Hydra reads a value without brackets as a single value, and the code that goes
    through the option would read a text one character at a time. Which options take lists is
    read from the signature of each node's ``_target_`` (a parameter whose type takes the value
    only as an element of a list, `_wants_list`), so it holds for options added with ``+`` or from
    the user's own config folders too."""

    def visit(node: Any, top: bool = False) -> None:
        keys = range(len(node)) if isinstance(node, ListConfig) else list(node.keys())
        path = None
        if isinstance(node, DictConfig) and "_target_" in node and not OmegaConf.is_interpolation(node, "_target_"):
            path = node.get("_target_")
        path = path if isinstance(path, str) else None
        for key in keys:
            if (top and key == "hydra") or OmegaConf.is_interpolation(node, key) or OmegaConf.is_missing(node, key):
                continue
            value = node[key]
            if isinstance(value, (DictConfig, ListConfig)):
                visit(value)
                continue
            if path is None or not isinstance(key, str) or key.startswith("_"):
                continue
            if isinstance(value, (str, int, float)) and _takes_as_list(path, key, value):
                with read_write(node), open_dict(node):
                    node[key] = [value]

    visit(cfg, top=True)


def _wandb_problem(cfg: DictConfig) -> str | None:
    """A W&B logger's mode that wandb would refuse, or a streaming one without credentials (see
    `fedsim.logging.wandb_logger.credentials_problem`); None otherwise."""
    logger = cfg.get("logger")
    callbacks = logger.get("callbacks") if isinstance(logger, DictConfig) else None
    if not isinstance(callbacks, ListConfig):
        return None
    for i, callback in enumerate(callbacks):
        if isinstance(callback, DictConfig) and str(callback.get("_target_", "")).rsplit(".", 1)[-1] == "WandbLogger":
            from fedsim.logging.wandb_logger import DEFAULT_MODE, credentials_problem

            problem = credentials_problem(callback.get("mode", DEFAULT_MODE), option=f"logger.callbacks.{i}.mode")
            if problem:
                return problem
    return None


def validate(cfg: DictConfig) -> None:
    """Raise ConfigError for the first problem found in the composed config; then take a single
    value given for a list option as a one-element list (`one_element_lists`, in place)."""
    for group in GROUPS:
        if cfg.get(group) is None:
            raise ConfigError(f"config group '{group}' is missing; choose one, e.g. {group}=<option>")
    _int(cfg, "seed", minimum=0)
    num_nodes = _int(cfg, "num_nodes", minimum=1)
    per_round = _int(cfg, "nodes_per_round", minimum=1)
    _int(cfg, "rounds", minimum=1)
    _int(cfg, "eval_every", minimum=0)
    if cfg.get("eval_threads") is not None:
        _int(cfg, "eval_threads", minimum=1)
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
    problem = _wandb_problem(cfg)
    if problem:
        raise ConfigError(problem)
    one_element_lists(cfg)
