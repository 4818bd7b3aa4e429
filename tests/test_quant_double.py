"""Double quantisation: the nearest-code rules, the offset, dequantisation order, bits per parameter."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refpeft.backend import to_numpy
from refpeft.errors import ConfigError, DTypeError, NonFiniteError
from refpeft.quant.codebooks import dynamic_map, midpoints
from refpeft.quant.double import NESTED_BLOCKSIZE, dequantize_absmax, quantize_absmax
from refpeft.quant.state import bits_per_parameter, nominal_bits_per_parameter, quantize_4bit
from tests.quant_cases import EXAMPLES
from tests.support import BACKEND_IDS, BACKENDS

MAP = np.asarray(dynamic_map(), dtype=np.float32)
MIDPOINTS = np.asarray(midpoints(dynamic_map()), dtype=np.float32)


def nearest_ties_to_even(v: np.ndarray) -> np.ndarray:
    """The nearest map index, deciding by float32 midpoints; a value on a midpoint takes the even index."""
    below = (v[:, None] > MIDPOINTS).sum(axis=1)
    on = v[:, None] == MIDPOINTS
    tie_up = (on & (np.arange(255) % 2 == 1)).any(axis=1)  # between 2j+1 and 2j+2: the even one is above
    return below + tie_up


def normalised_values(seed: int) -> np.ndarray:
    """256 values whose block absmax is 1 (so vn = v), with midpoints and their neighbours mixed in."""
    rng = np.random.default_rng(seed)
    special = np.concatenate([MIDPOINTS, np.nextafter(MIDPOINTS, 2), np.nextafter(MIDPOINTS, -2), MAP])
    v = np.where(rng.random(256) < 0.5, rng.uniform(-1, 1, 256), rng.choice(special, 256)).astype(np.float32)
    v[0] = 1.0
    return v


@settings(max_examples=EXAMPLES, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_cuda_search_is_nearest_with_ties_to_even(seed):
    v = normalised_values(seed)
    nested = quantize_absmax(v, offset=0.0)
    assert nested.nested_absmax[0] == 1.0
    assert np.array_equal(nested.codes, nearest_ties_to_even(v))


def test_cpu_table_costs_at_most_one_bin_of_error():
    """bnb CPU's 65,536-bin table: the code's error exceeds the nearest code's by at most a bin (2/65535).

    Near 0 the map is finer than a bin, so the code index can be several steps off (seen: 4).
    """
    v = np.linspace(-1, 1, 2**22).astype(np.float32)
    v[::256] = 1.0  # every nested block has absmax 1, so vn = v
    cpu = quantize_absmax(v, rounding="bnb-cpu", offset=0.0).codes.astype(int)
    exact = quantize_absmax(v, offset=0.0).codes.astype(int)
    extra = np.abs(MAP[cpu] - v.astype(np.float64)) - np.abs(MAP[exact] - v.astype(np.float64))
    assert extra.max() <= 2 / 65535
    assert 0 < np.count_nonzero(cpu != exact) < v.size // 500


def absmaxes(seed: int, n: int = 1000) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.01, 3.0, n).astype(np.float32)


@settings(max_examples=EXAMPLES, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 1500), rounding=st.sampled_from(["bnb-cuda", "bnb-cpu"]))
def test_codes_and_scales_have_the_stated_shapes_and_ranges(seed, n, rounding):
    absmax = absmaxes(seed, n)
    nested = quantize_absmax(absmax, rounding=rounding)
    assert nested.codes.dtype == np.uint8 and nested.codes.shape == (n,)
    assert nested.nested_absmax.dtype == np.float32 and nested.nested_absmax.shape == (-(-n // NESTED_BLOCKSIZE),)
    deviation = np.abs(absmax - np.float32(nested.offset))
    for c, scale in enumerate(nested.nested_absmax):  # each scale is its block's largest deviation from the offset
        assert scale == deviation[c * NESTED_BLOCKSIZE:(c + 1) * NESTED_BLOCKSIZE].max()
    assert np.all(np.abs(MAP[nested.codes.astype(int)]) <= 1.0)


@settings(max_examples=EXAMPLES, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 1500), rounding=st.sampled_from(["bnb-cuda", "bnb-cpu"]))
def test_round_trip_is_within_the_8_bit_resolution_of_each_256_block(seed, n, rounding):
    """|absmax' - absmax| <= half the widest gap of the dynamic map, times the block's scale, plus
    the two float32 roundings of the dequantisation and the one of absmax - offset (bnb-cpu's
    65,536-bin table may cost one more bin, 2/65535 of the scale)."""
    absmax = absmaxes(seed, n)
    nested = quantize_absmax(absmax, rounding=rounding)
    back = dequantize_absmax(nested)
    assert back.dtype == np.float32 and back.shape == absmax.shape
    scales = np.repeat(nested.nested_absmax.astype(np.float64), NESTED_BLOCKSIZE)[:n]
    half_gap = np.max(np.diff(MAP.astype(np.float64))) / 2 + (2 / 65535 if rounding == "bnb-cpu" else 0.0)
    u = 2.0**-24
    bound = half_gap * scales + 3 * u * (scales + np.abs(absmax.astype(np.float64)))
    assert np.all(np.abs(back.astype(np.float64) - absmax) <= bound)


@pytest.mark.parametrize("seed", range(5))
def test_offset_is_the_mean_it_claims_to_be(seed):
    """bnb-cuda: the float32 number nearest the exact mean (within half a float32 spacing); bnb-cpu:
    torch's float32 sum, within the n-term summation bound n u sum|a| / n of the exact mean."""
    absmax = absmaxes(seed, 5000)
    exact_mean = float(np.mean(absmax.astype(np.float64)))
    cuda = quantize_absmax(absmax).offset
    assert cuda == float(np.float32(cuda))
    assert abs(cuda - exact_mean) <= np.spacing(np.float32(exact_mean)) / 2
    cpu = quantize_absmax(absmax, rounding="bnb-cpu").offset
    assert cpu == float(np.float32(cpu))
    assert abs(cpu - exact_mean) <= absmax.size * 2.0**-24 * exact_mean + np.spacing(np.float32(exact_mean))
    assert quantize_absmax(absmax, offset=0.25).offset == 0.25


