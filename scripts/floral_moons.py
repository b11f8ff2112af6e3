"""FLORAL's synthetic task (not a federated simulation, so not an experiment config): kernel FLORAL,
the two-player game of a kernel SVM against a label attacker, on two moons with poisoned labels.

make_moons (n = 1000, noise 0.2), 60 % test, 20 % of the rest validation; training labels poisoned
at 5..40 %, then kernel FLORAL (RBF gamma 0.5, C 10, lr 1e-4, 501 rounds, budget B = 25: the Moon
settings of the FLORAL paper, Erdogan et al.) against the plain RBF-SVM (exact QP). "FLORAL, given
labels at prediction" is a diagnostic of ours: the same dual weights, predicting with the given
labels instead of the last attacked ones. The paper's pre-poisoned files are not public, so two
poisonings are made here: ``random`` (a uniform subset flipped) and ``influence`` (the points with
the largest dual weights of a clean RBF-SVM flipped first).

    .venv/bin/python scripts/floral_moons.py --out results/floral     # moons.jsonl, moons.md, moons.png
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RATES = [0.05, 0.10, 0.15, 0.20, 0.25, 0.30, 0.35, 0.40]
POISONINGS = ("random", "influence")
METHODS = ("FLORAL", "FLORAL, given labels at prediction", "RBF-SVM")


def moons_data(seed: int, n: int = 1000, noise: float = 0.2):
    from sklearn.datasets import make_moons
    from sklearn.model_selection import train_test_split

    X, y = make_moons(n_samples=n, noise=noise, random_state=seed)
    X_rest, X_test, y_rest, y_test = train_test_split(X, y, test_size=0.6, random_state=seed)
    X_train, X_val, y_train, y_val = train_test_split(X_rest, y_rest, test_size=0.2, random_state=seed)
    return X_train, y_train, X_val, y_val, X_test, y_test


def poison(X: np.ndarray, y: np.ndarray, rate: float, how: str, rng: np.random.Generator) -> np.ndarray:
    from strategies.floral import dual_qp, rbf_kernel

    k = int(round(rate * len(y)))
    if how == "random":
        idx = rng.choice(len(y), size=k, replace=False)
    else:  # influence: largest dual weights of a clean RBF-SVM first, ties broken at random
        lam = dual_qp(rbf_kernel(X, X, 0.5), np.where(y > 0, 1.0, -1.0), 10.0)
        idx = np.lexsort((rng.random(len(y)), -lam))[:k]
    out = y.copy()
    out[idx] = 1 - out[idx]
    return out


def run(spec: dict) -> dict:
    from strategies.floral import floral, rbf_svm

    t0 = time.perf_counter()
    seed = spec["seed"]
    X, y, Xv, yv, Xt, yt = moons_data(seed)
    yp = poison(X, y, spec["rate"], spec["poison"], np.random.default_rng([seed, 7]))
    signs = lambda v: np.where(v > 0, 1, -1)
    if spec["method"] == "RBF-SVM":
        model = rbf_svm(X, yp)
    else:
        game = floral(X, yp, rng=np.random.default_rng([seed, 42]))
        model = game.model if spec["method"] == "FLORAL" else game.model_given
    return {
        **spec,
        "test_acc": model.accuracy(Xt, signs(yt)),
        "val_acc": model.accuracy(Xv, signs(yv)),
        "seconds": time.perf_counter() - t0,
    }


def table(results: list[dict]) -> str:
    lines = []
    for how in POISONINGS:
        lines += [
            f"\n### moons, {how} poisoning: test accuracy (mean ± std over seeds)\n",
            "| method | " + " | ".join(f"{round(r * 100)}%" for r in RATES) + " |",
            "|---|" + "---|" * len(RATES),
        ]
        for method in METHODS:
            cells = []
            for rate in RATES:
                v = [r["test_acc"] for r in results if (r["poison"], r["method"], r["rate"]) == (how, method, rate)]
                cells.append(f"{np.mean(v):.3f} ± {np.std(v):.3f}" if v else "-")
            lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(POISONINGS), figsize=(11, 4.2), squeeze=False)
    for ax, how in zip(axes[0], POISONINGS):
        for method in METHODS:
            acc = [
                [r["test_acc"] for r in results if (r["poison"], r["method"], r["rate"]) == (how, method, rate)]
                for rate in RATES
            ]
            ax.errorbar(
                [100 * r for r in RATES],
                [np.mean(a) for a in acc],
                yerr=[np.std(a) for a in acc],
                marker="o",
                capsize=3,
                label=method,
            )
        ax.set(title=f"moons: {how} label poisoning", xlabel="poisoned labels (%)", ylabel="test accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "floral")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--jobs", type=int, default=max(1, os.cpu_count() or 1))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    specs = [
        {"poison": how, "rate": rate, "method": method, "seed": seed}
        for seed in args.seeds
        for how in POISONINGS
        for rate in RATES
        for method in METHODS
    ]
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(run, specs))
    with (args.out / "moons.jsonl").open("w") as sink:
        sink.writelines(json.dumps(r) + "\n" for r in results)
    text = table(results)
    (args.out / "moons.md").write_text(text)
    print(text)
    plot(results, args.out / "moons.png")
    print(f"wrote {args.out / 'moons.md'} and {args.out / 'moons.png'}")


if __name__ == "__main__":
    main()
