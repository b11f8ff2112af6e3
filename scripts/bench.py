"""Simulator throughput on a reference workload, against bare single-threaded processes.

Workloads (``--workload``), both Fashion-MNIST (synthetic images of the same shape when the files
are absent), 1 local epoch, batch 32, SGD lr 0.05, evaluation off:

- ``w1`` (cross-silo, the default): 100 nodes, Dirichlet alpha 0.5 (~600 examples each), 10 per
  round, CNN conv(1->16,k5)-relu-pool-conv(16->32,k5)-relu-pool-fc(512->128)-relu-fc(128->10);
- ``w2`` (cross-device): 10,000 nodes, Dirichlet alpha 100 (~6 examples each), 1,000 per round,
  MLP 784-128-10 (101,770 parameters);
- ``w5`` (Shakespeare cross-device, LEAF's task): the natural partition of the cached Shakespeare
  set (``python -m fedsim.data.shakespeare`` first), a seeded fifth of the roles (about 230), split
  0.8/0.2 in time, 100 roles per round, LEAF's LSTM (819,920 parameters), batch 10, SGD lr 0.8,
  and 5 minibatches per role and round (``strategy.client.steps=5``: one epoch of a role is 357
  minibatches on average, about half an hour of one core for 100 roles).

Two more, on CIFAR-10 (CIFAR-shaped synthetic images, 3x32x32 and 10 classes, when its files are
absent), each against ONE bare process on the same device (``--device cpu|cuda|cuda:N``, used for
fedsim's ``cluster.device`` and ``server.device`` and for the bare loop), ``cluster=local``:

- ``w3`` (pfl-research's cross-device CIFAR-10 benchmark, arXiv 2404.06430): 1,000 nodes x 50
  images (IID), 50 per round, 1 local epoch, batch 10, SGD lr 0.1, their small CNN
  (``model=pfl_cnn``, 1,626,442 parameters); also with ``cluster.vectorize=true``;
- ``w4`` (cross-silo): ResNet-18 with GroupNorm (``model=resnet18``), 10 nodes x 5,000 images
  (IID), all 10 per round, 1 local epoch, batch 32, SGD lr 0.05. ``--examples N`` scales the
  nodes down to N images each (the test set to N images), for a CPU; the output says so.

Their bare loop: the same model, data, initial parameters and node-rounds (the same number of
SGD steps), plain PyTorch (torch.optim.SGD, cross-entropy, torch's default settings) in a fresh
process with one torch thread, the training arrays uploaded to the device once, minibatches
index-selected there; one node-round of warm-up outside the timed window, the device
synchronised at both ends of it. On a GPU the bare loop runs twice: with torch's defaults
(``ratio``) and under the kernel settings fedsim trains with (`fedsim.devices.deterministic`: no
TF32, deterministic algorithms; ``ratio_fedsim_settings``), which tells the cost of those settings
from the simulator's own.

It measures, in one run:
1. the simulator (Ray executor, one actor per core, evaluation off): samples/s over the rounds
   after ``--warmup``; the timed window holds training rounds only: the one evaluation (after the
   last round) is taken out of it and reported on its own (``eval_s``, test examples/s);
2. the same local SGD work, i.e. the very node-rounds the simulator ran in those rounds, done by
   one bare single-threaded process per core (plain PyTorch loop, no Ray, no simulator), each
   process taking a balanced share, all started together: total samples / slowest process time.
It prints both and their ratio (target >= 0.9). The bare processes keep glibc's and torch's
defaults, as a researcher's own loop would. Two more baselines run in the same kind of processes:
the plain loop with freed memory retained as fedsim's workers retain it (``ratio_retained``; see
`fedsim.execution.malloc`), and fedsim's own LocalSGD inner loop with the run's
``cluster.retain_memory`` (``ratio_same_loop``: what the simulator around the loop, i.e. worker,
executor, Ray and server, costs).

    python scripts/bench.py [--workload w1|w2] [--rounds 30] [--warmup 3] [--cpus N] [-- extra overrides]
    python scripts/bench.py --workload w2 --rounds 12 --warmup 2 cluster.vectorize=true
    python scripts/bench.py --workload w5 --rounds 4 --warmup 1
    python scripts/bench.py --workload w3 --rounds 6 --warmup 1 [--device cuda] [cluster.vectorize=true]
    python scripts/bench.py --workload w4 --rounds 2 --warmup 1 --examples 50   # scaled, for a CPU
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path
from queue import Empty

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
WORKLOAD = [
    "model=cnn",
    "partition=dirichlet",
    "partition.alpha=0.5",
    "num_nodes=100",
    "nodes_per_round=10",
    "strategy.client.epochs=1",
    "strategy.client.batch_size=32",
    "strategy.client.lr=0.05",
    "eval_every=0",
    "cluster=ray",
    "logger=jsonl",
]
SYNTHETIC = ["dataset=synthetic", "dataset.shape=[1,28,28]", "dataset.n_train=60000", "dataset.n_test=10000"]
W2 = ["model=mlp", "partition.alpha=100", "num_nodes=10000", "nodes_per_round=1000"]
W5 = [
    "dataset=shakespeare",
    "partition=natural",
    "partition.fraction=0.2",
    "partition.train_fraction=0.8",
    "model=lstm",
    "num_nodes=229",
    "nodes_per_round=100",
    "strategy.client.epochs=1",
    "strategy.client.steps=5",
    "strategy.client.batch_size=10",
    "strategy.client.lr=0.8",
    "eval_every=0",
    "cluster=ray",
    "logger=jsonl",
]
W3 = [
    "model=pfl_cnn",
    "partition=iid",
    "num_nodes=1000",
    "nodes_per_round=50",
    "strategy.client.epochs=1",
    "strategy.client.batch_size=10",
    "strategy.client.lr=0.1",
    "eval_every=0",
    "cluster=local",
    "logger=jsonl",
]
W4 = [
    "model=resnet18",
    "partition=iid",
    "num_nodes=10",
    "nodes_per_round=10",
    "strategy.client.epochs=1",
    "strategy.client.batch_size=32",
    "strategy.client.lr=0.05",
    "eval_every=0",
    "cluster=local",
    "logger=jsonl",
]
W4_EXAMPLES = 5000  # images per node at full size
SINGLE = ("w3", "w4")  # workloads measured against one bare process on --device


def have_cifar10() -> bool:
    from fedsim.data.sources import _CIFAR_DIR, _CIFAR_TEST, _CIFAR_TRAIN, data_root

    base = data_root(None)
    return any(all((d / n).is_file() for n in _CIFAR_TRAIN + _CIFAR_TEST) for d in (base / _CIFAR_DIR, base))


def cifar_overrides(args: argparse.Namespace) -> list[str]:
    """W3 / W4: CIFAR-10 when its files are there (and W4 runs at full size), else synthetic
    images of its shape: as many training images as the workload's nodes hold."""
    if args.workload == "w3":
        n_train, n_test, workload = 50_000, 10_000, W3
    else:
        n_train, n_test, workload = 10 * args.examples, min(10_000, args.examples), W4
    if have_cifar10() and n_train == 50_000:
        data = ["dataset=cifar10", "dataset.download=false"]
    else:
        data = [
            "dataset=synthetic",
            "dataset.shape=[3,32,32]",
            f"dataset.n_train={n_train}",
            f"dataset.n_test={n_test}",
        ]
    return [*data, *workload, f"rounds={args.rounds}"]


