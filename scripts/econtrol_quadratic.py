"""The heterogeneous quadratic of docs/methods/econtrol.md ("Checks"): n = 10
nodes, f_i = 1/2 ||A_i x - b_i||^2 with A_i 30 x 50 and node-dependent b_i, top-5 of 50, full
gradients, step 0.2 / L_max, float64. Prints ||grad f|| after each number of steps for naive
compression, EF14, EF21, EF21-SGDM and EControl (eta 0.05, 0.1, 0.2). The test
tests/strategies/test_compression.py asserts the separation at 2,000 steps.

    .venv/bin/python scripts/econtrol_quadratic.py [--steps 500 1000 2000]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from strategies.feedback import EF14, EF21, EF21SGDM, EControl, NoFeedback  # noqa: E402
from tests.strategies.test_compression import run_quadratic  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", nargs="+", type=int, default=[500, 1000, 2000])
    args = ap.parse_args()
    rules = {
        "naive": NoFeedback,
        "EF14": EF14,
        "EF21": EF21,
        "EF21-SGDM 0.1": lambda: EF21SGDM(momentum=0.1),
        "EControl 0.05": lambda: EControl(eta=0.05),
        "EControl 0.1": lambda: EControl(eta=0.1),
        "EControl 0.2": lambda: EControl(eta=0.2),
    }
    print("| rule | " + " | ".join(f"{s} steps" for s in args.steps) + " |")
    print("|---|" + "---|" * len(args.steps))
    start = None
    for name, make in rules.items():
        cells = []
        for steps in args.steps:
            start, final = run_quadratic(make(), steps=steps)
            cells.append(f"{final:.2e}")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    print(f"\n||grad f(x0)|| = {start:.3e}")


if __name__ == "__main__":
    main()
