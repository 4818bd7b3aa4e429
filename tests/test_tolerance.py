"""Error bounds: they hold for real low-precision computations, they are tight, and they are per element."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refpeft import tolerance
from refpeft.errors import ConfigError, ShapeError
from refpeft.methods.linear import dropout_mask
from refpeft.methods.lora import lora_backward, lora_backward_bound, lora_forward, lora_forward_bound, lora_merge, \
    lora_merge_bound, lora_unmerge
from refpeft.optim import AdamConfig, adam_update, adam_update_bound
from strategies import LayerCase, layer_cases, normal_arrays
from support import BACKENDS, BACKEND_IDS, assert_close

FAST = settings(max_examples=30, deadline=None)


def layer(case: LayerCase, dtype: str) -> dict[str, np.ndarray]:
    """Inputs exactly representable in `dtype` (drawn in float64, rounded once)."""
    w_shape = (case.k, case.d) if case.fan_in_fan_out else (case.d, case.k)
    arrays = normal_arrays(case, ("x", (*case.batch, case.k)), ("W0", w_shape), ("A", (case.r, case.k)),
                           ("B", (case.d, case.r)), ("bias", (case.d,)), ("dy", (*case.batch, case.d)))
    arrays = {name: a.astype(dtype) for name, a in arrays.items()}
    arrays["bias"] = arrays["bias"] if case.bias else None
    arrays["dropout_mask"] = (dropout_mask((*case.batch, case.k), 0.25, seed=case.seed, dtype=dtype)
                              if case.dropout else None)
    return arrays


def in_float64(arrays: dict[str, np.ndarray | None]) -> dict[str, np.ndarray | None]:
    return {name: None if a is None else a.astype(np.float64) for name, a in arrays.items()}


def options(case: LayerCase) -> dict:
    return {"scaling": 16.0 / np.sqrt(case.r) if case.rslora else 16.0 / case.r,
            "fan_in_fan_out": case.fan_in_fan_out}


@FAST
@given(layer_cases(max_features=48), st.sampled_from(["float32", "float16"]))
def test_lora_forward_and_backward_within_bound_of_refpeft_in_low_precision(case, dtype):
    """refpeft itself run in float32/float16 is a correct low-precision implementation: ratio <= 1.

    NumPy sums float16 in float16, so the bound is asked for that accumulation."""
    a = layer(case, dtype)
    wide = in_float64(a)
    fwd = dict(x=a["x"], W0=a["W0"], A=a["A"], B=a["B"], bias=a["bias"], dropout_mask=a["dropout_mask"])
    y, cache = lora_forward(**fwd, **options(case), bias_trainable=case.bias)
    y64, cache64 = lora_forward(**{n: wide[n] for n in fwd}, **options(case), bias_trainable=case.bias)
    bound = lora_forward_bound(**fwd, **options(case), dtype=dtype, accumulation=dtype)
    assert tolerance.compare(y, y64, bound).passed
    grads, grads64 = lora_backward(a["dy"], cache), lora_backward(wide["dy"], cache64)
    bounds = lora_backward_bound(a["dy"], a["x"], a["W0"], a["A"], a["B"], dropout_mask=a["dropout_mask"],
                                 bias_trainable=case.bias, dtype=dtype, accumulation=dtype, **options(case))
    for name, b in bounds.items():
        result = tolerance.compare(getattr(grads, name), getattr(grads64, name), b)
        assert result.passed, f"{name}: {result}"


@FAST
@given(layer_cases(max_features=48, max_batch_dims=0))
def test_merge_and_unmerge_within_bound(case):
    a = layer(case, "float32")
    wide = in_float64(a)
    opts = options(case)
    merged = lora_merge(a["W0"], a["A"], a["B"], **opts)
    assert tolerance.compare(merged, lora_merge(wide["W0"], wide["A"], wide["B"], **opts),
                             lora_merge_bound(a["W0"], a["A"], a["B"], **opts)).passed
    back = lora_unmerge(a["W0"], a["A"], a["B"], **opts)
    assert tolerance.compare(back, lora_unmerge(wide["W0"], wide["A"], wide["B"], **opts),
                             lora_merge_bound(a["W0"], a["A"], a["B"], unmerge=True, **opts)).passed


def test_bound_holds_for_torch_float32_and_is_tight():
    """torch's float32 LoRA (BLAS summation, FMA) uses between 1/1000 and 1 of the rigorous bound."""
    torch = pytest.importorskip("torch", reason="torch is the float32 peer")
    rng = np.random.default_rng(7)
    n, k, d, r, s = 64, 128, 96, 8, 2.0
    x, W0, A, B = (rng.standard_normal(shape).astype(np.float32) for shape in ((n, k), (d, k), (r, k), (d, r)))
    t = [torch.from_numpy(a) for a in (x, W0, A, B)]
    y_torch = (t[0] @ t[1].T + (t[0] @ t[2].T @ t[3].T) * s).numpy()
    y64, _ = lora_forward(*(a.astype(np.float64) for a in (x, W0, A, B)), scaling=s)
    result = tolerance.compare(y_torch, y64, lora_forward_bound(x, W0, A, B, scaling=s))
    assert 1e-3 < result.ratio <= 1.0, result


