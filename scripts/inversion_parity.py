"""Parity of fedsim's gradient inversion (strategies/inversion.py) with the authors' procedure.

The authors' objective and loop (Wang and Gao, arXiv 2309.13536; their ``fixed.py`` calling an
inverting-gradients ``FedAvgReconstructor``) are restated here independently, with plain
``torch.autograd`` on a list of parameter tensors instead of fedsim's ``torch.func`` over a flat
vector:

- unrolled local training: K full-batch steps p <- p - lr grad_p loss(f(p; x), labels) with
  ``create_graph=True``; the update is p_K - p_0, one tensor per parameter;
- cost: the sum over the tensors of the L1 distance to the stale update;
- loop: Adam on [x, labels] at lr, each iteration: cost, backward, x's gradient replaced by its
  sign (labels keep theirs), step, MultiStepLR (milestones it // 2.667, // 1.6, // 1.142,
  gamma 0.1), x clamped to the box;
- labels: the authors' code path (the labels are a 2-D tensor, so the unrolled loss is
  BCE-with-logits against the raw labels), and the soft-label cross-entropy fedsim defaults to.

Both start from the same randn draws, on the authors' MNIST CNN shape (conv 10, conv 20, fc 50,
10; fedsim's ``ConvNet``), and the script prints the largest differences of the fitted inputs,
labels, final cost and replayed update. ``--iterations``/``--images``/``--steps`` size it.

    .venv/bin/python scripts/inversion_parity.py
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fedsim.models import ConvNet  # noqa: E402
from fedsim.seeding import torch_rng  # noqa: E402
from strategies.inversion import Unrolled, invert  # noqa: E402


def restated_update(module, params, x, labels, steps, lr, kind):
    """The authors' unrolled local training on a parameter list: returns [p_K - p_0]."""
    names = [n for n, _ in module.named_parameters()]
    current = list(params)
    for _ in range(steps):
        out = torch.func.functional_call(module, dict(zip(names, current)), (x,))
        if kind == "bce":
            loss = F.binary_cross_entropy_with_logits(out, labels)
        else:
            loss = torch.mean(torch.sum(-labels.softmax(-1) * out.log_softmax(-1), 1))
        grads = torch.autograd.grad(loss, current, create_graph=True)
        current = [p - lr * g for p, g in zip(current, grads)]
    return [p - q for p, q in zip(current, params)]


def restated_inversion(module, start_tensors, dw_tensors, x0, l0, *, steps, lr, iterations, inv_lr, box, kind):
    x = x0.clone().requires_grad_(True)
    labels = l0.clone().requires_grad_(True)
    opt = torch.optim.Adam([x, labels], lr=inv_lr)
    sched = torch.optim.lr_scheduler.MultiStepLR(
        opt, milestones=[iterations // 2.667, iterations // 1.6, iterations // 1.142], gamma=0.1
    )
    for _ in range(iterations):
        opt.zero_grad()
        upd = restated_update(module, start_tensors, x, labels, steps, lr, kind)
        cost = sum((u - d).abs().sum() for u, d in zip(upd, dw_tensors))
        cost.backward()
        x.grad.sign_()
        opt.step()
        sched.step()
        with torch.no_grad():
            x.data = torch.max(torch.min(x, torch.tensor(box[1])), torch.tensor(box[0]))
    upd = restated_update(module, start_tensors, x.detach(), labels.detach(), steps, lr, kind)
    cost = float(sum((u.detach() - d).abs().sum() for u, d in zip(upd, dw_tensors)))
    return x.detach(), labels.detach(), cost


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=40)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--inv-lr", type=float, default=0.1)
    ap.add_argument("--json", type=str, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(0)
    module = ConvNet((1, 28, 28), 10, channels=[10, 20], kernel=5, padding=0, hidden=[50])
    box = (0.0, 1.0)
    out = {"setting": vars(args)}
    for kind in ("bce", "soft_ce"):
        un = Unrolled(module, lr=args.lr, loss=kind)
        start = torch.cat([p.detach().reshape(-1) for p in module.parameters()])
        # a stale update from a "real" node: K steps on 16 random images with one-hot-ish labels
        gdata = torch_rng(0, "parity-data")
        xr = torch.rand(16, 1, 28, 28, generator=gdata)
        lr_ = F.one_hot(torch.randint(0, 10, (16,), generator=gdata), 10).float() * 4 - 2
        dw = un.update(start, xr, lr_, args.steps).detach()
        # fedsim
        x_f, l_f, fit_f = invert(
            un,
            start,
            dw,
            steps=args.steps,
            input_shape=(1, 28, 28),
            num_classes=10,
            images=args.images,
            iterations=args.iterations,
            lr=args.inv_lr,
            box=box,
            generator=torch_rng(0, "parity-init"),
        )
        # the restatement, from the same draws (x first, then labels, as both do)
        g = torch_rng(0, "parity-init")
        x0 = torch.randn((args.images, 1, 28, 28), generator=g)
        l0 = torch.randn((args.images, 10), generator=g)
        tensors = [p.detach().clone().requires_grad_(True) for p in module.parameters()]
        sizes = [t.numel() for t in tensors]
        dw_t = [d.view_as(t).detach() for d, t in zip(torch.split(dw, sizes), tensors)]
        x_r, l_r, fit_r = restated_inversion(
            module,
            tensors,
            dw_t,
            x0,
            l0,
            steps=args.steps,
            lr=args.lr,
            iterations=args.iterations,
            inv_lr=args.inv_lr,
            box=box,
            kind=kind,
        )
        # replay both from a moved model
        now = start + 0.01 * torch.randn(start.shape, generator=torch_rng(0, "parity-now"))
        with torch.no_grad():
            rep_f = un.update(now, x_f, l_f, args.steps)
        now_t = [t.view_as(p).clone().requires_grad_(True) for t, p in zip(torch.split(now, sizes), tensors)]
        rep_r = torch.cat(
            [u.detach().reshape(-1) for u in restated_update(module, now_t, x_r, l_r, args.steps, args.lr, kind)]
        )
        res = {
            "x_max_abs_diff": float((x_f - x_r).abs().max()),
            "labels_max_abs_diff": float((l_f - l_r).abs().max()),
            "fit_fedsim": fit_f,
            "fit_restated": fit_r,
            "fit_rel_diff": abs(fit_f - fit_r) / max(abs(fit_r), 1e-30),
            "fit_rel_to_dw": fit_f / float(dw.abs().sum()),
            "replay_rel_l1_diff": float((rep_f - rep_r).abs().sum() / rep_r.abs().sum()),
        }
        out[kind] = res
        print(kind, json.dumps(res))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
