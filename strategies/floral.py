"""FLORAL (Bal, Cevher & Muehlebach, "Adversarial Training for Defense Against Label Poisoning
Attacks", ICLR 2025, arXiv 2502.17121): a kernel SVM trained against a label-flipping attacker,
as a game solved by alternating one attacker move with one projected-gradient step on the dual,
and its extrapolation to federated neural networks (`Floral`, `FloralSGD`). Method notes, written
from the authors' code (melisilaydabal/floral: ``svm_opt.py``, ``player_flip.py``,
``experiment.py``): docs/methods/floral.md.

Notation: binary labels y in {-1, +1} (possibly already poisoned), RBF kernel
K_ij = exp(-gamma ||x_i - x_j||^2), dual variables lambda, box constant C. With attacked labels
y~, the dual (for minimisation) is D(lambda) = 1/2 lambda^T Q lambda - 1^T lambda with
Q_ij = y~_i y~_j K_ij, over {0 <= lambda <= C, y~^T lambda = 0}.

Round 0: the exact dual QP on the given labels (here libsvm through scikit-learn's SVC with a
precomputed kernel, tolerance 1e-8, instead of the code's cvxopt), then an attacker move. Round
t >= 1: one PGD step lambda <- P(lambda - lr (Q(y~) lambda - 1)) onto the feasible set of the
*current* attacked labels, then the attacker's next move. The projection is exact: the KKT
conditions give lambda(mu) = clip(lambda_hat - mu y~, 0, C) with y~^T lambda(mu) = 0, and since
y~^T lambda(mu) is non-increasing in mu, mu is found by bisection (the code's damped fixed-point
iteration solves the same equation; bisection is exact and never oscillates). The attacker takes the
support vectors (lambda > sv_tol), keeps the 2B with the largest lambda, and flips B of them drawn
uniformly, always relative to the given labels (flips are not cumulative). The bias is computed
from the same lambda and the same attacked labels as the decision function (computing it from
other labels is an easy mistake that silently changes the classifier).

Deviations, stated: constant learning rate (the code's intended decay never takes effect, see
docs/methods/floral.md); the projection runs only when lambda_hat is infeasible beyond a tolerance
of 1e-9 (the code tests exact equality).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedsim.errors import ConfigError
from strategies.client import LocalSGD
from strategies.fedavg import FedAvg


def rbf_kernel(X: np.ndarray, Y: np.ndarray, gamma: float) -> np.ndarray:
    """exp(-gamma ||x - y||^2) for every pair of rows (float64)."""
    X = np.asarray(X, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    sq = (X * X).sum(1)[:, None] + (Y * Y).sum(1)[None, :] - 2.0 * X @ Y.T
    return np.exp(-gamma * np.maximum(sq, 0.0))


def project_box_hyperplane(lam_hat: np.ndarray, y: np.ndarray, C: float, *, iters: int = 200) -> np.ndarray:
    """Euclidean projection of ``lam_hat`` onto {0 <= lambda <= C, y^T lambda = 0} for y in
    {-1, +1}^n: lambda(mu) = clip(lam_hat - mu y, 0, C), mu by bisection on the non-increasing
    function y^T lambda(mu). Needs both labels present (otherwise only lambda = 0 is feasible)."""
    lam_hat = np.asarray(lam_hat, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if not ((y > 0).any() and (y < 0).any()):
        return np.zeros_like(lam_hat)

    def g(mu: float) -> float:
        return float(y @ np.clip(lam_hat - mu * y, 0.0, C))

    span = float(np.abs(lam_hat).max()) + C + 1.0
    lo, hi = -span, span  # g(lo) = C * #pos >= 0 >= -C * #neg = g(hi)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if g(mid) > 0.0:
            lo = mid
        else:
            hi = mid
    return np.clip(lam_hat - 0.5 * (lo + hi) * y, 0.0, C)


def randomized_sv_flip(lam: np.ndarray, budget: int, rng: np.random.Generator, *, sv_tol: float) -> np.ndarray:
    """The attacker's move: indices of the B labels to flip, drawn uniformly from the (at most)
    2B support vectors with the largest dual weights (``player_flip.randomized_sv_flip``)."""
    sv = np.flatnonzero(lam > sv_tol)
    if budget <= 0 or sv.size == 0:
        return np.zeros(0, dtype=np.int64)
    order = sv[np.argsort(-lam[sv], kind="stable")][: 2 * budget]
    return np.sort(rng.choice(order, size=min(budget, order.size), replace=False))


def dual_qp(K: np.ndarray, y: np.ndarray, C: float) -> np.ndarray:
    """The exact dual solution lambda of the C-SVM with Gram matrix K and labels y in {-1, +1}."""
    from sklearn.svm import SVC

    svc = SVC(C=C, kernel="precomputed", tol=1e-8, shrinking=False)
    svc.fit(K, y)
    lam = np.zeros(len(y))
    lam[svc.support_] = np.abs(svc.dual_coef_[0])
    return lam


def bias(lam: np.ndarray, y: np.ndarray, K: np.ndarray, C: float, *, sv_tol: float) -> float:
    """b = mean over support vectors s of (y_s - sum_j lambda_j y_j K_sj), from one lambda and one
    label vector (the code's formula)."""
    sv = np.flatnonzero(lam > sv_tol)
    if sv.size == 0:
        return 0.0
    return float(np.mean(y[sv] - K[np.ix_(sv, sv)] @ (lam[sv] * y[sv])))


@dataclass
class KernelSVM:
    """A fitted kernel SVM: f(x) = sum_s lambda_s y_s k(x, x_s) + b over the support vectors."""

    X: np.ndarray
    coef: np.ndarray  # lambda_s * y_s over the support vectors
    b: float
    gamma: float

    def decision(self, X: np.ndarray) -> np.ndarray:
        if self.coef.size == 0:
            return np.full(len(X), self.b)
        return rbf_kernel(X, self.X, self.gamma) @ self.coef + self.b

    def accuracy(self, X: np.ndarray, y: np.ndarray) -> float:
        pred = np.where(self.decision(X) >= 0, 1, -1)
        return float((pred == np.asarray(y)).mean())


def _model(X, lam, y, K, C, gamma, sv_tol) -> KernelSVM:
    sv = np.flatnonzero(lam > sv_tol)
    return KernelSVM(np.asarray(X)[sv], lam[sv] * y[sv], bias(lam, y, K, C, sv_tol=sv_tol), gamma)


def rbf_svm(X: np.ndarray, y: np.ndarray, *, C: float = 10.0, gamma: float = 0.5, sv_tol: float = 1e-5) -> KernelSVM:
    """The vanilla RBF-SVM baseline: the exact dual QP on the given labels."""
    y = _pm1(y)
    K = rbf_kernel(X, X, gamma)
    return _model(X, dual_qp(K, y, C), y, K, C, gamma, sv_tol * C / 10.0)


def _pm1(y: np.ndarray) -> np.ndarray:
    y = np.asarray(y)
    vals = set(np.unique(y).tolist())
    if vals <= {0, 1}:
        return np.where(y > 0, 1.0, -1.0)
    if vals <= {-1, 1}:
        return y.astype(np.float64)
    raise ConfigError(f"FLORAL's SVM is binary: labels must be 0/1 or -1/+1, got {sorted(vals)}")


@dataclass
class FloralResult:
    """``model`` is the game's last iterate as the authors' code predicts with it (support-vector
    labels = the last attacked labels); ``model_given`` is the same lambda with the given labels,
    a diagnostic (not in the paper) that separates the dual weights from the last random flips."""

    model: KernelSVM
    model_given: KernelSVM
    lam: np.ndarray
    flips: list[np.ndarray] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)