def test_probabilistic_model_is_tighter_than_rigorous():
    rng = np.random.default_rng(1)
    x, W0, A, B = (rng.standard_normal(shape) for shape in ((4, 256), (8, 256), (2, 256), (8, 2)))
    rigorous = lora_forward_bound(x, W0, A, B, scaling=1.0)
    probabilistic = lora_forward_bound(x, W0, A, B, scaling=1.0, model="probabilistic")
    assert np.all(probabilistic < rigorous)


def test_bound_is_per_element_a_cancelling_output_gets_a_small_bound():
    """An output whose products cancel exactly is bounded by its own |x||W|, not the largest row's."""
    x = np.array([[1.0, 1.0]], dtype=np.float32)
    W0 = np.array([[1.0, -1.0], [1e3, 1e3]], dtype=np.float32)
    A, B = np.zeros((1, 2), np.float32), np.zeros((2, 1), np.float32)
    bound = lora_forward_bound(x, W0, A, B, scaling=1.0)
    assert bound[0, 0] < 1e-5 < bound[0, 1]


def test_adam_float32_within_bound():
    rng = np.random.default_rng(3)
    p, g, m, v = (rng.standard_normal(200).astype(np.float32) for _ in range(4))
    v = np.abs(v)
    for decoupled in (False, True):
        config = AdamConfig(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=decoupled)
        low = adam_update(p, g, m, v, v, t=3, config=config)
        high = adam_update(*(a.astype(np.float64) for a in (p, g, m, v, v)), t=3, config=config)
        bounds = adam_update_bound(p, g, m, v, t=3, lr=1e-2, betas=config.betas, eps=config.eps,
                                   weight_decay=0.1, decoupled_weight_decay=decoupled)
        for i, name in enumerate(("p", "m", "v")):
            result = tolerance.compare(low[i], high[i], bounds[name])
            assert result.passed and result.ratio > 1e-3, (name, result)


def test_a_perturbed_result_fails_with_its_ratio():
    rng = np.random.default_rng(2)
    x, W0, A, B = (rng.standard_normal(shape).astype(np.float32) for shape in ((3, 16), (5, 16), (2, 16), (5, 2)))
    y64, _ = lora_forward(*(a.astype(np.float64) for a in (x, W0, A, B)), scaling=1.0)
    bound = lora_forward_bound(x, W0, A, B, scaling=1.0)
    wrong = y64.copy()
    wrong[1, 2] += 10 * bound[1, 2]
    result = tolerance.compare(wrong, y64, bound)
    assert not result.passed and result.ratio == pytest.approx(10.0)


def test_compare_counts_exact_zeros_and_nan_mismatches():
    zero = np.zeros(3)
    assert tolerance.compare(zero, zero, zero).ratio == 0.0
    assert tolerance.compare(zero + 1e-30, zero, zero).ratio == np.inf
    assert tolerance.compare(np.array([np.nan]), np.array([1.0]), np.array([1.0])).ratio == np.inf
    with pytest.raises(ShapeError):
        tolerance.compare(np.zeros(2), np.zeros(3), np.zeros(3))


