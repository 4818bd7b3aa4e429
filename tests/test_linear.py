"""refpeft.methods.linear: layouts, validation, the base layer's products and dropout masks."""

from __future__ import annotations

import numpy as np
import pytest

from refpeft.errors import ConfigError, DTypeError, RankError, ShapeError
from refpeft.gradcheck import gradient_errors
from refpeft.methods.linear import LinearShape, base_forward, base_input_grad, check_linear_inputs, check_rank, \
    dropout_mask, flatten_rows, linear_shape, weight_rows

import array_api_compat.numpy as xp


def test_linear_shape_reads_either_layout():
    W = np.zeros((6, 10))                       # (d, k) PyTorch's layout
    assert linear_shape(W, fan_in_fan_out=False) == LinearShape(k=10, d=6)
    assert linear_shape(W.T, fan_in_fan_out=True) == LinearShape(k=10, d=6)
    with pytest.raises(ShapeError, match="2-D"):
        linear_shape(np.zeros(6), fan_in_fan_out=False)


def test_both_layouts_compute_the_same_layer_and_its_input_gradient():
    rng = np.random.default_rng(0)
    W, b, x, dy = (rng.standard_normal((6, 10)), rng.standard_normal(6), rng.standard_normal((4, 10)),
                   rng.standard_normal((4, 6)))
    y = base_forward(x, W, b, fan_in_fan_out=False, xp=xp)
    assert np.allclose(y, np.einsum("nk,dk->nd", x, W) + b, rtol=1e-14, atol=1e-14)
    assert np.array_equal(base_forward(x, W.T, b, fan_in_fan_out=True, xp=xp), y)
    assert np.array_equal(weight_rows(W.T, fan_in_fan_out=True, xp=xp), W)
    dx = base_input_grad(dy, W, fan_in_fan_out=False, xp=xp)
    assert np.array_equal(base_input_grad(dy, W.T, fan_in_fan_out=True, xp=xp), dx)
    f = lambda x: base_forward(x, W, b, fan_in_fan_out=False, xp=xp)  # noqa: E731
    assert gradient_errors(f, {"x": x}, {"x": dx}, dy)["x"] < 1e-9


def test_check_linear_inputs_returns_sizes_and_refuses_mismatches():
    x, W = np.ones((2, 3, 10)), np.ones((6, 10))
    _, shape = check_linear_inputs(x, W, bias=np.ones(6), fan_in_fan_out=False, A=np.ones((2, 10)))
    assert shape == LinearShape(k=10, d=6)
    with pytest.raises(ShapeError, match="10 input features"):
        check_linear_inputs(np.ones((2, 6)), W, bias=None, fan_in_fan_out=False)
    with pytest.raises(ShapeError):
        check_linear_inputs(x, W, bias=np.ones(10), fan_in_fan_out=False)
    with pytest.raises(DTypeError):
        check_linear_inputs(x.astype(np.float32), W, bias=None, fan_in_fan_out=False)


def test_rank_must_be_positive_but_may_exceed_the_layer():
    check_rank(8, LinearShape(k=4, d=4))        # PEFT allows it, so its files load
    with pytest.raises(RankError, match="0"):
        check_rank(0, LinearShape(k=4, d=4))


def test_flatten_rows_folds_leading_dimensions():
    x = np.arange(24.0).reshape(2, 3, 4)
    assert np.array_equal(flatten_rows(x, xp=xp), x.reshape(6, 4))
    assert flatten_rows(np.arange(4.0), xp=xp).shape == (1, 4)


def test_dropout_mask_is_inverted_dropout():
    p = 0.25
    mask = dropout_mask((500, 400), p, seed=3)
    assert set(np.unique(mask)) == {0.0, 1 / (1 - p)}
    n = mask.size
    assert abs(np.mean(mask == 0) - p) < 6 * np.sqrt(p * (1 - p) / n)   # each entry dropped with probability p
    assert abs(mask.mean() - 1) < 6 * np.sqrt(p / (1 - p) / n)         # expectation preserved
    assert np.array_equal(mask, dropout_mask((500, 400), p, seed=3))
    assert not np.array_equal(mask, dropout_mask((500, 400), p, seed=4))
    assert np.all(dropout_mask((3, 3), 0.0, seed=0) == 1.0)
    assert dropout_mask((2, 2), 0.5, seed=0, dtype="float32").dtype == np.float32
    for bad in (1.0, -0.1):
        with pytest.raises(ConfigError, match="dropout probability"):
            dropout_mask((2, 2), bad, seed=0)
