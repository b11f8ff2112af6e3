"""The label-shift estimators as pure functions: EM (MLLS), BBSE, calibration, floors, weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from strategies import label_shift as ls


def gaussian_posteriors(prior: np.ndarray, q: np.ndarray, m: int, seed: int = 0):
    """Test points drawn with labels from q and x | y ~ N(mu_y, 1) in 1-D, and their exact
    posteriors under the training prior (perfectly calibrated for the source distribution)."""
    rng = np.random.default_rng(seed)
    mu = np.arange(len(prior), dtype=np.float64) * 1.5
    y = rng.choice(len(q), size=m, p=q)
    x = mu[y] + rng.standard_normal(m)
    lik = np.exp(-0.5 * (x[:, None] - mu[None, :]) ** 2)
    post = lik * prior[None, :]
    return post / post.sum(1, keepdims=True), y


def test_em_recovers_a_known_marginal_from_calibrated_posteriors():
    prior = np.array([0.4, 0.3, 0.2, 0.1])
    q = np.array([0.05, 0.15, 0.3, 0.5])
    post, _ = gaussian_posteriors(prior, q, 40_000)
    q_hat, iters = ls.em_marginal(post, prior, tol=1e-8, max_iter=5000)
    assert 1 < iters < 5000
    assert np.abs(q_hat - q).max() < 0.02
    assert q_hat.sum() == pytest.approx(1.0)
    # EM is an ascent method on the MLLS likelihood: the estimate beats the starting point
    assert ls.mlls_loglik(post, prior, q_hat) > ls.mlls_loglik(post, prior, prior)


def test_em_without_shift_stays_at_the_prior():
    prior = np.array([0.25, 0.25, 0.25, 0.25])
    post, _ = gaussian_posteriors(prior, prior, 40_000, seed=1)
    q_hat, _ = ls.em_marginal(post, prior)
    assert np.abs(q_hat - prior).max() < 0.02


def test_em_error_falls_with_the_test_sample_size():
    prior = np.array([0.4, 0.3, 0.2, 0.1])
    q = np.array([0.1, 0.1, 0.3, 0.5])

    def err(m: int) -> float:
        return float(
            np.mean(
                [
                    np.abs(ls.em_marginal(gaussian_posteriors(prior, q, m, seed=s)[0], prior)[0] - q).sum()
                    for s in range(8)
                ]
            )
        )

    assert err(20_000) < 0.5 * err(500)


def test_bbse_recovers_the_marginal_from_an_exact_confusion_matrix():
    prior = np.array([0.5, 0.3, 0.2])
    cond = np.array([[0.8, 0.1, 0.2], [0.15, 0.7, 0.1], [0.05, 0.2, 0.7]])  # P(yhat = a | y = b)
    joint = cond * prior[None, :]  # P(yhat = a, y = b) on the training distribution
    q = np.array([0.1, 0.2, 0.7])
    mu = cond @ q  # P_te(yhat = a)
    assert np.allclose(ls.bbse_marginal(joint, mu, prior), q)
    # counts instead of probabilities: both are normalised first
    assert np.allclose(ls.bbse_marginal(joint * 1000, mu * 37, prior), q)


def test_bbse_clips_negative_weights_and_renormalises():
    prior = np.array([0.5, 0.5])
    joint = np.array([[0.5, 0.0], [0.0, 0.5]])
    q = ls.bbse_marginal(joint, np.array([1.2, -0.2]), prior)  # an impossible mu
    assert (q >= 0).all() and q.sum() == pytest.approx(1.0) and q[1] == 0


def test_calibration_gradient_and_hessian_match_finite_differences():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((50, 4)) * 3
    y = rng.integers(0, 4, 50)
    theta = np.array([0.7, 0.3, -0.1, 0.2, -0.4])
    _, grad, hess = ls.calibration_stats(z, y, theta)
    eps = 1e-6
    for i in range(len(theta)):
        e = np.zeros_like(theta)
        e[i] = eps
        up, g_up, _ = ls.calibration_stats(z, y, theta + e)
        down, g_down, _ = ls.calibration_stats(z, y, theta - e)
        assert (up - down) / (2 * eps) == pytest.approx(grad[i], rel=1e-5, abs=1e-6)
        assert np.allclose((g_up - g_down) / (2 * eps), hess[:, i], rtol=1e-4, atol=1e-6)
    assert np.linalg.eigvalsh(hess).min() > -1e-9  # convex


def test_temperature_scaling_undoes_an_overconfident_predictor():
    rng = np.random.default_rng(1)
    s = rng.standard_normal((20_000, 5)) * 1.5  # calibrated logits
    p = ls.softmax(s)
    y = np.array([rng.choice(5, p=row) for row in p])
    theta = ls.calibrate(3.0 * s, y, "ts")  # the predictor reports 3x the calibrated logits
    assert 1.0 / theta[0] == pytest.approx(3.0, rel=0.05)
    # BCTS also removes a class bias added to the logits (up to the gauge, biases sum to 0)
    bias = np.array([1.0, 0.0, -0.5, 0.0, 0.5])
    theta_b = ls.calibrate(3.0 * s + bias, y, "bcts")
    assert 1.0 / theta_b[0] == pytest.approx(3.0, rel=0.05)
    expected = -(bias - bias.mean()) / 3.0
    assert np.allclose(theta_b[1:], expected, atol=0.05)
    assert len(ls.calibrate(s, y, "none")) == 0


def test_smoothed_prior_floors_empty_classes():
    counts = np.array([0, 10, 90])
    assert np.array_equal(ls.smoothed_prior(counts, 0.0), [0.0, 0.1, 0.9])
    floored = ls.smoothed_prior(counts, 1.0)
    assert np.allclose(floored, [1 / 103, 11 / 103, 91 / 103]) and (floored > 0).all()
    assert np.allclose(ls.smoothed_prior(np.zeros(4), 0.0), 0.25)


def test_class_weights_at_zero_mass_classes_and_the_cap():
    target = np.array([0.5, 0.5, 0.0])
    prior = np.array([0.0, 0.5, 0.0])
    r = ls.class_weights(target, prior)
    assert np.isinf(r[0]) and r[1] == 1.0 and r[2] == 0.0
    capped = ls.class_weights(np.array([0.9, 0.1]), np.array([0.001, 0.999]), cap=10.0)
    assert capped[0] == 10.0 and capped[1] == pytest.approx(0.1 / 0.999)


def test_entropy_regulariser_is_cross_entropy_minus_zeta_entropy():
    logits = torch.tensor([[3.0, 0.0, -1.0], [0.5, 0.4, 0.3]])
    y = torch.tensor([0, 2])
    p = torch.softmax(logits, 1)
    entropy = -(p * p.log()).sum(1).mean()
    ce = torch.nn.functional.cross_entropy(logits, y)
    assert torch.allclose(ls.entropy_regularised_loss(logits, y, 0.3), ce - 0.3 * entropy)
    assert torch.equal(ls.entropy_regularised_loss(logits, y, 0.0), ce)
    # its gradient pushes a confident prediction towards higher entropy than plain CE does
    z = logits.clone().requires_grad_(True)
    ls.entropy_regularised_loss(z, y, 1.0).backward()
    z0 = logits.clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(z0, y).backward()
    step = lambda g: torch.softmax(logits - 0.5 * g, 1)
    ent = lambda q: float(-(q * q.log()).sum(1).mean())
    assert ent(step(z.grad)) > ent(step(z0.grad))
