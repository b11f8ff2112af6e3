"""Accuracy against uplink bytes with compressed communication (issue 6; shared/specs/econtrol.md).

Federated Fashion-MNIST, 10 nodes with Dirichlet(alpha = 0.1) label skew, every node in every
round, ``--rounds`` rounds (default 400) of 5 local SGD steps (batch 32, lr 0.05), MLP with 64
hidden units (d = 50,890), unweighted averaging (every node counts 1/n, as in the EF
analyses). Uplink: top-1 % and top-10 % of the flat pseudo-gradient with naive compression,
EF14, EF21, EF21-SGDM (momentum 0.1) and EControl (eta 0.05, 0.1, 0.2); dense FedAvg as the
reference. The h-based rules send their first message uncompressed (h0 = full), which is
counted. 3 seeds; the seed sets the partition, the initial model and every batch.

    .venv/bin/python scripts/compression_experiment.py --out results/compression --jobs 2
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

RATIOS = [0.01, 0.10]
METHODS = {
    "naive": ["feedback=none"],
    "EF14": ["feedback=ef14"],
    "EF21": ["feedback=ef21"],
    "EF21-SGDM": ["feedback=ef21_sgdm", "feedback.momentum=0.1"],
    "EControl 0.05": ["feedback=econtrol", "feedback.eta=0.05"],
    "EControl 0.1": ["feedback=econtrol", "feedback.eta=0.1"],
    "EControl 0.2": ["feedback=econtrol", "feedback.eta=0.2"],
}
DENSE = "uncompressed"
TARGET = 0.70


def overrides(spec: dict, rounds: int, root: str | None) -> list[str]:
    ov = [
        "dataset=fashion_mnist",
        "model=mlp",
        "model.hidden=[64]",
        "partition=dirichlet",
        "partition.alpha=0.1",
        "num_nodes=10",
        "nodes_per_round=10",
        f"rounds={rounds}",
        "eval_every=10",
        f"seed={spec['seed']}",
        "cluster=local",
        "strategy.client.steps=5",
        "strategy.client.batch_size=32",
        "strategy.client.lr=0.05",
        "strategy.weighted=false",
    ]
    if root:
        ov += [f"dataset.root={root}", "dataset.download=false"]
    if spec["method"] == DENSE:
        return ov
    return [*ov, "compressor=top_k", f"compressor.ratio={spec['ratio']}", *METHODS[spec["method"]]]


def work(spec: dict) -> dict:
    t0 = time.perf_counter()
    _, summary, curve = run_recorded(
        overrides(spec, spec["rounds"], spec["root"]), keys=("eval/acc",), every_round=("comm/bytes_up_total",)
    )
    return {
        **spec,
        "test_acc": float(summary["eval/acc"]),
        "bytes_up": int(summary["comm/bytes_up_total"]),
        "curve": curve,
        "seconds": time.perf_counter() - t0,
    }


def grid(args) -> list[dict]:
    base = {"rounds": args.rounds, "root": args.root}
    runs = []
    for seed in args.seeds:
        runs.append({**base, "method": DENSE, "ratio": 1.0, "seed": seed})
        for ratio in RATIOS:
            for method in METHODS:
                runs.append({**base, "method": method, "ratio": ratio, "seed": seed})
    return runs


def key(r: dict) -> tuple:
    return (r["method"], r["ratio"], r["seed"], r["rounds"])


def bytes_to(curve: list[dict], target: float) -> float:
    for c in curve:
        if c["eval/acc"] >= target:
            return c["comm/bytes_up_total"]
    return float("nan")


def summarise(results: list[dict]) -> str:
    lines = [
        f"| uplink | method | final test acc (mean ± std) | best acc | uplink MB total | MB to {TARGET:.0%} acc (seeds reaching) |",
        "|---|---|---|---|---|---|",
    ]
    for ratio in [1.0, *RATIOS]:
        for method in [DENSE, *METHODS]:
            rs = [r for r in results if r["ratio"] == ratio and r["method"] == method]
            if not rs:
                continue
            acc = [r["test_acc"] for r in rs]
            best = [max(c["eval/acc"] for c in r["curve"]) for r in rs]
            mb = np.mean([r["bytes_up"] for r in rs]) / 1e6
            reach = [bytes_to(r["curve"], TARGET) / 1e6 for r in rs]
            ok = [x for x in reach if np.isfinite(x)]
            reach_txt = f"{np.mean(ok):.2f} ({len(ok)}/{len(rs)})" if ok else f"- (0/{len(rs)})"
            label = "dense" if ratio == 1.0 else f"top-{ratio:.0%}"
            lines.append(
                f"| {label} | {method} | {np.mean(acc):.4f} ± {np.std(acc):.4f} | {np.mean(best):.4f} | "
                f"{mb:.2f} | {reach_txt} |"
            )
    return "\n".join(lines) + "\n"


def plot(results: list[dict], out: Path) -> list[Path]:
    plt = pyplot()
    if plt is None:
        return []
    paths = []
    dense = [r for r in results if r["method"] == DENSE]
    for x_key, xlabel, name, log in (
        ("comm/bytes_up_total", "uplink bytes (all nodes, cumulative)", "accuracy_vs_bytes.png", True),
        ("round", "round", "accuracy_vs_rounds.png", False),
    ):
        fig, axes = plt.subplots(1, len(RATIOS), figsize=(6.2 * len(RATIOS), 4.6), squeeze=False)
        for ax, ratio in zip(axes[0], RATIOS):
            groups = [(dense, {"color": "black", "linestyle": "--"})]
            groups += [([r for r in results if r["ratio"] == ratio and r["method"] == m], {}) for m in METHODS]
            plot_mean_curves(
                ax, [(f"{m} ({len(rs)} seeds)", rs, style) for m, (rs, style) in zip([DENSE, *METHODS], groups)], x_key
            )
            if log:
                ax.set_xscale("log")
            ax.set_title(f"Fashion-MNIST, Dirichlet 0.1, 10 nodes: top-{ratio:.0%}")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("test accuracy")
            ax.set_ylim(0.3, 0.9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, loc="lower right")
        paths.append(save_figure(fig, out / name))
    return paths


def main() -> None:
    args = experiment_parser(__doc__, ROOT / "results" / "compression", 400).parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = run_grid(
        [] if args.plot_only else grid(args),
        work,
        sink_path=args.out / "results.jsonl",
        key=key,
        jobs=args.jobs,
        describe=lambda r: (
            f"{r['method']:14} top-{r['ratio']:.0%} seed {r['seed']}: acc {r['test_acc']:.4f}, "
            f"{r['bytes_up'] / 1e6:.2f} MB up ({r['seconds']:.0f}s)"
        ),
    )
    report([r for r in results if r["rounds"] == args.rounds], args.out, summarise, plot)


if __name__ == "__main__":
    main()
