"""Round time against the number of nodes: does anything cost O(all nodes) per round?

For N = 10^3 ... 10^6 nodes (synthetic Gaussian mixture, 20 features, 2 examples per node, IID,
logistic regression, one process), 100 nodes per round, it times the build and the steady
rounds of FedAvg, of MIFA (one stored update per node that has sent) and of FedAvg with an EF21
uplink (one error-feedback estimate per node in the node state). The round time should stay
flat (within 2x) from 10^3 to 10^6 nodes.

    .venv/bin/python scripts/bench_nodes.py [--nodes 1000 10000 100000 1000000] [--rounds 40]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CASES = {
    "fedavg": ["strategy=fedavg"],
    "mifa": ["strategy=mifa"],
    "fedavg+ef21": ["strategy=fedavg", "compressor=top_k", "compressor.ratio=0.1", "feedback=ef21"],
}


class RoundTimes:
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_run_start(self, meta) -> None:
        pass

    def on_round_end(self, round_: int, metrics: dict) -> None:
        self.times.append(float(metrics["time/round_s"]))

    def on_run_end(self, summary: dict) -> None:
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", nargs="+", type=int, default=[1_000, 10_000, 100_000, 1_000_000])
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--per-round", type=int, default=100)
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    from hydra import compose, initialize_config_dir

    from fedsim.simulation import build, set_driver_threads

    set_driver_threads(1)
    rows = []
    for case in args.cases:
        for n in args.nodes:
            overrides = [
                "dataset=synthetic",
                f"dataset.n_train={2 * n}",
                "dataset.n_test=2000",
                "partition=iid",
                "model=logreg",
                f"num_nodes={n}",
                f"nodes_per_round={args.per_round}",
                f"rounds={args.rounds}",
                "eval_every=0",
                "cluster=local",
                *CASES[case],
            ]
            with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
                cfg = compose(config_name="config", overrides=overrides)
            t0 = time.perf_counter()
            sim = build(cfg)
            built = time.perf_counter() - t0
            timer = RoundTimes()
            sim.run([timer])
            steady = timer.times[args.warmup :]
            row = {
                "case": case,
                "nodes": n,
                "build_s": round(built, 2),
                "round_ms_median": round(1000 * statistics.median(steady), 2),
                "round_ms_mean": round(1000 * statistics.mean(steady), 2),
                "nodes_with_state": len(sim.state.node_states),
            }
            sim.close()
            rows.append(row)
            print(json.dumps(row), flush=True)
    print()
    print("| case | nodes | build s | round ms (median) | round ms (mean) | nodes with state |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['case']} | {r['nodes']:,} | {r['build_s']} | {r['round_ms_median']} | {r['round_ms_mean']} | "
            f"{r['nodes_with_state']:,} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
