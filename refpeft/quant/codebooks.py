"""The 4-bit codebooks (NF4, bitsandbytes' FP4) and the signed 8-bit dynamic map, with their thresholds.

Every value here is a float32 number, written as it is stored (decimal that round-trips, or hex).

NF4 (QLoRA, Dettmers et al. 2023, appendix E)
---------------------------------------------
Sixteen values: 8 positive quantiles of N(0, 1) at p = linspace(delta, 1/2, 9)[:-1], 7 negative
ones at p = linspace(delta, 1/2, 8)[:-1] (negated), and 0; all divided by the largest.
delta = 0.9677083 = (1/2)[(1 - 1/30) + (1 - 1/32)]. bitsandbytes evaluates linspace in float32
(torch), the quantile function in float64 (scipy) and rounds the table to float32 before the
division. `nf4_from_construction()` redoes exactly that (the quantile function is Python's
`statistics.NormalDist().inv_cdf`); the tests check it equals `NF4_CODE`, the published table.

Decision thresholds for code = #{t : xn > t} (strict `>`: a value on a threshold takes the lower code)
- "bnb-cuda": the 15 float32 literals of bitsandbytes' CUDA decision tree (`dQuantizeNF4`), also
  used by ONNX Runtime's bnb4 quantizer. Converting the decimal literals straight to float32 (as the
  C compiler does) gives the hex below; four of them (indices 0, 8, 12, 14) are one ulp above/below
  the float32 midpoint of neighbouring codes. (Going decimal -> float64 -> float32, as NumPy would,
  double-rounds to the midpoints: do not derive them that way.)
- "bnb-cpu": bitsandbytes 0.50's torch path uses the float32 midpoints (c[i] + c[i+1]) / 2.

FP4 (bitsandbytes' own format, not OCP e2m1)
--------------------------------------------
Bit 3 is the sign; the low three bits are a 1-2-1 float: 000 = 0, 001 = 0.0625, 010 = 8,
011 = 12, 100 = 4, 101 = 6, 110 = 2, 111 = 3, all divided by 12.
- "bnb-cuda": sign = (xn < 0); magnitude = #{t : |xn| > t} over 7 literal thresholds (not exact
  midpoints), mapped through the bit-pattern order FP4_MAGNITUDE_BITS. Code 8 decodes to -0.0.
- "bnb-cpu": bitsandbytes 0.50 sorts its FP4 table (+0.0 at index 0 and +0.0 at index 8) with
  torch.argsort and buckets on float32 midpoints. The two zeros sort as [0, 8], so |xn| <= 1/384
  gets the *opposite* sign bit from CUDA's (FP4_CPU_SORTED_CODES records that order).

Signed 8-bit dynamic map (Dettmers 2015, bitsandbytes `create_dynamic_map`)
--------------------------------------------------------------------------
For i = 0..6: b = linspace(0.1, 1, 2^i + 1) in float32, means m = (b[:-1] + b[1:]) / 2 in float32,
values +-f32(10^(i-6)) * m in float32; plus 0 and 1; sorted: 256 values from -0.99296875 to 1.
`dynamic_map()` rebuilds it with float32 arithmetic throughout (a float64 reconstruction is one
ulp off in places); the tests check its sha256 against bitsandbytes'.
"""

from __future__ import annotations

import functools
import struct
from statistics import NormalDist

QUANT_TYPES = ("nf4", "fp4")
ROUNDINGS = ("bnb-cuda", "bnb-cpu")
NF4_OFFSET = 0.9677083


def f32(value: float) -> float:
    """`value` rounded to the nearest float32 (ties to even), as a Python float."""
    return struct.unpack("<f", struct.pack("<f", value))[0]


def f32_from_hex(bits: str) -> float:
    """The float32 whose IEEE-754 bit pattern is the 8-digit hex string `bits`."""
    return struct.unpack(">f", bytes.fromhex(bits))[0]


NF4_CODE = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)

# torchao's NF4Tensor table: NF4_CODE written to four decimals (torchao 0.18, nf4_tensor.py), stored
# in the weight's dtype (Python float -> float32 -> bfloat16/float16: two roundings, as torch does).
TORCHAO_NF4_CODE = (-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0,
                    0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0)

NF4_THRESHOLDS_CUDA = tuple(
    f32_from_hex(h)
    for h in (
        "bf591cd9 bf1c5270 beeb8480 beadea76 be703cec be0d38bc bd3a7871 3d22faff "
        "3df64863 3e5067e0 3e9582d4 3ec753f9 3f006d03 3f248daf 3f5c89d9"
    ).split()
)

# Magnitudes of the 3-bit FP4 patterns 000..111 (before the division by 12).
FP4_MAGNITUDES = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)
# Bit pattern of the k-th smallest magnitude: 0, 0.0625, 2, 3, 4, 6, 8, 12.
FP4_MAGNITUDE_BITS = (0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010, 0b011)
FP4_THRESHOLDS_CUDA = tuple(
    f32_from_hex(h) for h in "3b2aaab9 3db00000 3e555555 3e955555 3ed55556 3f155550 3f555555".split()
)
# bnb 0.50 CPU: torch.argsort of its FP4 table (codes sorted by value; the two zeros as [0, 8]).
FP4_CPU_SORTED_CODES = (11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3)


def fp4_code(*, negative_zero: bool = True) -> tuple[float, ...]:
    """The 16 FP4 values by code, f32(magnitude / 12) with bit 3 as the sign.

    CUDA (and refpeft) decode code 8 as -0.0; bitsandbytes' Python table holds +0.0 there
    (`negative_zero=False`), which is the table its CPU quantizer sorts.
    """
    positive = tuple(f32(m / 12.0) for m in FP4_MAGNITUDES)
    negative = tuple(-v for v in positive)
    if not negative_zero:
        negative = (0.0,) + negative[1:]
    return positive + negative


