"""Checkpoint size and write time for two heavy states, measured on this machine:

- ``resnet18``: ResNet-18 (GroupNorm, CIFAR-10 shape, 11.2M parameters) with FedAvgM's server
  velocity (two d-vectors), after one round of 4 nodes;
- ``econtrol``: 10,000 nodes of a 101,770-parameter MLP with EControl + top-1 %, after every node
  has run once (e and h per node: 7.6 GiB of node state).

    .venv/bin/python scripts/bench_checkpoint.py [--cases resnet18 econtrol] [--nodes 10000]

Prints one JSON line per case: bytes on disk, seconds to write (torch.save + fsync + rename) and
to read back.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CASES = {
    "resnet18": [
        "dataset=synthetic",
        "dataset.shape=[3,32,32]",
        "dataset.n_train=400",
        "dataset.n_test=100",
        "model=resnet18",
        "num_nodes=4",
        "nodes_per_round=4",
        "rounds=1",
        "strategy.client.steps=1",
        "strategy.client.batch_size=8",
        "strategy.server_opt.momentum=0.9",
    ],
    "econtrol": [
        "dataset=synthetic",
        "dataset.shape=[1,28,28]",
        "dataset.n_train=60000",
        "dataset.n_test=1000",
        "model=mlp",
        "model.hidden=[128]",
        "partition=iid",
        "compressor=top_k",
        "compressor.ratio=0.01",
        "feedback=econtrol",
        "strategy.client.steps=1",
    ],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--nodes", type=int, default=10_000, help="nodes of the econtrol case")
    args = ap.parse_args()
    import torch
    from hydra import compose, initialize_config_dir

    from fedsim import checkpoint
    from fedsim.simulation import build, set_driver_threads

    torch.set_num_threads(1)
    set_driver_threads(1)
    for case in args.cases:
        overrides = [*CASES[case], "cluster=local", "eval_every=0", "logger=jsonl"]
        if case == "econtrol":
            per = 1000
            overrides += [f"num_nodes={args.nodes}", f"nodes_per_round={per}", f"rounds={-(-args.nodes // per)}"]
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
        sim = build(cfg)
        if case == "econtrol":  # every node once, in id order
            sim.participation = lambda t, n, k, rng, per=per: np.arange(t * per, min((t + 1) * per, n))
        state, _ = sim.run()
        sim.close()
        folder = Path(tempfile.mkdtemp(prefix="fedsim-ckpt-", dir=ROOT))
        try:
            t0 = time.perf_counter()
            path = checkpoint.save(folder, state, logs={}, config={}, keep=1)
            write_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            back = checkpoint.latest(folder)
            read_s = time.perf_counter() - t0
            assert back is not None and torch.equal(back.state.params, state.params)
            print(
                json.dumps(
                    {
                        "case": case,
                        "params": sim.num_params,
                        "nodes_with_state": len(state.node_states),
                        "bytes": path.stat().st_size,
                        "gib": path.stat().st_size / 1024**3,
                        "write_s": round(write_s, 2),
                        "read_s": round(read_s, 2),
                    }
                ),
                flush=True,
            )
        finally:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
