"""Label-shift estimation as pure functions (docs/methods/vrls.md, estimation).

Under label shift p_te(x|y) = p_tr(x|y), only the label marginals differ: π (training, known)
and q (test, unknown). These functions estimate q, and the ratio r = q / π, from a predictor's
outputs on unlabelled test inputs:

- `em_marginal`: maximum-likelihood label shift (MLLS) by EM (Saerens et al. 2002) on calibrated
  posteriors; VRLS is this same step on a predictor trained with the entropy regulariser of
  `entropy_regularised_loss` (Wu et al., ICLR 2025, arXiv 2502.02544).
- `bbse_marginal`: black-box shift estimation (Lipton et al. 2018) from a hard-prediction
  confusion matrix.
- `calibration_stats` / `newton_update` / `calibrate`: temperature scaling (Guo et al. 2017), or
  bias-corrected temperature scaling (BCTS, Alexandari et al. 2020), fitted by Newton's method on
  the validation NLL, which is convex in (1/T, b). Its gradient and Hessian are sums over
  examples, so nodes can report their partial sums and a server can take the step: only
  (1 + P + P^2) numbers per node, never logits or data.
- `smoothed_prior` / `class_weights`: π with a pseudo-count floor, and the per-class weights
  target / π with an optional cap.
- `dropped_classes` / `collapsed` / `em_unconverged` / `calibration_step` / `confusion_rank`: the
  checks that tell a degenerate estimate without the test labels (docs/methods/vrls.md, "Warnings").

Everything runs in float64 on numpy arrays.
"""

from __future__ import annotations

import numpy as np
import torch

from fedsim.errors import ConfigError

CALIBRATIONS = ("ts", "bcts", "none")


def num_calibration_params(kind: str, num_classes: int) -> int:
    """P: 1 (temperature), 1 + C (temperature and class biases) or 0 (none)."""
    return {"ts": 1, "bcts": 1 + num_classes, "none": 0}[kind]


def initial_calibration(kind: str, num_classes: int) -> np.ndarray:
    """θ0 = (β = 1/T = 1, b = 0): the identity calibration."""
    theta = np.zeros(num_calibration_params(kind, num_classes))
    if len(theta):
        theta[0] = 1.0
    return theta