def test_gamma_refuses_sums_too_long_for_the_format():
    assert tolerance.Precision("float32").gamma(10) == pytest.approx(10 * 2.0**-24, rel=1e-6)
    assert tolerance.Precision("bfloat16", accumulation="bfloat16").gamma(100) > 0
    with pytest.raises(ConfigError, match="n u >= 1"):
        tolerance.Precision("bfloat16", accumulation="bfloat16").gamma(256)
    with pytest.raises(ConfigError):
        tolerance.Precision("float8")


def test_scalar_rounding_is_counted_only_when_inexact():
    p = tolerance.Precision("float32")
    assert p.scalar_error(2.0) == 0.0
    assert 0.0 < p.scalar_error(0.1) <= 0.1 * 2.0**-24


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_bounds_are_the_same_on_every_backend(backend):
    rng = np.random.default_rng(4)
    x, W0, A, B, dy = (rng.standard_normal(s).astype(np.float32) for s in ((2, 3, 8), (6, 8), (2, 8), (6, 2), (2, 3, 6)))
    expected = lora_forward_bound(x, W0, A, B, scaling=0.5)
    actual = lora_forward_bound(*map(backend, (x, W0, A, B)), scaling=0.5)
    assert_close(actual, expected, rtol=1e-12)
    expected_grads = lora_backward_bound(dy, x, W0, A, B, scaling=0.5)
    actual_grads = lora_backward_bound(*map(backend, (dy, x, W0, A, B)), scaling=0.5)
    for name in expected_grads:
        assert_close(actual_grads[name], expected_grads[name], rtol=1e-12)


@FAST
@given(layer_cases(max_features=32), st.sampled_from(["detached", "exact"]))
def test_dora_bounds_hold_for_refpeft_in_float32(case, gradient):
    from refpeft.methods.dora import dora_backward, dora_backward_bound, dora_forward, dora_forward_bound, dora_merge, \
        dora_merge_bound, dora_unmerge, dora_unmerge_bound, dora_weight_norm

    a = layer(case, "float32")
    a["magnitude"] = np.abs(a["bias"] if a["bias"] is not None else np.ones(case.d, np.float32)) + 0.5
    wide = in_float64(a)
    names = ("x", "W0", "A", "B", "magnitude")
    opts = {**options(case), "bias": a["bias"], "dropout_mask": a["dropout_mask"]}
    wide_opts = {**options(case), "bias": wide["bias"], "dropout_mask": wide["dropout_mask"]}
    y, cache = dora_forward(*(a[n] for n in names), gradient=gradient, **opts)
    y64, cache64 = dora_forward(*(wide[n] for n in names), gradient=gradient, **wide_opts)
    assert tolerance.compare(y, y64, dora_forward_bound(*(a[n] for n in names), **opts)).passed
    grads, grads64 = dora_backward(a["dy"], cache), dora_backward(wide["dy"], cache64)
    bounds = dora_backward_bound(a["dy"], *(a[n] for n in names), gradient=gradient, **opts)
    for name, b in bounds.items():
        result = tolerance.compare(getattr(grads, name), getattr(grads64, name), b)
        assert result.passed, f"{name}: {result}"
    merged = dora_merge(*(a[n] for n in names[1:]), **options(case))
    merged64 = dora_merge(*(wide[n] for n in names[1:]), **options(case))
    assert tolerance.compare(merged, merged64, dora_merge_bound(*(a[n] for n in names[1:]), **options(case))).passed
    norm = dora_weight_norm(*(a[n] for n in names[1:4]), **options(case))                 # float32, cached
    back = dora_unmerge(merged, a["A"], a["B"], a["magnitude"], weight_norm=norm, **options(case))
    back64 = dora_unmerge(merged.astype(np.float64), wide["A"], wide["B"], wide["magnitude"],
                          weight_norm=norm.astype(np.float64), **options(case))
    bound = dora_unmerge_bound(merged, a["A"], a["B"], a["magnitude"], norm, **options(case))
    assert tolerance.compare(back, back64, bound).passed