def device_overrides(ov: list[str], device: str) -> list[str]:
    """``cluster.device`` and ``server.device`` set to ``device``; on a CPU, nothing where this
    checkout's config has no such keys (the run is then on the CPU anyway)."""
    cfg = compose(ov)
    missing = [f"{group}.device" for group in ("cluster", "server") if "device" not in cfg[group]]
    if missing and device != "cpu":
        raise SystemExit(f"bench.py: --device {device}, but this checkout's config has no {', '.join(missing)}")
    if missing:
        print(f"note: no {', '.join(missing)} in this checkout's config; the run is on the CPU", flush=True)
        return []
    return [f"cluster.device={device}", f"server.device={device}"]


def overrides(args: argparse.Namespace) -> list[str]:
    from fedsim.data.sources import _find_idx, _idx_dirs, data_root

    have_fmnist = any(
        _find_idx(d, "train-images-idx3-ubyte") for d in _idx_dirs(data_root(None), "FashionMNIST", (str(FMNIST_DIR),))
    )
    data = ["dataset=fashion_mnist", "dataset.download=false"] if have_fmnist else SYNTHETIC
    workload = [*WORKLOAD, *(W2 if args.workload == "w2" else [])]
    if args.workload == "w5":
        data, workload = [], W5
    if args.workload in SINGLE:
        ov = [*cifar_overrides(args), *args.overrides]
        return [*ov, *device_overrides(ov, args.device)]
    return [*data, *workload, f"rounds={args.rounds}", f"cluster.num_cpus={args.cpus}", *args.overrides]


