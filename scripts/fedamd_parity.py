"""FedAMD parity: fedsim's `strategy=fedamd` against a restatement of the authors' update loop.

The restatement below follows the FedAMD branch of the authors' ``main_fmnist.py`` and
``fedamd_train_iter`` / ``compute_grad`` in their ``algo/fedamd.py`` (github.com/HarliWu/FedAMD),
written here from reading them, per parameter tensor as they do:

- before the first round every node's bullseye is its full-batch gradient at x_0;
- each round, the global direction is the mean of all N stored bullseyes (taken before the
  round's anchors refresh theirs); an anchor replaces its bullseye by the full-batch gradient at
  the current model; a miner keeps a "last" copy of its model and, for each of its K minibatches,
  sets direction <- direction - grad(last; batch) + grad(current; batch), copies current into
  last and steps current <- current - lr * direction (at the first step last = current, so the
  correction is zero up to rounding); it returns start - current;
- the server subtracts lr_g times the plain mean of the miners' returns (no step without miners).

Same inputs on both sides: a tiny MLP on a fixed synthetic dataset split over 6 nodes, the same
start model, the same participants per round, fedsim's anchor draws (seed, "anchor", round, node)
as the fixed anchor schedule, and the minibatches fedsim's nodes draw from their streams (the
authors' loaders are unshuffled; the order of batches is an input, not part of the update rule).
fedsim's first round has every node take part: all of them are anchors there (none holds a
bullseye yet), which is the authors' initialisation; fedsim round t + 1 is the authors' round t.

    .venv/bin/python scripts/fedamd_parity.py            # prints the largest differences
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the Hydra plugins and strategies of this checkout

from fedsim.models import build_model  # noqa: E402
from fedsim.seeding import np_rng, torch_rng  # noqa: E402
from fedsim.simulation import build, make  # noqa: E402


class Scripted:
    """A participation model that returns fixed participant lists (round 0: every node)."""

    uses_nodes_per_round = True

    def __init__(self, lists: list[list[int]]) -> None:
        self.lists = lists

    def __call__(self, round_: int, num_nodes: int, nodes_per_round: int, rng: np.random.Generator) -> np.ndarray:
        return np.asarray(self.lists[round_], dtype=np.int64)


def grads_of(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
    """Per-parameter gradients of the mean cross-entropy on (x, y)."""
    module.zero_grad()
    F.cross_entropy(module(x), y).backward()
    return [p.grad.detach().clone() for p in module.parameters()]  # type: ignore[union-attr]


def authors_loop(
    module: torch.nn.Module,
    nodes: list[tuple[torch.Tensor, torch.Tensor]],
    schedule: list[list[tuple[int, bool, list[torch.Tensor]]]],
    *,
    lr: float,
    lr_global: float,
) -> torch.Tensor:
    """The restated loop; ``schedule[t]`` lists (node, is_anchor, the miner's batches) of round t."""
    model = copy.deepcopy(module)
    n = len(nodes)
    bullseye = [grads_of(copy.deepcopy(model), x, y) for x, y in nodes]  # before the first round
    for round_ in schedule:
        direction = [sum(bullseye[i][j] / n for i in range(n)) for j in range(len(bullseye[0]))]
        returns = []
        for node, anchor, batches in round_:
            x, y = nodes[node]
            if anchor:
                bullseye[node] = grads_of(copy.deepcopy(model), x, y)
                continue
            current = copy.deepcopy(model)
            last = copy.deepcopy(current)
            v = [d.clone() for d in direction]
            for idx in batches:
                g_last = grads_of(last, x[idx], y[idx])
                g_cur = grads_of(current, x[idx], y[idx])
                v = [vj - a + b for vj, a, b in zip(v, g_last, g_cur)]
                last = copy.deepcopy(current)
                with torch.no_grad():
                    for p, vj in zip(current.parameters(), v):
                        p -= lr * vj
            returns.append([s.detach() - c.detach() for s, c in zip(model.parameters(), current.parameters())])
        if returns:
            with torch.no_grad():
                for j, p in enumerate(model.parameters()):
                    avg = torch.zeros_like(p)
                    for r in returns:
                        avg += r[j] / len(returns)
                    p -= lr_global * avg
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach()


def run(overrides: list[str], rounds: int, per_round: int, seed: int) -> dict[str, float]:
    conf = ROOT / "conf"
    base = [
        "dataset=synthetic",
        "dataset.n_train=900",
        "dataset.n_test=100",
        "dataset.dim=12",
        "dataset.num_classes=4",
        "model=mlp",
        "model.hidden=[16]",
        "partition=dirichlet",
        "partition.alpha=0.5",
        "num_nodes=6",
        f"nodes_per_round={per_round}",
        f"rounds={rounds}",
        "eval_every=0",
        "cluster=local",
        f"seed={seed}",
        "strategy=fedamd",
        "strategy.client.steps=5",
        "strategy.client.batch_size=16",
        "strategy.client.lr=0.05",
        *overrides,
    ]
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="config", overrides=base, return_hydra_config=True)
    sim = build(cfg)
    N = sim.facts.num_nodes
    rng = np_rng(seed, "parity-participants")
    lists = [list(range(N))] + [sorted(rng.choice(N, per_round, replace=False).tolist()) for _ in range(rounds - 1)]
    sim.participation = Scripted(lists)
    x0 = sim.state.params.clone()
    client, strategy = sim.strategy.client, sim.strategy
    try:
        final, _ = sim.run()
    finally:
        sim.close()

    ds, part = sim.data.dataset, sim.data.partition
    nodes = [
        (torch.as_tensor(ds.x_train[ix], dtype=torch.float32), torch.as_tensor(ds.y_train[ix], dtype=torch.int64))
        for ix in part.train
    ]
    # fedsim's anchor draws and minibatches, handed to the restatement as its fixed schedule
    held: set[int] = set()
    schedule = []
    for t, ids in enumerate(lists):
        roles = [strategy.schedule.is_anchor(seed, t, i, i in held) for i in ids]
        if t == 0:
            assert all(roles), "round 0 must make every node an anchor"
            held.update(ids)
            continue
        entry = []
        for i, anchor in zip(ids, roles):
            batches = [] if anchor else list(client._batches(len(nodes[i][1]), torch_rng(seed, "train", t, i)))
            entry.append((i, anchor, batches))
        held.update(i for i, a in zip(ids, roles) if a)
        schedule.append(entry)

    module = build_model(make(cfg.model), ds.input_shape, ds.num_classes, seed=seed)
    torch.nn.utils.vector_to_parameters(x0.clone(), module.parameters())
    lr_g = float(strategy.server_opt.lr)  # type: ignore[attr-defined]
    theirs = authors_loop(module, nodes, schedule, lr=client.lr, lr_global=lr_g)
    ours = final.params
    anchors = sum(a for r in schedule for _, a, _ in r)
    miners = sum(not a for r in schedule for _, a, _ in r)
    return {
        "max_abs_diff": float((ours - theirs).abs().max()),
        "max_rel_diff": float((ours - theirs).norm() / (theirs - x0).norm()),
        "moved": float((theirs - x0).norm()),
        "anchors": anchors,
        "miners": miners,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()
    torch.set_num_threads(1)
    settings = {
        "constant p = 0.3": ["strategy.anchor_prob=0.3"],
        "sequential r = 3": ["strategy.anchor_period=3"],
    }
    worst = 0.0
    print("| setting | seed | anchors / miners | ||x_T - x_0|| | max |fedsim - authors| | relative |")
    print("|---|---|---|---|---|---|")
    for name, overrides in settings.items():
        for seed in args.seeds:
            r = run(overrides, args.rounds, 3, seed)
            worst = max(worst, r["max_abs_diff"])
            print(
                f"| {name} | {seed} | {r['anchors']} / {r['miners']} | {r['moved']:.4f} | "
                f"{r['max_abs_diff']:.2e} | {r['max_rel_diff']:.2e} |"
            )
    print(f"largest difference over all runs: {worst:.2e}")


if __name__ == "__main__":
    main()
