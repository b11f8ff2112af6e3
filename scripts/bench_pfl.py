"""pfl-research's simulation of scripts/bench.py's workloads: the other side of fedsim's comparison.

pfl (Apple's pfl-research, https://github.com/apple/pfl-research, arXiv 2404.06430) is an
optional benchmark dependency. It runs here with these settings:

- pfl 0.6.0 with its PyTorch backend, ``torchrun --standalone --nproc_per_node=N`` (``--procs``,
  default 2), one thread per process (``torch.set_num_threads(1)``, ``OMP_NUM_THREADS=1``), CPU,
  gloo (``CUDA_VISIBLE_DEVICES=''``, ``PFL_PYTORCH_DEVICE=cpu``);
- pfl's ``FederatedDataset`` with ``user_id_to_weight`` = examples per node: with more than one
  process this is pfl's sorted cohort sampler, its documented load balancing (each cohort sorted by
  weight, largest first, each node to the least-loaded process);
- ``FederatedAveraging`` on a ``SimulatedBackend`` with ``WeightByDatapoints`` (FedAvg weighted by
  examples), central ``torch.optim.SGD(lr=1.0)`` (fedsim's ``server_opt``), local
  ``torch.optim.SGD`` with ``strategy.client``'s lr, batch size and epochs;
- everything else is fedsim's own code, composed exactly as scripts/bench.py composes it (its
  ``overrides`` and ``compose``): the Fashion-MNIST arrays (synthetic ones of the same shape when
  the files are absent), the partition (fedsim's partitioner with (seed, "partition")), the node
  ids of every round (fedsim's participation model with (seed, "sample", t)), the model
  (``conf/model/cnn.yaml`` for W1, ``mlp.yaml`` for W2) and its initial weights (seed, "init").
  pfl's user sampler replays fedsim's node ids round by round, so both sides train the very same
  node-rounds: W1 = 100 nodes, Dirichlet 0.5, 10 per round, CNN; W2 = 10,000 nodes, Dirichlet 100,
  1,000 per round, MLP; both 1 epoch, batch 32, lr 0.05, no evaluation.

It times the rounds after ``--warmup`` (rank 0, from the end of round ``warmup - 1`` to the end of
the last round, pfl's ``after_central_iteration``), counts the samples with pfl's own
``number of data points`` metric, checks that count against fedsim's (``client.work`` summed over
the same node-rounds: what scripts/bench.py reports as ``sim_samples`` for the same ``--rounds``
and ``--warmup``), and prints one JSON object (also written to ``--json``). Exit 1 when the counts
differ, 2 when pfl is missing.

Install (pfl pins ``packaging<26``, ``wheel<0.46``, ``multiprocess``, ``dp-accounting`` and
``torch>=2.0.1,<3``: it keeps torch 2.14.1 but would downgrade fedsim's ``packaging``, so give it a
venv of its own and point ``--python`` at it; the script re-executes itself with that python):

    python3 -m venv /tmp/pflvenv
    /tmp/pflvenv/bin/pip install torch==2.14.1 'pfl[pytorch]==0.6.0'
    /tmp/pflvenv/bin/pip install -e .          # fedsim's own dependencies (hydra, numpy, ...)
    python scripts/bench_pfl.py --python /tmp/pflvenv/bin/python --workload w1 --rounds 30 --warmup 3

    python scripts/bench_pfl.py [--workload w1|w2] [--rounds 30] [--warmup 3] [--procs 2]
                                [--python PATH] [--json PATH] [-- extra fedsim overrides]

Side by side, three interleaved runs each (same rounds, warmup and cores; ``sim_samples`` of
bench.py must equal ``samples`` here; fedsim / pfl = ``sim_samples_per_s / samples_per_s``):

    for i in 1 2 3; do
      .venv/bin/python scripts/bench.py --workload w1 --rounds 30 --warmup 3 --cpus 2 --json /tmp/fedsim_w1_$i.json
      .venv/bin/python scripts/bench_pfl.py --python /tmp/pflvenv/bin/python --workload w1 --rounds 30 \\
          --warmup 3 --procs 2 --json /tmp/pfl_w1_$i.json
    done                                   # then the same with --workload w2

What differs between the two runs and could not be removed:

- Processes. pfl is SPMD: N identical torchrun processes each train their share of every cohort,
  sum it, all-reduce the sum (and the metrics, as float32) over gloo, and each applies the central
  step itself. fedsim has a driver (sampling, aggregation, the server step) and one Ray actor per
  core, with parameters and results through Ray's object store, and Ray's own processes (raylet,
  GCS, ...) share the cores. pfl's sorted sampler adds a helper process per rank (``multiprocess``)
  that prefetches user ids; it idles once its cache is full.
- Startup. Neither window holds it: Ray's start and the actors' data load on fedsim's side;
  torchrun's rendezvous, gloo, every rank's data load and the sampler process on pfl's.
- Load balancing. Both give each node to the least-loaded worker, largest first, by examples
  (fedsim's ``assign_lpt``, pfl's sorted sampler); ties break differently (fedsim by node id, pfl
  by sampling order), so the per-process shares can differ by a node.
- Sampling. pfl's own samplers are not used: a replay sampler hands it fedsim's ids in order.
- Data structures. pfl builds a ``Dataset`` per node-round: the node's rows gathered once into
  contiguous tensors, then sliced into minibatches; fedsim gathers each minibatch by index from
  the node's rows. Its updates are dicts of per-parameter tensors (``MappedVectorStatistics``),
  fedsim's are rows of a flat parameter vector. pfl builds a new local optimizer per node and
  calls the model's ``loss`` method (cross-entropy, as fedsim's).
- Batch order. pfl slices a user's data in stored order and never reshuffles it; here each node's
  rows are permuted once when its dataset is built (per node-round, the one-epoch equivalent of
  fedsim's per-epoch permutation; with ``epochs > 1`` pfl would repeat that order). The permutations
  come from different streams and the sums run in a different order, so the models are not
  bit-identical: the work is the same, the numbers are not.
- Evaluation. fedsim's ``eval_every=0`` evaluates once after the last round, and bench.py takes
  it out of its window. pfl's central evaluation is a callback, not added here; pfl also evaluates
  every user before and after local training on round 0 (``iteration % evaluation_frequency == 0``),
  which this script turns off (every round has ``do_evaluation=False``). Neither window evaluates.
- Timing. pfl's window is rank 0's, after its all-reduce of the round (so after the slowest rank);
  fedsim's is the driver's ``on_round_end``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

PFL_VERSION = "0.6.0"
INSTALL = f"pip install 'pfl[pytorch]=={PFL_VERSION}'"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", choices=["w1", "w2"], default="w1")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--procs", type=int, default=2, help="pfl worker processes (torchrun --nproc_per_node)")
    ap.add_argument(
        "--retain-memory",
        action="store_true",
        help="pfl's processes keep freed memory as fedsim's workers do (cluster.retain_memory; glibc)",
    )
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    ap.add_argument("--python", default=None, help="run under this python (a venv that has pfl; see the docstring)")
    ap.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--_result", default=None, help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    if args.rounds <= args.warmup or args.warmup < 0:
        ap.error("need 0 <= --warmup < --rounds")
    if args.procs < 1:
        ap.error("--procs must be >= 1")
    return args


def forward(args: argparse.Namespace) -> list[str]:
    """The options to run this script again with (without ``--python``, ``--json`` and the worker ones)."""
    out = ["--workload", args.workload, "--rounds", str(args.rounds), "--warmup", str(args.warmup)]
    out += ["--procs", str(args.procs)] + (["--retain-memory"] if args.retain_memory else [])
    return [*out, "--", *args.overrides] if args.overrides else out


def fail(message: str, code: int = 2) -> None:
    print(f"bench_pfl: {message}", file=sys.stderr)
    sys.exit(code)


def launch(args: argparse.Namespace) -> None:
    """Check the dependencies, start the workers under torchrun, print (and write) rank 0's figures."""
    if args.python:
        python = args.python
        if not os.access(python, os.X_OK):
            fail(f"--python {python} is not an executable")
        fwd = forward(args)
        if args.json:
            fwd = ["--json", str(args.json.resolve()), *fwd]
        os.execv(python, [python, str(Path(__file__).resolve()), *fwd])
    if importlib.util.find_spec("pfl") is None:
        fail(f"pfl is not installed for {sys.executable}: {INSTALL} (in a venv of its own, then --python; see --help)")
    missing = [m for m in ("torch", "hydra", "omegaconf", "numpy") if importlib.util.find_spec(m) is None]
    if missing:
        fail(f"fedsim's dependencies ({', '.join(missing)}) are missing for {sys.executable}: pip install -e {ROOT}")
    from importlib.metadata import version

    if version("pfl") != PFL_VERSION:
        print(
            f"bench_pfl: pfl {version('pfl')} is installed, the comparison was set up with {PFL_VERSION}",
            file=sys.stderr,
        )

    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "PFL_PYTORCH_DEVICE": "cpu",
        "PYTHONUNBUFFERED": "1",
    }
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_pfl_") as tmp:
        result = Path(tmp) / "result.json"
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nnodes=1",
            f"--nproc_per_node={args.procs}",
            str(Path(__file__).resolve()),
            "--_worker",
            "--_result",
            str(result),
            *forward(args),
        ]
        rc = subprocess.run(cmd, env=env, cwd=ROOT).returncode
        if rc != 0 or not result.exists():
            fail(f"the pfl workers failed (torchrun exit {rc})", 1)
        out = json.loads(result.read_text())
    out["total_wall_s"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    if not out["samples_match"]:
        fail(f"pfl trained {out['samples']} samples, fedsim's sim_samples would be {out['sim_samples']}", 1)


def worker(args: argparse.Namespace) -> None:
    """One torchrun rank: fedsim's data, partition, node ids and model; pfl's simulation loop."""
    import dataclasses

    import numpy as np
    import torch
    import torch.nn.functional as F
    from bench import compose, overrides  # scripts/bench.py: the very same workload
    from hydra.utils import instantiate

    from fedsim.data.base import FederatedData
    from fedsim.execution.malloc import retain_freed_memory
    from fedsim.models import build_model
    from fedsim.seeding import np_rng, torch_seed

    torch.set_num_threads(1)
    retained = retain_freed_memory() if args.retain_memory else False
    bench_args = argparse.Namespace(
        workload=args.workload, rounds=args.rounds, cpus=args.procs, overrides=list(args.overrides)
    )
    ov = overrides(bench_args)
    cfg = compose(ov)
    seed, num_nodes, per_round = int(cfg.seed), int(cfg.num_nodes), int(cfg.nodes_per_round)
    if not (cfg.strategy.get("weighted", False) and float(cfg.strategy.server_opt.lr) == 1.0):
        raise SystemExit("bench_pfl: the workload must be example-weighted FedAvg with server lr 1.0")
    if float(cfg.strategy.server_opt.get("momentum", 0.0)) or float(cfg.strategy.client.get("momentum", 0.0)):
        raise SystemExit("bench_pfl: momentum is not mirrored on the pfl side")

    ds = instantiate(cfg.dataset)
    part = instantiate(cfg.partition)(ds.y_train, ds.y_test, num_nodes, np_rng(seed, "partition"))
    data = FederatedData(ds, part)
    participation = instantiate(cfg.participation).bind(
        num_nodes=num_nodes, seed=seed, label_counts=data.label_counts("train")
    )
    rounds = [
        [int(i) for i in participation(t, num_nodes, per_round, np_rng(seed, "sample", t))] for t in range(args.rounds)
    ]
    if any(len(ids) != len(rounds[0]) for ids in rounds):
        raise SystemExit("bench_pfl: pfl needs the same cohort size every round (participation=uniform)")
    cohort = len(rounds[0])
    client = instantiate(cfg.strategy.client)
    sizes = [int(s) for s in part.sizes()]
    sim_samples = sum(client.work(sizes[n]) for ids in rounds[args.warmup :] for n in ids)
    net = build_model(instantiate(cfg.model), ds.input_shape, ds.num_classes, seed=seed)

    # pfl from here on (importing pfl.model.pytorch joins the torchrun process group).
    np.random.seed(seed)  # pfl's own streams must agree across ranks
    torch.manual_seed(seed)
    from pfl.aggregate.base import get_num_datapoints_weight_name, get_num_devices_weight_name
    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.aggregate.weighting import WeightByDatapoints
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.callback.base import TrainingProcessCallback
    from pfl.common_types import Population
    from pfl.data.dataset import Dataset
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.hyperparam import NNTrainHyperParams
    from pfl.internal.ops.selector import get_default_framework_module as get_ops
    from pfl.metrics import Weighted
    from pfl.model.pytorch import PyTorchModel

    rank, world = get_ops().distributed.global_rank, get_ops().distributed.world_size

    def _value(metric) -> float:  # a count: summed over users (and ranks), weight 1 each
        return float(metric.weighted_value if isinstance(metric, Weighted) else metric)

    class Module(torch.nn.Module):
        """fedsim's network with the ``loss`` and ``metrics`` methods pfl's PyTorchModel calls."""

        def __init__(self, net: torch.nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(self.net(x), y)

        @torch.no_grad()
        def metrics(self, x: torch.Tensor, y: torch.Tensor) -> dict:
            return {"loss": Weighted(F.cross_entropy(self.net(x), y, reduction="sum").item(), len(y))}

    x, y = torch.from_numpy(ds.x_train), torch.from_numpy(ds.y_train)
    index = [torch.from_numpy(ix) for ix in part.train]
    gen = torch.Generator().manual_seed(torch_seed(seed, "pfl-shuffle", rank))

    def make_dataset(node: int) -> Dataset:
        ix = index[node][torch.randperm(len(index[node]), generator=gen)]  # pfl never reshuffles
        return Dataset(raw_data=[x[ix], y[ix]], user_id=node)

    flat = [n for ids in rounds for n in ids]  # replayed in order: cohort t is round t's ids
    position = iter(range(10**18))

    def replay() -> int:
        return flat[next(position) % len(flat)]  # the sampler prefetches past the last round

    train_data = FederatedDataset(make_dataset, replay, user_id_to_weight=dict(enumerate(sizes)))

    class FedAvgNoEval(FederatedAveraging):
        """pfl's FedAvg, without its local evaluation of every user on round 0."""

        def get_next_central_contexts(self, *a, **kw):
            contexts, model, metrics = super().get_next_central_contexts(*a, **kw)
            if contexts is not None:
                contexts = tuple(dataclasses.replace(c, do_evaluation=False) for c in contexts)
            return contexts, model, metrics

    datapoints, devices = (
        get_num_datapoints_weight_name(Population.TRAIN),
        get_num_devices_weight_name(Population.TRAIN),
    )

    class Clock(TrainingProcessCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []
            self.samples: list[int] = []
            self.devices: list[int] = []

        def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
            self.ends.append(time.perf_counter())
            self.samples.append(round(_value(aggregate_metrics[datapoints])))
            self.devices.append(round(_value(aggregate_metrics[devices])))
            return False, type(aggregate_metrics)()

    module = Module(net)
    model = PyTorchModel(
        model=module,
        local_optimizer_create=torch.optim.SGD,
        central_optimizer=torch.optim.SGD(module.parameters(), lr=1.0),
    )
    backend = SimulatedBackend(training_data=train_data, val_data=None, postprocessors=[WeightByDatapoints()])
    algorithm_params = NNAlgorithmParams(
        central_num_iterations=args.rounds, evaluation_frequency=1, train_cohort_size=cohort, val_cohort_size=None
    )
    train_params = NNTrainHyperParams(
        local_num_epochs=client.epochs, local_learning_rate=client.lr, local_batch_size=client.batch_size
    )
    clock = Clock()
    t_start = time.perf_counter()
    FedAvgNoEval().run(
        algorithm_params=algorithm_params,
        backend=backend,
        model=model,
        model_train_params=train_params,
        callbacks=[clock],
        send_metrics_to_platform=False,
    )
    if rank != 0:
        return
    t_begin = clock.ends[args.warmup - 1] if args.warmup > 0 else t_start
    wall = clock.ends[-1] - t_begin
    samples = sum(clock.samples[args.warmup :])
    from importlib.metadata import version

    out = {
        "workload": args.workload,
        "overrides": list(args.overrides),
        "dataset": "fashion_mnist" if "dataset=fashion_mnist" in ov else "synthetic[1,28,28]",
        "framework": f"pfl {version('pfl')}, torch {torch.__version__}",
        "procs": world,
        "retain_memory": retained,
        "sampler": "sorted (user_id_to_weight = examples)" if world > 1 else "plain (one process)",
        "steady_rounds": args.rounds - args.warmup,
        "nodes_per_round": cohort,
        "samples_per_s": round(samples / wall, 1),
        "samples": samples,
        "sim_samples": sim_samples,
        "samples_match": samples == sim_samples and all(d == cohort for d in clock.devices),
        "wall_s": round(wall, 3),
        "run_s": round(clock.ends[-1] - t_start, 3),
    }
    Path(args._result).write_text(json.dumps(out))


def main() -> None:
    args = parse()
    if args._worker:
        worker(args)
    else:
        launch(args)


if __name__ == "__main__":
    main()
