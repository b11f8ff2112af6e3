"""Every combination of strategy x server x uplink x attack x participation either runs (2
rounds on digits, finite accuracy) or is refused before it starts with one line. No crash.

The (strategy, server, attack) part of each cell is composed by Hydra exactly as the command line
does; the flat groups (compressor, feedback, participation) are then swapped in from their YAML
files, which is what composition does for groups without a defaults list (checked below), and
keeps the matrix cheap. ``python -m tests.test_combinations`` prints the counts and every refusal.
"""

from __future__ import annotations

import itertools
import math
import multiprocessing as mp
import sys
from collections import Counter
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"

STRATEGIES = sorted(path.stem for path in (CONF / "strategy").glob("*.yaml"))
"""Every strategy the command line offers (``strategy=<name>``): a new YAML is covered at once."""
SERVERS = ["sync", "async", "p2p"]
UPLINKS = {
    "none": {},
    "top_k+ef14": {"compressor": "top_k", "feedback": "ef14"},
    "rand_k+econtrol": {"compressor": "rand_k", "feedback": "econtrol"},
    "qsgd": {"compressor": "qsgd"},
}
ATTACKS = {
    "none": [],
    "alie": ["attack=alie", "byzantine.num=2"],
    "label_flip": ["attack=label_flip", "byzantine.num=2"],
    "sign_flip+median": ["attack=sign_flip", "byzantine.num=2", "strategy/aggregator=median"],
}
PARTICIPATION = {
    "uniform": {},
    "bernoulli": {"participation": "bernoulli"},
    "markov": {"participation": "markov"},
    "cyclic": {"participation": "cyclic"},
}
SETTINGS = {"compressor.ratio": 0.1, "participation.p": 0.5, "participation.period": 4}
BASE = [
    "dataset=digits",
    "model=logreg",
    "num_nodes=8",
    "nodes_per_round=8",
    "rounds=2",
    "eval_every=0",
    "cluster=local",
    "logger=jsonl",
    "seed=1",
    "strategy.predictor_rounds=1",
    "strategy.calibration_rounds=1",
]
CELLS = list(itertools.product(STRATEGIES, SERVERS, UPLINKS, ATTACKS, PARTICIPATION))


@cache
def _composed(strategy: str, server: str, attack: str):
    from hydra import compose, initialize_config_dir

    from fedsim.cli import one_line

    base = [b for b in BASE if not b.startswith("strategy.") or strategy.startswith("vrls")]
    if server == "p2p":
        base = [b for b in base if not b.startswith("nodes_per_round")]
    overrides = [*base, f"strategy={strategy}", f"server={server}", *ATTACKS[attack]]
    try:
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose(config_name="config", overrides=overrides, return_hydra_config=True), None
    except Exception as exc:  # noqa: BLE001 - the command line shows this as its one line
        return None, one_line(exc)


def run_cell(cell: tuple[str, str, str, str, str]) -> tuple[tuple[str, ...], str, str]:
    """(cell, status, detail): status ran, refused or crashed."""
    import torch
    from omegaconf import OmegaConf

    from fedsim.errors import ConfigError
    from fedsim.simulation import build, set_driver_threads

    torch.set_num_threads(1)
    set_driver_threads(1)
    strategy, server, uplink, attack, part = cell
    composed, refusal = _composed(strategy, server, attack)
    if composed is None:
        return cell, "refused", str(refusal)
    cfg = composed.copy()
    names = {k: str(v) for k, v in composed.hydra.runtime.choices.items() if v is not None}
    for group, option in {**UPLINKS[uplink], **PARTICIPATION[part]}.items():
        node = OmegaConf.load(CONF / group / f"{option}.yaml")
        assert "defaults" not in node, f"{group}/{option} has a defaults list; compose it with Hydra"
        cfg[group] = node
        names[group] = option
    for key, value in SETTINGS.items():
        group, name = key.split(".")
        if name in cfg[group]:
            cfg[group][name] = value
    try:
        sim = build(cfg, names=names)
    except ConfigError as exc:
        return cell, "refused", str(exc)
    except Exception as exc:  # noqa: BLE001
        return cell, "crashed", f"build: {type(exc).__name__}: {exc}"
    try:
        _, summary = sim.run()
    except Exception as exc:  # noqa: BLE001
        return cell, "crashed", f"run: {type(exc).__name__}: {exc}"
    finally:
        sim.close()
    acc = summary.get("eval/acc")
    if not isinstance(acc, float) or not math.isfinite(acc):
        return cell, "crashed", f"accuracy {acc!r}"
    return cell, "ran", f"{acc:.3f}"


def run_matrix(cells=CELLS, processes: int = 2):
    ctx = mp.get_context("spawn")  # the test session may hold a Ray instance: never fork it
    with ctx.Pool(processes) as pool:
        return pool.map(run_cell, cells, chunksize=24)


@pytest.mark.combinations
def test_every_combination_runs_or_is_refused_with_one_line():
    results = run_matrix()
    status = Counter(s for _, s, _ in results)
    crashed = [(c, d) for c, s, d in results if s == "crashed"]
    assert not crashed, crashed[:5]
    for cell, s, detail in results:
        if s == "refused":
            assert detail and "\n" not in detail and "Traceback" not in detail, (cell, detail)
            assert not any(word in detail for word in ("Buffered", "Decentralized", "Compressed", "Naive")), detail
    ran = {c for c, s, _ in results if s == "ran"}
    # the combinations the contract promises (label shift + Byzantine faults + compression, robust
    # error feedback, FedAU with error feedback, async with everything, the new FedProx)
    for cell in [
        ("vrls", "sync", "rand_k+econtrol", "sign_flip+median", "uniform"),
        ("vrls_bbse", "sync", "top_k+ef14", "alie", "bernoulli"),
        ("robust", "sync", "rand_k+econtrol", "sign_flip+median", "markov"),
        ("fedau", "sync", "rand_k+econtrol", "label_flip", "cyclic"),
        ("fedbuff", "async", "rand_k+econtrol", "sign_flip+median", "bernoulli"),
        ("monna", "p2p", "none", "label_flip", "uniform"),
        ("fedprox", "async", "qsgd", "alie", "markov"),
        ("scaffold", "sync", "top_k+ef14", "sign_flip+median", "bernoulli"),
        ("scaffold", "async", "rand_k+econtrol", "alie", "uniform"),
        ("feddyn", "sync", "rand_k+econtrol", "label_flip", "markov"),
        ("fednova", "sync", "qsgd", "sign_flip+median", "cyclic"),
    ]:
        assert cell in ran, (cell, next(d for c, _, d in results if c == cell))
    assert status["ran"] + status["refused"] == len(CELLS)
    assert {"fedavg", "scaffold", "fednova", "feddyn", "vrls", "monna"} <= set(STRATEGIES)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    out = run_matrix()
    print(len(out), dict(Counter(s for _, s, _ in out)))
    for (cell, s, detail), n in Counter((c[:3], s, d) for c, s, d in out if s != "ran").most_common():
        print(n, s, cell, detail[:150])
