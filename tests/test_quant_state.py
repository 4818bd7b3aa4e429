"""refpeft.quant.state: the state's flags, the bytes it really holds, dtype handling, the round trip."""

from __future__ import annotations

import numpy as np
import pytest

from refpeft.errors import DTypeError
from refpeft.quant.codebooks import NF4_CODE
from refpeft.quant.state import bits_per_parameter, dequantize_4bit, quantize_4bit, stored_bytes


def weight(shape=(33, 65), seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape", [(33, 65), (300, 256), (7,)])
def test_stored_bytes_are_the_bytes_the_state_holds(double_quant, shape):
    state = quantize_4bit(weight(shape), blocksize=64, double_quant=double_quant)
    assert state.nested is double_quant and state.numel == int(np.prod(shape)) and state.shape == shape
    held = {"weight": state.packed.nbytes}
    if double_quant:
        held |= {"absmax": state.absmax.codes.nbytes, "nested_absmax": state.absmax.nested_absmax.nbytes}
    else:
        held |= {"absmax": state.absmax.nbytes}
    assert stored_bytes(state) == held
    assert bits_per_parameter(state) == 8 * sum(held.values()) / state.numel


def test_double_quantisation_stores_less_and_costs_little():
    w = weight((256, 1024))
    plain, nested = quantize_4bit(w), quantize_4bit(w, double_quant=True)
    assert bits_per_parameter(nested) < bits_per_parameter(plain)
    error_plain = np.abs(dequantize_4bit(plain) - w).mean()
    error_nested = np.abs(dequantize_4bit(nested) - w).mean()
    assert error_plain <= error_nested < 1.05 * error_plain


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_dequantize_restores_shape_and_dtype_within_half_a_code_step(dtype):
    w = weight().astype(dtype)
    state = quantize_4bit(w, quant_type="nf4")
    assert state.dtype == dtype
    back = dequantize_4bit(state)
    assert back.shape == w.shape and back.dtype == np.dtype(dtype)
    # half NF4's widest gap (between -1 and -0.6962), times the block's absmax, bounds the error
    half_gap = np.max(np.diff(np.sort(np.asarray(NF4_CODE, dtype=np.float64)))) / 2
    blocks = np.abs(w.astype(np.float32).reshape(-1))
    absmax = np.repeat([b.max() for b in np.array_split(blocks, np.arange(64, blocks.size, 64))], 64)[:blocks.size]
    err = np.abs(back.astype(np.float32) - w.astype(np.float32)).reshape(-1)
    assert np.all(err <= half_gap * absmax * (1 + 2e-3) + 1e-6)  # 2e-3: float16's rounding
    assert err.max() > 0.5 * half_gap * absmax.min()  # lossy, as 4 bits must be
    assert dequantize_4bit(state, dtype="bfloat16").dtype == np.float32


def test_bfloat16_is_recorded_only_for_bfloat16_values():
    w = weight()
    bf = (w.view(np.uint32) & 0xFFFF0000).view(np.float32)     # truncated: bfloat16 numbers
    assert quantize_4bit(bf, dtype="bfloat16").dtype == "bfloat16"
    with pytest.raises(DTypeError, match="not bfloat16 numbers"):
        quantize_4bit(w, dtype="bfloat16")
    with pytest.raises(DTypeError):
        quantize_4bit(w.astype(np.float64))
    with pytest.raises(DTypeError):
        dequantize_4bit(quantize_4bit(w), dtype="int8")
