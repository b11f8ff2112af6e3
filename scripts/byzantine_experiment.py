"""Reproduce the MoNNA and NNM claims (issue 3; shared/specs/robust_aggregation.md section 5).

Part ``monna`` (peer to peer, the MoNNA paper's MNIST grid): n = 26 nodes, f = 5 Byzantine,
Dirichlet alpha = 1, batch 25, lr 0.75 / (1 + floor(t/50)), L2 1e-4, 600 steps, attacks ALIE
("little") and FOE ("empire") with the MoNNA repository's line search (delta 1, 16 evaluations,
both directions). Methods: D-SGD without attack (Byzantine nodes silent, mean mixing), MoNNA (NNA,
beta 0.99), NNA with beta 0, trimmed mean with beta 0.99.

Part ``nnm`` (server-based D-SGD with worker momentum, ByzFL's loop): the same nodes, data and
attacks, lr 0.1, beta 0.9, server weight decay 1e-4 (ByzFL's defaults); Krum, trimmed mean and geometric median with and without NNM, plus D-SGD
without attack.

Every run is one ``fedsim`` simulation built from the same Hydra config as the command line
(local executor, one torch thread per run, runs in parallel processes). Results go to
OUT/results.jsonl (one line per run, appended as runs finish), OUT/table.md and OUT/*.png.

    .venv/bin/python scripts/byzantine_experiment.py --out results/byzantine --jobs 2
    .venv/bin/python scripts/byzantine_experiment.py --out results/byzantine --plot-only
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# The MoNNA repository's "little" and "empire" attacks: strength line-searched against the
# defence from 0 with step 1, 16 evaluations, trying both directions. Used in both parts.
SEARCH = ["attack.delta=1", "attack.budget=16", "attack.below=true"]
ATTACKS = {"ALIE": ["attack=optimal_alie", *SEARCH], "FOE": ["attack=optimal_ipm", *SEARCH]}
NO_ATTACK = "none"


def common(args: argparse.Namespace, seed: int) -> list[str]:
    ov = [
        f"dataset={args.dataset}",
        "model=mlp",
        f"model.hidden=[{args.hidden}]",
        "partition=dirichlet",
        "partition.alpha=1.0",
        "num_nodes=26",
        "nodes_per_round=26",
        "byzantine.num=5",
        f"rounds={args.steps}",
        f"eval_every={args.eval_every}",
        f"seed={seed}",
        "cluster=local",
    ]
    if args.root:
        ov += [f"dataset.root={args.root}", "dataset.download=false"]
    return ov


def grid(args: argparse.Namespace) -> list[dict]:
    runs = []
    for seed in args.seeds:
        if "monna" in args.parts:
            p2p = ["strategy=monna", "server=p2p", "server.eval_all_every=0"]
            runs.append(
                {
                    "part": "monna",
                    "attack": NO_ATTACK,
                    "method": "D-SGD (no attack)",
                    "seed": seed,
                    "overrides": [*p2p, "strategy/aggregator=mean", "attack=none"],
                }
            )
            for attack, aov in ATTACKS.items():
                for method, mov in (
                    ("MoNNA (NNA, beta 0.99)", ["strategy/aggregator=nna"]),
                    ("NNA, beta 0", ["strategy/aggregator=nna", "strategy.client.beta=0.0"]),
                    ("trimmed mean, beta 0.99", ["strategy/aggregator=trimmed_mean"]),
                ):
                    runs.append(
                        {
                            "part": "monna",
                            "attack": attack,
                            "method": method,
                            "seed": seed,
                            "overrides": [*p2p, *mov, *aov],
                        }
                    )
        if "nnm" in args.parts:
            runs.append(
                {
                    "part": "nnm",
                    "attack": NO_ATTACK,
                    "method": "D-SGD (no attack)",
                    "seed": seed,
                    "overrides": ["strategy=robust", "strategy/aggregator=mean", "attack=none"],
                }
            )
            for attack, aov in ATTACKS.items():
                for rule in ("krum", "trimmed_mean", "geometric_median"):
                    for nnm in (False, True):
                        method = ("NNM + " if nnm else "") + rule
                        pre = ["strategy.preaggregators=[nnm]"] if nnm else []
                        runs.append(
                            {
                                "part": "nnm",
                                "attack": attack,
                                "method": method,
                                "seed": seed,
                                "overrides": ["strategy=robust", f"strategy/aggregator={rule}", *pre, *aov],
                            }
                        )
    return runs


def run_one(spec: dict, base: list[str]) -> dict:
    import torch
    from hydra import compose, initialize_config_dir

    from fedsim.simulation import build, set_driver_threads

    torch.set_num_threads(1)
    set_driver_threads(1)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*base, *spec["overrides"]])
    curve: list[tuple[int, float]] = []
    honest_mean = None

    class Keep:
        def on_round_end(self, t: int, metrics: dict) -> None:
            nonlocal honest_mean
            if "eval/acc" in metrics:
                curve.append((t + 1, float(metrics["eval/acc"])))
            if "eval/honest_acc_mean" in metrics:
                honest_mean = float(metrics["eval/honest_acc_mean"])

    t0 = time.perf_counter()
    sim = build(cfg)
    try:
        sim.run([Keep()])
        error = None
    except Exception as exc:  # a diverged run is a result too
        error = f"{type(exc).__name__}: {exc}"
    finally:
        sim.close()
    return {
        **spec,
        "curve": curve,
        "final": curve[-1][1] if curve else None,
        "max": max(a for _, a in curve) if curve else None,
        "honest_mean_final": honest_mean,
        "error": error,
        "seconds": time.perf_counter() - t0,
        "byzantine_ids": sorted(sim.byzantine.ids),
    }


def load(out: Path) -> list[dict]:
    path = out / "results.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def key(r: dict) -> tuple:
    return (r["part"], r["attack"], r["method"], r["seed"])


def table(results: list[dict]) -> str:
    import numpy as np

    lines = []
    for part in ("monna", "nnm"):
        rows = [r for r in results if r["part"] == part]
        if not rows:
            continue
        what = "honest node 0" if part == "monna" else "server model"
        lines += [
            f"\n### {part}: test accuracy of the {what} (mean ± std over seeds)\n",
            "| attack | method | final acc | max acc | honest-mean final | seeds |",
            "|---|---|---|---|---|---|",
        ]
        groups: dict[tuple, list[dict]] = {}
        for r in rows:
            groups.setdefault((r["attack"], r["method"]), []).append(r)
        for (attack, method), rs in sorted(groups.items(), key=lambda kv: (kv[0][0] != NO_ATTACK, kv[0])):
            fin = np.array([r["final"] if r["final"] is not None and not r["error"] else np.nan for r in rs])
            mx = np.array([r["max"] if r["max"] is not None else np.nan for r in rs])
            hm = [r["honest_mean_final"] for r in rs if r.get("honest_mean_final") is not None]
            hm_s = f"{np.mean(hm):.3f}" if hm else "-"
            err = " (diverged: " + str(sum(bool(r["error"]) for r in rs)) + ")" if any(r["error"] for r in rs) else ""
            lines.append(
                f"| {attack} | {method} | {np.nanmean(fin):.3f} ± {np.nanstd(fin):.3f}{err} | "
                f"{np.nanmean(mx):.3f} ± {np.nanstd(mx):.3f} | {hm_s} | {len(rs)} |"
            )
    return "\n".join(lines) + "\n"


def plot(results: list[dict], out: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: pip install -e .[experiments] for the plots", file=sys.stderr)
        return []
    import numpy as np

    written = []
    for part in ("monna", "nnm"):
        rows = [r for r in results if r["part"] == part and r["curve"]]
        attacks = sorted({r["attack"] for r in rows} - {NO_ATTACK})
        if not rows or not attacks:
            continue
        fig, axes = plt.subplots(1, len(attacks), figsize=(6.5 * len(attacks), 4.5), squeeze=False)
        for ax, attack in zip(axes[0], attacks):
            methods = sorted({r["method"] for r in rows if r["attack"] in (attack, NO_ATTACK)})
            for method in methods:
                rs = [r for r in rows if r["method"] == method and r["attack"] in (attack, NO_ATTACK)]
                steps = [s for s, _ in rs[0]["curve"]]
                acc = np.array([[a for _, a in r["curve"]] for r in rs if len(r["curve"]) == len(steps)])
                mean = acc.mean(0)
                style = "k--" if "no attack" in method else "-"
                ax.plot(steps, mean, style, label=f"{method} (n={len(acc)})")
                ax.fill_between(steps, acc.min(0), acc.max(0), alpha=0.15)
            ax.set_title(f"{part}: {attack}, n=26, f=5, Dirichlet alpha=1")
            ax.set_xlabel("step")
            ax.set_ylabel("test accuracy" + (" (honest node 0)" if part == "monna" else ""))
            ax.set_ylim(0, 1)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8, loc="lower right")
        fig.tight_layout()
        path = out / f"{part}_accuracy.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "byzantine")
    ap.add_argument("--parts", nargs="+", default=["monna", "nnm"], choices=["monna", "nnm"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--dataset", default="fashion_mnist", choices=["fashion_mnist", "mnist"])
    ap.add_argument("--root", default=None, help="folder with the dataset's IDX files (default: the loader's search)")
    ap.add_argument("--hidden", type=int, default=64, help="hidden width of the MLP")
    ap.add_argument("--jobs", type=int, default=max(1, (os.cpu_count() or 1)))
    ap.add_argument("--plot-only", action="store_true")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    done = {key(r) for r in load(args.out)}
    if not args.plot_only:
        todo = [r for r in grid(args) if key(r) not in done]
        todo.sort(key=lambda r: ("NNM" not in r["method"], r["attack"] == NO_ATTACK))  # slowest first
        print(
            f"{len(todo)} runs to do ({len(done)} already in {args.out / 'results.jsonl'}), {args.jobs} at a time",
            flush=True,
        )
        with ProcessPoolExecutor(max_workers=args.jobs) as pool, (args.out / "results.jsonl").open("a") as sink:
            futures = {pool.submit(run_one, spec, common(args, spec["seed"])): spec for spec in todo}
            for fut in as_completed(futures):
                res = fut.result()
                sink.write(json.dumps(res) + "\n")
                sink.flush()
                print(
                    f"{res['part']:5} {res['attack']:4} {res['method']:28} seed {res['seed']}: "
                    f"final {res['final']} max {res['max']} ({res['seconds']:.0f}s){' ' + res['error'] if res['error'] else ''}",
                    flush=True,
                )
    results = load(args.out)
    text = table(results)
    (args.out / "table.md").write_text(text)
    print(text)
    for path in plot(results, args.out):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
