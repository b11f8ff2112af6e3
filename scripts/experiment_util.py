"""Shared plumbing of the experiment drivers in scripts/: compose a config, run a simulation
recording its evaluation curve, and run a grid of runs in a process pool with resumable results
(one JSON line per finished run)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def compose_config(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def run_recorded(overrides: list[str], keys: Iterable[str] = ("eval/acc",), every_round: Iterable[str] = ()):
    """Build and run one simulation on this process (1 torch thread). Returns (sim, summary,
    curve): curve has one dict per evaluated round with ``round`` (1-based) and ``keys``, plus
    the running values of ``every_round`` keys (e.g. cumulative bytes) at that round."""
    import torch

    from fedsim.simulation import build, set_driver_threads

    torch.set_num_threads(1)
    set_driver_threads(1)
    sim = build(compose_config(overrides))
    curve: list[dict[str, Any]] = []
    keys, every_round = tuple(keys), tuple(every_round)

    class Keep:
        def on_round_end(self, t: int, m: dict) -> None:
            if "eval/acc" in m:
                curve.append({"round": t + 1, **{k: m[k] for k in keys + every_round if k in m}})

    try:
        _, summary = sim.run([Keep()])
    finally:
        sim.close()
    return sim, summary, curve


def run_grid(
    runs: list[dict],
    work: Callable[[dict], dict],
    *,
    sink_path: Path,
    key: Callable[[dict], tuple],
    jobs: int,
    describe: Callable[[dict], str],
) -> list[dict]:
    """Run every spec in ``runs`` not yet in ``sink_path`` (by ``key``), ``jobs`` at a time;
    append each result as it finishes. Returns all results, old and new."""
    results = [json.loads(x) for x in sink_path.read_text().splitlines()] if sink_path.exists() else []
    done = {key(r) for r in results}
    todo = [r for r in runs if key(r) not in done]
    print(f"{len(todo)} runs to do ({len(results)} already in {sink_path}), {jobs} at a time", flush=True)
    if not todo:
        return results
    with ProcessPoolExecutor(max_workers=jobs) as pool, sink_path.open("a") as sink:
        futs = [pool.submit(work, spec) for spec in todo]
        for fut in as_completed(futs):
            r = fut.result()
            results.append(r)
            sink.write(json.dumps(r) + "\n")
            sink.flush()
            print(describe(r), flush=True)
    return results


def pyplot():
    """matplotlib's pyplot on the Agg backend, or None (with a hint) when it is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: pip install -e .[experiments] for the plots", file=sys.stderr)
        return None
    return plt


def mean_curve(runs: list[dict], x_key: str, y_key: str = "eval/acc"):
    """Across runs (seeds): mean x, mean y and std y of their recorded curves, cut to the shortest
    curve (runs that stop by simulated time may evaluate once more or less)."""
    import numpy as np

    n = min(len(r["curve"]) for r in runs)
    xs = np.array([[c[x_key] for c in r["curve"][:n]] for r in runs], dtype=float).mean(0)
    ys = np.array([[c[y_key] for c in r["curve"][:n]] for r in runs], dtype=float)
    return xs, ys.mean(0), ys.std(0)


def plot_mean_curves(ax, groups: Iterable[tuple[str, list[dict], dict]], x_key: str, y_key: str = "eval/acc") -> None:
    """On ``ax``, for each ``(label, runs, style)`` group that has runs: its `mean_curve` as a line
    (matplotlib ``style``, e.g. a colour or marker) with a band of one standard deviation (in the
    line's colour when the style names one)."""
    for label, runs, style in groups:
        if not runs:
            continue
        x, mean, std = mean_curve(runs, x_key, y_key)
        ax.plot(x, mean, label=label, **style)
        ax.fill_between(
            x, mean - std, mean + std, alpha=0.15, **({"color": style["color"]} if "color" in style else {})
        )


def save_figure(fig, path: Path) -> Path:
    """Lay out, write as PNG (120 dpi) and close ``fig``."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def experiment_parser(doc: str, out: Path, rounds: int):
    """The command line every federated experiment driver shares."""
    import argparse
    import os

    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--out", type=Path, default=out)
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--rounds", type=int, default=rounds)
    ap.add_argument("--root", default=None, help="folder with Fashion-MNIST's IDX files")
    ap.add_argument("--jobs", type=int, default=max(1, os.cpu_count() or 1))
    ap.add_argument("--plot-only", action="store_true", help="only rebuild the table and plots from results.jsonl")
    return ap


def report(
    results: list[dict],
    out: Path,
    summarise: Callable[[list[dict]], str],
    plot: Callable[[list[dict], Path], list[Path]],
) -> None:
    """Write and print the markdown table, then the plots."""
    text = summarise(results)
    (out / "table.md").write_text(text)
    print(text)
    for p in plot(results, out):
        print(f"wrote {p}")
