"""A 4-bit weight quantised, dequantised and measured a few blocks at a time, in bounded memory.

Every step of blockwise quantisation reads one block, so the weight flattened row-major can be cut
into chunks of CHUNK_ELEMENTS consecutive elements (a multiple of every block size, hence whole
blocks and an even count) and each chunk quantised alone: the codes and absmaxes are those of the
whole weight, bit for bit, in both roundings. Only the last chunk can end in a partial block or an
odd element, exactly as the whole weight's last block does (which is all "bnb-cpu"'s partial-block
path looks at). Double quantisation needs every absmax at once (its offset is their mean); they
are small (n / blocksize float32), so it runs on the assembled vector as `quantize_4bit` does.

    state  = quantize_4bit_chunked(W, quant_type="nf4", blocksize=64, double_quant=True)  # == quantize_4bit(W, ...)
    pieces = dequantize_4bit_chunks(state)   # flat pieces of dequantize_4bit(state), in order
    error  = quantization_error(W, state)    # sums over chunks, in float64 chunk by chunk

Memory: the input (a memory-mapped array is read a chunk at a time), the packed codes and absmax
(n/2 + 4n/blocksize bytes) and a few chunk-sized temporaries. NumPy only (for files on disk).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import ml_dtypes  # noqa: F401  (registers the "bfloat16" dtype name with NumPy)
import numpy as np

from refpeft.errors import ConfigError
from refpeft.quant.blockwise import BLOCKSIZES, PIECE
from refpeft.quant.double import quantize_absmax
from refpeft.quant.state import QuantState4bit, absmax_values, dequantize_4bit, quantize_4bit

# The pieces quantize_4bit itself works in (1 MiB of float32, a multiple of every block size): a
# chunk's temporaries stay in cache, so bounding the memory costs no speed.
CHUNK_ELEMENTS = PIECE


@dataclass(frozen=True)
class QuantError:
    """||W - Q(W)||^2, ||W||^2 and max |W - Q(W)| of one weight, accumulated in float64."""

    squared_error: float
    squared_norm: float
    max_abs_error: float
    numel: int

    @property
    def rms(self) -> float:
        return math.sqrt(self.squared_error / self.numel)

    @property
    def relative(self) -> float:
        """||W - Q(W)|| / ||W|| (0 for an all-zero weight)."""
        return math.sqrt(self.squared_error / self.squared_norm) if self.squared_norm else 0.0


def flat_chunks(x: np.ndarray, chunk_elements: int = CHUNK_ELEMENTS) -> Iterator[np.ndarray]:
    """Consecutive row-major pieces of `x` flattened (views when `x` is contiguous, as a memmap is)."""
    flat = x.reshape(-1)
    for start in range(0, flat.shape[0], chunk_elements):
        yield flat[start:start + chunk_elements]


def quantize_4bit_chunked(x: np.ndarray, *, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = False,
                          rounding: str = "bnb-cuda", dtype: str | None = None,
                          chunk_elements: int = CHUNK_ELEMENTS) -> QuantState4bit:
    """`quantize_4bit(x, ...)`, computed a chunk at a time; `x` float32/float16, or bfloat16
    (ml_dtypes, or float32 holding bfloat16 values with dtype="bfloat16")."""
    _check_chunk(chunk_elements, blocksize)
    if x.size == 0:
        return quantize_4bit(x, quant_type=quant_type, blocksize=blocksize)  # the ShapeError it gives
    bfloat16 = x.dtype == np.dtype("bfloat16")   # ml_dtypes' type: emulated as float32 (refpeft.backend)
    stored = "bfloat16" if bfloat16 else dtype
    packed, absmax = [], []
    for piece in flat_chunks(x, chunk_elements):
        weight = piece.astype(np.float32) if bfloat16 else piece
        state = quantize_4bit(weight, quant_type=quant_type, blocksize=blocksize, rounding=rounding, dtype=stored)
        packed.append(state.packed)
        absmax.append(state.absmax)
    absmax_all = np.concatenate(absmax)
    return QuantState4bit(packed=np.concatenate(packed), shape=tuple(x.shape), dtype=state.dtype,
                          absmax=quantize_absmax(absmax_all, rounding=rounding) if double_quant else absmax_all,
                          blocksize=blocksize, quant_type=quant_type)


def dequantize_4bit_chunks(state: QuantState4bit, chunk_elements: int = CHUNK_ELEMENTS) -> Iterator[np.ndarray]:
    """`dequantize_4bit(state)` flattened, as consecutive pieces of `chunk_elements` values."""
    _check_chunk(chunk_elements, state.blocksize)
    absmax, n, bs = absmax_values(state), state.numel, state.blocksize
    for start in range(0, n, chunk_elements):
        stop = min(start + chunk_elements, n)
        piece = QuantState4bit(packed=state.packed[start // 2:(stop + 1) // 2], absmax=absmax[start // bs:-(-stop // bs)],
                               shape=(stop - start,), dtype=state.dtype, blocksize=bs, quant_type=state.quant_type)
        yield dequantize_4bit(piece)


def quantization_error(x: np.ndarray, state: QuantState4bit, chunk_elements: int = CHUNK_ELEMENTS) -> QuantError:
    """How far `dequantize_4bit(state)` is from `x`, in float64 one chunk at a time (no float64
    copy of the whole weight)."""
    squared_error = squared_norm = max_abs = 0.0
    for piece, approx in zip(flat_chunks(x, chunk_elements), dequantize_4bit_chunks(state, chunk_elements)):
        exact = piece.astype(np.float64)
        error = approx.astype(np.float64) - exact
        squared_error += float(np.sum(np.square(error)))   # not error @ error: BLAS threads spin on a busy CPU
        squared_norm += float(np.sum(np.square(exact)))
        max_abs = max(max_abs, float(np.max(np.abs(error))))
    return QuantError(squared_error=squared_error, squared_norm=squared_norm, max_abs_error=max_abs, numel=state.numel)


def _check_chunk(chunk_elements: int, blocksize: int) -> None:
    if blocksize not in BLOCKSIZES:
        raise ConfigError(f"blocksize must be one of {', '.join(map(str, BLOCKSIZES))}, got {blocksize!r}")
    if chunk_elements <= 0 or chunk_elements % blocksize:
        raise ConfigError(f"chunk_elements must be a positive multiple of the block size {blocksize}, "
                          f"got {chunk_elements}")