def floral(
    X: np.ndarray,
    y: np.ndarray,
    *,
    C: float = 10.0,
    gamma: float = 0.5,
    lr: float = 1e-4,
    rounds: int = 501,
    budget: int = 25,
    sv_tol: float = 1e-5,
    rng: np.random.Generator,
    eval_sets: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
    eval_every: int = 0,
) -> FloralResult:
    """Run the FLORAL game on (X, y) (y 0/1 or -1/+1, possibly poisoned). Defaults are the Moon
    config of the authors' code (C 10, RBF gamma 0.5, lr 1e-4, 501 rounds, B = 25). ``sv_tol``
    is relative to C = 10 (scaled by C / 10, so that it follows the scale of the box)."""
    if rounds < 1 or budget < 0 or lr <= 0 or C <= 0:
        raise ConfigError("floral: need rounds >= 1, budget >= 0, lr > 0 and C > 0")
    y = _pm1(y)
    tol = sv_tol * C / 10.0
    K = rbf_kernel(X, X, gamma)
    lam = dual_qp(K, y, C)
    flips = [randomized_sv_flip(lam, budget, rng, sv_tol=tol)]
    history = []
    for t in range(1, rounds):
        y_att = y.copy()
        y_att[flips[-1]] *= -1.0
        grad = (y_att[:, None] * y_att[None, :] * K) @ lam - 1.0
        lam_hat = lam - lr * grad
        infeasible = (lam_hat < -1e-9).any() or (lam_hat > C + 1e-9).any() or abs(float(y_att @ lam_hat)) > 1e-9
        lam = project_box_hyperplane(lam_hat, y_att, C) if infeasible else lam_hat
        if eval_sets and eval_every and (t % eval_every == 0 or t == rounds - 1):
            m = _model(X, lam, y_att, K, C, gamma, tol)
            history.append({"round": t, **{k: m.accuracy(a, _pm1(b)) for k, (a, b) in eval_sets.items()}})
        if t < rounds - 1:
            flips.append(randomized_sv_flip(lam, budget, rng, sv_tol=tol))
    y_last = y.copy()
    if rounds > 1:
        y_last[flips[-1]] *= -1.0
    return FloralResult(
        _model(X, lam, y_last, K, C, gamma, tol), _model(X, lam, y, K, C, gamma, tol), lam, flips, history
    )