@settings(max_examples=EXAMPLES, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(16, 1500))
def test_requantising_dequantised_values_changes_nothing(seed, n):
    """Dequantised values are representable: quantised again (same offset, bnb-cuda's nearest code)
    they give the same codes and, bit for bit, the same values. Every nested block's largest
    deviation is made positive, because the map reaches +1 but only -0.99296875: a negative extreme
    shrinks the block's scale on the second pass. (With a handful of values the offset sits near the
    8.0 itself and the block's extremes tie, hence n >= 16.)"""
    absmax = absmaxes(seed, n)
    absmax[::NESTED_BLOCKSIZE] = 8.0
    nested = quantize_absmax(absmax)
    back = dequantize_absmax(nested)
    again = quantize_absmax(back, offset=nested.offset)
    assert np.array_equal(again.codes, nested.codes)
    assert np.array_equal(dequantize_absmax(again), back)


def test_equal_absmaxes_come_back_as_the_offset():
    absmax = np.full(300, 0.75, dtype=np.float32)
    for rounding in ("bnb-cuda", "bnb-cpu"):
        nested = quantize_absmax(absmax, rounding=rounding)
        assert np.all(nested.codes == 0) and np.all(nested.nested_absmax == 0.0)
        assert np.array_equal(dequantize_absmax(nested), absmax)


def test_refusals():
    with pytest.raises(DTypeError):
        quantize_absmax(np.ones(4, dtype=np.float64))
    with pytest.raises(NonFiniteError):
        quantize_absmax(np.array([1.0, np.inf], dtype=np.float32))
    with pytest.raises(ConfigError):
        quantize_absmax(np.ones(4, dtype=np.float32), rounding="exact")


@pytest.mark.parametrize("backend", BACKENDS, ids=BACKEND_IDS)
@pytest.mark.parametrize("rounding", ["bnb-cuda", "bnb-cpu"])
def test_every_backend_gives_the_same_codes(backend, rounding):
    absmax = np.random.default_rng(1).uniform(0.1, 2.0, 700).astype(np.float32)
    expected = quantize_absmax(absmax, rounding=rounding)
    nested = quantize_absmax(backend(absmax), rounding=rounding)
    assert np.array_equal(to_numpy(nested.codes), expected.codes) and nested.offset == expected.offset
    assert np.array_equal(to_numpy(dequantize_absmax(nested)), dequantize_absmax(expected))


@pytest.mark.parametrize("blocksize", [64, 128])
def test_bits_per_parameter_from_stored_bytes(blocksize):
    w = np.random.default_rng(2).standard_normal((256, 4096)).astype(np.float32)
    plain = quantize_4bit(w, blocksize=blocksize)
    nested = quantize_4bit(w, blocksize=blocksize, double_quant=True)
    assert bits_per_parameter(plain) == nominal_bits_per_parameter(blocksize, double_quant=False) == 4 + 32 / blocksize
    assert bits_per_parameter(nested) == nominal_bits_per_parameter(blocksize, double_quant=True)
    assert abs(nominal_bits_per_parameter(64, double_quant=True) - 4.127) < 1e-3
