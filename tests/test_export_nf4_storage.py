"""What ONNX Runtime's MatMulBnb4 storage (float16 absmax, no double quantisation) loses against refpeft's NF4."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnx", reason="refpeft_onnx (the onnx extra) holds the comparison")

from refpeft_onnx.nf4 import MATMULBNB4_STORAGES, matmulbnb4_storage_errors  # noqa: E402

U16 = 2.0**-11          # float16's unit roundoff: f16(absmax) = absmax (1 + d), |d| <= U16
U32 = 2.0**-24


def _normal(shape, *, std=0.02, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32) * np.float32(std)


def test_bits_per_parameter_of_each_storage_at_block_64():
    r = matmulbnb4_storage_errors(_normal((256, 256)))
    assert list(r) == list(MATMULBNB4_STORAGES)
    assert r["nf4-double-quant"].bits_per_parameter == 4 + 8 / 64 + 32 / (64 * 256)  # offset: per tensor
    assert r["nf4-float32-absmax"].bits_per_parameter == 4.5
    assert r["matmulbnb4-float16-absmax"].bits_per_parameter == 4.25
    assert r["matmulbnb4-float16-from-double-quant"].bits_per_parameter == 4.25


def test_float16_absmax_adds_at_most_one_float16_rounding_of_the_weight():
    # ||W - W16|| <= ||W - W32|| + ||W32 - W16||, and |W32 - W16| <= (U16 + 2 U32) |W32| elementwise.
    W = _normal((512, 384), seed=1)
    r = matmulbnb4_storage_errors(W)
    e32, e16 = r["nf4-float32-absmax"].relative_error, r["matmulbnb4-float16-absmax"].relative_error
    assert e32 <= e16 * (1 + 1e-3)                       # rounding the absmax never helps much
    assert abs(e16 - e32) <= (U16 + 2 * U32) * (1 + e32)
    # and the double-quantised absmax costs more than the float16 one (8-bit codes vs 11 bits)
    assert r["nf4-double-quant"].relative_error > e16


def test_float16_absmax_overflows_and_underflows_where_float32_does_not():
    big = _normal((64, 64), std=4e4, seed=2)            # absmax ~ 1e5 per block: past float16's 65504
    r = matmulbnb4_storage_errors(big)
    assert np.isfinite(r["nf4-float32-absmax"].relative_error)
    assert not np.isfinite(r["matmulbnb4-float16-absmax"].relative_error)
    tiny = _normal((64, 64), std=1e-7, seed=3)           # absmax ~ 3e-7: a float16 subnormal (steps of 6e-8)
    r = matmulbnb4_storage_errors(tiny)
    assert r["matmulbnb4-float16-absmax"].relative_error > 1.2 * r["nf4-float32-absmax"].relative_error