@FAST
@given(layer_cases(max_features=32))
def test_vera_bounds_hold_for_refpeft_in_float32(case):
    from refpeft.methods.vera import vera_backward, vera_backward_bound, vera_forward, vera_forward_bound, vera_merge, \
        vera_merge_bound, vera_unmerge

    a = layer(case, "float32")
    rng = np.random.default_rng(case.seed)
    a["lambda_d"] = rng.standard_normal(case.r).astype(np.float32)
    a["lambda_b"] = rng.standard_normal(case.d).astype(np.float32)
    wide = in_float64(a)
    names = ("x", "W0", "A", "B", "lambda_d", "lambda_b")
    ffo = {"fan_in_fan_out": case.fan_in_fan_out}
    opts = {**ffo, "bias": a["bias"], "dropout_mask": a["dropout_mask"]}
    y, cache = vera_forward(*(a[n] for n in names), **opts)
    y64, cache64 = vera_forward(*(wide[n] for n in names), **ffo, bias=wide["bias"], dropout_mask=wide["dropout_mask"])
    assert tolerance.compare(y, y64, vera_forward_bound(*(a[n] for n in names), **opts)).passed
    grads, grads64 = vera_backward(a["dy"], cache), vera_backward(wide["dy"], cache64)
    bounds = vera_backward_bound(a["dy"], *(a[n] for n in names), dropout_mask=a["dropout_mask"], **ffo)
    for name, b in bounds.items():
        result = tolerance.compare(getattr(grads, name), getattr(grads64, name), b)
        assert result.passed, f"{name}: {result}"
    merged = vera_merge(*(a[n] for n in names[1:]), **ffo)
    merged64 = vera_merge(*(wide[n] for n in names[1:]), **ffo)
    assert tolerance.compare(merged, merged64, vera_merge_bound(*(a[n] for n in names[1:]), **ffo)).passed
    shared = [a[n] for n in names[2:]]
    back, back64 = vera_unmerge(merged, *shared, **ffo), vera_unmerge(merged.astype(np.float64),
                                                                        *(wide[n] for n in names[2:]), **ffo)
    assert tolerance.compare(back, back64, vera_merge_bound(merged, *shared, unmerge=True, **ffo)).passed


@FAST
@given(layer_cases(max_features=48, max_batch_dims=2), st.sampled_from(["nf4", "fp4"]))
def test_qlora_bfloat16_bounds_hold_for_refpeft(case, quant_type):
    """refpeft.methods.qlora's bfloat16 precision (bitsandbytes + PEFT's rounding points) within the mixed bound."""
    import ml_dtypes

    from refpeft.methods.qlora import base_weight, qlora_backward, qlora_backward_bound, qlora_forward, \
        qlora_forward_bound, quantize_base

    if case.k * case.d < 2:
        return
    a = layer(case, "float32")
    bf16 = {n: None if v is None else v.astype(ml_dtypes.bfloat16).astype(np.float32)
            for n, v in a.items() if n in ("x", "dy", "bias")}
    state = quantize_base(a["W0"] if not case.fan_in_fan_out else a["W0"].T, quant_type=quant_type, blocksize=32)
    W0 = base_weight(state)
    s = options(case)["scaling"]
    y, cache = qlora_forward(bf16["x"], state, a["A"], a["B"], scaling=s, bias=bf16["bias"])
    wide = {n: None if v is None else v.astype(np.float64) for n, v in {**bf16, "A": a["A"], "B": a["B"], "W0": W0}.items()}
    y64, cache64 = lora_forward(wide["x"], wide["W0"], wide["A"], wide["B"], scaling=s, bias=wide["bias"])
    assert tolerance.compare(y, y64, qlora_forward_bound(bf16["x"], W0, a["A"], a["B"], scaling=s,
                                                         bias=bf16["bias"])).passed
    grads, grads64 = qlora_backward(bf16["dy"], cache), lora_backward(wide["dy"], cache64)
    bounds = qlora_backward_bound(bf16["dy"], bf16["x"], W0, a["A"], a["B"], scaling=s)
    for name, b in bounds.items():
        result = tolerance.compare(getattr(grads, name), getattr(grads64, name), b)
        assert result.passed, f"{name}: {result}"