def compose(ov: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=ov)


class Timer:
    """Callback recording the end time and the sampled nodes of every round (after the device's
    queued kernels, where ``device`` is a GPU)."""

    def __init__(self, device=None) -> None:
        self.device = device
        self.ends: list[float] = []
        self.samples: list[int] = []
        self.eval_s: list[float] = []

    def on_run_start(self, meta) -> None:
        pass

    def on_warning(self, round_: int, message: str) -> None:
        pass

    def on_round_end(self, round_: int, metrics: dict) -> None:
        if self.device is not None:
            from fedsim.devices import synchronize

            synchronize(self.device)
        self.ends.append(time.perf_counter())
        self.samples.append(int(metrics["train/samples"]))
        self.eval_s.append(float(metrics.get("time/eval_s", 0.0)))

    def on_run_end(self, summary: dict) -> None:
        pass


def time_rounds(executor) -> list[tuple[float, list[float]]]:
    """Wraps ``executor.run_round`` to record, per round, its wall time and each worker's busy
    time (``RoundResult.busy_s``: the worker's own training of its share)."""
    rounds: list[tuple[float, list[float]]] = []
    run_round = executor.run_round

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        result = run_round(*args, **kwargs)
        rounds.append((time.perf_counter() - t0, list(result.busy_s)))
        return result

    executor.run_round = timed
    return rounds


def split_window(rounds: list[tuple[float, list[float]]], window: float, samples: int) -> dict:
    """Where the timed window goes: the workers' training at their own pace (``worker_samples_per_s``:
    samples per second of busy time, per worker), workers waiting for the slowest one of the
    round (``share_imbalance``: 1 - mean/max busy), the executor's round trip around the slowest
    worker (``share_round_trip``: run_round - max busy), and the driver between rounds
    (``share_driver``: the window - run_round). Shares are of the window."""
    busy = sum(sum(b) for _, b in rounds)
    slowest = sum(max(b) for _, b in rounds)
    mean = sum(sum(b) / len(b) for _, b in rounds)
    executor = sum(t for t, _ in rounds)
    return {
        "worker_samples_per_s": round(samples / busy, 1) if busy else None,
        "share_imbalance": round((slowest - mean) / window, 4),
        "share_round_trip": round((executor - slowest) / window, 4),
        "share_driver": round((window - executor) / window, 4),
    }