class FloralSGD(LocalSGD):
    """FLORAL-style adversarial training for neural networks (our multi-class extrapolation of the
    paper's game, docs/methods/floral.md: **ours, not the paper's**). At every local step
    the node plays the label-flipping attacker against itself before the SGD step:

    1. score the batch by an influence proxy, the analogue of the SVM's dual weight:
       ``influence="grad_norm"``: ||softmax(z) - onehot(y)||, the exact norm of the per-example loss
       gradient with respect to the logits z; ``influence="margin"``: the negative margin
       max_{c != y} z_c - z_y (points near or across the boundary count most);
    2. keep the 2B most influential examples, B = round(budget * batch size);
    3. flip B of them drawn uniformly (stream (seed, "client-aux", round, node)) to the strongest
       wrong class (``flip="strongest"``) or to C - 1 - y (``flip="reverse"``);
    4. take the step on the attacked batch.

    Composes with any aggregator (it only changes the local objective). Train metrics are measured
    against the node's own labels.
    """

    def __init__(
        self, *, budget: float = 0.1, influence: str = "grad_norm", flip: str = "strongest", **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        if not 0.0 <= budget <= 0.5:
            raise ConfigError(f"floral budget={budget} must be in [0, 0.5] (a fraction of each batch)")
        if influence not in ("grad_norm", "margin"):
            raise ConfigError(f"floral influence={influence!r} must be 'grad_norm' or 'margin'")
        if flip not in ("strongest", "reverse"):
            raise ConfigError(f"floral flip={flip!r} must be 'strongest' or 'reverse'")
        self.budget = float(budget)
        self.influence = influence
        self.flip = flip

    def scores(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The influence proxy of each example (larger = more influential)."""
        if self.influence == "grad_norm":
            p = torch.softmax(logits, dim=1)
            p[torch.arange(len(y), device=y.device), y] -= 1.0
            return torch.linalg.vector_norm(p, dim=1)
        true = logits.gather(1, y[:, None])[:, 0]
        other = logits.scatter(1, y[:, None], float("-inf")).max(dim=1).values
        return other - true

    def targets(self, logits: torch.Tensor, y: torch.Tensor, gen: torch.Generator | None) -> torch.Tensor:
        k = int(round(self.budget * len(y)))
        if k == 0:
            return y
        top = torch.argsort(self.scores(logits, y), descending=True, stable=True)[: 2 * k]
        # drawn from the CPU stream (the same flips on any device), moved once
        chosen = top[torch.randperm(len(top), generator=gen, device="cpu")[:k].to(top.device)]
        out = y.clone()
        if self.flip == "reverse":
            out[chosen] = logits.shape[1] - 1 - y[chosen]
        else:
            out[chosen] = logits[chosen].scatter(1, y[chosen, None], float("-inf")).argmax(dim=1)
        return out


class Floral(FedAvg):
    """``strategy=floral``: FedAvg whose nodes train with `FloralSGD` (they play FLORAL's label
    flipper against themselves at every local step). Any aggregator and pre-aggregator chain
    composes with it, as with FedAvg."""

    def __init__(self, *, client: FloralSGD, **kwargs: Any) -> None:
        if not isinstance(client, FloralSGD):
            raise ConfigError("strategy=floral trains with its own client (strategies.floral.FloralSGD)")
        super().__init__(client=client, **kwargs)
