"""Blockwise 4-bit quantisation: the decision rule by its definition, packing, special blocks, errors, backends."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refpeft.backend import to_numpy
from refpeft.errors import ConfigError, DTypeError, NonFiniteError, ShapeError
from refpeft.quant.blockwise import (
    BLOCKSIZES,
    CPU_ABSMAX_FLOOR,
    dequantize_blockwise_4bit,
    pack_nibbles,
    quantize_blockwise_4bit,
    unpack_nibbles,
)
from refpeft.quant.codebooks import (
    FP4_CPU_SORTED_CODES,
    FP4_MAGNITUDE_BITS,
    NF4_CODE,
    code_values,
    thresholds,
)
from tests.quant_cases import EXAMPLES, build, quant_cases
from tests.support import BACKEND_IDS, BACKENDS

ROUNDINGS = ["bnb-cuda", "bnb-cpu"]
QUANT_TYPES = ["nf4", "fp4"]


def codes_of(packed: np.ndarray, n: int) -> np.ndarray:
    flat = np.asarray(packed).reshape(-1)
    return np.stack([flat >> 4, flat & 15], axis=1).reshape(-1)[:n]


def codes_by_definition(xn: np.ndarray, quant_type: str, rounding: str) -> np.ndarray:
    """The decision rule as documented: count thresholds strictly below (of |xn| for CUDA FP4)."""
    t = np.asarray(thresholds(quant_type, rounding), dtype=np.float32)
    if quant_type == "nf4":
        return (xn[:, None] > t).sum(axis=1)
    if rounding == "bnb-cuda":
        magnitude = np.asarray(FP4_MAGNITUDE_BITS)[(np.abs(xn)[:, None] > t).sum(axis=1)]
        return magnitude + 8 * (xn < 0)
    return np.asarray(FP4_CPU_SORTED_CODES)[(xn[:, None] > t).sum(axis=1)]


@settings(max_examples=EXAMPLES, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), blocksize=st.sampled_from(BLOCKSIZES), blocks=st.integers(1, 6),
       quant_type=st.sampled_from(QUANT_TYPES), rounding=st.sampled_from(ROUNDINGS))
def test_codes_follow_the_threshold_definition(seed, blocksize, blocks, quant_type, rounding):
    """With absmax = 1 in every block, xn = x: codes must equal the threshold count, boundaries included."""
    rng = np.random.default_rng(seed)
    t = np.asarray(thresholds(quant_type, rounding), dtype=np.float32)
    on_and_near = np.concatenate([t, np.nextafter(t, np.float32(2)), np.nextafter(t, np.float32(-2)),
                                  np.asarray(NF4_CODE, dtype=np.float32), [0.0, -0.0]]).astype(np.float32)
    x = np.where(rng.random(blocks * blocksize) < 0.5, rng.uniform(-1, 1, blocks * blocksize),
                 rng.choice(on_and_near, blocks * blocksize)).astype(np.float32)
    x[::blocksize] = 1.0
    packed, absmax = quantize_blockwise_4bit(x, quant_type=quant_type, blocksize=blocksize, rounding=rounding)
    assert np.all(absmax == 1.0)
    assert np.array_equal(codes_of(packed, x.size), codes_by_definition(x, quant_type, rounding))


@settings(max_examples=EXAMPLES, deadline=None)
@given(case=quant_cases(), quant_type=st.sampled_from(QUANT_TYPES), rounding=st.sampled_from(ROUNDINGS))
def test_round_trip_error_is_within_half_the_widest_gap(case, quant_type, rounding):
    x = build(case)
    packed, absmax = quantize_blockwise_4bit(x, quant_type=quant_type, blocksize=case.blocksize, rounding=rounding)
    x_hat = dequantize_blockwise_4bit(packed, absmax, shape=x.shape, quant_type=quant_type,
                                      blocksize=case.blocksize)
    assert x_hat.shape == x.shape and x_hat.dtype == np.float32
    values = np.sort(np.asarray(code_values(quant_type), dtype=np.float64))
    half_gap = np.max(np.diff(values)) / 2
    per_element = np.repeat(absmax.astype(np.float64), case.blocksize)[: x.size].reshape(x.shape)
    bound = per_element * (half_gap + 1e-6) + 1e-45
    # Under bnb-cuda, a block whose absmax is at most 2^-128 has 1/absmax = inf (float32): every
    # nonzero value becomes +-inf and decodes to +-absmax, and a zero becomes 0 * inf = NaN, which
    # passes no threshold: code 0 (docs/quantization.md).
    saturated = (per_element <= 2.0**-128) & (rounding == "bnb-cuda")
    # Under bnb-cpu, a block whose absmax is below f32(1e-38) is scaled by 1/1e-38 instead (the
    # clamp; a true division in a last partial block) but decoded with its own absmax.
    floor = np.float32(1e-38)
    floored = (per_element < floor) & (rounding == "bnb-cpu")
    error = np.abs(x_hat.astype(np.float64) - x)
    special = saturated | floored
    assert np.all(error[~special] <= bound[~special])
    code0 = float(code_values(quant_type)[0])
    expected = np.where(x != 0, np.sign(x), code0) * per_element
    assert np.array_equal(x_hat[saturated], expected[saturated].astype(np.float32))
    flat = x.ravel().astype(np.float32)
    with np.errstate(over="ignore"):  # large values overflow here, but only floored blocks are compared
        xn = flat * (np.float32(1) / floor)
        if x.size % case.blocksize:
            last = slice(x.size - x.size % case.blocksize, None)
            xn[last] = flat[last] / floor
    table = np.asarray(code_values(quant_type), dtype=np.float32)
    decoded = table[codes_by_definition(xn, quant_type, rounding)] * per_element.ravel().astype(np.float32)
    assert np.array_equal(x_hat.ravel()[floored.ravel()], decoded[floored.ravel()])


def test_packing_puts_the_first_element_in_the_high_nibble():
    x = np.array([1.0, -1.0, 0.0], dtype=np.float32)  # NF4 codes 15, 0, 7 and the padding 0.0 -> 7
    packed, _ = quantize_blockwise_4bit(x, blocksize=32)
    assert packed.shape == (2, 1) and packed.dtype == np.uint8 and list(packed[:, 0]) == [0xF0, 0x77]
    fp4, _ = quantize_blockwise_4bit(x, quant_type="fp4", blocksize=32)  # FP4 codes 3, 11, 0, 0
    assert list(fp4[:, 0]) == [0x3B, 0x00]


@given(codes=st.lists(st.integers(0, 15), min_size=1, max_size=64).map(lambda c: c + c[:1] * (len(c) % 2)))
@settings(max_examples=EXAMPLES, deadline=None)
def test_unpack_inverts_pack(codes):
    import array_api_compat.numpy as xp

    packed = pack_nibbles(np.asarray(codes, dtype=np.uint8), xp=xp)
    assert np.array_equal(unpack_nibbles(packed, xp=xp), codes)


@pytest.mark.parametrize("n", [64, 100])  # a full and a partial all-zero block after a nonzero one
def test_all_zero_blocks(n):
    x = np.zeros(n, dtype=np.float32)
    x[0] = 1.0
    x[:32] = np.linspace(-1, 1, 32)
    cuda, cuda_absmax = quantize_blockwise_4bit(x, blocksize=32, rounding="bnb-cuda")
    cpu, cpu_absmax = quantize_blockwise_4bit(x, blocksize=32, rounding="bnb-cpu")
    zero = slice(16, None)  # bytes of blocks 1, 2, ...
    assert np.all(cuda[zero] == 0x00) and np.all(cpu[zero] == 0x77)
    assert np.all(cuda_absmax[1:] == 0.0)
    full_zero = cpu_absmax[1:-1] if n % 32 else cpu_absmax[1:]
    assert np.all(full_zero == 0.0)
    if n % 32:  # bnb CPU's partial-block path stores the clamped absmax
        assert cpu_absmax[-1] == np.float32(CPU_ABSMAX_FLOOR)
    decoded = dequantize_blockwise_4bit(cuda, cuda_absmax, shape=(n,), blocksize=32)
    assert np.all(decoded[32:] == 0.0) and np.all(np.signbit(decoded[32:]))  # NF4 code 0 = -1.0 times 0


def test_cuda_reciprocal_overflow_block():
    """absmax <= 2^-128: 1/absmax = inf, so x * inf saturates the code and 0 * inf = NaN gives code 0."""
    tiny = np.float32(2.0**-130)
    x = np.array([tiny, -tiny, 0.0, tiny / 2] + [0.0] * 28, dtype=np.float32)
    packed, absmax = quantize_blockwise_4bit(x, blocksize=32)
    assert absmax[0] == tiny
    assert list(codes_of(packed, 4)) == [15, 0, 0, 15]
    fp4, _ = quantize_blockwise_4bit(x, quant_type="fp4", blocksize=32)
    assert list(codes_of(fp4, 4)) == [0b0011, 0b1011, 0, 0b0011]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_inputs_are_refused(bad):
    x = np.ones((4, 64), dtype=np.float32)
    x[2, 5] = bad
    with pytest.raises(NonFiniteError, match="1 non-finite"):
        quantize_blockwise_4bit(x)


def test_options_are_checked():
    x = np.ones(64, dtype=np.float32)
    with pytest.raises(ConfigError, match="blocksize"):
        quantize_blockwise_4bit(x, blocksize=16)
    with pytest.raises(ConfigError, match="quant_type"):
        quantize_blockwise_4bit(x, quant_type="int4")
    with pytest.raises(ConfigError, match="rounding"):
        quantize_blockwise_4bit(x, rounding="nearest")
    with pytest.raises(ShapeError, match="nothing to quantise"):
        quantize_blockwise_4bit(np.ones((0, 3), dtype=np.float32))
    packed, absmax = quantize_blockwise_4bit(x)
    with pytest.raises(ShapeError, match="bytes"):
        dequantize_blockwise_4bit(packed, absmax, shape=(66,))
    with pytest.raises(DTypeError, match="uint8"):
        dequantize_blockwise_4bit(packed.astype(np.int16), absmax, shape=(64,))


def test_float16_quantises_as_its_float32_values():
    x = np.random.default_rng(1).standard_normal(1000).astype(np.float16)
    for rounding in ROUNDINGS:
        a = quantize_blockwise_4bit(x, rounding=rounding)
        b = quantize_blockwise_4bit(x.astype(np.float32), rounding=rounding)
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("quant_type", QUANT_TYPES)
@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_every_backend_gives_the_same_bytes(backend, quant_type, rounding):
    x = np.random.default_rng(2).standard_normal((7, 45)).astype(np.float32)
    x[0, :32] = 0.0
    expected = quantize_blockwise_4bit(x, quant_type=quant_type, blocksize=32, rounding=rounding)
    packed, absmax = quantize_blockwise_4bit(backend(x), quant_type=quant_type, blocksize=32, rounding=rounding)
    assert np.array_equal(to_numpy(packed), expected[0]) and np.array_equal(to_numpy(absmax), expected[1])
    decoded = dequantize_blockwise_4bit(packed, absmax, shape=x.shape, quant_type=quant_type, blocksize=32)
    reference = dequantize_blockwise_4bit(*expected, shape=x.shape, quant_type=quant_type, blocksize=32)
    assert np.array_equal(to_numpy(decoded).view(np.uint32), reference.view(np.uint32))
