"""IA3: gradients vs finite differences, merge == forward, unmerge(merge) == W0, bounds, backends, the row, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refpeft.adapter import ModuleAdapter
from refpeft.checkpoint import merged_weight
from refpeft.errors import ConfigError, NonFiniteError, ShapeError
from refpeft.methods import METHODS
from refpeft.methods.ia3 import (
    ia3_backward,
    ia3_backward_bound,
    ia3_delta_weight,
    ia3_feedforward,
    ia3_forward,
    ia3_forward_bound,
    ia3_init,
    ia3_l_shape,
    ia3_merge,
    ia3_merge_bias,
    ia3_merge_bound,
    ia3_parameter_count,
    ia3_unmerge,
)
from refpeft.methods.linear import LinearShape, dropout_mask
from refpeft.tolerance import ratio
from strategies import LayerCase, layer_cases, normal_arrays
from support import BACKENDS, BACKEND_IDS, assert_close, vjp_check

FAST = settings(max_examples=30, deadline=None)
U64 = 2.0**-53


def layer(case: LayerCase, feedforward: bool) -> dict:
    """Random float64 inputs and a random l around 1 (not ones, which hide mistakes)."""
    w_shape = (case.k, case.d) if case.fan_in_fan_out else (case.d, case.k)
    l_shape = ia3_l_shape(LinearShape(k=case.k, d=case.d), feedforward=feedforward)
    a = normal_arrays(case, ("x", (*case.batch, case.k)), ("W0", w_shape), ("l", l_shape), ("bias", (case.d,)),
                      ("dy", (*case.batch, case.d)))
    a["l"] = 1.0 + 0.5 * a["l"]
    if not case.bias:
        a["bias"] = None
    return a


def forward(a: dict, case: LayerCase, feedforward: bool, **changes):
    args = {**{n: a[n] for n in ("x", "W0", "l", "bias")}, **changes}
    return ia3_forward(args.pop("x"), args.pop("W0"), args.pop("l"), fan_in_fan_out=case.fan_in_fan_out,
                       feedforward=feedforward, **args)


@FAST
@given(layer_cases(), st.booleans())
def test_gradients_match_finite_differences(case, feedforward):
    a = layer(case, feedforward)
    _, cache = forward(a, case, feedforward, bias_trainable=case.bias)
    grads = ia3_backward(a["dy"], cache)
    assert grads.dl.shape == a["l"].shape

    def f(x, l, bias=None):
        return forward(a, case, feedforward, x=x, l=l, bias=bias)[0]

    inputs, wanted = {"x": a["x"], "l": a["l"]}, {"x": grads.dx, "l": grads.dl}
    if case.bias:
        inputs["bias"], wanted["bias"] = a["bias"], grads.dbias
    else:
        assert grads.dbias is None
    vjp_check(f, inputs, wanted, a["dy"], tol=1e-7)


@FAST
@given(layer_cases(), st.booleans())
def test_merged_layer_computes_the_adapted_forward(case, feedforward):
    a = layer(case, feedforward)
    y, _ = forward(a, case, feedforward)
    W = ia3_merge(a["W0"], a["l"], fan_in_fan_out=case.fan_in_fan_out, feedforward=feedforward)
    b = None if a["bias"] is None else ia3_merge_bias(a["bias"], a["l"]) if not feedforward else a["bias"]
    merged = a["x"] @ (W if case.fan_in_fan_out else W.T) + (0.0 if b is None else b)
    bound = ia3_forward_bound(a["x"], a["W0"], a["l"], bias=a["bias"], fan_in_fan_out=case.fan_in_fan_out,
                              feedforward=feedforward, dtype="float64")
    assert ratio(merged, y, bound) <= 1.0


@FAST
@given(layer_cases(), st.booleans())
def test_unmerge_returns_the_frozen_weight_and_bias(case, feedforward):
    a = layer(case, feedforward)
    opts = dict(fan_in_fan_out=case.fan_in_fan_out, feedforward=feedforward)
    W = ia3_merge(a["W0"], a["l"], **opts)
    back = ia3_unmerge(W, a["l"], **opts)
    assert np.all(np.abs(back - a["W0"]) <= 3 * U64 * np.abs(a["W0"]))     # two roundings: fl(fl(W0 l) / l)
    # W - W0 cancels values of |W0|'s size (l near 0 makes W small while W0 is not): its rounding scales with both
    scale = max(np.max(np.abs(W)), np.max(np.abs(a["W0"])))
    assert_close(ia3_delta_weight(a["W0"], a["l"], **opts), W - a["W0"], rtol=0, atol=4 * U64 * scale)
    if a["bias"] is not None:
        b = ia3_merge_bias(a["bias"], a["l"])
        assert_close(ia3_merge_bias(b, a["l"], unmerge=True), a["bias"], rtol=4 * U64)


def test_the_two_sides_scale_rows_or_columns():
    W0 = np.arange(12.0).reshape(3, 4) + 1
    out, inp = np.array([[2.0], [3.0], [5.0]]), np.array([[2.0, 3.0, 5.0, 7.0]])
    assert np.array_equal(ia3_merge(W0, out), np.diag(out[:, 0]) @ W0)
    assert np.array_equal(ia3_merge(W0, inp), W0 @ np.diag(inp[0]))
    assert np.array_equal(ia3_merge(W0.T, out, fan_in_fan_out=True), (np.diag(out[:, 0]) @ W0).T)
    b = np.array([1.0, -1.0, 2.0])
    assert np.array_equal(ia3_merge_bias(b, out), b * out[:, 0])
    assert ia3_merge_bias(b, inp) is b                        # input scaling leaves the bias alone


def test_unmerge_refuses_zeros_in_l():
    W0 = np.ones((3, 4))
    l = np.array([[2.0], [0.0], [5.0]])
    with pytest.raises(NonFiniteError, match="1 zero entry"):
        ia3_unmerge(ia3_merge(W0, l), l)
    with pytest.raises(NonFiniteError):
        ia3_merge_bias(np.ones(3), l, unmerge=True)


@pytest.mark.parametrize("feedforward", [False, True])
def test_float32_forward_and_backward_within_their_bounds(feedforward):
    case = LayerCase(batch=(3, 5), k=40, d=24, r=1, bias=True, rslora=False, fan_in_fan_out=False, dropout=False,
                     seed=7)
    a = layer(case, feedforward)
    a32 = {n: None if v is None else v.astype(np.float32) for n, v in a.items()}
    a = {n: None if v is None else v.astype(np.float64) for n, v in a32.items()}   # inputs exact in float32
    y64, c64 = forward(a, case, feedforward, bias_trainable=True)
    y32, c32 = forward(a32, case, feedforward, bias_trainable=True)
    opts = dict(bias=a["bias"], feedforward=feedforward, dtype="float32")
    assert 0 < ratio(y32, y64, ia3_forward_bound(a["x"], a["W0"], a["l"], **opts)) <= 1.0
    g64, g32 = ia3_backward(a["dy"], c64), ia3_backward(a32["dy"], c32)
    bounds = ia3_backward_bound(a["dy"], a["x"], a["W0"], a["l"], bias_trainable=True, **opts)
    for name in ("dx", "dl", "dbias"):
        assert ratio(getattr(g32, name), getattr(g64, name), bounds[name]) <= 1.0, name


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("feedforward", [False, True])
def test_backends_agree_with_numpy(backend, feedforward):
    case = LayerCase(batch=(2, 3), k=6, d=5, r=1, bias=True, rslora=False, fan_in_fan_out=False, dropout=False, seed=3)
    a = layer(case, feedforward)
    y, cache = forward(a, case, feedforward, bias_trainable=True)
    g = ia3_backward(a["dy"], cache)
    x = backend(a["x"])
    yb, cb = ia3_forward(x, backend(a["W0"]), backend(a["l"]), bias=backend(a["bias"]), feedforward=feedforward,
                         bias_trainable=True)
    gb = ia3_backward(backend(a["dy"]), cb)
    assert_close(yb, y, rtol=1e-13, like=x)
    for name in ("dx", "dl", "dbias"):
        assert_close(getattr(gb, name), getattr(g, name), rtol=1e-13, like=x)
    assert_close(ia3_merge(backend(a["W0"]), backend(a["l"])), ia3_merge(a["W0"], a["l"]), rtol=0, like=x)


def test_init_is_the_identity_and_counts_one_vector():
    shape = LinearShape(k=6, d=4)
    x, W0 = np.random.default_rng(0).standard_normal((3, 6)), np.random.default_rng(1).standard_normal((4, 6))
    for feedforward, size in ((False, 4), (True, 6)):
        l = ia3_init(shape, feedforward=feedforward)
        assert l.shape == ia3_l_shape(shape, feedforward=feedforward) and np.all(l == 1.0)
        assert np.array_equal(ia3_forward(x, W0, l)[0], x @ W0.T)
        assert ia3_parameter_count(shape, feedforward=feedforward) == size


def test_side_is_read_from_the_shape_and_a_1x1_layer_defaults_to_output():
    assert ia3_feedforward(np.ones((1, 6)), LinearShape(k=6, d=4)) is True
    assert ia3_feedforward(np.ones((4, 1)), LinearShape(k=6, d=4)) is False
    assert ia3_feedforward(np.ones((1, 1)), LinearShape(k=1, d=4)) is True
    assert ia3_feedforward(np.ones((1, 1)), LinearShape(k=1, d=1)) is False
    assert ia3_feedforward(np.ones((1, 1)), LinearShape(k=1, d=1), feedforward=True) is True
    x, W0, b, l = np.ones((2, 1)), np.ones((1, 1)), np.ones(1), np.full((1, 1), 3.0)
    assert ia3_forward(x, W0, l, bias=b)[0][0, 0] == 6.0                       # (x w + b) l
    assert ia3_forward(x, W0, l, bias=b, feedforward=True)[0][0, 0] == 4.0     # (x l) w + b


def test_bad_input_is_refused():
    x, W0 = np.ones((2, 6)), np.ones((4, 6))
    with pytest.raises(ShapeError, match=r"\(4, 1\) \(output scaling\) or \(1, 6\)"):
        ia3_forward(x, W0, np.ones((6, 1)))
    with pytest.raises(ShapeError, match="scales the layer's outputs"):
        ia3_forward(x, W0, np.ones((4, 1)), feedforward=True)
    with pytest.raises(ConfigError, match="needs a bias"):
        ia3_forward(x, W0, np.ones((4, 1)), bias_trainable=True)
    with pytest.raises(ShapeError):
        ia3_merge(W0, np.ones((4,)))
    module = ModuleAdapter("ia3", {"l": np.ones((4, 1))})
    with pytest.raises(ConfigError, match="no dropout"):
        module.spec.forward(x, W0, module, dropout_mask=dropout_mask((2, 6), 0.5, seed=0))


@pytest.mark.parametrize("feedforward", [False, True])
def test_the_table_row_matches_the_functions(feedforward):
    spec = METHODS["ia3"]
    rng = np.random.default_rng(5)
    W0, x, b = rng.standard_normal((7, 5)), rng.standard_normal((3, 5)), rng.standard_normal(7)
    l = 1 + rng.standard_normal(ia3_l_shape(LinearShape(k=5, d=7), feedforward=feedforward))
    module = ModuleAdapter("ia3", {"l": l})
    assert (module.in_features, module.out_features) == ((5, None) if feedforward else (None, 7))
    assert spec.parameter_count(5, 7, module) == (5 if feedforward else 7)
    y, cache = spec.forward(x, W0, module, bias=b)
    assert np.array_equal(y, ia3_forward(x, W0, l, bias=b)[0])
    assert np.array_equal(spec.backward(np.ones_like(y), cache).dl, ia3_backward(np.ones_like(y), cache).dl)
    merged_bias = spec.merge_bias(b, module)
    assert_close(x @ spec.merge(W0, module).T + merged_bias, y, rtol=1e-14)
    # Blockwise merging (refpeft.checkpoint) slices an output-side l by rows and broadcasts an input-side l.
    blocks = [merged_weight(module, W0[rows], rows=rows) for rows in (slice(0, 3), slice(3, 7))]
    assert np.array_equal(np.concatenate(blocks), ia3_merge(W0, l))
    modules, shared, config = spec.init_modules({"model.layers.0.mlp.down_proj": W0, "model.layers.0.self_attn.v_proj": W0},
                                                ranks={}, alphas={}, seed=3)
    assert modules["model.layers.0.mlp.down_proj"].l.shape == (1, 5)
    assert modules["model.layers.0.self_attn.v_proj"].l.shape == (7, 1)
    assert shared == {} and config == {}
