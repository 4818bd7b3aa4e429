"""Hypothesis strategy for quantisation tests: tensors that reach every branch of the 4-bit quantisers.

A case is drawn as parameters (size, block size, dtype, magnitude, features) and built with NumPy
from its seed, so failures shrink to small sizes and replay exactly. Features:
- partial last blocks and odd element counts (sizes 1..2^16, and block multiples +-1);
- all-zero blocks (full and partial);
- magnitudes from subnormal (absmax <= 2^-128: CUDA's reciprocal overflows; < 1e-38: bnb CPU's
  clamp) to near the dtype's maximum;
- values exactly on decision thresholds and one ulp either side of them: a block gets a
  power-of-two absmax 2^e, so xn = x * 2^-e is exact and x = t * 2^e lands on threshold t.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import ml_dtypes
import numpy as np
from hypothesis import strategies as st

from refpeft.quant.blockwise import BLOCKSIZES
from refpeft.quant.codebooks import (
    FP4_THRESHOLDS_CUDA,
    NF4_CODE,
    NF4_THRESHOLDS_CUDA,
    TORCHAO_NF4_CODE,
    midpoints,
    thresholds,
)

DTYPES = ("float32", "float16", "bfloat16")
NUMPY_DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}
# Examples per hypothesis test; raise it (e.g. REFPEFT_QUANT_EXAMPLES=2000) for a conformance run.
EXAMPLES = int(os.environ.get("REFPEFT_QUANT_EXAMPLES", "40"))


@dataclass(frozen=True)
class QuantCase:
    n: int
    cols: int              # the tensor is (n // cols, cols) when cols divides n, else 1-D
    blocksize: int
    dtype: str
    log10_scale: float
    zero_blocks: bool
    boundaries: bool
    seed: int

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.n // self.cols, self.cols) if self.n % self.cols == 0 else (self.n,)


@st.composite
def quant_cases(draw, *, blocksizes: tuple[int, ...] = BLOCKSIZES, max_n: int = 2**16) -> QuantCase:
    blocksize = draw(st.sampled_from(blocksizes))
    n = draw(st.one_of(
        st.integers(1, 300),
        st.integers(1, max_n),
        st.builds(lambda m, d: max(1, m * blocksize + d), st.integers(1, max(1, max_n // blocksize)),
                  st.sampled_from([-1, 0, 1])),
    ))
    dtype = draw(st.sampled_from(DTYPES))
    low, high = (-7.0, 4.0) if dtype == "float16" else (-44.0, 37.0)
    scale = draw(st.one_of(st.just(0.0), st.floats(low, high)))
    return QuantCase(n=min(n, max_n), cols=draw(st.sampled_from([1, 2, 16, 64, 96, 320])), blocksize=blocksize,
                     dtype=dtype, log10_scale=scale, zero_blocks=draw(st.booleans()),
                     boundaries=draw(st.booleans()), seed=draw(st.integers(0, 2**32 - 1)))


def build(case: QuantCase) -> np.ndarray:
    """The case's tensor: float32 holding values of case.dtype (exactly representable)."""
    rng = np.random.default_rng(case.seed)
    x = rng.standard_normal(case.n) * 10.0**case.log10_scale
    n_blocks = -(-case.n // case.blocksize)
    if case.boundaries:
        for b in rng.choice(n_blocks, size=min(n_blocks, 3), replace=False):
            _plant_boundaries(x, b * case.blocksize, min(case.n, (b + 1) * case.blocksize), rng, case)
    if case.zero_blocks:
        for b in rng.choice(n_blocks, size=max(1, n_blocks // 4), replace=False):
            x[b * case.blocksize:(b + 1) * case.blocksize] = 0.0
    kind = NUMPY_DTYPES[case.dtype]
    with np.errstate(over="ignore"):
        stored = x.astype(kind)
    stored = np.where(np.isfinite(stored), stored, np.asarray(ml_dtypes.finfo(kind).max, dtype=kind)).astype(kind)
    return stored.astype(np.float32).reshape(case.shape)


def _plant_boundaries(x: np.ndarray, start: int, stop: int, rng: np.random.Generator, case: QuantCase) -> None:
    exponent = int(np.clip(round(case.log10_scale * 3.32), -120, 120)) if case.dtype != "float16" else \
        int(np.clip(round(case.log10_scale * 3.32), -14, 14))
    absmax = np.float32(2.0**exponent)
    t = np.asarray(sorted({*NF4_THRESHOLDS_CUDA, *FP4_THRESHOLDS_CUDA, *thresholds("nf4", "bnb-cpu"),
                           *thresholds("fp4", "bnb-cpu"), *NF4_CODE, *midpoints(TORCHAO_NF4_CODE)}),
                   dtype=np.float32)
    t = np.concatenate([t, -t])
    near = np.concatenate([t, np.nextafter(t, np.float32(2)), np.nextafter(t, np.float32(-2))])
    values = (near * absmax).astype(np.float64)
    count = stop - start
    x[start:stop] = rng.choice(values, size=count)
    x[start + int(rng.integers(count))] = absmax * rng.choice([-1.0, 1.0])
    x[start:stop] = np.clip(x[start:stop], -absmax, absmax)


@st.composite
def torchao_cases(draw, *, max_n: int = 2**15) -> tuple[QuantCase, int]:
    """(case, scaler_block_size) for the shapes torchao's to_nf4 accepts: n a multiple of
    block_size * scaler_block_size, even, 1-D or 2-D. Planted boundaries include the midpoints
    of torchao's table (argmin ties)."""
    blocksize = draw(st.sampled_from([16, 32, 64]))
    scaler_block_size = draw(st.sampled_from([8, 16, 64, 256]))
    unit = blocksize * scaler_block_size
    n = unit * draw(st.integers(1, max(1, max_n // unit)))
    dtype = draw(st.sampled_from(DTYPES))
    low, high = (-7.0, 4.0) if dtype == "float16" else (-30.0, 30.0)
    cols = draw(st.sampled_from([c for c in (1, 2, 16, 64, 96, 320) if n % c == 0]))
    case = QuantCase(n=n, cols=cols, blocksize=blocksize, dtype=dtype,
                     log10_scale=draw(st.one_of(st.just(0.0), st.floats(low, high))),
                     zero_blocks=draw(st.booleans()), boundaries=draw(st.booleans()),
                     seed=draw(st.integers(0, 2**32 - 1)))
    return case, scaler_block_size
