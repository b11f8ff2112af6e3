"""Time every aggregator and pre-aggregator config on an (n, d) matrix (default n = 100,
d = 1,000,000, f = 10), one thread or all, and print a table.

    .venv/bin/python scripts/bench_aggregators.py [--n 100] [--d 1000000] [--f 10] [--repeat 3] [--only median meamed]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the repository's packages and its Hydra plugins (the sweeper)

from strategies.preaggregators import PRE_AGGREGATORS, build_chain  # noqa: E402

CONF = ROOT / "conf"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--d", type=int, default=1_000_000)
    ap.add_argument("--f", type=int, default=10)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--only", nargs="*", default=None, help="these rules (and pre:NAME) only")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    U = torch.randn(args.n, args.d, generator=torch.Generator().manual_seed(0))
    w = torch.ones(args.n, dtype=torch.float64)
    names = sorted(p.stem for p in (CONF / "strategy" / "aggregator").glob("*.yaml"))
    pres = sorted(PRE_AGGREGATORS)
    if args.only is not None:
        names = [n for n in names if n in args.only]
        pres = [p for p in pres if f"pre:{p}" in args.only]
    print(f"n={args.n} d={args.d} f={args.f} threads={torch.get_num_threads()} (best of {args.repeat})")
    print(f"{'rule':<28}{'seconds':>10}")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for name in names:
            cfg = compose(config_name="config", overrides=[f"strategy/aggregator={name}", f"byzantine.num={args.f}"])
            agg = instantiate(cfg.strategy.aggregator)
            best = min(_time(lambda agg=agg: agg.aggregate(U, w, agg.init())) for _ in range(args.repeat))
            print(f"{name:<28}{best:>10.3f}")
    for name in pres:
        pre = build_chain([name], f=args.f)[0]
        best = min(_time(lambda pre=pre: pre(U, w, rng=torch.Generator().manual_seed(0))) for _ in range(args.repeat))
        print(f"{'pre:' + name:<28}{best:>10.3f}")


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
