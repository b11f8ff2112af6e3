"""SCAFFOLD under a compressed uplink: the two-vector form against a one-vector form.

The one-vector form is what the old contract allowed: nodes send only their update, and the
server rebuilds each node's control change from it (option II: c_i+ - c_i = -c + delta_i / (K_i
lr)). Under error feedback the server only sees an estimate of delta_i while the node used its
true delta_i, so the server's c leaves the mean of the nodes' c_i. The two-vector form
(`strategies/scaffold.py`) sends the control change as a vector of its own.

    python scripts/scaffold_compression.py [--rounds 20] [--seeds 0 1 2] [-- extra overrides]

Prints, per method and seed, the final test accuracy and the relative gap
||c - mean_i c_i|| / ||mean_i c_i|| between the server's control variate and the mean over all N
nodes of their own c_i (the invariant SCAFFOLD relies on).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fedsim.contract import RunFacts  # noqa: E402
from fedsim.types import RoundInfo, UpdateBatch  # noqa: E402
from strategies.client import Correction, LocalSGD  # noqa: E402
from strategies.fedavg import FedAvg  # noqa: E402


class OneVectorClient(LocalSGD):
    """SCAFFOLD option II's node, sending only its update."""

    def correction(self, start, state, ctx):
        c = ctx.broadcast["c"]
        own = None if state is None else state.get("c")
        return Correction(linear=c if own is None else c - own)

    def finish(self, model, delta, start, data, state, ctx):
        if len(data) == 0:
            return delta, state
        c = ctx.broadcast["c"]
        own = torch.zeros_like(c) if state is None or state.get("c") is None else state["c"]
        return delta, {"c": own - c + delta / (self.steps(len(data)) * self.lr)}


class OneVectorScaffold(FedAvg):
    """The server rebuilds each sender's control change from the row it received."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.declare(broadcast="vectors", linear=False)

    def init(self, params: torch.Tensor, facts: RunFacts) -> dict[str, Any]:
        state = super().init(params, facts)
        state["c"] = torch.zeros_like(params)
        state["steps"] = torch.tensor([self.client.steps(int(n)) for n in facts.sizes], dtype=torch.float32)
        state["N"] = int(facts.num_nodes)
        return state

    def broadcast(self, state):
        return {"c": state["c"]}

    def step(self, params, batch: UpdateBatch, state, info: RoundInfo):
        new_params, new_state, metrics = super().step(params, batch, state, info)
        K = state["steps"].index_select(0, batch.node_ids).unsqueeze(1)
        rebuilt = -state["c"] + batch.messages / (K.clamp(min=1) * self.client.lr)
        live = (batch.num_examples > 0).unsqueeze(1)
        c = state["c"] + (rebuilt * live).sum(0) / state["N"]
        return new_params, {**new_state, "c": c}, metrics


def gap(state) -> float:
    total = torch.zeros_like(state.params)
    n = state.strategy_state.get("N") or state.strategy_state.get("num_nodes")
    for nid in range(int(n)):
        node = state.node_states.get(nid) or {}
        c = (node.get("client") or {}).get("c")
        if c is not None:
            total += c
    mean = total / n
    return float((state.strategy_state["c"] - mean).norm() / mean.norm())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--json", type=Path)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from hydra import compose, initialize_config_dir

    from fedsim.simulation import build, set_driver_threads

    common = [
        "dataset=digits",
        "partition=dirichlet",
        "partition.alpha=0.1",
        "cluster=local",
        "compressor=top_k",
        "compressor.ratio=0.1",
        "feedback=ef21",
        f"rounds={args.rounds}",
        "eval_every=0",
    ]
    groups = {o.split("=", 1)[0] for o in args.overrides if "=" in o}
    # an uplink given on the command line replaces the default one (with its options)
    common = [o for o in common if o.split("=", 1)[0].split(".")[0] not in groups] + list(args.overrides)
    methods = {
        "fedavg": ["strategy=fedavg", "strategy.weighted=false"],
        "scaffold, one vector (server rebuilds the control change)": [
            "strategy=fedavg",
            "strategy.weighted=false",
            "strategy._target_=__main__.OneVectorScaffold",
            "strategy.client._target_=__main__.OneVectorClient",
        ],
        "scaffold, two vectors (control dense)": ["strategy=scaffold"],
        "scaffold, two vectors (control compressed)": ["strategy=scaffold", "strategy.control_uplink=compressed"],
    }
    out = []
    set_driver_threads(1)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        for name, extra in methods.items():
            for seed in args.seeds:
                cfg = compose(
                    config_name="config", overrides=[*common, *extra, f"seed={seed}"], return_hydra_config=True
                )
                sim = build(cfg)
                try:
                    state, summary = sim.run()
                finally:
                    sim.close()
                row = {
                    "method": name,
                    "seed": seed,
                    "acc": round(float(summary["eval/acc"]), 4),
                    "c_gap": None if name == "fedavg" else round(gap(state), 4),
                }
                out.append(row)
                print(json.dumps(row), flush=True)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
