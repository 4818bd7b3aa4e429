"""refpeft.quant.chunked: a weight quantised a chunk at a time is the weight quantised whole.

Specification: for any shape (odd element counts, partial last blocks, chunks that split the
weight in many pieces), dtype, code, rounding and double quantisation, `quantize_4bit_chunked`
returns the very state `quantize_4bit` does (codes, absmax, nested codes, offset: bit for bit);
the dequantised pieces concatenate to `dequantize_4bit`; and the error report equals the one
computed on the whole weight in float64.
"""

from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest

from refpeft.errors import ConfigError, ShapeError
from refpeft.quant.chunked import dequantize_4bit_chunks, quantization_error, quantize_4bit_chunked
from refpeft.quant.codebooks import NF4_CODE
from refpeft.quant.state import dequantize_4bit, quantize_4bit

CASES = [  # shape, blocksize, chunk_elements
    ((37, 29), 32, 64),        # odd n = 1073: a partial last block and a pad element, 17 chunks
    ((64, 64), 64, 64),        # one block per chunk
    ((5, 300), 128, 256),      # partial last block in a partial last chunk
    ((3, 4096), 4096, 4096),   # one chunk per block
    ((2000,), 64, 2**18),      # a single chunk
]


def _weight(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32) * np.float32(0.02)
    x.reshape(-1)[: x.size // 7] = 0.0           # an all-zero stretch: all-zero blocks in both roundings
    return x.astype(dtype)


def _whole(x, **options):
    if x.dtype == np.dtype(ml_dtypes.bfloat16):
        return quantize_4bit(x.astype(np.float32), dtype="bfloat16", **options)
    return quantize_4bit(x, **options)


@pytest.mark.parametrize("shape, blocksize, chunk", CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
@pytest.mark.parametrize("quant_type, rounding", [("nf4", "bnb-cuda"), ("nf4", "bnb-cpu"), ("fp4", "bnb-cuda"),
                                                  ("fp4", "bnb-cpu")])
@pytest.mark.parametrize("double_quant", [False, True])
def test_chunked_state_is_the_whole_state(shape, blocksize, chunk, dtype, quant_type, rounding, double_quant):
    x = _weight(shape, dtype)
    options = dict(quant_type=quant_type, blocksize=blocksize, rounding=rounding, double_quant=double_quant)
    whole = _whole(x, **options)
    chunked = quantize_4bit_chunked(x, chunk_elements=chunk, **options)
    assert (chunked.shape, chunked.dtype, chunked.blocksize, chunked.quant_type) == \
        (whole.shape, whole.dtype, whole.blocksize, whole.quant_type)
    np.testing.assert_array_equal(chunked.packed, whole.packed)
    if double_quant:
        assert chunked.absmax.offset == whole.absmax.offset
        np.testing.assert_array_equal(chunked.absmax.codes, whole.absmax.codes)
        np.testing.assert_array_equal(chunked.absmax.nested_absmax, whole.absmax.nested_absmax)
    else:
        np.testing.assert_array_equal(chunked.absmax, whole.absmax)
    pieces = list(dequantize_4bit_chunks(chunked, chunk))
    assert len(pieces) == math.ceil(x.size / chunk)
    np.testing.assert_array_equal(np.concatenate(pieces), np.asarray(dequantize_4bit(whole)).reshape(-1))


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_error_report_is_the_whole_weights_in_float64(dtype):
    x = _weight((37, 29), dtype, seed=1)
    state = _whole(x, blocksize=32)
    report = quantization_error(x, state, chunk_elements=64)
    exact = x.astype(np.float64)
    error = np.asarray(dequantize_4bit(state), dtype=np.float64) - exact
    assert report.squared_error == pytest.approx(np.sum(error**2), rel=1e-12)
    assert report.squared_norm == pytest.approx(np.sum(exact**2), rel=1e-12)
    assert report.max_abs_error == np.max(np.abs(error))
    assert report.relative == pytest.approx(np.linalg.norm(error) / np.linalg.norm(exact), rel=1e-12)
    # the report is not vacuous: a 4-bit code loses something, but at most half the widest gap
    # between NF4 codes times the largest absmax (plus the stored dtype's rounding, 2^-8 for bfloat16)
    half_gap = 0.5 * float(np.max(np.diff(NF4_CODE)))
    assert 0 < report.max_abs_error <= half_gap * float(np.max(state.absmax)) * (1 + 2**-7)


def test_a_memory_mapped_weight_is_read_a_chunk_at_a_time(tmp_path):
    x = _weight((300, 70), np.float32, seed=2)
    path = tmp_path / "w.bin"
    x.tofile(path)
    mapped = np.memmap(path, dtype=np.float32, mode="r", shape=x.shape)
    chunked = quantize_4bit_chunked(mapped, blocksize=64, double_quant=True, chunk_elements=1024)
    np.testing.assert_array_equal(chunked.packed, quantize_4bit(x, blocksize=64, double_quant=True).packed)


def test_refusals():
    with pytest.raises(ConfigError, match="multiple of the block size 64"):
        quantize_4bit_chunked(np.ones((4, 64), np.float32), blocksize=64, chunk_elements=96)
    with pytest.raises(ConfigError, match="blocksize must be one of"):
        quantize_4bit_chunked(np.ones((4, 64), np.float32), blocksize=48)
    with pytest.raises(ShapeError, match="nothing to quantise"):
        quantize_4bit_chunked(np.ones((0, 64), np.float32))
