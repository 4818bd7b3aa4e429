"""The codebooks: NF4 from its construction, the thresholds' relation to the codes, FP4, the dynamic map."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from refpeft.quant.codebooks import (
    FP4_CPU_SORTED_CODES,
    FP4_MAGNITUDE_BITS,
    FP4_MAGNITUDES,
    FP4_THRESHOLDS_CUDA,
    NF4_CODE,
    NF4_THRESHOLDS_CUDA,
    dynamic_map,
    expected_gaussian_mse,
    f32,
    fp4_code,
    linspace_f32,
    midpoints,
    nf4_from_construction,
    thresholds,
)

DYNAMIC_MAP_SHA256 = "e732639a65f497b4ad684bb166a4467708255edd5207757de8b8f0c7e1fda89c"


def ulps(a: float, b: float) -> int:
    return abs(int(np.float32(a).view(np.int32)) - int(np.float32(b).view(np.int32)))


def test_nf4_construction_reproduces_the_published_table():
    assert nf4_from_construction() == NF4_CODE
    assert all(f32(v) == v for v in NF4_CODE)


def test_nf4_offset_is_the_mean_of_the_two_quantile_edges():
    assert abs(0.5 * ((1 - 1 / 30) + (1 - 1 / 32)) - 0.9677083) < 1e-7


def test_nf4_table_shape():
    assert len(NF4_CODE) == 16 and NF4_CODE[0] == -1.0 and NF4_CODE[7] == 0.0 and NF4_CODE[15] == 1.0
    assert list(NF4_CODE) == sorted(NF4_CODE)
    assert sum(v < 0 for v in NF4_CODE) == 7 and sum(v > 0 for v in NF4_CODE) == 8


def test_nf4_cuda_thresholds_are_midpoints_but_four_are_one_ulp_off():
    mids = midpoints(NF4_CODE)
    assert thresholds("nf4", "bnb-cpu") == mids
    off = [i for i, (t, m) in enumerate(zip(NF4_THRESHOLDS_CUDA, mids)) if t != m]
    assert off == [0, 8, 12, 14]
    assert all(ulps(NF4_THRESHOLDS_CUDA[i], mids[i]) == 1 for i in off)
    # each threshold separates its two codes
    assert all(NF4_CODE[i] < t < NF4_CODE[i + 1] for i, t in enumerate(NF4_THRESHOLDS_CUDA))


def test_nf4_cuda_literals_round_once_from_decimal():
    """The C compiler converts `0.8614784181118011f` straight to float32; via float64 it double-rounds."""
    literal = "0.8614784181118011"
    via_float64 = float(np.float32(float(literal)))
    assert NF4_THRESHOLDS_CUDA[14] != via_float64 and ulps(NF4_THRESHOLDS_CUDA[14], via_float64) == 1
    from fractions import Fraction
    exact = Fraction(literal)
    assert abs(Fraction(NF4_THRESHOLDS_CUDA[14]) - exact) < abs(Fraction(via_float64) - exact)


def test_fp4_table():
    code = fp4_code()
    magnitudes = [FP4_MAGNITUDES[b] for b in FP4_MAGNITUDE_BITS]
    assert magnitudes == sorted(magnitudes) == [0.0, 0.0625, 2, 3, 4, 6, 8, 12]
    assert code[3] == 1.0 and code[11] == -1.0 and code[1] == f32(0.0625 / 12)
    assert np.signbit(code[8]) and not np.signbit(fp4_code(negative_zero=False)[8])
    assert all(code[c + 8] == -code[c] for c in range(8))


def test_fp4_cuda_thresholds_separate_magnitudes_and_are_not_exact_midpoints():
    sorted_magnitudes = [f32(FP4_MAGNITUDES[b] / 12) for b in FP4_MAGNITUDE_BITS]
    mids = midpoints(tuple(sorted_magnitudes))
    assert all(a < t < b for a, t, b in zip(sorted_magnitudes, FP4_THRESHOLDS_CUDA, sorted_magnitudes[1:]))
    assert sum(t != m for t, m in zip(FP4_THRESHOLDS_CUDA, mids)) >= 3
    assert all(abs(t - m) <= 1e-6 for t, m in zip(FP4_THRESHOLDS_CUDA, mids))


def test_fp4_cpu_order_sorts_the_python_table():
    table = fp4_code(negative_zero=False)
    values = [table[c] for c in FP4_CPU_SORTED_CODES]
    assert values == sorted(values) and sorted(FP4_CPU_SORTED_CODES) == list(range(16))
    assert FP4_CPU_SORTED_CODES[7:9] == (0, 8)  # the two zeros: +0 code first, which flips tiny signs


def test_dynamic_map():
    m = dynamic_map()
    assert len(m) == 256 and list(m) == sorted(m)
    assert m[0] == f32(-0.99296875) and m[127] == 0.0 and m[255] == 1.0
    assert hashlib.sha256(np.asarray(m, dtype="<f4").tobytes()).hexdigest() == DYNAMIC_MAP_SHA256


def test_linspace_f32_equals_torch():
    torch = pytest.importorskip("torch", reason="torch.linspace is the definition being emulated")
    for start, stop, num in [(0.1, 1.0, n) for n in (2, 3, 5, 9, 17, 33, 65)] + [(0.9677083, 0.5, 8),
                                                                                 (0.9677083, 0.5, 9)]:
        ours = np.asarray(linspace_f32(start, stop, num), dtype=np.float32)
        assert np.array_equal(ours, torch.linspace(start, stop, num).numpy()), (start, stop, num)


@pytest.mark.parametrize("quant_type,blocksize", [("nf4", 64), ("fp4", 64), ("nf4", 256)])
def test_measured_gaussian_mse_matches_the_codebook_integral(quant_type, blocksize):
    from refpeft.quant.state import dequantize_4bit, quantize_4bit

    values = sorted(fp4_code()) if quant_type == "fp4" else list(NF4_CODE)
    values = [v for i, v in enumerate(values) if i == 0 or v != values[i - 1]]  # FP4's two zeros are one value
    expected = expected_gaussian_mse(tuple(values), thresholds(quant_type, "bnb-cuda") if quant_type == "nf4"
                                     else tuple(-t for t in reversed(FP4_THRESHOLDS_CUDA)) + FP4_THRESHOLDS_CUDA,
                                     blocksize=blocksize)
    x = np.random.default_rng(7).standard_normal(2**20).astype(np.float32)
    squared = (dequantize_4bit(quantize_4bit(x, quant_type=quant_type, blocksize=blocksize)).astype(np.float64) - x) ** 2
    standard_error = squared.std() / np.sqrt(squared.size)
    assert abs(squared.mean() - expected) < 4 * standard_error
