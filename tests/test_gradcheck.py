"""refpeft.gradcheck: a right gradient passes, a wrong one is caught, the step follows the input's scale."""

from __future__ import annotations

import numpy as np
import pytest

from refpeft.gradcheck import directional_derivative, gradient_errors


def setup(scale=1.0):
    rng = np.random.default_rng(0)
    W = rng.standard_normal((5, 4))
    x = rng.standard_normal((3, 4)) * scale
    dy = rng.standard_normal((3, 5))
    return W, x, dy


def f(x, W):
    return np.tanh(x @ W.T)                          # (n, d)


def true_grads(x, W, dy):
    g = dy * (1 - np.tanh(x @ W.T) ** 2)
    return {"x": g @ W, "W": g.T @ x}


def test_the_right_gradient_passes_tightly():
    W, x, dy = setup()
    errors = gradient_errors(f, {"x": x, "W": W}, true_grads(x, W, dy), dy)
    assert set(errors) == {"x", "W"} and max(errors.values()) < 1e-9


@pytest.mark.parametrize("slip", ["sign", "transpose_factor", "small_term"])
def test_a_wrong_gradient_is_caught(slip):
    W, x, dy = setup()
    grads = true_grads(x, W, dy)
    if slip == "sign":
        grads["W"] = -grads["W"]
    elif slip == "transpose_factor":
        grads["x"] = (dy @ W)                          # the tanh' factor forgotten
    else:
        grads["W"] = grads["W"] * (1 + 1e-4)           # a 1e-4 relative slip
    errors = gradient_errors(f, {"x": x, "W": W}, grads, dy)
    assert max(errors.values()) > 1e-6


def test_a_zero_gradient_must_match_a_zero_derivative():
    W, x, dy = setup()
    errors = gradient_errors(f, {"x": x, "W": W}, {"x": np.zeros_like(x)}, dy)
    assert errors["x"] > 1e-3                          # compared absolutely: the true derivative is not zero
    flat = gradient_errors(lambda x, W: W.sum() * np.ones((3, 5)), {"x": x, "W": W}, {"x": np.zeros_like(x)}, dy)
    assert flat["x"] == 0.0


def test_a_gradient_of_the_wrong_shape_is_refused():
    W, x, dy = setup()
    with pytest.raises(ValueError, match="dx has shape"):
        gradient_errors(f, {"x": x, "W": W}, {"x": np.zeros((4, 3))}, dy)


def test_richardson_extrapolation_is_fourth_order():
    """On a quintic the extrapolated difference is off by h^4 (its O(h^2) term cancels)."""
    loss = lambda v: float(v["p"][0] ** 5)            # noqa: E731
    p = {"p": np.array([1.0])}
    e1 = abs(directional_derivative(loss, p, "p", np.array([1.0]), h=1e-1) - 5.0)
    e2 = abs(directional_derivative(loss, p, "p", np.array([1.0]), h=5e-2) - 5.0)
    assert 0 < e1 and 12 < e1 / e2 < 20                # 2^4 = 16; a central difference alone gives 4


def test_the_step_scales_with_the_input():
    """A large input gets a proportionally large step: the check stays tight at scale 1e4, where a
    fixed step of 1e-4 would be dominated by the forward's rounding error."""
    W, x, dy = setup(scale=1e4)
    g = lambda x, W: (x @ W.T) ** 2                  # noqa: E731
    grads = {"x": (2 * (x @ W.T) * dy) @ W}
    assert gradient_errors(g, {"x": x, "W": W}, grads, dy)["x"] < 1e-9


@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e4])
def test_the_step_is_h_times_max_1_and_the_largest_entry(scale, monkeypatch):
    import refpeft.gradcheck as gradcheck

    steps = []
    real = gradcheck.directional_derivative
    monkeypatch.setattr(gradcheck, "directional_derivative",
                        lambda *args, h: steps.append(h) or real(*args, h=h))
    W, x, dy = setup(scale=scale)
    gradcheck.gradient_errors(f, {"x": x, "W": W}, {"x": true_grads(x, W, dy)["x"]}, dy, directions=3, h=1e-4)
    assert steps == [1e-4 * max(1.0, float(np.max(np.abs(x))))] * 3
