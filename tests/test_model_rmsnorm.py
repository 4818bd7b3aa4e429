"""RMSNorm: gradients vs finite differences, backends, torch's rms_norm, LlamaRMSNorm, Qwen3 q/k norm."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from refpeft.backend import UNIT_ROUNDOFF
from refpeft.errors import ConfigError, DTypeError, ShapeError
from refpeft.model.rmsnorm import rms_norm_backward, rms_norm_forward
from support import BACKENDS, BACKEND_IDS, assert_close, vjp_check

FAST = settings(max_examples=25, deadline=None)


@st.composite
def norms(draw, min_features=1):
    """x (..., H) with 0 to 3 leading axes, a weight (H,), dy, and an eps (0 included)."""
    shape = (*draw(st.lists(st.integers(1, 4), max_size=3)), draw(st.integers(min_features, 16)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return dict(x=rng.standard_normal(shape), weight=rng.standard_normal(shape[-1]),
                dy=rng.standard_normal(shape), eps=draw(st.sampled_from([0.0, 1e-6, 1e-5, 0.5])))


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
@FAST
@given(case=norms(min_features=2))  # H = 1 gives y = w sign(x) up to eps: a derivative of order eps,
def test_gradients_match_finite_differences(backend, case):  # below finite differences' rounding
    eps = case["eps"]
    _, cache = rms_norm_forward(backend(case["x"]), backend(case["weight"]), eps=eps)
    grads = rms_norm_backward(backend(case["dy"]), cache)

    def f(x, weight):
        return rms_norm_forward(backend(x), backend(weight), eps=eps)[0]

    vjp_check(f, {"x": case["x"], "weight": case["weight"]}, {"x": grads.dx, "weight": grads.dweight}, case["dy"])


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
@FAST
@given(case=norms())
def test_forward_agrees_with_torch_rms_norm_in_float64(backend, case):
    x, w = torch.tensor(case["x"]), torch.tensor(case["weight"])
    expected = torch.nn.functional.rms_norm(x, (x.shape[-1],), w, eps=case["eps"])
    y, _ = rms_norm_forward(backend(case["x"]), backend(case["weight"]), eps=case["eps"])
    assert_close(y, expected.numpy(), rtol=1e-12, like=backend(case["x"]))


@FAST
@given(case=norms())
def test_forward_agrees_with_llama_rms_norm_within_its_float32_error(case):
    # LlamaRMSNorm normalises in float32 (and lowers float64 inputs to float32), so the peer runs in
    # float32 on float32-representable inputs, against refpeft in float64. Its error per entry is at
    # most the mean of squares' gamma_H (halved by the square root), plus one rounding each for eps,
    # rsqrt, x * r and w * xhat: |y32 - y| <= (H / 2 + 4) u |w xhat| to first order.
    x32, w32 = case["x"].astype(np.float32), case["weight"].astype(np.float32)
    module = LlamaRMSNorm(x32.shape[-1], eps=case["eps"])
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(w32))
        peer = module(torch.from_numpy(x32)).numpy().astype(np.float64)
    y, cache = rms_norm_forward(x32.astype(np.float64), w32.astype(np.float64), eps=case["eps"])
    H = x32.shape[-1]
    bound = (H / 2 + 4) * UNIT_ROUNDOFF["float32"] * np.abs(y) * (1 + 1e-3) + 1e-45
    assert np.all(np.abs(peer - y) <= bound), float(np.max(np.abs(peer - y) / bound))


def test_qwen3_per_head_norm_is_each_head_normalised_on_its_own():
    rng = np.random.default_rng(0)
    x, w, dy = rng.standard_normal((2, 3, 4, 8)), rng.standard_normal(8), rng.standard_normal((2, 3, 4, 8))
    y, cache = rms_norm_forward(x, w, eps=1e-6)                      # (batch, seq, heads, head_dim)
    grads = rms_norm_backward(dy, cache)
    dweight = np.zeros(8)
    for head in range(4):
        y_head, head_cache = rms_norm_forward(x[:, :, head], w, eps=1e-6)
        assert_close(y[:, :, head], y_head, rtol=1e-15)
        head_grads = rms_norm_backward(dy[:, :, head], head_cache)
        assert_close(grads.dx[:, :, head], head_grads.dx, rtol=1e-15)
        dweight += head_grads.dweight
    assert_close(grads.dweight, dweight, rtol=1e-13)


def test_bad_input_is_refused():
    x = np.ones((2, 4))
    with pytest.raises(ShapeError, match=r"expected \(4,\)"):
        rms_norm_forward(x, np.ones(3), eps=1e-6)
    with pytest.raises(ShapeError, match="0-d"):
        rms_norm_forward(np.float64(1.0) * np.ones(()), np.ones(()), eps=1e-6)
    with pytest.raises(ConfigError, match="eps"):
        rms_norm_forward(x, np.ones(4), eps=-1.0)
    with pytest.raises(DTypeError):
        rms_norm_forward(x, np.ones(4, dtype=np.float32), eps=1e-6)
    _, cache = rms_norm_forward(x, np.ones(4), eps=1e-6)
    with pytest.raises(ShapeError, match="dy"):
        rms_norm_backward(np.ones((2, 5)), cache)
