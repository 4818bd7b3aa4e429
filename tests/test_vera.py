"""VeRA: gradients vs finite differences, one projection pair over many shapes, merge, init, backends, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refpeft.errors import ConfigError, RankError, ShapeError
from refpeft.init import kaiming_uniform_bound
from refpeft.methods.linear import LinearShape, dropout_mask
from refpeft.methods.vera import (
    vera_init,
    largest_layer,
    vera_backward,
    vera_delta_weight,
    vera_forward,
    vera_merge,
    vera_parameter_count,
    vera_projection_size,
    vera_projections,
    vera_slices,
    vera_unmerge,
)
from strategies import LayerCase, layer_cases, normal_arrays
from support import BACKENDS, BACKEND_IDS, assert_close, vjp_check

FAST = settings(max_examples=30, deadline=None)
U64 = 2.0**-53


@st.composite
def vera_cases(draw):
    """A layer case, projections larger than the layer by (extra_k, extra_d), and a rank free of min(d, k)."""
    case = draw(layer_cases())
    return case, draw(st.integers(0, 9)), draw(st.integers(0, 9)), draw(st.integers(1, 80))


def layer(case: LayerCase, extra_k: int, extra_d: int, r: int) -> dict[str, np.ndarray]:
    """Random float64 inputs, shared projections covering the layer, and non-zero lambdas."""
    w_shape = (case.k, case.d) if case.fan_in_fan_out else (case.d, case.k)
    a = normal_arrays(case, ("x", (*case.batch, case.k)), ("W0", w_shape), ("lambda_d", (r,)),
                      ("lambda_b", (case.d,)), ("bias", (case.d,)), ("dy", (*case.batch, case.d)))
    a["vera_A"], a["vera_B"] = vera_projections(LinearShape(k=case.k + extra_k, d=case.d + extra_d), r,
                                                seed=case.seed % 1000, generator="numpy")
    if not case.bias:
        a["bias"] = None
    a["dropout_mask"] = dropout_mask((*case.batch, case.k), 0.25, seed=case.seed) if case.dropout else None
    return a


def forward(a: dict, case: LayerCase, **changes):
    args = {n: a[n] for n in ("x", "W0", "vera_A", "vera_B", "lambda_d", "lambda_b", "bias", "dropout_mask")}
    args.update(changes)
    return vera_forward(args.pop("x"), args.pop("W0"), args.pop("vera_A"), args.pop("vera_B"), args.pop("lambda_d"),
                        args.pop("lambda_b"), fan_in_fan_out=case.fan_in_fan_out, **args)


@FAST
@given(vera_cases())
def test_gradients_match_finite_differences(params):
    case, *sizes = params
    a = layer(case, *sizes)
    _, cache = forward(a, case, bias_trainable=case.bias)
    grads = vera_backward(a["dy"], cache)

    def f(x, lambda_d, lambda_b, bias=None):
        return forward(a, case, x=x, lambda_d=lambda_d, lambda_b=lambda_b, bias=bias)[0]

    inputs = {"x": a["x"], "lambda_d": a["lambda_d"], "lambda_b": a["lambda_b"]}
    wanted = {"x": grads.dx, "lambda_d": grads.dlambda_d, "lambda_b": grads.dlambda_b}
    if case.bias:
        inputs["bias"], wanted["bias"] = a["bias"], grads.dbias
    else:
        assert grads.dbias is None
    vjp_check(f, inputs, wanted, a["dy"], tol=1e-7)


@FAST
@given(vera_cases())
def test_merged_forward_equals_unmerged_forward(params):
    case, *sizes = params
    a = layer(case, *sizes)
    y, _ = forward(a, case, dropout_mask=None)
    W = vera_merge(a["W0"], a["vera_A"], a["vera_B"], a["lambda_d"], a["lambda_b"], fan_in_fan_out=case.fan_in_fan_out)
    W_rows = W.T if case.fan_in_fan_out else W
    y_merged = a["x"] @ W_rows.T + (0.0 if a["bias"] is None else a["bias"])
    A, B = vera_slices(a["vera_A"], a["vera_B"], k=case.k, d=case.d)
    W_abs = np.abs(W_rows) + np.abs(a["lambda_b"])[:, None] * np.abs(B) @ (np.abs(a["lambda_d"])[:, None] * np.abs(A))
    scale = float(np.max(np.abs(a["x"]).reshape(-1, case.k) @ W_abs.T))
    assert_close(y_merged, y, rtol=1e-12, atol=1e-12 * scale)


@FAST
@given(vera_cases())
def test_unmerge_restores_the_frozen_weight(params):
    case, *sizes = params
    a = layer(case, *sizes)
    args = (a["vera_A"], a["vera_B"], a["lambda_d"], a["lambda_b"])
    W = vera_merge(a["W0"], *args, fan_in_fan_out=case.fan_in_fan_out)
    restored = vera_unmerge(W, *args, fan_in_fan_out=case.fan_in_fan_out)
    delta = vera_delta_weight(*args, k=case.k, fan_in_fan_out=case.fan_in_fan_out)
    # Per entry: the delta once (the same rounded value both ways), one add, one subtract.
    assert np.all(np.abs(restored - a["W0"]) <= 2 * U64 * (np.abs(a["W0"]) + np.abs(delta)))


@FAST
@given(vera_cases())
def test_initial_adapter_gives_exactly_the_base_output(params):
    case, *sizes = params
    a = layer(case, *sizes)
    lambda_d, lambda_b = vera_init(case.d, sizes[-1])
    y, _ = forward(a, case, lambda_d=lambda_d, lambda_b=lambda_b)
    W_rows = a["W0"].T if case.fan_in_fan_out else a["W0"]
    base = a["x"].reshape(-1, case.k) @ W_rows.T + (0 if a["bias"] is None else a["bias"])
    np.testing.assert_array_equal(y, base.reshape(*case.batch, case.d))


def test_one_projection_pair_serves_layers_of_different_shapes():
    shapes = [LinearShape(k=24, d=8), LinearShape(k=8, d=40), LinearShape(k=16, d=16)]
    shared = largest_layer(shapes)
    assert shared == LinearShape(k=24, d=40)
    vera_A, vera_B = vera_projections(shared, 12, seed=5)
    assert vera_A.shape == (12, 24) and vera_B.shape == (40, 12)
    rng = np.random.default_rng(0)
    for shape in shapes:
        x, W0 = rng.standard_normal((3, shape.k)), rng.standard_normal((shape.d, shape.k))
        lambda_d, lambda_b = rng.standard_normal(12), rng.standard_normal(shape.d)
        y, cache = vera_forward(x, W0, vera_A, vera_B, lambda_d, lambda_b)
        # The layer sees the leading block of each projection (views, not copies).
        np.testing.assert_array_equal(cache.A, vera_A[:, :shape.k])
        np.testing.assert_array_equal(cache.B, vera_B[:shape.d, :])
        assert np.shares_memory(cache.A, vera_A) and np.shares_memory(cache.B, vera_B)
        W = vera_merge(W0, vera_A, vera_B, lambda_d, lambda_b)
        assert_close(x @ W.T, y, rtol=1e-13)


def test_projections_are_seeded_with_the_documented_bounds():
    shape = LinearShape(k=300, d=50)
    for generator in ("numpy", "torch-cpu"):
        A1, B1 = vera_projections(shape, 32, seed=7, generator=generator)
        A2, B2 = vera_projections(shape, 32, seed=7, generator=generator)
        np.testing.assert_array_equal(A1, A2)
        np.testing.assert_array_equal(B1, B2)
        for P, fan_in in ((A1, 300), (B1, 32)):
            bound = math.sqrt(6 / fan_in)
            assert bound == pytest.approx(kaiming_uniform_bound(fan_in, a=0.0), rel=1e-15)
            assert np.max(np.abs(P)) <= bound and np.max(np.abs(P)) > 0.9 * bound
    A3, _ = vera_projections(shape, 32, seed=8)
    assert not np.array_equal(A1, A3)
    A32, _ = vera_projections(shape, 4, dtype="float32")
    assert A32.dtype == np.float32


def test_refpeft_bound_gives_peft_float32_draw_parameters():
    """PEFT's bound sqrt(3) * (sqrt(2) / sqrt(f)) and refpeft's may differ in float64's last bit;
    the float32 width and offset a torch uniform_ draw uses must not, for any fan-in in range."""
    fan = np.arange(1, 300_001, dtype=np.float64)
    peft = np.sqrt(3.0) * (np.sqrt(2.0) / np.sqrt(fan))
    ours = np.array([kaiming_uniform_bound(int(f), a=0.0) for f in fan[::997]])
    np.testing.assert_array_equal(ours, np.sqrt(2.0) * np.sqrt(3.0 / fan[::997]))  # vectorised form is refpeft's
    refpeft = np.sqrt(2.0) * np.sqrt(3.0 / fan)
    np.testing.assert_array_equal((2 * refpeft).astype(np.float32), (2 * peft).astype(np.float32))
    np.testing.assert_array_equal((-refpeft).astype(np.float32), (-peft).astype(np.float32))


def test_init_values_and_parameter_counts():
    lambda_d, lambda_b = vera_init(7, 3)
    np.testing.assert_array_equal(lambda_d, [0.1, 0.1, 0.1])
    np.testing.assert_array_equal(lambda_b, np.zeros(7))
    np.testing.assert_array_equal(vera_init(2, 2, d_initial=1.0)[0], [1.0, 1.0])
    assert vera_parameter_count(4096, 256) == 4096 + 256
    assert vera_parameter_count(10, 4, bias=True) == 24
    assert vera_projection_size(LinearShape(k=4096, d=11008), 256) == 256 * (4096 + 11008)


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_every_backend_gives_the_numpy_result(backend):
    case = LayerCase(batch=(2, 3), k=7, d=5, r=3, bias=True, rslora=False, fan_in_fan_out=True, dropout=True, seed=3)
    a = layer(case, 2, 3, 9)
    ref_y, ref_cache = forward(a, case, bias_trainable=True)
    ref = vera_backward(a["dy"], ref_cache)
    b = {n: backend(v) for n, v in a.items()}
    y, cache = forward(b, case, bias_trainable=True)
    grads = vera_backward(b["dy"], cache)
    assert_close(y, ref_y, rtol=1e-13, like=b["x"])
    for name in ("dx", "dlambda_d", "dlambda_b", "dbias"):
        assert_close(getattr(grads, name), getattr(ref, name), rtol=1e-13, like=b["x"])
    args = ("vera_A", "vera_B", "lambda_d", "lambda_b")
    W = vera_merge(b["W0"], *(b[n] for n in args), fan_in_fan_out=True)
    assert_close(W, vera_merge(a["W0"], *(a[n] for n in args), fan_in_fan_out=True), rtol=1e-15, like=b["W0"])
    assert_close(vera_unmerge(W, *(b[n] for n in args), fan_in_fan_out=True), a["W0"], rtol=1e-14, like=b["W0"])


class TestBadInput:
    def setup_method(self):
        rng = np.random.default_rng(0)
        self.x, self.W0 = rng.standard_normal((4, 6)), rng.standard_normal((5, 6))
        self.vera_A, self.vera_B = vera_projections(LinearShape(k=6, d=5), 3)
        self.lambda_d, self.lambda_b = rng.standard_normal(3), rng.standard_normal(5)

    def forward(self, **changes):
        args = dict(vera_A=self.vera_A, vera_B=self.vera_B, lambda_d=self.lambda_d, lambda_b=self.lambda_b)
        args.update(changes)
        return vera_forward(self.x, self.W0, args.pop("vera_A"), args.pop("vera_B"), args.pop("lambda_d"),
                            args.pop("lambda_b"), **args)

    def test_projections_too_small_or_mismatched(self):
        with pytest.raises(ShapeError, match="covers 4 inputs, the layer has k = 6"):
            self.forward(vera_A=self.vera_A[:, :4])
        with pytest.raises(ShapeError, match="covers 2 outputs, the layer has d = 5"):
            self.forward(vera_B=self.vera_B[:2])
        with pytest.raises(ShapeError, match=r"expected \(d_max, r\) with r = 3"):
            self.forward(vera_B=np.ones((5, 2)))

    def test_vectors(self):
        with pytest.raises(ShapeError, match=r"lambda_d has shape \(2,\)"):
            self.forward(lambda_d=np.ones(2))
        with pytest.raises(ShapeError, match=r"lambda_b has shape \(4,\)"):
            self.forward(lambda_b=np.ones(4))
        with pytest.raises(ConfigError, match="needs a bias"):
            self.forward(bias_trainable=True)

    def test_ranks_and_sizes(self):
        with pytest.raises(RankError, match="at least 1"):
            vera_projections(LinearShape(k=6, d=5), 0)
        with pytest.raises(RankError, match="at least 1"):
            vera_init(5, 0)
        with pytest.raises(ConfigError, match="at least one layer"):
            largest_layer([])
        with pytest.raises(ConfigError, match="unknown generator"):
            vera_projections(LinearShape(k=6, d=5), 2, generator="jax")
