"""refpeft.rounding: Monte Carlo arithmetic bounds of a lower-precision evaluation.

The bound is probabilistic, so the properties checked are the ones the derivation promises: real
float32 (and float16) evaluations of random computations fall inside it, exact operations add no
noise, the noise is of the derived width, and the bound scales with the unit roundoff.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refpeft.errors import ConfigError
from refpeft.rounding import Noisy, noisy, rounding_bound


def _mlp(x: np.ndarray, w1: np.ndarray, w2: np.ndarray):
    """A small computation with every kind of op: matmul, elementwise, exp, a reduction."""
    def run(wrap):
        h = np.matmul(wrap(x), wrap(w1))
        h = h / (1.0 + np.exp(-h))
        y = np.matmul(h, wrap(w2))
        return y - np.mean(y, axis=-1, keepdims=True)
    return run


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 6), st.integers(1, 64), st.integers(1, 48), st.integers(0, 2**31 - 1))
def test_float32_and_float16_evaluations_fall_inside_the_bound(n, k, d, seed):
    rng = np.random.default_rng(seed)
    x, w1, w2 = rng.standard_normal((n, k)), rng.standard_normal((k, d)), rng.standard_normal((d, 5))
    run = _mlp(x, w1, w2)
    exact = run(lambda a: a)
    for dtype in (np.float32, np.float16):
        with np.errstate(over="ignore"):           # float16's exp(-h) overflows to inf for h < -11: h / inf = 0
            low = _mlp(x.astype(dtype), w1.astype(dtype), w2.astype(dtype))(lambda a: a)
        assert low.dtype == dtype
        bound = rounding_bound(run, dtype=np.dtype(dtype).name, seed=seed)
        assert np.max(np.abs(low.astype(np.float64) - exact)) <= bound


def test_exact_operations_add_no_noise_and_rounding_ones_do():
    x = noisy(np.linspace(-3.0, 3.0, 7))
    for exact in (-x, np.abs(x), np.maximum(x, 0.5), x[::-1], np.concatenate([x, x]), np.where(x > 0, x, 0.0)):
        assert np.array_equal(np.asarray(exact), np.asarray(exact.view(np.ndarray)))
    plain = np.linspace(-3.0, 3.0, 7)
    assert not np.array_equal(np.asarray(x * 1.5), plain * 1.5)
    assert isinstance(x * 1.5, Noisy) and isinstance(np.sum(x), (Noisy, np.floating, float))


def test_the_noise_of_a_product_is_within_two_units_of_its_result():
    Noisy.rng = np.random.default_rng(0)
    x = noisy(np.full(10_000, 3.0))
    deviation = np.abs(np.asarray(x * 7.0) - 21.0)
    assert np.max(deviation) <= 2 * Noisy.u * 21.0 and np.max(deviation) > 1.5 * Noisy.u * 21.0


def test_a_matmul_gets_sqrt_k_times_its_absolute_product():
    Noisy.rng = np.random.default_rng(1)
    a, b = noisy(np.ones((2000, 16))), np.ones((16, 1))
    deviation = np.abs(np.asarray(np.matmul(a, b)) - 16.0)
    width = np.sqrt(16) * 16.0 * Noisy.u
    assert np.max(deviation) <= width and np.max(deviation) > 0.9 * width


def test_the_bound_scales_with_the_unit_roundoff():
    rng = np.random.default_rng(2)
    run = _mlp(rng.standard_normal((3, 20)), rng.standard_normal((20, 10)), rng.standard_normal((10, 5)))
    b32, b16 = rounding_bound(run, dtype="float32"), rounding_bound(run, dtype="float16")
    assert b16 == pytest.approx(b32 * 2.0**13, rel=1e-12) and b32 > 0


def test_an_output_argument_gets_the_noisy_result():
    Noisy.rng = np.random.default_rng(3)
    x = noisy(np.full(100, 2.0))
    out = np.empty(100).view(Noisy)
    np.multiply(x, 3.0, out=out)
    assert np.all(np.abs(np.asarray(out) - 6.0) <= 2 * Noisy.u * 6.0) and np.any(np.asarray(out) != 6.0)


def test_an_unknown_dtype_is_refused():
    with pytest.raises(ConfigError, match="no unit roundoff for dtype 'int8'"):
        rounding_bound(lambda wrap: np.zeros(1), dtype="int8")
