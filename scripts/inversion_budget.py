"""Accuracy of the gradient-inversion estimate against its budget (strategies/inversion.py).

One stale update on Fashion-MNIST with the authors' MNIST CNN shape (conv 10, conv 20, fc 50,
10): a model trained by central SGD on the other nine classes gives w_old (after ``--warm``
steps) and w_now (``--delay`` steps later); a node holding ``--node-size`` images of class 5
runs ``--local-steps`` full-batch steps at ``--lr`` (the authors: 5 full-batch steps) from w_old
(the stale update dw) and from w_now (the fresh update the oracle knows). For each budget
(iterations x synthetic images x inversion lr) the script inverts dw, replays from w_now and
reports the relative L1 errors ||dw_hat - dw_fresh|| / ||dw_fresh|| against the stale update's
||dw - dw_fresh|| / ||dw_fresh||, the fit residual and the seconds taken.

    .venv/bin/python scripts/inversion_budget.py --json results/inversion/budget.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fedsim.data.sources import load_fashion_mnist  # noqa: E402
from fedsim.models import ConvNet  # noqa: E402
from fedsim.seeding import np_rng, torch_rng  # noqa: E402
from strategies.inversion import Unrolled, invert  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--budgets", default="10x32x1,30x32x1,100x32x1,300x32x1,10x32x0.1,30x32x0.1,100x32x0.1,300x32x0.1,100x128x0.1"
    )
    ap.add_argument("--warm", type=int, default=30)
    ap.add_argument("--delay", type=int, default=40)
    ap.add_argument("--node-size", type=int, default=200)
    ap.add_argument("--local-steps", type=int, default=5)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    data = load_fashion_mnist(download=False)
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    rng = np_rng(0, "budget")
    others = np.flatnonzero(data.y_train != 5)
    node = rng.choice(np.flatnonzero(data.y_train == 5), args.node_size, replace=False)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        module = ConvNet((1, 28, 28), 10, channels=[10, 20], kernel=5, padding=0, hidden=[50])
    names = [n for n, _ in module.named_parameters()]
    w = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
    un = Unrolled(module, lr=args.lr)

    def sgd(w: torch.Tensor, steps: int, offset: int) -> torch.Tensor:
        for s in range(steps):
            idx = torch.from_numpy(np_rng(0, "central", offset + s).choice(others, 64, replace=False))
            p = un.fm.one(w.clone().requires_grad_(True))
            loss = F.cross_entropy(torch.func.functional_call(module, p, (x[idx],)), y[idx])
            g = torch.autograd.grad(loss, list(p.values()))
            w = (w - 0.05 * torch.cat([t.reshape(-1) for t in g])).detach()
        return w

    w_old = sgd(w, args.warm, 0)
    w_now = sgd(w_old, args.delay, args.warm)
    xn, yn = x[torch.from_numpy(node)], F.one_hot(y[torch.from_numpy(node)], 10).float() * 1e4  # hard labels
    with torch.no_grad():
        dw = un.update(w_old, xn, yn, args.local_steps)
        fresh = un.update(w_now, xn, yn, args.local_steps)
    norm = float(fresh.abs().sum())
    out: dict = {
        "setting": vars(args),
        "names": names,
        "err_stale": float((dw - fresh).abs().sum()) / norm,
        "model_drift_rel": float((w_now - w_old).norm() / w_old.norm()),
        "budgets": [],
    }
    print(f"stale update: relative L1 error {out['err_stale']:.4f} against the fresh one")
    for spec in args.budgets.split(","):
        iters, images, lr = spec.split("x")
        t0 = time.perf_counter()
        xs, ls, fit = invert(
            un,
            w_old,
            dw,
            steps=args.local_steps,
            input_shape=(1, 28, 28),
            num_classes=10,
            images=int(images),
            iterations=int(iters),
            lr=float(lr),
            box=(0.0, 1.0),
            generator=torch_rng(0, "budget-init"),
        )
        with torch.no_grad():
            est = un.update(w_now, xs, ls, args.local_steps)
        row = {
            "iterations": int(iters),
            "images": int(images),
            "inv_lr": float(lr),
            "err_estimate": float((est - fresh).abs().sum()) / norm,
            "fit_rel": fit / float(dw.abs().sum()),
            "seconds": time.perf_counter() - t0,
        }
        out["budgets"].append(row)
        print(json.dumps(row), flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
