"""Memory of a long cluster=ray run: the driver's resident set size, and the sum over the Ray
worker processes, every ``--every`` steps (digits, 20 nodes, 10 per round, 2 actors).

    .venv/bin/python scripts/bench_rss.py [--rounds 5000] [--every 250]

Prints one JSON line per sample and a final line with the growth from the first sample.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def rss_mb(pid: int | str = "self") -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def ray_workers_mb() -> float:
    """RSS of the processes named ray::* (the actors) that are not this driver."""
    total = 0.0
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit() and int(proc.name) != os.getpid():
            try:
                if (proc / "cmdline").read_bytes().startswith(b"ray::"):
                    total += rss_mb(proc.name)
            except OSError:
                continue
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5000)
    ap.add_argument("--every", type=int, default=250)
    args = ap.parse_args()
    from hydra import compose, initialize_config_dir

    from fedsim.simulation import build, set_driver_threads

    set_driver_threads(1)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=[f"rounds={args.rounds}", "eval_every=50", "cluster=ray", "cluster.num_cpus=2", "logger=jsonl"],
        )
    sim = build(cfg)
    samples: list[dict] = []
    t0 = time.perf_counter()

    class Sample:
        def on_round_end(self, t: int, metrics: dict) -> None:
            if (t + 1) % args.every == 0:
                row = {
                    "round": t + 1,
                    "driver_mb": round(rss_mb(), 1),
                    "workers_mb": round(ray_workers_mb(), 1),
                    "seconds": round(time.perf_counter() - t0, 1),
                }
                samples.append(row)
                print(json.dumps(row), flush=True)

    try:
        sim.run([Sample()])
    finally:
        sim.close()
    first, last = samples[0], samples[-1]
    print(
        json.dumps(
            {
                "driver_growth_mb": round(last["driver_mb"] - first["driver_mb"], 1),
                "workers_growth_mb": round(last["workers_mb"] - first["workers_mb"], 1),
                "from_round": first["round"],
                "to_round": last["round"],
            }
        )
    )


if __name__ == "__main__":
    main()
