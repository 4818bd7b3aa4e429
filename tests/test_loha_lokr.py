"""LoHa and LoKr: gradients vs finite differences, merge properties, bounds, LoKr's factor sizes, bad input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refpeft.adapter import ModuleAdapter
from refpeft.errors import ConfigError, ShapeError
from refpeft.methods import method_spec
from refpeft.methods.loha import (loha_backward, loha_delta_weight, loha_forward, loha_forward_bound, loha_init,
                                  loha_merge, loha_merge_bound, loha_parameter_count, loha_scaling, loha_unmerge,
                                  loha_backward_bound)
from refpeft.methods.lokr import (lokr_backward, lokr_delta_weight, lokr_factorization, lokr_forward,
                                  lokr_forward_bound, lokr_init, lokr_layout, lokr_merge, lokr_merge_bound,
                                  lokr_parameter_count, lokr_unmerge)
from refpeft.methods.lora import lora_parameter_count
from strategies import LayerCase, layer_cases, normal_arrays
from support import BACKENDS, BACKEND_IDS, assert_close, vjp_check

FAST = settings(max_examples=30, deadline=None)
LOHA_NAMES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


def loha_layer(case: LayerCase) -> dict:
    w_shape = (case.k, case.d) if case.fan_in_fan_out else (case.d, case.k)
    return normal_arrays(case, ("x", (*case.batch, case.k)), ("W0", w_shape), ("hada_w1_a", (case.d, case.r)),
                         ("hada_w1_b", (case.r, case.k)), ("hada_w2_a", (case.d, case.r)),
                         ("hada_w2_b", (case.r, case.k)), ("bias", (case.d,)), ("dy", (*case.batch, case.d)))


@FAST
@given(layer_cases(max_features=24))
def test_loha_gradients_match_finite_differences(case):
    a = loha_layer(case)
    bias = a["bias"] if case.bias else None
    s = loha_scaling(6.0, case.r)

    def f(x, hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b, bias=None):
        return loha_forward(x, a["W0"], hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b, scaling=s, bias=bias,
                            fan_in_fan_out=case.fan_in_fan_out)[0]

    _, cache = loha_forward(a["x"], a["W0"], *(a[n] for n in LOHA_NAMES), scaling=s, bias=bias,
                            fan_in_fan_out=case.fan_in_fan_out, bias_trainable=case.bias)
    g = loha_backward(a["dy"], cache)
    inputs = {"x": a["x"], **{n: a[n] for n in LOHA_NAMES}}
    wanted = {"x": g.dx, **{n: getattr(g, f"d{n}") for n in LOHA_NAMES}}
    if case.bias:
        inputs["bias"], wanted["bias"] = bias, g.dbias
    vjp_check(f, inputs, wanted, a["dy"], tol=1e-7)


@FAST
@given(layer_cases(max_features=24))
def test_loha_merged_forward_equals_unmerged_within_the_bound(case):
    a = loha_layer(case)
    factors = [a[n] for n in LOHA_NAMES]
    s = loha_scaling(6.0, case.r)
    y, _ = loha_forward(a["x"], a["W0"], *factors, scaling=s, fan_in_fan_out=case.fan_in_fan_out)
    W = loha_merge(a["W0"], *factors, scaling=s, fan_in_fan_out=case.fan_in_fan_out)
    merged = a["x"] @ (W if case.fan_in_fan_out else W.T)
    bound = loha_forward_bound(a["x"], a["W0"], *factors, scaling=s, fan_in_fan_out=case.fan_in_fan_out,
                               dtype="float64")
    # the merged product rounds W once more: widen by the merge bound through x
    merge = loha_merge_bound(a["W0"], *factors, scaling=s, fan_in_fan_out=case.fan_in_fan_out, dtype="float64")
    extra = np.abs(a["x"]) @ (merge if case.fan_in_fan_out else merge.T)
    assert np.all(np.abs(merged - y) <= bound + extra * 2 + 1e-300)
    back = loha_unmerge(W, *factors, scaling=s, fan_in_fan_out=case.fan_in_fan_out)
    assert np.all(np.abs(back - a["W0"]) <= merge + loha_merge_bound(
        W, *factors, scaling=s, fan_in_fan_out=case.fan_in_fan_out, dtype="float64", unmerge=True))


def test_loha_delta_is_the_hadamard_product_and_init_is_zero():
    rng = np.random.default_rng(0)
    w1a, w1b, w2a, w2b = rng.standard_normal((5, 2)), rng.standard_normal((2, 7)), rng.standard_normal((5, 2)), \
        rng.standard_normal((2, 7))
    expected = 0.5 * np.einsum("di,ik->dk", w1a, w1b) * np.einsum("di,ik->dk", w2a, w2b)
    assert_close(loha_delta_weight(w1a, w1b, w2a, w2b, scaling=0.5), expected, rtol=1e-14)
    w1a, w1b, w2a, w2b = loha_init(7, 5, 3, seed=1)
    assert np.all(w2b == 0) and np.all(w1a != 0) and np.abs(w1b).max() <= 1 / np.sqrt(7)
    assert loha_parameter_count(7, 5, 3) == 2 * lora_parameter_count(7, 5, 3)
    assert loha_scaling(4, 3) == float(np.float32(4 / 3)) != 4 / 3


def test_loha_backward_bound_covers_float32_rounding():
    rng = np.random.default_rng(3)
    x, W0, dy = rng.standard_normal((6, 9)), rng.standard_normal((5, 9)), rng.standard_normal((6, 5))
    f = [rng.standard_normal(s) for s in ((5, 2), (2, 9), (5, 2), (2, 9))]
    y64, c64 = loha_forward(x, W0, *f, scaling=0.75)
    y32, c32 = loha_forward(*(a.astype(np.float32) for a in (x, W0, *f)), scaling=0.75)
    assert np.all(np.abs(y32 - y64) <= loha_forward_bound(x, W0, *f, scaling=0.75))
    g64, g32 = loha_backward(dy, c64), loha_backward(dy.astype(np.float32), c32)
    bounds = loha_backward_bound(dy, x, W0, *f, scaling=0.75)
    for name in ("dx", *(f"d{n}" for n in LOHA_NAMES)):
        assert np.all(np.abs(getattr(g32, name) - getattr(g64, name)) <= bounds[name]), name


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_loha_and_lokr_forward_on_every_backend(backend):
    rng = np.random.default_rng(1)
    x, W0 = rng.standard_normal((3, 12)), rng.standard_normal((8, 12))
    f = [rng.standard_normal(s) for s in ((8, 2), (2, 12), (8, 2), (2, 12))]
    y, _ = loha_forward(backend(x), backend(W0), *map(backend, f), scaling=0.5)
    assert_close(y, x @ (W0 + loha_delta_weight(*f, scaling=0.5)).T, rtol=1e-13, like=backend(x))
    t = {"lokr_w1": rng.standard_normal((2, 3)), "lokr_w2_a": rng.standard_normal((4, 1)),
         "lokr_w2_b": rng.standard_normal((1, 4))}
    y, _ = lokr_forward(backend(x), backend(W0), {n: backend(v) for n, v in t.items()}, scaling=0.5)
    assert_close(y, x @ (W0 + 0.5 * np.kron(t["lokr_w1"], t["lokr_w2_a"] @ t["lokr_w2_b"])).T, rtol=1e-13,
                 like=backend(x))


# --- LoKr ---------------------------------------------------------------------------------------


@st.composite
def lokr_cases(draw):
    d1, d2, k1, k2 = (draw(st.integers(1, 5)) for _ in range(4))
    return dict(d1=d1, d2=d2, k1=k1, k2=k2, r=draw(st.integers(1, 3)), low1=draw(st.booleans()),
                low2=draw(st.booleans()), batch=tuple(draw(st.lists(st.integers(1, 3), max_size=2))),
                fan_in_fan_out=draw(st.booleans()), bias=draw(st.booleans()), seed=draw(st.integers(0, 2**31)))


def lokr_layer(c: dict) -> tuple[dict, dict]:
    rng = np.random.default_rng(c["seed"])
    d, k, r = c["d1"] * c["d2"], c["k1"] * c["k2"], c["r"]
    t = {}
    for i, low in (("1", c["low1"]), ("2", c["low2"])):
        di, ki = c[f"d{i}"], c[f"k{i}"]
        t.update({f"lokr_w{i}_a": rng.standard_normal((di, r)), f"lokr_w{i}_b": rng.standard_normal((r, ki))}
                 if low else {f"lokr_w{i}": rng.standard_normal((di, ki))})
    a = {"x": rng.standard_normal((*c["batch"], k)), "W0": rng.standard_normal((k, d) if c["fan_in_fan_out"] else (d, k)),
         "bias": rng.standard_normal(d) if c["bias"] else None, "dy": rng.standard_normal((*c["batch"], d))}
    return a, t


@FAST
@given(lokr_cases())
def test_lokr_gradients_match_finite_differences(c):
    a, t = lokr_layer(c)

    def f(x, bias=None, **tensors):
        return lokr_forward(x, a["W0"], tensors, scaling=0.7, bias=bias, fan_in_fan_out=c["fan_in_fan_out"])[0]

    _, cache = lokr_forward(a["x"], a["W0"], t, scaling=0.7, bias=a["bias"], fan_in_fan_out=c["fan_in_fan_out"],
                            bias_trainable=c["bias"])
    g = lokr_backward(a["dy"], cache)
    inputs, wanted = {"x": a["x"], **t}, {"x": g.dx, **{n: getattr(g, f"d{n}") for n in t}}
    if c["bias"]:
        inputs["bias"], wanted["bias"] = a["bias"], g.dbias
    assert all(getattr(g, f"d{n}") is None for n in ("lokr_w1", "lokr_w1_a", "lokr_w2", "lokr_w2_a") if n not in t)
    vjp_check(f, inputs, wanted, a["dy"], tol=1e-7)


@FAST
@given(lokr_cases())
def test_lokr_merge_round_trip_and_merged_forward(c):
    a, t = lokr_layer(c)
    fif = c["fan_in_fan_out"]
    y, _ = lokr_forward(a["x"], a["W0"], t, scaling=0.7, fan_in_fan_out=fif)
    W = lokr_merge(a["W0"], t, scaling=0.7, fan_in_fan_out=fif)
    merged = a["x"] @ (W if fif else W.T)
    merge = lokr_merge_bound(a["W0"], t, scaling=0.7, fan_in_fan_out=fif, dtype="float64")
    bound = lokr_forward_bound(a["x"], a["W0"], t, scaling=0.7, fan_in_fan_out=fif, dtype="float64")
    assert np.all(np.abs(merged - y) <= bound + 2 * np.abs(a["x"]) @ (merge if fif else merge.T) + 1e-300)
    back = lokr_unmerge(W, t, scaling=0.7, fan_in_fan_out=fif)
    assert np.all(np.abs(back - a["W0"]) <= merge + lokr_merge_bound(W, t, scaling=0.7, fan_in_fan_out=fif,
                                                                      dtype="float64", unmerge=True))


def test_lokr_forward_bound_covers_float32():
    rng = np.random.default_rng(5)
    x, W0 = rng.standard_normal((4, 12)), rng.standard_normal((8, 12))
    t = {"lokr_w1_a": rng.standard_normal((2, 1)), "lokr_w1_b": rng.standard_normal((1, 3)),
         "lokr_w2": rng.standard_normal((4, 4))}
    y64, _ = lokr_forward(x, W0, t, scaling=0.3)
    y32, _ = lokr_forward(x.astype(np.float32), W0.astype(np.float32),
                          {n: v.astype(np.float32) for n, v in t.items()}, scaling=0.3)
    bound = lokr_forward_bound(x, W0, t, scaling=0.3)
    assert np.all(np.abs(y32 - y64) <= bound) and bound.max() < 1e-4


def test_lokr_delta_is_the_kronecker_product():
    rng = np.random.default_rng(2)
    t = {"lokr_w1_a": rng.standard_normal((3, 2)), "lokr_w1_b": rng.standard_normal((2, 2)),
         "lokr_w2": rng.standard_normal((2, 5))}
    expected = 1.5 * np.kron(t["lokr_w1_a"] @ t["lokr_w1_b"], t["lokr_w2"])
    assert_close(lokr_delta_weight(t, scaling=1.5), expected, rtol=1e-14)
    assert_close(lokr_delta_weight(t, scaling=1.5, fan_in_fan_out=True), expected.T, rtol=1e-14)


@pytest.mark.parametrize("dimension,factor,expected", [(256, -1, (16, 16)), (128, -1, (8, 16)), (127, -1, (1, 127)),
                                                       (128, 4, (4, 32)), (12, -1, (3, 4)), (1, -1, (1, 1))])
def test_lokr_factorization_docstring_examples(dimension, factor, expected):
    assert lokr_factorization(dimension, factor) == expected


def test_lokr_layout_and_init():
    lay = lokr_layout(12, 8, 1, decompose_both=True)
    assert (lay.w1, lay.w2, lay.w1_low_rank, lay.w2_low_rank) == ((2, 3), (4, 4), True, True)
    assert not lokr_layout(12, 8, 2, decompose_both=True).w1_low_rank      # r >= max(2, 3) / 2
    t = lokr_init(12, 8, 1, decompose_both=True, seed=3)
    assert sorted(t) == ["lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"] and np.all(t["lokr_w1_a"] == 0)
    assert np.all(lokr_delta_weight(t, scaling=1.0) == 0)
    assert lokr_parameter_count(lay, 1) == sum(v.size for v in t.values())


def test_lokr_module_rank_from_the_config_when_both_factors_are_full():
    t = {"lokr_w1": np.ones((2, 2)), "lokr_w2": np.ones((3, 3))}
    assert ModuleAdapter("lokr", t, alpha=4.0, rank=8).scaling == 0.5
    with pytest.raises(ConfigError, match="rank"):
        ModuleAdapter("lokr", t).scaling
    assert method_spec("lokr").in_features(ModuleAdapter("lokr", t, rank=8)) == 6


def test_bad_input_is_refused():
    x, W0 = np.ones((2, 6)), np.ones((4, 6))
    with pytest.raises(ShapeError, match="hada_w1_b"):
        loha_forward(x, W0, np.ones((4, 2)), np.ones((2, 5)), np.ones((4, 2)), np.ones((2, 6)), scaling=1.0)
    with pytest.raises(ConfigError, match="lokr_w2"):
        lokr_forward(x, W0, {"lokr_w1": np.ones((2, 2)), "lokr_w2": np.ones((2, 3)), "lokr_w2_a": np.ones((2, 1))},
                     scaling=1.0)
    with pytest.raises(ShapeError, match="kron"):
        lokr_forward(x, W0, {"lokr_w1": np.ones((2, 2)), "lokr_w2": np.ones((2, 2))}, scaling=1.0)
    m = ModuleAdapter("loha", dict(zip(LOHA_NAMES, loha_init(6, 4, 2))))
    with pytest.raises(ConfigError, match="dropout"):
        method_spec("loha").forward(x, W0, m, dropout_mask=np.ones((2, 6)))
