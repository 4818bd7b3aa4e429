"""QLoRA: gradients by finite differences of the dequantised model (float64), bf16 emulation properties."""

from __future__ import annotations

import numpy as np
import pytest

from refpeft.backend import round_to, to_numpy
from refpeft.errors import ConfigError, DTypeError, ShapeError
from refpeft.methods.lora import lora_forward_bound
from refpeft.methods.qlora import base_weight, qlora_backward, qlora_backward_bound, qlora_forward, quantize_base
from refpeft.quant.state import dequantize_4bit
from tests.support import BACKEND_IDS, BACKENDS, vjp_check

import array_api_compat.numpy as xp


def layer(k=64, d=32, r=4, seed=0, quant_type="nf4"):
    rng = np.random.default_rng(seed)
    state = quantize_base(rng.standard_normal((d, k)) * 0.1, quant_type=quant_type)
    return state, rng.standard_normal((r, k)) * 0.1, rng.standard_normal((d, r)) * 0.1, rng.standard_normal(d)


def bf16(a):
    return round_to(np.asarray(a, dtype=np.float32), "bfloat16", xp=xp)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dropout", [False, True])
def test_lora_gradients_match_finite_differences_of_the_dequantised_model(quant_type, dropout):
    state, A, B, bias = layer(quant_type=quant_type)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 5, 64))
    mask = (rng.random(x.shape) > 0.2) / 0.8 if dropout else None
    dy = rng.standard_normal((3, 5, 32))

    def f(x, A, B):
        return qlora_forward(x, state, A, B, scaling=2.0, bias=bias, dropout_mask=mask, precision="float64")[0]

    _, cache = qlora_forward(x, state, A, B, scaling=2.0, bias=bias, dropout_mask=mask, precision="float64")
    grads = qlora_backward(dy, cache)
    vjp_check(f, {"x": x, "A": A, "B": B}, {"x": grads.dx, "A": grads.dA, "B": grads.dB}, dy)


@pytest.mark.parametrize("gradient", ["detached", "exact"])
def test_dora_on_a_4bit_base_gradients(gradient):
    state, A, B, bias = layer()
    W0 = base_weight(state, precision="float64")
    magnitude = np.linalg.norm(W0 + 2.0 * B @ A, axis=1) * 1.1
    rng = np.random.default_rng(2)
    x, dy = rng.standard_normal((6, 64)), rng.standard_normal((6, 32))
    _, cache = qlora_forward(x, state, A, B, scaling=2.0, magnitude=magnitude, precision="float64",
                             dora_gradient=gradient)
    grads = qlora_backward(dy, cache)

    def f(x, A, B, magnitude):
        return qlora_forward(x, state, A, B, scaling=2.0, magnitude=magnitude, precision="float64",
                             dora_gradient="exact")[0]

    checked = {"x": grads.dx, "magnitude": grads.dmagnitude}
    if gradient == "exact":  # the detached gradient is by design not the derivative w.r.t. A and B
        checked |= {"A": grads.dA, "B": grads.dB}
    vjp_check(f, {"x": x, "A": A, "B": B, "magnitude": magnitude}, checked, dy)