def code_values(quant_type: str) -> tuple[float, ...]:
    """The 16 dequantisation values of `quant_type`, indexed by 4-bit code."""
    return NF4_CODE if quant_type == "nf4" else fp4_code()


def midpoints(sorted_values: tuple[float, ...]) -> tuple[float, ...]:
    """Float32 midpoints f32(f32(a + b) / 2) of neighbouring sorted values."""
    return tuple(f32(f32(a + b) / 2.0) for a, b in zip(sorted_values[:-1], sorted_values[1:]))


@functools.cache
def thresholds(quant_type: str, rounding: str) -> tuple[float, ...]:
    """The ascending float32 decision thresholds t of code = #{t : xn > t}.

    For NF4 the count is the code; for FP4 under "bnb-cuda" it is the magnitude rank of |xn|, and
    under "bnb-cpu" the rank of xn among FP4_CPU_SORTED_CODES.
    """
    if quant_type == "nf4":
        return NF4_THRESHOLDS_CUDA if rounding == "bnb-cuda" else midpoints(NF4_CODE)
    if rounding == "bnb-cuda":
        return FP4_THRESHOLDS_CUDA
    table = fp4_code(negative_zero=False)
    return midpoints(tuple(table[c] for c in FP4_CPU_SORTED_CODES))


def linspace_f32(start: float, stop: float, num: int) -> list[float]:
    """torch.linspace in float32 on CPU: step = f32((stop - start) / (num - 1)); the first half
    counts up from start (start + step * i), the second half down from stop (stop - step * j),
    each value one fused multiply-add (a single float32 rounding; the product is exact in float64)."""
    start, stop = f32(start), f32(stop)
    step = f32((stop - start) / (num - 1))
    half = num // 2
    return [
        f32(start + step * i) if i < half else f32(stop - step * (num - 1 - i))
        for i in range(num)
    ]


def nf4_from_construction(offset: float = NF4_OFFSET) -> tuple[float, ...]:
    """Rebuild the NF4 table from its definition, in bitsandbytes' precisions (see module doc)."""
    ppf = NormalDist().inv_cdf
    positive = [f32(ppf(p)) for p in linspace_f32(offset, 0.5, 9)[:-1]]
    negative = [f32(-ppf(p)) for p in linspace_f32(offset, 0.5, 8)[:-1]]
    values = sorted(positive + negative + [0.0])
    largest = max(values)
    return tuple(f32(v / largest) for v in values)


@functools.cache
def dynamic_map() -> tuple[float, ...]:
    """bitsandbytes' signed 8-bit dynamic map (256 ascending float32 values), see module doc."""
    values = [0.0, 1.0]
    for i in range(7):
        bounds = linspace_f32(0.1, 1.0, 2**i + 1)
        means = [f32(f32(a + b) / 2.0) for a, b in zip(bounds[:-1], bounds[1:])]
        scale = f32(10.0 ** (i - 6))
        values += [f32(scale * m) for m in means] + [-f32(scale * m) for m in means]
    return tuple(sorted(values))


def expected_gaussian_mse(values: tuple[float, ...], bounds: tuple[float, ...], *, blocksize: int,
                          steps: int = 4000) -> float:
    """The mean squared error of blockwise absmax quantisation of iid N(0, 1) data, from the codebook.

    `values` are the sorted code values (-1 and 1 included) and `bounds` the decision thresholds
    between them. In a block of b values with M = max |x| = m, the maximal value is exact (it maps
    to +-1) and the other b - 1 are iid N(0, 1) conditioned on |x| <= m, each replaced by m * c_j on
    [m t_(j-1), m t_j]. With phi, Phi the normal density and distribution,

        MSE = (b - 1)/b * integral f_M(m) E[(x - m c(x/m))^2 | |x| <= m] dm,
        f_M(m) = b * 2 phi(m) * (2 Phi(m) - 1)^(b - 1),
        integral over [l, u] of (x - a)^2 phi(x) dx = [Phi - x phi + 2 a phi + a^2 Phi]_l^u,

    integrated over m in (0, 10] by Simpson's rule (`steps` even) in float64.
    """
    from math import erf, exp, pi, sqrt

    def Phi(x: float) -> float:
        return 0.5 * (1.0 + erf(x / sqrt(2.0)))

    def phi(x: float) -> float:
        return exp(-0.5 * x * x) / sqrt(2.0 * pi)

    def conditional(m: float) -> float:
        edges = [-m] + [m * t for t in bounds] + [m]
        total = 0.0
        for (lo, hi), c in zip(zip(edges[:-1], edges[1:]), values):
            a = m * c
            F = lambda x: Phi(x) - x * phi(x) + 2 * a * phi(x) + a * a * Phi(x)  # noqa: E731
            total += F(hi) - F(lo)
        return total / (2.0 * Phi(m) - 1.0)

    def integrand(m: float) -> float:  # f_M(0) = 0 for b > 1
        mass = 2.0 * Phi(m) - 1.0
        return 0.0 if m == 0.0 else blocksize * 2.0 * phi(m) * mass ** (blocksize - 1) * conditional(m)

    h = 10.0 / steps
    weights = [1.0 if i in (0, steps) else (4.0 if i % 2 else 2.0) for i in range(steps + 1)]
    integral = h / 3.0 * sum(w * integrand(h * i) for i, w in enumerate(weights))
    return (blocksize - 1) / blocksize * integral
