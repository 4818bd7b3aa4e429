"""The derived backward bounds of LoKr, OFT and AdaLoRA hold: refpeft's float32 gradients against float64, any shape."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings, strategies as st

from refpeft.methods.adalora import adalora_backward, adalora_backward_bound, adalora_forward
from refpeft.methods.lokr import lokr_backward, lokr_backward_bound, lokr_forward, lokr_layout
from refpeft.methods.oft import oft_backward, oft_forward
from refpeft.methods.oft_bounds import oft_backward_bound
from refpeft.tolerance import compare


def _gradients(forward, backward, arrays: dict, dtype: str, **options) -> tuple:
    cast = {name: None if a is None else a.astype(dtype) for name, a in arrays.items()}
    dy = cast.pop("dy")
    _, cache = forward(**cast, **options)
    return backward(dy, cache)


def _draw(rng: np.random.Generator, shape: tuple[int, ...], scale: float = 1.0) -> np.ndarray:
    """float32-representable values (so both precisions start from the same inputs)."""
    return (rng.standard_normal(shape) * scale).astype(np.float32).astype(np.float64)


def _assert_within(g32, g64, bounds: dict) -> None:
    for name, bound in bounds.items():
        comparison = compare(getattr(g32, name), getattr(g64, name), bound)
        assert comparison.passed, (name, comparison.describe())


@settings(max_examples=25, deadline=None)
@given(k=st.sampled_from([4, 6, 8, 12, 16]), d=st.sampled_from([4, 6, 9, 12]), r=st.integers(1, 4),
       decompose_both=st.booleans(), fan_in_fan_out=st.booleans(), n=st.integers(1, 5), seed=st.integers(0, 2**32 - 1))
def test_lokr_backward_bound_covers_float32(k, d, r, decompose_both, fan_in_fan_out, n, seed):
    rng = np.random.default_rng(seed)
    lay = lokr_layout(k, d, r, decompose_both=decompose_both)
    tensors = {}
    for i, (shape, low) in (("1", (lay.w1, lay.w1_low_rank)), ("2", (lay.w2, lay.w2_low_rank))):
        parts = {"_a": (shape[0], r), "_b": (r, shape[1])} if low else {"": shape}
        tensors.update({f"lokr_w{i}{suffix}": _draw(rng, sub) for suffix, sub in parts.items()})
    x, dy = _draw(rng, (n, k)), _draw(rng, (n, d))
    W0 = _draw(rng, (k, d) if fan_in_fan_out else (d, k), 0.3)
    options = dict(scaling=0.75, fan_in_fan_out=fan_in_fan_out, bias_trainable=False)
    g = {dtype: _gradients(lambda x, W0, **t: lokr_forward(x, W0, t, **options), lokr_backward,
                           {"x": x, "W0": W0, "dy": dy, **tensors}, dtype) for dtype in ("float32", "float64")}
    bounds = lokr_backward_bound(dy, x, W0, tensors, scaling=0.75, fan_in_fan_out=fan_in_fan_out)
    _assert_within(g["float32"], g["float64"], bounds)


@settings(max_examples=25, deadline=None)
@given(b=st.integers(2, 4), blocks=st.integers(1, 4), d=st.integers(1, 8), terms=st.integers(1, 7),
       scale=st.sampled_from([0.1, 0.4, 1.0]), bias=st.booleans(), fan_in_fan_out=st.booleans(), n=st.integers(1, 5),
       seed=st.integers(0, 2**32 - 1))
def test_oft_backward_bound_covers_float32(b, blocks, d, terms, scale, bias, fan_in_fan_out, n, seed):
    rng = np.random.default_rng(seed)
    k = b * blocks
    V, x, dy = _draw(rng, (blocks, b * (b - 1) // 2), scale), _draw(rng, (n, k)), _draw(rng, (n, d))
    W0 = _draw(rng, (k, d) if fan_in_fan_out else (d, k), 0.3)
    arrays = {"x": x, "W0": W0, "V": V, "dy": dy, "bias": _draw(rng, (d,)) if bias else None}
    g = {dtype: _gradients(oft_forward, oft_backward, arrays, dtype, terms=terms, fan_in_fan_out=fan_in_fan_out,
                           bias_trainable=bias) for dtype in ("float32", "float64")}
    bounds = oft_backward_bound(dy, x, W0, V, terms=terms, fan_in_fan_out=fan_in_fan_out, bias_trainable=bias)
    _assert_within(g["float32"], g["float64"], bounds)


@settings(max_examples=25, deadline=None)
@given(k=st.integers(1, 16), d=st.integers(1, 12), r=st.integers(1, 5), dropout=st.booleans(), pruned=st.booleans(),
       fan_in_fan_out=st.booleans(), n=st.integers(1, 5), seed=st.integers(0, 2**32 - 1))
def test_adalora_backward_bound_covers_float32(k, d, r, dropout, pruned, fan_in_fan_out, n, seed):
    rng = np.random.default_rng(seed)
    A, E, B = _draw(rng, (r, k), 0.5), _draw(rng, (r, 1)), _draw(rng, (d, r), 0.5)
    if pruned:
        E[0, 0] = 0.0
    x, dy = _draw(rng, (n, k)), _draw(rng, (n, d))
    W0 = _draw(rng, (k, d) if fan_in_fan_out else (d, k), 0.3)
    mask = (rng.random((n, k)) < 0.75) / 0.75 if dropout else None
    mask = None if mask is None else mask.astype(np.float32).astype(np.float64)
    s = 3.0 / (r + 1e-5)
    arrays = {"x": x, "W0": W0, "A": A, "E": E, "B": B, "dy": dy, "dropout_mask": mask}
    g = {dtype: _gradients(adalora_forward, adalora_backward, arrays, dtype, scaling=s, ranknum=float(r),
                           fan_in_fan_out=fan_in_fan_out) for dtype in ("float32", "float64")}
    bounds = adalora_backward_bound(dy, x, W0, A, E, B, scaling=s, dropout_mask=mask, fan_in_fan_out=fan_in_fan_out)
    _assert_within(g["float32"], g["float64"], bounds)