def bf16_by_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> nearest bfloat16 (ties to even), by integer arithmetic on the bits (finite inputs)."""
    bits = np.asarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return rounded.astype(np.uint32).view(np.float32)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_float64_is_plain_lora_on_the_dequantised_base(quant_type):
    """The float64 path against the layer written out in NumPy on refpeft.quant's dequantised weight
    (rounded to bfloat16 here, by bits), within LoRA's derived float64 bound (refpeft.tolerance)."""
    state, A, B, bias = layer(quant_type=quant_type)
    x = np.random.default_rng(3).standard_normal((7, 64))
    y, _ = qlora_forward(x, state, A, B, scaling=0.5, bias=bias, precision="float64")
    W0 = bf16_by_bits(dequantize_4bit(state, dtype="float32")).astype(np.float64)   # (d, k)
    expected = x @ W0.T + bias + 0.5 * (x @ A.T) @ B.T
    bound = lora_forward_bound(x, W0, A, B, scaling=0.5, bias=bias, dtype="float64")
    assert np.all(np.abs(y - expected) <= bound)
    # the check can fail: the base left at float32 (not rounded to bfloat16) is far outside the bound
    W32 = dequantize_4bit(state, dtype="float32").astype(np.float64)
    assert not np.array_equal(W32, W0)
    assert np.any(np.abs(y - (x @ W32.T + bias + 0.5 * (x @ A.T) @ B.T)) > bound)


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
def test_bfloat16_stays_within_its_rounding_of_the_float64_model(backend):
    """One bfloat16 policy on every backend (refpeft.backend): the same rounding points, float32
    arrays holding bfloat16 values, within the bound of the float64 model; backends differ only
    where their float32 matmuls sum in another order, by at most one bfloat16 rounding."""
    state, A, B, bias = layer(k=128, d=48, r=8)
    rng = np.random.default_rng(4)
    x, dy = bf16(rng.standard_normal((16, 128))), bf16(rng.standard_normal((16, 48)))
    A32, B32, b32 = A.astype(np.float32), B.astype(np.float32), bias.astype(np.float32)
    W0 = base_weight(state, precision="float64")
    state_b = quantize_base(backend(W0.astype(np.float32)))
    y, cache = qlora_forward(backend(x), state_b, backend(A32), backend(B32), scaling=2.0, bias=backend(b32))
    grads = qlora_backward(backend(dy), cache)
    assert str(y.dtype).endswith("float32") and str(grads.dx.dtype).endswith("float32")
    y, dx = to_numpy(y), to_numpy(grads.dx)
    y64, cache64 = qlora_forward(x.astype(np.float64), state, A32.astype(np.float64), B32.astype(np.float64),
                                 scaling=2.0, bias=bf16(b32).astype(np.float64), precision="float64")
    g64 = qlora_backward(dy.astype(np.float64), cache64)
    assert np.array_equal(y, bf16(y)) and np.array_equal(dx, bf16(dx))
    u = 2.0**-8
    # three bf16 roundings (base, adapter output, sum) on top of float32 sums
    y_bound = 3 * u * (np.abs(x) @ np.abs(W0).T + np.abs(b32) + 2.0 * np.abs(x) @ np.abs(A32).T @ np.abs(B32).T)
    assert np.all(np.abs(y - y64) <= y_bound)
    dx_bound = 3 * u * (np.abs(dy) @ np.abs(W0) + 2.0 * np.abs(dy) @ np.abs(B32) @ np.abs(A32))
    assert np.all(np.abs(dx - g64.dx) <= dx_bound)
    # dA, dB are float32 products: within the derived bound of PEFT's float32 adapter backward
    bounds = qlora_backward_bound(dy, x, W0, A32, B32, scaling=2.0)
    assert np.all(np.abs(to_numpy(grads.dA) - g64.dA) <= bounds["dA"])
    assert np.all(np.abs(to_numpy(grads.dB) - g64.dB) <= bounds["dB"])
    # the bound can catch a slip: gradients rounded once to bfloat16 fall outside it
    assert np.any(np.abs(bf16(g64.dA) - g64.dA) > bounds["dA"])
    assert np.any(np.abs(bf16(g64.dB) - g64.dB) > bounds["dB"])


def test_refusals():
    state, A, B, bias = layer()
    x = np.random.default_rng(5).standard_normal((2, 64)).astype(np.float32)
    with pytest.raises(DTypeError, match="bfloat16 values"):
        qlora_forward(x, state, A.astype(np.float32), B.astype(np.float32), scaling=1.0)
    with pytest.raises(ConfigError, match="float64"):
        qlora_forward(bf16(x), state, A.astype(np.float32), B.astype(np.float32), scaling=1.0,
                      magnitude=np.ones(32, dtype=np.float32))
    with pytest.raises(ConfigError, match="precision"):
        qlora_forward(x, state, A, B, scaling=1.0, precision="float16")
    with pytest.raises(ShapeError):
        qlora_forward(bf16(x[:, :10]), state, A.astype(np.float32), B.astype(np.float32), scaling=1.0)
