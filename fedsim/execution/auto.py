"""``cluster=auto`` (the default): the in-process executor for a run that fits one process, Ray
otherwise.

Starting a local Ray costs about 10 s on a 2-core machine (``ray.init`` 4-8 s, then each actor
process imports torch, 3-4 s, and the shutdown 1-2 s), and each round pays 10-25 ms for the calls;
the digits default trains in about 1 s. Ray divides the training by its CPUs at best, so on c CPUs
it saves at most (1 - 1/c) of the training time. ``auto`` estimates the run's training time on one
core from the model's forward FLOPs and the examples its nodes train on, and uses Ray only when
that saving exceeds Ray's start-up (``cluster.ray_startup_s``) and per-round cost. Either way the
results are bit-identical (docs/design.md, "Determinism"); only the wall time differs. A run that
names a cluster (``cluster.address``) always uses Ray."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from fedsim.data.base import FederatedData
from fedsim.execution.local import LocalExecutor
from fedsim.execution.worker import WorkerSpec

FLOPS_PER_S = 2e9
"""Training speed assumed for one CPU core (forward + backward, small minibatches, one torch thread);
the digits MLP and the Fashion-MNIST CNN measure 2-6 GFLOP/s on a 2-core machine, so the estimate
errs towards Ray."""
TRAIN_FACTOR = 3.0
"""FLOPs of a training example per forward FLOP (forward, backward for inputs and for weights)."""
NODE_OVERHEAD_S = 2e-3
"""Per node and round: building its minibatches, its message, the server's share of it."""


RAY_ROUND_S = 0.02
"""Ray's own cost per round (one call per actor, the model through the object store, the results
back): 10-25 ms on a 2-core machine for the digits default."""


@dataclass(frozen=True)
class Estimate:
    """The run's training time on one core, as ``cluster=auto`` estimates it."""

    seconds: float
    forward_flops: int
    examples_per_round: float
    rounds: int

    def ray_pays(self, cpus: int, startup_s: float) -> tuple[bool, str]:
        """Whether Ray on ``cpus`` workers would save more than it costs (``startup_s`` once and
        `RAY_ROUND_S` a round), and why, in words."""
        saved = self.seconds * (1 - 1 / max(cpus, 1))
        cost = startup_s + self.rounds * RAY_ROUND_S
        verdict = saved > cost
        why = (
            f"~{self.seconds:.3g} s of training on one core; Ray on {cpus} CPU(s) would save ~{saved:.3g} s, "
            f"{'more' if verdict else 'less'} than its ~{cost:.3g} s of start-up (cluster.ray_startup_s="
            f"{startup_s:g}) and per-round cost"
        )
        return verdict, why


def _layer_flops(module: torch.nn.Module, out: Any) -> int:
    """Multiply-add FLOPs (2 per multiply-accumulate) of one call of a linear, convolutional or
    recurrent layer, from its output's shape; 0 for other layers."""
    if isinstance(out, tuple):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        return 0
    if isinstance(module, torch.nn.Linear):
        return 2 * out.numel() * module.in_features
    if isinstance(module, torch.nn.modules.conv._ConvNd):
        per_output = module.in_channels // module.groups
        for k in module.kernel_size:
            per_output *= k
        return 2 * out.numel() * per_output
    if isinstance(module, torch.nn.RNNBase):  # every weight once per time step
        weights = sum(p.numel() for name, p in module.named_parameters() if name.startswith("weight"))
        steps = out.shape[1] if module.batch_first else out.shape[0]
        return 2 * weights * int(steps) * (out.shape[0] if module.batch_first else out.shape[1])
    return 0


def forward_flops(spec: WorkerSpec) -> int:
    """FLOPs of one example's forward pass: its linear, convolutional and recurrent layers counted
    from their output shapes on one zero input (a few milliseconds; torch's FlopCounterMode costs
    about 2 s at its first use), at least 2 per parameter."""
    with torch.random.fork_rng(devices=[]):  # the run's own streams are not touched
        model = spec.model_factory(tuple(spec.input_shape), int(spec.num_classes))
    params = sum(p.numel() for p in model.parameters())
    counted = [0]

    def hook(module: torch.nn.Module, _inputs: Any, out: Any) -> None:
        counted[0] += _layer_flops(module, out)

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad():
            model(torch.zeros((1, *spec.input_shape)))  # as fedsim.models.build_model probes it
    except Exception:  # noqa: BLE001 - a model this probe cannot feed: count its parameters
        counted[0] = 0
    finally:
        for h in handles:
            h.remove()
    return max(counted[0], 2 * params)


def estimate(spec: WorkerSpec, data: FederatedData, *, rounds: int, nodes_per_round: int | None) -> Estimate:
    """The training time of ``rounds`` rounds of ``nodes_per_round`` average nodes on one core."""
    sizes = [len(ix) for ix in data.partition.train]
    per_round = min(int(nodes_per_round or len(sizes)), len(sizes)) if sizes else 0
    mean_work = sum(spec.client_update.work(n) for n in sizes) / max(len(sizes), 1)
    examples = per_round * mean_work
    flops = forward_flops(spec)
    seconds = rounds * (examples * TRAIN_FACTOR * flops / FLOPS_PER_S + per_round * NODE_OVERHEAD_S)
    return Estimate(seconds, flops, examples, rounds)


def AutoExecutor(  # noqa: N802 - a factory that stands where an executor class stands in conf/cluster
    spec: WorkerSpec,
    data: FederatedData,
    *,
    ray_startup_s: float = 15.0,
    rounds: int = 1,
    nodes_per_round: int | None = None,
    address: str | None = None,
    num_cpus: int | None = None,
    vectorize: bool = False,
    cohort: int | None = None,
    device: str | None = "auto",
    retain_memory: bool = True,
    **ray_options: Any,
) -> Any:
    """`RayExecutor` (with ``address``, ``num_cpus`` and ``ray_options``) when a cluster is named,
    or when spreading the estimated training over the CPUs Ray would get (``num_cpus``, else every
    core; with a GPU device, the GPUs) saves more than Ray's start-up (``ray_startup_s``) and
    per-round cost; else `LocalExecutor`. The executor's ``description`` says which and why."""
    from fedsim.errors import ConfigError

    if ray_startup_s is None or float(ray_startup_s) < 0:
        raise ConfigError(f"cluster.ray_startup_s={ray_startup_s} must be >= 0 (seconds)")
    common: dict[str, Any] = {
        "vectorize": vectorize,
        "cohort": cohort,
        "device": device,
        "retain_memory": retain_memory,
    }
    if not address:
        guess = estimate(spec, data, rounds=int(rounds), nodes_per_round=nodes_per_round)
        workers = int(num_cpus or os.cpu_count() or 1)
        if str(device or "auto").lower() != "cpu" and torch.cuda.is_available():
            workers = torch.cuda.device_count()  # an actor per GPU against one process on one GPU
        use_ray, why = guess.ray_pays(workers, float(ray_startup_s))
        if not use_ray:
            executor: Any = LocalExecutor(spec, data, **common)
            executor.description += f" [cluster=auto: {why}]"
            return executor
    else:
        why = f"cluster.address={address}"
    from fedsim.execution.ray_executor import RayExecutor

    executor = RayExecutor(spec, data, address=address, num_cpus=num_cpus, **common, **ray_options)
    executor.description += f" [cluster=auto: {why}]"
    return executor