def bare_worker(
    cfg_overrides: list[str], nodes: list[int], start_params, loop: str, retain: bool, barrier, queue
) -> None:
    """One bare process over its share of node-rounds. ``loop="torch"``: a plain PyTorch loop
    (torch.optim.SGD); ``loop="fedsim"``: fedsim's own LocalSGD inner loop called directly, with
    no worker, executor, Ray or server around it (isolates the simulator's overhead). ``retain``:
    the process keeps freed memory as fedsim's workers do (`fedsim.execution.malloc`)."""
    import torch
    import torch.nn.functional as F
    from hydra.utils import instantiate

    from fedsim.execution.malloc import retain_freed_memory
    from fedsim.seeding import np_rng

    torch.set_num_threads(1)
    if retain:
        retain_freed_memory()
    cfg = compose(cfg_overrides)
    ds = instantiate(cfg.dataset)
    partitioner = instantiate(cfg.partition)
    if getattr(partitioner, "takes_dataset", False):  # a natural partition (w5)
        ds, part = partitioner.split(ds, int(cfg.num_nodes))
    else:
        part = partitioner(ds.y_train, ds.y_test, int(cfg.num_nodes), np_rng(int(cfg.seed), "partition"))
    model = instantiate(cfg.model)(ds.input_shape, ds.num_classes)
    x, y = torch.from_numpy(ds.x_train), torch.from_numpy(ds.y_train)
    index = [torch.from_numpy(ix) for ix in part.train]
    if loop == "fedsim":
        from fedsim.params import FlatModel
        from fedsim.types import ClientContext, NodeData

        flat, update = FlatModel(model), instantiate(cfg.strategy.client)
        barrier.wait()
        t0 = time.perf_counter()
        samples = 0
        for r, node in enumerate(nodes):
            flat.load(start_params)
            data = NodeData(x[index[node]], y[index[node]])
            update(flat, start_params, data, None, ClientContext(r, node, 0, ds.num_classes))
            samples += update.work(len(data))
        queue.put((samples, time.perf_counter() - t0))
        return
    client = cfg.strategy.client
    lr, bs, epochs = float(client.lr), int(client.batch_size), int(client.epochs)
    steps = None if client.get("steps") is None else int(client.steps)
    gen = torch.Generator().manual_seed(0)
    barrier.wait()
    t0 = time.perf_counter()
    samples = 0
    for node in nodes:
        torch.nn.utils.vector_to_parameters(start_params, model.parameters())
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        xs, ys = x[index[node]], y[index[node]]
        if steps is None:
            for _ in range(epochs):
                perm = torch.randperm(len(ys), generator=gen)
                for i in range(0, len(ys), bs):
                    b = perm[i : i + bs]
                    opt.zero_grad()
                    F.cross_entropy(model(xs[b]), ys[b]).backward()
                    opt.step()
            samples += epochs * len(ys)
        else:  # exactly `steps` minibatches, cycling passes (LocalSGD's steps)
            done = 0
            while done < steps:
                perm = torch.randperm(len(ys), generator=gen)
                for i in range(0, len(ys), bs):
                    if done == steps:
                        break
                    b = perm[i : i + bs]
                    opt.zero_grad()
                    F.cross_entropy(model(xs[b]), ys[b]).backward()
                    opt.step()
                    done += 1
            samples += steps * min(bs, len(ys))
        _ = start_params - torch.nn.utils.parameters_to_vector(model.parameters())
    queue.put((samples, time.perf_counter() - t0))


