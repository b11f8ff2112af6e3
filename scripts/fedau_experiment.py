"""Unknown participation: FedAU against the baselines (issue 5; shared/specs/fedau.md).

Federated Fashion-MNIST, 250 nodes with FedAU's Dirichlet partition (each node's label mix drawn
from Dirichlet(0.1), ``partition=dirichlet_per_node``), label-correlated participation rates
(Dirichlet(0.1) over classes, mean 0.1, floor 0.02) under Bernoulli, Markov (transition 0.05) and
cyclic (period 100) patterns; 5 local SGD steps of batch 16 per round, MLP with 64 hidden units
(the paper's small CNN for Fashion-MNIST is replaced by this MLP to fit the CPU budget),
``--rounds`` rounds (default 400, i.e. 2,000 iterations; the paper runs far longer). Methods and
learning rates as in the FedAU README: FedAU with K = infinity and K = 50 (local 0.1, global 1),
average over participants (0.0562, 1.78), average over all (0.1, 10), known probabilities,
FedVarp and MIFA (0.0562, 1). 3 seeds; the seed sets the partition, the rates and the schedule.

    .venv/bin/python scripts/fedau_experiment.py --out results/fedau --jobs 2
    # the longer-horizon subset
    .venv/bin/python scripts/fedau_experiment.py --out results/fedau_long --rounds 2000 --patterns bernoulli \
        --methods "FedAU (K=50)" "FedAU (K=inf)" "average participating" "average all" "known probabilities" MIFA
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

PATTERNS = {
    "bernoulli": ["participation=bernoulli"],
    "markov-0.05": ["participation=markov", "participation.transition=0.05"],
    "cyclic-100": ["participation=cyclic", "participation.period=100"],
}
METHODS = {
    "FedAU (K=inf)": ["strategy=fedau"],
    "FedAU (K=50)": ["strategy=fedau", "strategy.cutoff=50"],
    "average participating": ["strategy=avg_participating"],
    "average all": ["strategy=avg_all"],
    "known probabilities": ["strategy=known_prob"],
    "FedVarp": ["strategy=fedvarp"],
    "MIFA": ["strategy=mifa"],
}
LAST = 5  # evaluations averaged for the "final" accuracy


def overrides(spec: dict) -> list[str]:
    ov = [
        "dataset=fashion_mnist",
        "model=mlp",
        "model.hidden=[64]",
        "partition=dirichlet_per_node",
        "partition.alpha=0.1",
        "num_nodes=250",
        f"rounds={spec['rounds']}",
        "eval_every=20",
        f"seed={spec['seed']}",
        "cluster=local",
        "participation.p=0.1",
        "participation.alpha=0.1",
        "participation.p_min=0.02",
        "strategy.log_weights_every=0",
    ]
    if spec["root"]:
        ov += [f"dataset.root={spec['root']}", "dataset.download=false"]
    return [*ov, *PATTERNS[spec["pattern"]], *METHODS[spec["method"]]]


def work(spec: dict) -> dict:
    t0 = time.perf_counter()
    sim, summary, curve = run_recorded(
        overrides(spec), keys=("eval/acc", "eval/loss"), every_round=("fedau/estimate_rel_err",)
    )
    st = sim.state.strategy_state
    seen = st["intervals"] > 0
    return {
        **spec,
        "test_acc": float(summary["eval/acc"]),
        "test_acc_last": float(np.mean([c["eval/acc"] for c in curve[-LAST:]])),
        "curve": curve,
        "estimate": [float(x) if s else None for x, s in zip(st["estimate"], seen)],
        "probs": [float(p) for p in st["probs"]],
        "seconds": time.perf_counter() - t0,
    }


def grid(args) -> list[dict]:
    base = {"rounds": args.rounds, "root": args.root}
    return [
        {**base, "pattern": pat, "method": m, "seed": s}
        for s in args.seeds
        for pat in args.patterns
        for m in args.methods
    ]


def key(r: dict) -> tuple:
    return (r["pattern"], r["method"], r["seed"], r["rounds"])


def summarise(results: list[dict]) -> str:
    lines = [
        f"Test accuracy, mean ± std over seeds of the mean of the last {LAST} evaluations (every 20 rounds).\n",
        "| method | " + " | ".join(PATTERNS) + " |",
        "|---|" + "---|" * len(PATTERNS),
    ]
    for m in METHODS:
        cells = []
        for pat in PATTERNS:
            v = [r["test_acc_last"] for r in results if r["method"] == m and r["pattern"] == pat]
            cells.append(f"{np.mean(v):.4f} ± {np.std(v):.4f} ({len(v)})" if v else "-")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "FedAU (K=inf) estimate vs the true rate at the end: median over nodes of |w_n p_n - 1|.",
        "",
        "| pattern | median rel. error (mean over seeds) | nodes with an estimate |",
        "|---|---|---|",
    ]
    for pat in PATTERNS:
        rs = [r for r in results if r["method"] == "FedAU (K=inf)" and r["pattern"] == pat]
        if not rs:
            continue
        errs, counts = [], []
        for r in rs:
            pairs = [(w, p) for w, p in zip(r["estimate"], r["probs"]) if w is not None]
            errs.append(np.median([abs(w * p - 1) for w, p in pairs]))
            counts.append(len(pairs))
        lines.append(f"| {pat} | {np.mean(errs):.3f} | {np.mean(counts):.0f} / 250 |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], out: Path) -> list[Path]:
    plt = pyplot()
    if plt is None:
        return []
    paths = []
    fig, axes = plt.subplots(1, len(PATTERNS), figsize=(5.6 * len(PATTERNS), 4.4), squeeze=False)
    for ax, pat in zip(axes[0], PATTERNS):
        groups = [[r for r in results if r["method"] == m and r["pattern"] == pat] for m in METHODS]
        plot_mean_curves(ax, [(f"{m} ({len(rs)})", rs, {}) for m, rs in zip(METHODS, groups)], "round")
        ax.set_title(f"Fashion-MNIST, 250 nodes, {pat}")
        ax.set_xlabel("round (5 local steps each)")
        ax.set_ylabel("test accuracy")
        ax.set_ylim(0.4, 0.9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    paths.append(save_figure(fig, out / "fedau_accuracy.png"))
    fig, axes = plt.subplots(1, len(PATTERNS), figsize=(5.2 * len(PATTERNS), 4.4), squeeze=False)
    for ax, pat in zip(axes[0], PATTERNS):
        for method, marker in (("FedAU (K=inf)", "o"), ("FedAU (K=50)", "x")):
            rs = [r for r in results if r["method"] == method and r["pattern"] == pat]
            pts = [(1 / p, w) for r in rs for w, p in zip(r["estimate"], r["probs"]) if w is not None]
            if pts:
                a = np.array(pts)
                ax.scatter(a[:, 0], a[:, 1], s=8, alpha=0.4, marker=marker, label=f"{method}, all seeds")
        ax.plot([1, 50], [1, 50], color="black", linewidth=1, label="w = 1/p")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(f"estimated weight vs 1/p_n ({pat})")
        ax.set_xlabel("1 / p_n (true)")
        ax.set_ylabel("FedAU weight w_n after the run")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    paths.append(save_figure(fig, out / "fedau_weights.png"))
    return paths


def main() -> None:
    ap = experiment_parser(__doc__, ROOT / "results" / "fedau", 400)
    ap.add_argument("--patterns", nargs="+", default=list(PATTERNS), choices=list(PATTERNS))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = run_grid(
        [] if args.plot_only else grid(args),
        work,
        sink_path=args.out / "results.jsonl",
        key=key,
        jobs=args.jobs,
        describe=lambda r: (
            f"{r['pattern']:12} {r['method']:22} seed {r['seed']}: acc {r['test_acc_last']:.4f} ({r['seconds']:.0f}s)"
        ),
    )
    report([r for r in results if r["rounds"] == args.rounds], args.out, summarise, plot)


if __name__ == "__main__":
    main()
