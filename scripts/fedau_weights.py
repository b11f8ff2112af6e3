"""FedAU's estimated weights against the true 1/p_n, from the runs of a sweep.

A FedAU-family run with ``strategy.log_weights_every=k`` logs every k rounds the list of all N
estimates (``fedau/estimates``) and, when the participation model knows them, the true rates
(``fedau/rates``). This reads the last such record of every run, draws w_n against 1/p_n on log
axes (all seeds of a group in one colour, one panel per value of ``--columns``, the line
w = 1/p), writes ``<name>.png`` and prints per group the median over nodes of |w_n p_n - 1|
(mean over seeds) and how many nodes have an estimate.

    python scripts/fedau_weights.py multirun/fedau_fmnist_long --where variant=fedau,fedau_k50 --out results/fedau_long
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fedsim.report import group_runs, label_text, load  # noqa: E402


def last_weights(records: list[dict]) -> tuple[np.ndarray, np.ndarray] | None:
    """(w, p) of the last record that logged both; w is NaN where no interval is recorded yet."""
    for rec in reversed(records):
        if "fedau/estimates" in rec and "fedau/rates" in rec:
            w = np.array([np.nan if x is None else x for x in rec["fedau/estimates"]], dtype=float)
            return w, np.asarray(rec["fedau/rates"], dtype=float)
    return None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("paths", nargs="+", type=Path, help="sweep folders or run folders")
    ap.add_argument("--where", nargs="*", default=[], metavar="KEY=VALUES", help="keep runs whose KEY is one of VALUES")
    ap.add_argument("--columns", default="participation", help="one panel per value of this key (if swept)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--name", default="fedau_weights")
    args = ap.parse_args(argv)
    runs, keys = load(args.paths)
    for cond in args.where:
        key, _, values = cond.partition("=")
        runs = [r for r in runs if r.values.get(key) in values.split(",")]
    data = {id(r): last_weights(r.records) for r in runs}
    runs = [r for r in runs if data[id(r)] is not None]
    if not runs:
        print(
            "fedau_weights: error: no finished run logged fedau/estimates with fedau/rates; run the sweep with "
            "strategy.log_weights_every=<rounds> under a participation model with known rates",
            file=sys.stderr,
        )
        sys.exit(2)
    col = args.columns if args.columns in keys else None
    panels = sorted({r.values.get(col, "") for r in runs}) if col else [""]
    line_keys = [k for k in keys if k not in ("seed", col) and len({r.values.get(k) for r in runs}) > 1]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4), squeeze=False)
    top = max(float(np.nanmax(1 / data[id(r)][1])) for r in runs)
    print("| group | median over nodes of abs(w p - 1), mean over seeds | nodes with an estimate | seeds |")
    print("|---|---|---|---|")
    for ax, panel in zip(axes[0], panels):
        members = [r for r in runs if not col or r.values.get(col, "") == panel]
        for i, (label, group) in enumerate(sorted(group_runs(members, line_keys).items())):
            name = label_text(label)
            pts, errs, seen = [], [], []
            for r in group:
                w, p = data[id(r)]
                ok = np.isfinite(w)
                pts.append(np.stack([1 / p[ok], w[ok]], 1))
                errs.append(float(np.median(np.abs(w[ok] * p[ok] - 1))))
                seen.append(f"{int(ok.sum())} / {len(w)}")
            xy = np.concatenate(pts)
            ax.scatter(xy[:, 0], xy[:, 1], s=8, alpha=0.4, marker="ox+^"[i % 4], label=f"{name}, all seeds")
            where = f"{col}={panel}, " if col else ""
            print(f"| {where}{name} | {np.mean(errs):.3f} | {', '.join(sorted(set(seen)))} | {len(group)} |")
        ax.plot([1, top], [1, top], color="black", linewidth=1, label="w = 1/p")
        ax.set(xscale="log", yscale="log", xlabel="1 / p_n (true)", ylabel="estimated weight w_n (last logged)")
        ax.set_title(f"FedAU weights vs 1/p_n{f' ({col}={panel})' if col else ''}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    out = args.out or args.paths[0]
    out.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out / f"{args.name}.png", dpi=120)
    print(f"wrote {out / f'{args.name}.png'}")


if __name__ == "__main__":
    main()