def bare_single(job: dict, queue) -> None:
    """W3 / W4's baseline: the node-rounds ``job["nodes"]`` one after another in this one
    process, a plain PyTorch loop on ``job["device"]`` with one thread, the training arrays (the
    simulator's own, from ``job["arrays"]``/x.npy, y.npy) uploaded to the device once and
    minibatches index-selected there (``job["index"]``: each node's rows). torch's default
    settings, or with ``job["fedsim_settings"]`` the ones fedsim trains under
    (`fedsim.devices.deterministic`: no TF32, deterministic kernels). The first node-round is
    run once more before the timed window (kernels, allocator). Puts (samples, seconds), or the
    error's text."""
    try:
        import numpy as np
        import torch
        import torch.nn.functional as F
        from hydra.utils import instantiate

        from fedsim.devices import deterministic, resolve, synchronize

        torch.set_num_threads(1)
        device = resolve(job["device"])
        if job["fedsim_settings"]:
            deterministic(device)
        cfg = compose(job["overrides"])
        x = torch.from_numpy(np.load(Path(job["arrays"]) / "x.npy")).to(device)
        y = torch.from_numpy(np.load(Path(job["arrays"]) / "y.npy")).to(device)
        model = instantiate(cfg.model)(tuple(x.shape[1:]), job["num_classes"]).to(device)
        ix_of = {n: torch.from_numpy(ix).to(device) for n, ix in job["index"].items()}
        start = job["start"].to(device)
        client = cfg.strategy.client
        lr, bs, epochs = float(client.lr), int(client.batch_size), int(client.epochs)
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        gen = torch.Generator().manual_seed(0)
        total = torch.zeros_like(start)  # the sum of the node-rounds' updates (FedAvg's numerator)

        def node_round(node: int) -> int:
            torch.nn.utils.vector_to_parameters(start, model.parameters())
            ix = ix_of[node]
            for _ in range(epochs):
                perm = torch.randperm(len(ix), generator=gen).to(device)
                for i in range(0, len(ix), bs):
                    b = ix[perm[i : i + bs]]
                    opt.zero_grad()
                    F.cross_entropy(model(x.index_select(0, b)), y.index_select(0, b)).backward()
                    opt.step()
            total.add_(start - torch.nn.utils.parameters_to_vector(model.parameters()))
            return epochs * len(ix)

        node_round(job["nodes"][0])
        synchronize(device)
        t0 = time.perf_counter()
        samples = sum(node_round(node) for node in job["nodes"])
        synchronize(device)
        queue.put((samples, time.perf_counter() - t0))
    except Exception as exc:  # reported by the parent, which goes on
        queue.put(f"{type(exc).__name__}: {exc}".splitlines()[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", choices=["w1", "w2", "w3", "w4", "w5"], default="w1")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--device", default="cpu", help="w3/w4: cpu, cuda or cuda:N (fedsim's run and the bare loop)")
    ap.add_argument("--examples", type=int, default=W4_EXAMPLES, help="w4: images per node (scaled down below 5,000)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.rounds <= args.warmup:
        ap.error("--rounds must exceed --warmup")
    single = args.workload in SINGLE
    if not single and args.device != "cpu":
        ap.error("--device is for w3 and w4 (w1, w2 and w5 run on Ray actors on the CPU)")
    if args.examples != W4_EXAMPLES and args.workload != "w4":
        ap.error("--examples is for w4")
    if not 1 <= args.examples <= W4_EXAMPLES:
        ap.error(f"--examples must be in 1 ... {W4_EXAMPLES}")

    import numpy as np
    import torch

    from fedsim.devices import name_of, resolve
    from fedsim.errors import ConfigError
    from fedsim.execution.worker import NodeTask, assign_lpt
    from fedsim.seeding import np_rng
    from fedsim.simulation import build, set_driver_threads

    try:
        device = resolve(args.device, key="--device")
    except ConfigError as exc:
        ap.error(str(exc))
    scaled = args.workload == "w4" and args.examples < W4_EXAMPLES
    if scaled:
        print(f"W4 SCALED: {args.examples} images per node (full size {W4_EXAMPLES:,}), test set {args.examples}")
    ov = overrides(args)
    print("workload:", " ".join(ov), flush=True)
    set_driver_threads(1)
    sim = build(compose(ov))
    timer = Timer(device if device.type == "cuda" else None)
    rounds = time_rounds(sim.executor)
    t_start = time.perf_counter()
    try:
        sim.run([timer])
    finally:
        sim.close()
    steady = slice(args.warmup, args.rounds)
    t_begin = timer.ends[args.warmup - 1] if args.warmup > 0 else t_start
    eval_s = sum(timer.eval_s[steady])  # the evaluation after the last round: reported on its own
    sim_time = timer.ends[-1] - t_begin - eval_s
    sim_samples = sum(timer.samples[steady])
    sim_tput = sim_samples / sim_time
    split = split_window(rounds[steady], sim_time, sim_samples)

    # The same node-rounds the simulator ran in the steady rounds.
    participation = sim.participation
    node_rounds: list[int] = []
    for t in range(args.warmup, args.rounds):
        ids = participation(t, sim.server.num_nodes, sim.server.nodes_per_round, np_rng(sim.server.seed, "sample", t))
        node_rounds += [int(i) for i in ids]
    start = sim.state.params.clone()
    ctx = mp.get_context("spawn")

    def bare(loop: str, retain: bool) -> tuple[int, float, float]:
        """Split over one bare process per core (balanced by work, no barriers): samples, total
        samples/s, and samples per second of one process at its own pace."""
        sizes = sim.data.partition.sizes()
        tasks = [NodeTask(i) for i in range(len(node_rounds))]
        plan = assign_lpt(tasks, [int(sizes[n]) for n in node_rounds], args.cpus)
        barrier, queue = ctx.Barrier(args.cpus), ctx.Queue()
        procs = [
            ctx.Process(
                target=bare_worker,
                args=(ov, [node_rounds[t.node_id] for t in part], start, loop, retain, barrier, queue),
            )
            for part in plan
        ]
        for p in procs:
            p.start()
        results = [queue.get() for _ in procs]
        for p in procs:
            p.join()
        total = sum(r[0] for r in results)
        return total, total / max(r[1] for r in results), total / sum(r[1] for r in results)

    def bare_one_process(arrays: str, fedsim_settings: bool) -> tuple[int, float] | str:
        """W3 / W4: all node-rounds in one fresh process on ``device``; (samples, samples/s), or
        the text of the error it met."""
        ds = sim.data.dataset
        job = {
            "arrays": arrays,
            "overrides": ov,
            "num_classes": ds.num_classes,
            "index": {n: sim.data.partition.train[n] for n in set(node_rounds)},
            "nodes": node_rounds,
            "start": start,
            "device": str(device),
            "fedsim_settings": fedsim_settings,
        }
        queue = ctx.Queue()
        proc = ctx.Process(target=bare_single, args=(job, queue))
        proc.start()
        while True:
            try:
                result = queue.get(timeout=1.0)
                break
            except Empty:
                if not proc.is_alive():
                    result = f"the bare process died (exit code {proc.exitcode})"
                    break
        proc.join()
        return result if isinstance(result, str) else (result[0], result[0] / result[1])

    out: dict = {"workload": args.workload, "overrides": args.overrides}
    same = None
    if single:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        with tempfile.TemporaryDirectory(prefix="fedsim-bench-") as arrays:
            np.save(Path(arrays) / "x.npy", sim.data.dataset.x_train)
            np.save(Path(arrays) / "y.npy", sim.data.dataset.y_train)
            plain = bare_one_process(arrays, fedsim_settings=False)
            # on a GPU, also under fedsim's kernel settings (a no-op on the CPU)
            same = bare_one_process(arrays, fedsim_settings=True) if device.type == "cuda" else None
        if isinstance(plain, str):
            raise SystemExit(f"bench.py: the bare loop failed: {plain}")
        bare_samples, bare_tput = plain
        out |= {
            "dataset": "cifar10" if "dataset=cifar10" in ov else "synthetic[3,32,32]",
            "device": name_of(device),
            "torch": torch.__version__,
            "examples_per_node": args.examples if args.workload == "w4" else 50,
            "scaled": scaled,
            **({"vectorize": sim.vectorize_info()} if sim.executor.spec.vectorize else {}),
        }
    else:
        retained = bool(sim.executor.spec.retain_memory)
        bare_samples, bare_tput, _ = bare("torch", retain=False)
        _, retained_tput, _ = bare("torch", retain=True)
        _, same_loop_tput, same_loop_each = bare("fedsim", retain=retained)
        out |= {
            "dataset": "shakespeare"
            if args.workload == "w5"
            else "fashion_mnist"
            if "dataset=fashion_mnist" in ov
            else "synthetic[1,28,28]",
            "cpus": args.cpus,
        }
    out |= {
        "steady_rounds": args.rounds - args.warmup,
        "sim_samples_per_s": round(sim_tput, 1),
        "bare_samples_per_s": round(bare_tput, 1),
        "ratio": round(sim_tput / bare_tput, 3),
    }
    if not single:
        out |= {
            "retain_memory": retained,
            "bare_retained_samples_per_s": round(retained_tput, 1),
            "ratio_retained": round(sim_tput / retained_tput, 3),
            "bare_same_loop_samples_per_s": round(same_loop_tput, 1),
            "bare_same_loop_process_samples_per_s": round(same_loop_each, 1),
            "ratio_same_loop": round(sim_tput / same_loop_tput, 3),
        }
    elif same is not None:  # the bare loop under fedsim's settings (no TF32, deterministic kernels)
        out |= (
            {"bare_fedsim_settings_error": same}
            if isinstance(same, str)
            else {
                "bare_fedsim_settings_samples_per_s": round(same[1], 1),
                "ratio_fedsim_settings": round(sim_tput / same[1], 3),
            }
        )
    out |= split
    out |= {
        "eval_s": round(eval_s, 3),
        "eval_examples_per_s": round(len(sim.data.dataset.y_test) / eval_s, 1) if eval_s > 0 else None,
        "sim_samples": sim_samples,
        "bare_samples": bare_samples,
        "total_wall_s": round(time.perf_counter() - t_start, 1),
    }
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
