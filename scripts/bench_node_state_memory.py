"""Memory of per-node error-feedback state at scale (issue 6): 10,000 nodes of a ~100,000-
parameter model (MLP 784-128-10, d = 101,770) on 60,000 synthetic 28x28 images (6 per node).

Runs the real simulator (local executor) with EControl + top-1 % until every node has its state
(e and h, float32, d entries each), visiting ``--per-round`` nodes per round in id order, and
reports the bytes held in node state, the driver's peak resident memory, and the server's own
compression state (the mirrored mean estimate: d floats).

    .venv/bin/python scripts/bench_node_state_memory.py [--nodes 10000] [--per-round 1000] [--feedback econtrol]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def compose_config(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def rss_gb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024**2
    return float("nan")


def tensor_bytes(tree) -> int:
    """Bytes of every tensor in a nested dict (a node's or the uplink's state)."""
    import torch

    if torch.is_tensor(tree):
        return tree.numel() * tree.element_size()
    if isinstance(tree, dict):
        return sum(tensor_bytes(v) for v in tree.values())
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=10_000)
    ap.add_argument("--per-round", type=int, default=1000)
    ap.add_argument("--feedback", default="econtrol")
    args = ap.parse_args()
    import torch

    from fedsim.simulation import build, set_driver_threads

    torch.set_num_threads(1)
    set_driver_threads(1)
    rounds = -(-args.nodes // args.per_round)
    cfg = compose_config(
        [
            "dataset=synthetic",
            "dataset.shape=[1,28,28]",
            "dataset.n_train=60000",
            "dataset.n_test=1000",
            "model=mlp",
            "model.hidden=[128]",
            "partition=iid",
            f"num_nodes={args.nodes}",
            f"nodes_per_round={args.per_round}",
            f"rounds={rounds}",
            "eval_every=0",
            "cluster=local",
            "logger=jsonl",
            "strategy.client.steps=1",
            "strategy.client.batch_size=6",
            "compressor=top_k",
            "compressor.ratio=0.01",
            f"feedback={args.feedback}",
        ]
    )
    sim = build(cfg)
    per = args.per_round
    # every node once, in id order (round t runs nodes [t * per, (t + 1) * per))
    sim.participation = lambda t, n, k, rng: np.arange(t * per, min((t + 1) * per, n))
    base = rss_gb()
    t0 = time.perf_counter()
    state, _ = sim.run()
    seconds = time.perf_counter() - t0
    held = sum(tensor_bytes(s) for s in state.node_states.values())
    out = {
        "nodes": args.nodes,
        "params": sim.num_params,
        "feedback": args.feedback,
        "nodes_with_state": len(state.node_states),
        "node_state_gb": held / 1024**3,
        "node_state_bytes_per_node": held / max(1, len(state.node_states)),
        "server_mirror_mb": tensor_bytes(state.uplink_state) / 1024**2,
        "rss_before_run_gb": base,
        "rss_after_run_gb": rss_gb(),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2,
        "seconds": seconds,
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