def calibrated_logits(logits: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """β z + b for θ = (β, b_1..b_C) (BCTS), β z for θ = (β,) (TS), z for θ = () (none)."""
    z = np.asarray(logits, dtype=np.float64)
    if len(theta) == 0:
        return z
    out = theta[0] * z
    if len(theta) > 1:
        out = out + theta[1:][None, :]
    return out


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def calibration_stats(logits: np.ndarray, y: np.ndarray, theta: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """Sums over examples of the NLL of softmax(β z + b), its gradient (P,) and Hessian (P, P)
    with respect to θ = (β, b).

    With φ_c = (z_c, e_c), the NLL is logsumexp_c(θ·φ_c) − θ·φ_y, so the gradient is
    E_p[φ] − φ_y and the Hessian Cov_p(φ) (positive semi-definite: the NLL is convex in θ).
    """
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    n = z.shape[0]
    p_dim = len(theta)
    if n == 0 or p_dim == 0:
        return 0.0, np.zeros(p_dim), np.zeros((p_dim, p_dim))
    s = calibrated_logits(z, theta)
    m = s.max(axis=1, keepdims=True)
    lse = m[:, 0] + np.log(np.exp(s - m).sum(axis=1))
    rows = np.arange(n)
    nll = float((lse - s[rows, y]).sum())
    p = softmax(s)
    ez = (p * z).sum(axis=1)  # E_p[z]
    grad = np.zeros(p_dim)
    hess = np.zeros((p_dim, p_dim))
    grad[0] = float((ez - z[rows, y]).sum())
    hess[0, 0] = float(((p * z * z).sum(axis=1) - ez**2).sum())
    if p_dim > 1:
        onehot = np.zeros_like(p)
        onehot[rows, y] = 1.0
        grad[1:] = (p - onehot).sum(axis=0)
        # Cov(z, e_c) = p_c (z_c - E[z]); Cov(e_a, e_b) = p_a δ_ab - p_a p_b
        hess[0, 1:] = hess[1:, 0] = (p * (z - ez[:, None])).sum(axis=0)
        hess[1:, 1:] = np.diag(p.sum(axis=0)) - p.T @ p
    return nll, grad, hess


def newton_update(theta: np.ndarray, grad: np.ndarray, hess: np.ndarray, *, ridge: float = 1e-6) -> np.ndarray:
    """One damped Newton step on the (pooled) NLL. The class biases have a gauge (adding a constant
    to all of them changes nothing), so a small ridge keeps the Hessian invertible; β is kept
    within a factor 4 of its current value (a trust region in log β) and positive."""
    if len(theta) == 0:
        return theta
    h = hess + ridge * max(1.0, float(np.abs(np.diag(hess)).max(initial=0.0))) * np.eye(len(theta))
    step = np.linalg.solve(h, grad)
    new = theta - step
    beta = float(theta[0])
    new[0] = min(max(new[0], beta / 4.0), beta * 4.0)
    if len(new) > 1:
        new[1:] -= new[1:].mean()  # fix the gauge
    return new


def calibrate(
    logits: np.ndarray, y: np.ndarray, kind: str = "ts", *, iters: int = 50, tol: float = 1e-10
) -> np.ndarray:
    """Fit θ on one labelled validation set (what the federated rounds do with pooled sums)."""
    if kind not in CALIBRATIONS:
        raise ConfigError(f"calibration={kind!r} must be one of {', '.join(CALIBRATIONS)}")
    theta = initial_calibration(kind, np.asarray(logits).shape[1])
    for _ in range(iters):
        _, grad, hess = calibration_stats(logits, y, theta)
        new = newton_update(theta, grad, hess)
        if np.abs(new - theta).max(initial=0.0) < tol:
            return new
        theta = new
    return theta


def em_marginal(
    probs: np.ndarray, prior: np.ndarray, *, tol: float = 1e-6, max_iter: int = 1000
) -> tuple[np.ndarray, int]:
    """MLLS by EM (Saerens et al. 2002): the test label marginal q that maximises
    Σ_j log Σ_y f̂_y(x_j) q_y / π_y, starting from q = π.

    E-step: a_j(y) ∝ (q_y / π_y) f̂_y(x_j); M-step: q_y = mean_j a_j(y); stop when
    ||q_new − q||_1 < tol. ``probs`` are calibrated posteriors under the training prior π
    (m × C); returns (q, iterations). Classes with π_y = 0 are floored at 1e-12 (the predictor
    assigns them no mass anyway).
    """
    f = np.asarray(probs, dtype=np.float64)
    pi = np.maximum(np.asarray(prior, dtype=np.float64), 1e-12)
    pi = pi / pi.sum()
    if f.ndim != 2 or f.shape[1] != len(pi):
        raise ValueError(f"probs of shape {f.shape} do not match a prior over {len(pi)} classes")
    if len(f) == 0:
        return pi.copy(), 0
    scaled = f / pi[None, :]
    q = pi.copy()
    for it in range(1, max_iter + 1):
        a = scaled * q[None, :]
        a /= np.maximum(a.sum(axis=1, keepdims=True), 1e-300)
        new = a.mean(axis=0)
        done = np.abs(new - q).sum() < tol
        q = new
        if done:
            return q, it
    return q, max_iter


def mlls_loglik(probs: np.ndarray, prior: np.ndarray, q: np.ndarray) -> float:
    """The MLLS objective Σ_j log Σ_y f̂_y(x_j) q_y / π_y (EM never decreases it)."""
    f = np.asarray(probs, dtype=np.float64)
    w = np.asarray(q, dtype=np.float64) / np.maximum(np.asarray(prior, dtype=np.float64), 1e-12)
    return float(np.log(np.maximum(f @ w, 1e-300)).sum())


def bbse_marginal(confusion: np.ndarray, predicted: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """BBSE (Lipton et al. 2018): with Ĉ_ab = P_tr(ŷ = a, y = b) and μ̂_a = P_te(ŷ = a), solve
    Ĉ w = μ̂ (least squares, so a singular Ĉ still gives an answer), clip w at 0, and return
    q = π ⊙ w normalised to sum 1 (π itself if every entry clipped to 0)."""
    C = np.asarray(confusion, dtype=np.float64)
    mu = np.asarray(predicted, dtype=np.float64)
    pi = np.asarray(prior, dtype=np.float64)
    if C.sum() > 0:
        C = C / C.sum()
    if mu.sum() > 0:
        mu = mu / mu.sum()
    w = np.linalg.lstsq(C, mu, rcond=None)[0]
    q = pi * np.clip(w, 0.0, None)
    return q / q.sum() if q.sum() > 0 else pi / pi.sum()


def smoothed_prior(counts: np.ndarray, floor: float) -> np.ndarray:
    """π = (counts + ε) / (n + C ε): the label marginal with a pseudo-count floor ε (Laplace
    smoothing for ε = 1). ε = 0 gives the raw marginal, with zeros for absent classes."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum() + floor * len(counts)
    if total <= 0:
        return np.full(len(counts), 1.0 / len(counts))
    return (counts + floor) / total


def class_weights(target: np.ndarray, prior: np.ndarray, *, cap: float | None = None) -> np.ndarray:
    """r(y) = target(y) / π(y), clipped at ``cap`` when set. A class with π(y) = 0 gets weight 0
    if the target gives it no mass either, else +inf (or the cap): such a class has no training
    example on this node, so its weight multiplies nothing."""
    target = np.asarray(target, dtype=np.float64)
    prior = np.asarray(prior, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(prior > 0, target / np.where(prior > 0, prior, 1.0), np.where(target > 0, np.inf, 0.0))
    if cap is not None:
        r = np.minimum(r, cap)
    return r


def entropy_regularised_loss(logits: torch.Tensor, y: torch.Tensor, zeta: float) -> torch.Tensor:
    """VRLS stage A: mean of CE(f(x), y) + ζ Σ_y f_y(x) log f_y(x), i.e. cross-entropy minus ζ
    times the prediction entropy (the regulariser pushes predictions away from overconfidence).
    Computed with log-softmax (no 1e-8 inside the log needed)."""
    ce = torch.nn.functional.cross_entropy(logits, y)
    if zeta == 0:
        return ce
    logp = torch.log_softmax(logits, dim=1)
    neg_entropy = (logp.exp() * logp).sum(dim=1).mean()
    return ce + zeta * neg_entropy


DROP_RATIO = 1e-3
"""A class whose target mass is below this fraction of its training share is dropped by IW-ERM."""
COLLAPSE = 0.99
"""A marginal with at least this mass on one class has collapsed onto it."""
CALIBRATION_STEP = 1e-2
"""A last calibration step larger than this (relative in 1/T, absolute in the biases): unfinished."""


def dropped_classes(target: np.ndarray, prior: np.ndarray, *, ratio: float = DROP_RATIO) -> np.ndarray:
    """The classes y with π(y) > 0 and target(y) < ``ratio`` · π(y), ascending.

    IW-ERM weights node k's examples of class y by target(y)/π_k(y), so the share of class y in
    the whole weighted loss is target(y) where plain training gives it π(y): below a thousandth of
    its training share (``ratio`` 1e-3) the class is, in effect, not trained on. An estimate puts
    such mass on a class when the predictor gives it (almost) no posterior on any test input: a
    predictor that cannot recognise the class yet, unless the class is truly absent from every
    node's test data. No test label is needed. Classes with π(y) = 0 (no training example,
    ``prior_floor=0``) are left out: no weight reaches them anyway."""
    target = np.asarray(target, dtype=np.float64)
    prior = np.asarray(prior, dtype=np.float64)
    return np.flatnonzero((prior > 0) & ~(target >= ratio * prior))


def collapsed(marginal: np.ndarray, *, mass: float = COLLAPSE) -> int | None:
    """The class holding at least ``mass`` of ``marginal`` (None if none does): IW-ERM towards such
    a target trains a near-constant classifier."""
    q = np.asarray(marginal, dtype=np.float64)
    if len(q) == 0 or not np.isfinite(q).all():
        return None
    top = int(np.argmax(q))
    return top if q[top] >= mass else None


def em_unconverged(iterations: np.ndarray, max_iter: int) -> int:
    """How many EM runs stopped at their cap ``max_iter`` (`em_marginal` returns the cap when the
    change ||q_new − q||_1 never fell below its tolerance). NaN entries: no run."""
    it = np.asarray(iterations, dtype=np.float64)
    return int((np.isfinite(it) & (it >= max_iter)).sum())


def calibration_step(old: np.ndarray, new: np.ndarray) -> float:
    """The size of a calibration step θ_old → θ_new: max(|Δβ|/β, max_c |Δb_c|), the relative change
    of the inverse temperature β and the absolute change of the class biases (logit units). Newton
    on the convex NLL shrinks its steps quadratically near the optimum, so a last step above
    `CALIBRATION_STEP` (1 %) means the posteriors EM uses are still measurably off calibration
    (or the trust region, β at most ×4 per step, was still binding)."""
    old = np.asarray(old, dtype=np.float64)
    new = np.asarray(new, dtype=np.float64)
    if len(old) == 0:
        return 0.0
    step = abs(float(new[0] - old[0])) / max(abs(float(old[0])), 1e-12)
    if len(old) > 1:
        step = max(step, float(np.abs(new[1:] - old[1:]).max()))
    return step


def confusion_rank(confusion: np.ndarray) -> int:
    """The numerical rank of BBSE's confusion matrix Ĉ (joint counts or frequencies). Below the
    number of trained classes, Ĉ w = μ̂ has no unique solution: a class without held-out examples
    (a zero column) or one the predictor never predicts (a zero row) has a weight that BBSE cannot
    identify (least squares then gives it the minimum-norm answer, typically 0)."""
    C = np.asarray(confusion, dtype=np.float64)
    if C.size == 0 or not np.isfinite(C).all() or C.sum() <= 0:
        return 0
    return int(np.linalg.matrix_rank(C / C.sum()))
