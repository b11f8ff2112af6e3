"""Accuracy against simulated time under staleness (issue 8; shared/specs/async.md).

Federated Fashion-MNIST, 20 nodes with Dirichlet(0.1) label skew, all 20 always in flight, each
job 10 local SGD steps (batch 64, lr 0.05), MLP with 64 hidden units; latency F-0 (every node
takes 1 time unit) and F-80 (node i takes 1 - 0.8 i / 19: the fastest is 80 % faster), after
Fraboni et al. (JMLR 2023). Schemes: synchronous FedAvg on the clock (waits for the slowest),
asynchronous FedAvg with the importance-corrected ("weight") coefficients (server lr 1, and 0.1
since the paper tunes learning rates per scheme), FedAsync (alpha 0.6,
polynomial staleness a = 0.5), FedBuff (buffer 5, s = (1 + tau)^-1/2, server lr 1), FedFix-0.5
(period-corrected). Every run lasts ``--duration`` simulated time units (default 60), with an
evaluation every 2 units. 3 seeds.

    .venv/bin/python scripts/async_experiment.py --out results/async --jobs 2
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from experiment_util import (
    ROOT,
    experiment_parser,
    plot_mean_curves,
    pyplot,
    report,
    run_grid,
    run_recorded,
    save_figure,
)

SCENARIOS = {"F-0": ["latency=linear", "latency.spread=0"], "F-80": ["latency=linear", "latency.spread=80"]}
METHODS = {
    "sync FedAvg": ["strategy=fedavg"],
    "async FedAvg": ["strategy=async_fedavg"],
    "async FedAvg, lr_g 0.1": ["strategy=async_fedavg", "strategy.server_opt.lr=0.1"],
    "FedAsync": ["strategy=fedasync"],
    "FedBuff-5": ["strategy=fedbuff", "strategy.buffer=5"],
    "FedFix-0.5": ["strategy=fedfix", "strategy.period=0.5"],
}
TARGETS = (0.70, 0.75)


def overrides(spec: dict) -> list[str]:
    ov = [
        "dataset=fashion_mnist",
        "model=mlp",
        "model.hidden=[64]",
        "partition=dirichlet",
        "partition.alpha=0.1",
        "num_nodes=20",
        "nodes_per_round=20",
        "rounds=1000000",
        "server=async",
        f"server.duration={spec['duration']}",
        "server.eval_interval=2",
        f"seed={spec['seed']}",
        "cluster=local",
        "strategy.client.steps=10",
        "strategy.client.batch_size=64",
        "strategy.client.lr=0.05",
    ]
    if spec["root"]:
        ov += [f"dataset.root={spec['root']}", "dataset.download=false"]
    return [*ov, *SCENARIOS[spec["scenario"]], *METHODS[spec["method"]]]


def work(spec: dict) -> dict:
    t0 = time.perf_counter()
    _, summary, curve = run_recorded(overrides(spec), keys=("eval/acc", "time/simulated", "round"))
    return {
        **spec,
        "test_acc": float(summary["eval/acc"]),
        "updates": int(summary["rounds"]),
        "curve": curve,
        "seconds": time.perf_counter() - t0,
    }


def grid(args) -> list[dict]:
    base = {"duration": args.duration, "root": args.root}
    return [{**base, "scenario": sc, "method": m, "seed": s} for s in args.seeds for sc in SCENARIOS for m in METHODS]


def key(r: dict) -> tuple:
    return (r["scenario"], r["method"], r["seed"], r["duration"])


def time_to(curve: list[dict], target: float) -> float:
    for c in curve:
        if c["eval/acc"] >= target:
            return c["time/simulated"]
    return float("nan")


def summarise(results: list[dict]) -> str:
    head = " | ".join(f"time to {t:.0%} (seeds)" for t in TARGETS)
    lines = [
        f"| latency | method | final acc (mean ± std) | best acc | server updates | {head} |",
        "|---|---|---|---|---|" + "---|" * len(TARGETS),
    ]
    for sc in SCENARIOS:
        for m in METHODS:
            rs = [r for r in results if r["scenario"] == sc and r["method"] == m]
            if not rs:
                continue
            acc = [r["test_acc"] for r in rs]
            best = np.mean([max(c["eval/acc"] for c in r["curve"]) for r in rs])
            cells = []
            for t in TARGETS:
                ok = [x for x in (time_to(r["curve"], t) for r in rs) if np.isfinite(x)]
                cells.append(f"{np.mean(ok):.1f} ({len(ok)}/{len(rs)})" if ok else f"- (0/{len(rs)})")
            lines.append(
                f"| {sc} | {m} | {np.mean(acc):.4f} ± {np.std(acc):.4f} | {best:.4f} | "
                f"{np.mean([r['updates'] for r in rs]):.0f} | " + " | ".join(cells) + " |"
            )
    return "\n".join(lines) + "\n"


def plot(results: list[dict], out: Path) -> list[Path]:
    plt = pyplot()
    if plt is None:
        return []
    fig, axes = plt.subplots(1, len(SCENARIOS), figsize=(6.2 * len(SCENARIOS), 4.6), squeeze=False)
    for ax, sc in zip(axes[0], SCENARIOS):
        groups = [[r for r in results if r["scenario"] == sc and r["method"] == m] for m in METHODS]
        plot_mean_curves(ax, [(f"{m} ({len(rs)} seeds)", rs, {}) for m, rs in zip(METHODS, groups)], "time/simulated")
        ax.set_title(f"Fashion-MNIST, Dirichlet 0.1, 20 nodes, {sc}")
        ax.set_xlabel("simulated time (slowest node's job = 1)")
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0.2, 0.9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    return [save_figure(fig, out / "accuracy_vs_time.png")]


def main() -> None:
    ap = experiment_parser(__doc__, ROOT / "results" / "async", 0)
    ap.add_argument("--duration", type=float, default=60.0, help="simulated time of every run")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = run_grid(
        [] if args.plot_only else grid(args),
        work,
        sink_path=args.out / "results.jsonl",
        key=key,
        jobs=args.jobs,
        describe=lambda r: (
            f"{r['scenario']:5} {r['method']:13} seed {r['seed']}: "
            f"acc {r['test_acc']:.4f}, {r['updates']} updates ({r['seconds']:.0f}s)"
        ),
    )
    report([r for r in results if r["duration"] == args.duration], args.out, summarise, plot)


if __name__ == "__main__":
    main()
