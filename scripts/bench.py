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

It measures, in one run:
1. the simulator (Ray executor, one actor per core, evaluation off): samples/s over the rounds
   after ``--warmup``; the timed window holds training rounds only: the one evaluation (after the
   last round) is taken out of it and reported on its own (``eval_s``, test examples/s);
2. the same local SGD work, i.e. the very node-rounds the simulator ran in those rounds, done by
   one bare single-threaded process per core (plain PyTorch loop, no Ray, no simulator), each
   process taking a balanced share, all started together: total samples / slowest process time.
It prints both and their ratio (target >= 0.9). A second baseline runs fedsim's own LocalSGD
inner loop in the same bare processes, so ``ratio_same_loop`` isolates what the simulator around
the loop (worker, executor, Ray, server) costs.

    python scripts/bench.py [--workload w1|w2] [--rounds 30] [--warmup 3] [--cpus N] [-- extra overrides]
    python scripts/bench.py --workload w2 --rounds 12 --warmup 2 cluster.vectorize=true
    python scripts/bench.py --workload w5 --rounds 4 --warmup 1
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

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


def overrides(args: argparse.Namespace) -> list[str]:
    from fedsim.data.sources import _find_idx, _idx_dirs, data_root

    have_fmnist = any(
        _find_idx(d, "train-images-idx3-ubyte") for d in _idx_dirs(data_root(None), "FashionMNIST", (str(FMNIST_DIR),))
    )
    data = ["dataset=fashion_mnist", "dataset.download=false"] if have_fmnist else SYNTHETIC
    workload = [*WORKLOAD, *(W2 if args.workload == "w2" else [])]
    if args.workload == "w5":
        data, workload = [], W5
    return [*data, *workload, f"rounds={args.rounds}", f"cluster.num_cpus={args.cpus}", *args.overrides]


def compose(ov: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=ov)


class Timer:
    """Callback recording the end time and the sampled nodes of every round."""

    def __init__(self) -> None:
        self.ends: list[float] = []
        self.samples: list[int] = []
        self.eval_s: list[float] = []

    def on_run_start(self, meta) -> None:
        pass

    def on_warning(self, round_: int, message: str) -> None:
        pass

    def on_round_end(self, round_: int, metrics: dict) -> None:
        self.ends.append(time.perf_counter())
        self.samples.append(int(metrics["train/samples"]))
        self.eval_s.append(float(metrics.get("time/eval_s", 0.0)))

    def on_run_end(self, summary: dict) -> None:
        pass


def bare_worker(cfg_overrides: list[str], nodes: list[int], start_params, loop: str, barrier, queue) -> None:
    """One bare process over its share of node-rounds. ``loop="torch"``: a plain PyTorch loop
    (torch.optim.SGD); ``loop="fedsim"``: fedsim's own LocalSGD inner loop called directly, with
    no worker, executor, Ray or server around it (isolates the simulator's overhead)."""
    import torch
    import torch.nn.functional as F
    from hydra.utils import instantiate

    from fedsim.seeding import np_rng

    torch.set_num_threads(1)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", choices=["w1", "w2", "w5"], default="w1")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    if args.rounds <= args.warmup:
        ap.error("--rounds must exceed --warmup")

    from fedsim.execution.worker import NodeTask, assign_lpt
    from fedsim.seeding import np_rng
    from fedsim.simulation import build, set_driver_threads

    ov = overrides(args)
    print("workload:", " ".join(ov), flush=True)
    set_driver_threads(1)
    sim = build(compose(ov))
    timer = Timer()
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

    # The same node-rounds, split over one bare process per core (balanced by work, no barriers).
    participation = sim.participation
    node_rounds: list[int] = []
    for t in range(args.warmup, args.rounds):
        ids = participation(t, sim.server.num_nodes, sim.server.nodes_per_round, np_rng(sim.server.seed, "sample", t))
        node_rounds += [int(i) for i in ids]
    sizes = sim.data.partition.sizes()
    tasks = [NodeTask(i) for i in range(len(node_rounds))]
    plan = assign_lpt(tasks, [int(sizes[n]) for n in node_rounds], args.cpus)
    start = sim.state.params.clone()

    def bare(loop: str) -> tuple[int, float]:
        ctx = mp.get_context("spawn")
        barrier, queue = ctx.Barrier(args.cpus), ctx.Queue()
        procs = [
            ctx.Process(
                target=bare_worker, args=(ov, [node_rounds[t.node_id] for t in part], start, loop, barrier, queue)
            )
            for part in plan
        ]
        for p in procs:
            p.start()
        results = [queue.get() for _ in procs]
        for p in procs:
            p.join()
        total = sum(r[0] for r in results)
        return total, total / max(r[1] for r in results)

    bare_samples, bare_tput = bare("torch")
    _, same_loop_tput = bare("fedsim")
    out = {
        "workload": args.workload,
        "overrides": args.overrides,
        "dataset": "shakespeare"
        if args.workload == "w5"
        else "fashion_mnist"
        if "dataset=fashion_mnist" in ov
        else "synthetic[1,28,28]",
        "cpus": args.cpus,
        "steady_rounds": args.rounds - args.warmup,
        "sim_samples_per_s": round(sim_tput, 1),
        "bare_samples_per_s": round(bare_tput, 1),
        "ratio": round(sim_tput / bare_tput, 3),
        "bare_same_loop_samples_per_s": round(same_loop_tput, 1),
        "ratio_same_loop": round(sim_tput / same_loop_tput, 3),
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
