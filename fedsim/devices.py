"""Where tensors live: choosing a torch device, moving nested values to and from it, and
making GPU kernels deterministic.

The rule everywhere in fedsim: code follows the device of its inputs (``zeros_like``,
``new_zeros``, ``device=x.device``). Random streams stay on CPU generators, so minibatch order
does not depend on the device. What crosses process boundaries (parameters, node state, results,
checkpoints) is on the CPU, so a driver without a GPU can use workers that have one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from fedsim.errors import ConfigError

CPU = torch.device("cpu")

# cuBLAS reads this when it starts (deterministic reductions; see `deterministic`): set it before
# anything in this process can touch a GPU. It changes nothing on the CPU.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def resolve(name: str | None, *, key: str = "cluster.device") -> torch.device:
    """``auto`` (CUDA when torch sees a GPU, else CPU), ``cpu``, ``cuda`` or ``cuda:N``; a CUDA
    device on a machine whose torch sees none is one line (`ConfigError`)."""
    name = "auto" if name is None else str(name).strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"{key}={name} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return CPU
    if device.type != "cuda":
        raise ConfigError(f"{key}={name}: fedsim runs on cpu or cuda; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ConfigError(
            f"{key}={name}, but this machine's torch sees no GPU (torch.cuda.is_available() is False); "
            f"use {key}=cpu (or auto), or install a CUDA build of torch"
        )
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(
            f"{key}={name}, but torch sees {torch.cuda.device_count()} GPU(s); use cuda:0 ... "
            f"cuda:{torch.cuda.device_count() - 1}"
        )
    return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())


def name_of(device: torch.device) -> str:
    """'cpu', or the GPU's model (e.g. 'NVIDIA H200'): what bit-identity across runs needs to match."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return "cpu"


def to(value: Any, device: torch.device | str, *, non_blocking: bool = False) -> Any:
    """``value`` with every tensor in it (nested dicts, lists, tuples) on ``device``; what is
    already there is returned as it is (the same object: not copied, its type kept). A
    `fedsim.state.PersistentMap` stays one."""
    if isinstance(value, torch.Tensor):
        return value if value.device == torch.device(device) else value.to(device, non_blocking=non_blocking)
    if isinstance(value, Mapping):
        moved = {k: to(v, device, non_blocking=non_blocking) for k, v in value.items()}
        if all(moved[k] is v for k, v in value.items()):
            return value
        from fedsim.state import PersistentMap

        return PersistentMap.of(moved) if isinstance(value, PersistentMap) else moved
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(to(v, device, non_blocking=non_blocking) for v in value)
    return value


def to_cpu(value: Any) -> Any:
    """`to` the CPU: what crosses Ray, goes into checkpoints and reaches the driver."""
    return to(value, CPU)


def deterministic(device: torch.device) -> None:
    """Deterministic kernels on ``device``: cuDNN's deterministic algorithms, no autotuning,
    no TF32, and cuBLAS's fixed workspace (set before the first cuBLAS call). A no-op on CPU,
    whose kernels fedsim already runs deterministically (one thread per worker)."""
    if device.type != "cuda":
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.use_deterministic_algorithms(True, warn_only=False)


def cap_memory(device: torch.device, share: float) -> None:
    """Let this process take at most ``share`` (0 < share <= 1) of the GPU's memory, so that
    actors sharing a GPU (``cluster.gpus_per_actor`` < 1) cannot starve each other; an
    allocation beyond it raises torch's out-of-memory error, which the worker words as one line."""
    if device.type == "cuda" and 0 < share < 1:
        torch.cuda.set_per_process_memory_fraction(float(share), device)


def synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued kernels (timing); a no-op on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
