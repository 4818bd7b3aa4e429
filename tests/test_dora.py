"""DoRA: exact and detached gradients vs finite differences, merge properties, init, norm, backends, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import example, given, settings

from refpeft.methods import dora
from refpeft.methods.dora import (
    dora_backward,
    dora_delta_weight,
    dora_forward,
    dora_merge,
    dora_parameter_count,
    dora_unmerge,
    dora_weight_norm,
    dora_init,
)
from refpeft.errors import ConfigError, NonFiniteError, ShapeError
from refpeft.methods.linear import dropout_mask
from refpeft.methods.lora import lora_init, lora_parameter_count, lora_scaling
from strategies import LayerCase, layer_cases, normal_arrays
from support import BACKENDS, BACKEND_IDS, assert_close, vjp_check

FAST = settings(max_examples=30, deadline=None)
U64 = 2.0**-53


def layer(case: LayerCase) -> dict[str, np.ndarray]:
    """Random float64 inputs and parameters (B non-zero, m away from the norm so g != 1 matters)."""
    w_shape = (case.k, case.d) if case.fan_in_fan_out else (case.d, case.k)
    a = normal_arrays(case, ("x", (*case.batch, case.k)), ("W0", w_shape), ("A", (case.r, case.k)),
                      ("B", (case.d, case.r)), ("bias", (case.d,)), ("dy", (*case.batch, case.d)),
                      ("noise", (case.d,)))
    n = dora_weight_norm(a["W0"], a["A"], a["B"], **options(case))
    a["magnitude"] = n * (1.0 + 0.5 * np.tanh(a.pop("noise")))     # g = m / n in (0.5, 1.5)
    if not case.bias:
        a["bias"] = None
    a["dropout_mask"] = dropout_mask((*case.batch, case.k), 0.25, seed=case.seed) if case.dropout else None
    return a


def options(case: LayerCase) -> dict:
    return dict(scaling=lora_scaling(16.0, case.r, rslora=case.rslora), fan_in_fan_out=case.fan_in_fan_out)


def run(a: dict, case: LayerCase, gradient: str):
    y, cache = dora_forward(a["x"], a["W0"], a["A"], a["B"], a["magnitude"], bias=a["bias"],
                            dropout_mask=a["dropout_mask"], gradient=gradient, bias_trainable=case.bias,
                            **options(case))
    return y, dora_backward(a["dy"], cache)


def checked(a: dict, case: LayerCase, grads) -> tuple[dict, dict]:
    inputs = {"x": a["x"], "A": a["A"], "B": a["B"], "magnitude": a["magnitude"]}
    wanted = {"x": grads.dx, "A": grads.dA, "B": grads.dB, "magnitude": grads.dmagnitude}
    if case.bias:
        inputs["bias"], wanted["bias"] = a["bias"], grads.dbias
    else:
        assert grads.dbias is None
    return inputs, wanted


@FAST
@given(layer_cases().filter(lambda c: c.k >= 2))  # k = 1: see the test after this one
def test_exact_gradient_matches_finite_differences(case):
    a = layer(case)
    _, grads = run(a, case, "exact")

    def f(x, A, B, magnitude, bias=None):  # the norm follows A and B
        return dora_forward(x, a["W0"], A, B, magnitude, bias=bias, dropout_mask=a["dropout_mask"],
                            **options(case))[0]

    vjp_check(f, *checked(a, case, grads), a["dy"], tol=1e-7)


@FAST
@given(layer_cases(max_features=1))
def test_exact_gradient_for_one_input_feature_has_no_A_or_B_part(case):
    """With k = 1 a row's direction V_i / n_i is its sign: y does not depend on A or B at all.

    The exact gradient is then zero up to the cancellation of its two parts (relative error is
    meaningless against a zero gradient, hence this separate check).
    """
    a = layer(case)
    _, exact = run(a, case, "exact")
    # The rounding scale of the two cancelling parts: the detached gradient summed in absolute
    # value over every entry of dy (entries may cancel each other), times the condition of the
    # norm, (|W0| + |s B A|) / |W0 + s B A| per output row (the row itself may nearly cancel).
    scale_A, scale_B = 0.0, 0.0
    for index in np.ndindex(a["dy"].shape):
        only = np.zeros_like(a["dy"])
        only[index] = a["dy"][index]
        _, entry = run({**a, "dy": only}, case, "detached")
        scale_A, scale_B = scale_A + np.abs(entry.dA), scale_B + np.abs(entry.dB)
    W_rows = (a["W0"].T if case.fan_in_fan_out else a["W0"])[:, 0]
    sBA = options(case)["scaling"] * (a["B"] @ a["A"])[:, 0]
    condition = float(np.max((np.abs(W_rows) + np.abs(sBA)) / np.abs(W_rows + sBA)))
    assert np.all(np.abs(exact.dA) <= 64 * U64 * condition * scale_A)
    assert np.all(np.abs(exact.dB) <= 64 * U64 * condition * scale_B)


@FAST
@given(layer_cases())
# a magnitude of 65 (||W0|| of a 48-wide row): finite differences with a step not scaled to the input
# measured the forward's rounding (1.2e-7), not the gradient (refpeft.gradcheck)
@example(LayerCase(batch=(), k=48, d=1, r=1, bias=False, rslora=False, fan_in_fan_out=False, dropout=False, seed=5308))
def test_detached_gradient_is_the_gradient_with_the_norm_frozen(case):
    a = layer(case)
    _, grads = run(a, case, "detached")
    frozen = dora_weight_norm(a["W0"], a["A"], a["B"], **options(case))

    def f(x, A, B, magnitude, bias=None):  # n held at its value at the point of differentiation
        return dora_forward(x, a["W0"], A, B, magnitude, bias=bias, dropout_mask=a["dropout_mask"],
                            weight_norm=frozen, **options(case))[0]

    vjp_check(f, *checked(a, case, grads), a["dy"], tol=1e-7)


@FAST
@given(layer_cases())
def test_the_modes_differ_only_in_dA_and_dB(case):
    a = layer(case)
    y_detached, detached = run(a, case, "detached")
    y_exact, exact = run(a, case, "exact")
    np.testing.assert_array_equal(y_detached, y_exact)
    for name in ("dx", "dmagnitude", "dbias"):
        np.testing.assert_array_equal(getattr(detached, name), getattr(exact, name))
    # The terms the detached form drops are proportional to dL/dg (= n dL/dm, the same in both
    # modes): present exactly when it is non-zero (it vanishes when, say, dropout zeroes the input).
    dropped = np.linalg.norm(exact.dB - detached.dB) + np.linalg.norm(exact.dA - detached.dA)
    assert (dropped > 0.0) == bool(np.any(detached.dmagnitude))


@FAST
@given(layer_cases())
def test_merged_forward_equals_unmerged_forward(case):
    a = layer(case)
    y, _ = dora_forward(a["x"], a["W0"], a["A"], a["B"], a["magnitude"], bias=a["bias"], **options(case))
    W = dora_merge(a["W0"], a["A"], a["B"], a["magnitude"], **options(case))
    W_rows = W.T if case.fan_in_fan_out else W
    y_merged = a["x"] @ W_rows.T + (0.0 if a["bias"] is None else a["bias"])
    assert_close(y_merged, y, rtol=1e-12, atol=1e-12 * _output_scale(a, case))


@FAST
@given(layer_cases())
def test_unmerge_restores_the_frozen_weight(case):
    a = layer(case)
    opts = options(case)
    n = dora_weight_norm(a["W0"], a["A"], a["B"], **opts)
    W = dora_merge(a["W0"], a["A"], a["B"], a["magnitude"], **opts)
    restored = dora_unmerge(W, a["A"], a["B"], a["magnitude"], weight_norm=n, **opts)
    # Per entry: s B A (r products, r - 1 sums), + W0, * g, / g, - s B A: a few roundings of
    # |W0| + s |B||A| (g is in (0.5, 1.5), so its factors cancel within a constant).
    entry_scale = np.abs(a["W0"]) + opts["scaling"] * _rows_to_layout(np.abs(a["B"]) @ np.abs(a["A"]), case)
    assert np.all(np.abs(restored - a["W0"]) <= 4 * (case.r + 4) * U64 * entry_scale)
    delta = dora_delta_weight(a["W0"], a["A"], a["B"], a["magnitude"], **opts)
    assert_close(a["W0"] + delta, W, rtol=1e-14)


@FAST
@given(layer_cases())
def test_initial_adapter_gives_exactly_the_base_output(case):
    a = layer(case)
    opts = options(case)
    A, B = lora_init(case.k, case.d, case.r, seed=case.seed)
    m = dora_init(a["W0"], A, B, **opts)
    y, _ = dora_forward(a["x"], a["W0"], A, B, m, bias=a["bias"], dropout_mask=a["dropout_mask"], **opts)
    W_rows = _rows_to_layout(a["W0"], case)
    base = a["x"].reshape(-1, case.k) @ W_rows.T + (0 if a["bias"] is None else a["bias"])
    np.testing.assert_array_equal(y, base.reshape(*case.batch, case.d))
    assert_close(m, np.linalg.norm(W_rows, axis=1), rtol=1e-15)   # B = 0: m0 = ||W0_i||


@FAST
@given(layer_cases())
def test_blockwise_norm_equals_the_norm_of_the_formed_weight(case):
    a = layer(case)
    opts = options(case)
    V = _rows_to_layout(a["W0"], case) + opts["scaling"] * (a["B"] @ a["A"])
    expected = np.linalg.norm(V, axis=1)
    for block in (1, 7, dora.NORM_BLOCK_ELEMENTS):  # one row at a time, a few rows, all rows
        original = dora.NORM_BLOCK_ELEMENTS
        dora.NORM_BLOCK_ELEMENTS = block
        try:
            n = dora_weight_norm(a["W0"], a["A"], a["B"], **opts)
        finally:
            dora.NORM_BLOCK_ELEMENTS = original
        assert_close(n, expected, rtol=1e-15)


@FAST
@given(layer_cases())
def test_cache_never_holds_a_d_by_k_array(case):
    a = layer(case)
    _, cache = dora_forward(a["x"], a["W0"], a["A"], a["B"], a["magnitude"], bias=a["bias"],
                            dropout_mask=a["dropout_mask"], gradient="exact", **options(case))
    rows = math.prod(case.batch)
    assert cache.xa.shape == (rows, case.r) and cache.xv.shape == (rows, case.d)
    assert cache.weight_norm.shape == (case.d,)
    assert cache.W0 is a["W0"] and cache.A is a["A"] and cache.B is a["B"] and cache.magnitude is a["magnitude"]


@pytest.mark.parametrize("gradient", ["detached", "exact"])
@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_every_backend_gives_the_numpy_result(backend, gradient):
    case = LayerCase(batch=(2, 3), k=7, d=5, r=3, bias=True, rslora=False, fan_in_fan_out=True, dropout=True, seed=3)
    a = layer(case)
    opts = options(case)
    ref_y, ref = run(a, case, gradient)
    b = {n: backend(v) for n, v in a.items()}
    y, grads = run(b, case, gradient)
    assert_close(y, ref_y, rtol=1e-13, like=b["x"])
    for name in ("dx", "dA", "dB", "dmagnitude", "dbias"):
        assert_close(getattr(grads, name), getattr(ref, name), rtol=1e-13, like=b["x"])
    W = dora_merge(b["W0"], b["A"], b["B"], b["magnitude"], **opts)
    assert_close(W, dora_merge(a["W0"], a["A"], a["B"], a["magnitude"], **opts), rtol=1e-15, like=b["W0"])
    n = dora_weight_norm(b["W0"], b["A"], b["B"], **opts)
    assert_close(dora_unmerge(W, b["A"], b["B"], b["magnitude"], weight_norm=n, **opts), a["W0"], rtol=1e-14,
                 like=b["W0"])


class TestZeroNormRow:
    """A row with W0_i + s (B A)_i = 0 has no direction: refused by name, never a NaN."""

    def setup_method(self):
        rng = np.random.default_rng(0)
        self.W0 = rng.standard_normal((5, 6))
        self.W0[3] = 0.0
        self.A, self.B = rng.standard_normal((2, 6)), np.zeros((5, 2))
        self.x, self.m = rng.standard_normal((4, 6)), np.ones(5)

    def test_init(self):
        with pytest.raises(NonFiniteError, match=r"zero in 1 row\(s\), first \[3\]"):
            dora_init(self.W0, self.A, self.B, scaling=2.0)

    def test_forward_and_merge(self):
        with pytest.raises(NonFiniteError, match=r"first \[3\]"):
            dora_forward(self.x, self.W0, self.A, self.B, self.m, scaling=2.0)
        with pytest.raises(NonFiniteError, match=r"first \[3\]"):
            dora_merge(self.W0, self.A, self.B, self.m, scaling=2.0)

    def test_a_given_norm_and_a_zero_magnitude_at_unmerge(self):
        n = np.ones(5)
        n[1] = 0.0
        with pytest.raises(NonFiniteError, match=r"first \[1\]"):
            dora_forward(self.x, self.W0, self.A, self.B, self.m, scaling=2.0, weight_norm=n)
        m = self.m.copy()
        m[2] = 0.0
        with pytest.raises(NonFiniteError, match=r"magnitude is zero in row\(s\) \[2\]"):
            dora_unmerge(self.W0, self.A, self.B, m, scaling=2.0, weight_norm=np.ones(5))

    def test_cancelling_adapter(self):
        B = np.zeros((5, 2))
        B[0] = [1.0, 0.0]
        W0 = np.ones((5, 6))
        W0[0] = -2.0 * self.A[0]  # W0_0 + s (B A)_0 = 0 exactly with s = 2
        with pytest.raises(NonFiniteError, match=r"first \[0\]"):
            dora_weight_norm(W0, self.A, B, scaling=2.0)


class TestBadInput:
    def setup_method(self):
        rng = np.random.default_rng(0)
        self.x, self.W0 = rng.standard_normal((4, 6)), rng.standard_normal((5, 6))
        self.A, self.B, self.m = rng.standard_normal((2, 6)), rng.standard_normal((5, 2)), np.ones(5)

    def forward(self, **changes):
        return dora_forward(self.x, self.W0, self.A, self.B, changes.pop("magnitude", self.m), scaling=1.0, **changes)

    def test_options(self):
        with pytest.raises(ConfigError, match="unknown DoRA gradient mode 'full'"):
            self.forward(gradient="full")
        with pytest.raises(ConfigError, match="frozen"):
            self.forward(gradient="exact", weight_norm=np.ones(5))
        with pytest.raises(ConfigError, match="needs a bias"):
            self.forward(bias_trainable=True)

    def test_shapes(self):
        with pytest.raises(ShapeError, match=r"magnitude has shape \(4,\)"):
            self.forward(magnitude=np.ones(4))
        with pytest.raises(ShapeError, match=r"weight_norm has shape \(3,\)"):
            self.forward(weight_norm=np.ones(3))
        with pytest.raises(ShapeError, match=r"B has shape"):
            dora_weight_norm(self.W0, self.A, np.ones((4, 2)), scaling=1.0)


def test_parameter_counts():
    assert dora_parameter_count(4096, 4096, 16) == lora_parameter_count(4096, 4096, 16) + 4096
    assert dora_parameter_count(20, 10, 2, bias=True) == 2 * 30 + 10 + 10   # (k, d, r)


def _rows_to_layout(M: np.ndarray, case: LayerCase) -> np.ndarray:
    """Swap between the (d, k) row view and W0's stored layout (a transpose with fan_in_fan_out)."""
    return M.T if case.fan_in_fan_out else M


def _output_scale(a: dict, case: LayerCase) -> float:
    """A magnitude for absolute tolerances: |x| (|W0| + s |B||A|)^T summed over k, times max g, plus |b|."""
    s = options(case)["scaling"]
    W_abs = np.abs(_rows_to_layout(a["W0"], case)) + s * np.abs(a["B"]) @ np.abs(a["A"])
    g = np.max(np.abs(a["magnitude"])) / np.min(dora_weight_norm(a["W0"], a["A"], a["B"], **options(case)))
    bias = 0.0 if a["bias"] is None else np.max(np.abs(a["bias"]))
    return float(np.max(np.abs(a["x"]).reshape(-1, case.k) @ W_abs.T)) * max(1.0, g) + bias
