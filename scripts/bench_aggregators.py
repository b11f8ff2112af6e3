"""Time every aggregator and pre-aggregator config on an (n, d) matrix (default n = 100,
d = 1,000,000, f = 10), one thread or all, on the CPU or a GPU, and print a table.

    .venv/bin/python scripts/bench_aggregators.py [--n 100] [--d 1000000] [--f 10] [--repeat 3] [--only median meamed]
    .venv/bin/python scripts/bench_aggregators.py --device cuda --d 11200000 --repeat 2 [--json out.json]

With ``--device cuda`` the matrix is drawn on the GPU and every timing waits for the GPU's
queued kernels; the first of the ``--repeat`` calls of a rule includes its kernels' first load.
A rule that fails (e.g. no GPU path) is printed with its error and the others go on.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # the repository's packages and its Hydra plugins (the sweeper)

from fedsim.devices import name_of, resolve, synchronize  # noqa: E402
from fedsim.errors import ConfigError  # noqa: E402
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
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--json", type=Path, default=None, help="also write {rule: seconds or error} to this file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = resolve(args.device, key="--device")
    except ConfigError as exc:
        ap.error(str(exc))
    U = torch.randn(args.n, args.d, generator=torch.Generator(device).manual_seed(0), device=device)
    w = torch.ones(args.n, dtype=torch.float64, device=device)
    names = sorted(p.stem for p in (CONF / "strategy" / "aggregator").glob("*.yaml"))
    pres = sorted(PRE_AGGREGATORS)
    if args.only is not None:
        names = [n for n in names if n in args.only]
        pres = [p for p in pres if f"pre:{p}" in args.only]
    print(
        f"n={args.n} d={args.d} f={args.f} threads={torch.get_num_threads()} device={name_of(device)} "
        f"(best of {args.repeat})"
    )
    print(f"{'rule':<28}{'seconds':>10}")
    results: dict[str, float | str] = {}

    def report(label: str, fn) -> None:
        try:
            best = min(_time(fn, device) for _ in range(args.repeat))
        except Exception as exc:  # a rule without a path for this device: say so, go on
            results[label] = f"{type(exc).__name__}: {exc}".splitlines()[0]
            print(f"{label:<28}{'failed':>10}  {results[label]}")
            return
        results[label] = round(best, 4)
        print(f"{label:<28}{best:>10.3f}")

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        for name in names:
            cfg = compose(config_name="config", overrides=[f"strategy/aggregator={name}", f"byzantine.num={args.f}"])
            agg = instantiate(cfg.strategy.aggregator)
            report(name, lambda agg=agg: agg.aggregate(U, w, agg.init()))
    for name in pres:
        pre = build_chain([name], f=args.f)[0]
        report(f"pre:{name}", lambda pre=pre: pre(U, w, rng=torch.Generator().manual_seed(0)))
    if args.json:
        meta = {"n": args.n, "d": args.d, "f": args.f, "repeat": args.repeat, "device": name_of(device)}
        args.json.write_text(json.dumps({**meta, "seconds": results}, indent=2) + "\n")


def _time(fn, device: torch.device) -> float:
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
