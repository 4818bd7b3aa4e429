"""Blockwise 4-bit quantisation (NF4, FP4) and its packing, as bitsandbytes does it (Dettmers et al. 2023).

Quantising x (any shape, n elements, float32/float16/bfloat16; all math in float32):

    flat      = x flattened row-major, cast to float32 (exact)
    block b   = flat[b*bs : (b+1)*bs]; the last block may be partial (bs in 32, 64, ..., 4096)
    absmax[b] = max |block b|                                  # float32, exact
    xn        = block b * f32(1 / absmax[b])                   # a reciprocal multiply, not a division
    code      = #{t in thresholds : xn > t}                    # NF4: the code itself, see codebooks
    byte j    = code[2j] << 4 | code[2j+1]                     # first element in the high nibble

Semantic variants (`rounding=`), each reproducing one bitsandbytes implementation bit for bit:
- "bnb-cuda" (default; the CUDA kernels `kQuantizeBlockwise`, which made the checkpoints on disk):
  literal thresholds (codebooks.NF4_THRESHOLDS_CUDA / FP4_THRESHOLDS_CUDA). An all-zero block has
  1/absmax = inf and 0 * inf = NaN, and NaN passes no comparison: every code is 0 (NF4 byte 0x00,
  decoded as -0.0). When absmax <= 2^-128, 1/absmax overflows to inf too: nonzero values become
  +-inf (top or bottom code) and zeros NaN (code 0).
- "bnb-cpu" (bitsandbytes 0.50's torch path on CPU): float32 midpoint thresholds; absmax is clamped
  to >= f32(1e-38) inside the reciprocal (so an all-zero block quantises 0.0 -> NF4 0x77); the last
  *partial* block divides by its absmax (x / absmax, not x * (1/absmax)) and stores the clamped
  absmax (1e-38 for an all-zero partial block, while a full all-zero block stores 0).
An odd element count pads one 0.0 into the last block (its code is that of 0.0 in that block).

Dequantising: value = f32(LUT[code] * absmax[block]), then rounded to nearest (ties to even) to
the output dtype. The LUT is CUDA's (FP4 code 8 is -0.0); it is shared by both variants, since
bitsandbytes' CPU dequantisers disagree among themselves on that zero's sign (see docs).

Inputs must be finite: NaN/inf are refused before anything is computed (NonFiniteError).

How it runs fast without changing a bit of the above: the weight goes through in cache-sized
pieces (PIECE); the threshold count is two lookups on a fine grid (`_rank`); even and odd
elements are coded apart, so packing reads contiguous arrays; dequantising gathers both values of
a byte at once from a 256-entry table of pairs.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Iterator

from refpeft.backend import check_float_array, namespace, require_shape
from refpeft.errors import ConfigError, DTypeError, ShapeError
from refpeft.quant.codebooks import (
    FP4_CPU_SORTED_CODES,
    FP4_MAGNITUDE_BITS,
    QUANT_TYPES,
    ROUNDINGS,
    code_values,
    f32,
    thresholds,
)

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
# 1.0f / a overflows to inf exactly when 0 < a <= 2^-128 (checked against IEEE float32 division).
RECIPROCAL_OVERFLOW = 2.0**-128
# bnb 0.50 CPU: absmax.clamp(min=1e-38) before the reciprocal (1e-38 is a float32 subnormal).
CPU_ABSMAX_FLOOR = f32(1e-38)
# Both directions work through the weight in pieces of PIECE consecutive elements (1 MiB of
# float32; a multiple of every block size, so whole blocks and an even count). Every step is
# blockwise, so each piece gives exactly its part of the result, and a piece's temporaries stay
# in cache: on a 4096 x 4096 weight this is ~2.5x (quantise) and ~2x (dequantise) faster than
# whole-array passes. Only the weight's last piece can end in a partial block or an odd element.
PIECE = 2**18


def check_options(*, quant_type: str, blocksize: int, rounding: str | None = None) -> None:
    """Refuse an unknown quant_type / rounding or a block size bitsandbytes does not offer."""
    if quant_type not in QUANT_TYPES:
        raise ConfigError(f"quant_type must be one of {', '.join(QUANT_TYPES)}, got {quant_type!r}")
    if blocksize not in BLOCKSIZES:
        raise ConfigError(f"blocksize must be one of {', '.join(map(str, BLOCKSIZES))}, got {blocksize!r}")
    if rounding is not None and rounding not in ROUNDINGS:
        raise ConfigError(f"rounding must be one of {', '.join(ROUNDINGS)}, got {rounding!r}")


def split_blocks(flat: Any, blocksize: int, *, xp: Any) -> Any:
    """(n,) -> (ceil(n / blocksize), blocksize), the last block padded with zeros."""
    n = flat.shape[0]
    n_blocks = -(-n // blocksize)
    pad = n_blocks * blocksize - n
    if pad:
        flat = xp.concat([flat, xp.zeros(pad, dtype=flat.dtype)])
    return xp.reshape(flat, (n_blocks, blocksize))


def quantize_blockwise_4bit(x: Any, *, quant_type: str = "nf4", blocksize: int = 64,
                            rounding: str = "bnb-cuda") -> tuple[Any, Any]:
    """Quantise `x` to packed 4-bit codes; returns (packed uint8 ((n+1)//2, 1), absmax float32 (n_blocks,))."""
    xp = namespace(x)
    check_options(quant_type=quant_type, blocksize=blocksize, rounding=rounding)
    check_float_array("x", x, xp=xp)
    n = math.prod(x.shape)
    if n == 0:
        raise ShapeError(f"x has shape {tuple(x.shape)}: nothing to quantise")
    flat = xp.reshape(x, (-1,))
    packed = xp.empty(((n + 1) // 2,), dtype=xp.uint8)
    absmax = xp.empty((-(-n // blocksize),), dtype=xp.float32)
    for elements, nbytes, blocks in _pieces(n, blocksize):
        packed[nbytes], absmax[blocks] = _quantize_piece(xp.astype(flat[elements], xp.float32, copy=False),
                                                         quant_type, blocksize, rounding, xp=xp)
    return xp.reshape(packed, (-1, 1)), absmax


def _pieces(n: int, blocksize: int) -> Iterator[tuple[slice, slice, slice]]:
    """(elements, packed bytes, blocks) slices of consecutive pieces of PIECE elements (the last shorter)."""
    for start in range(0, n, PIECE):
        stop = min(start + PIECE, n)
        yield slice(start, stop), slice(start // 2, (stop + 1) // 2), slice(start // blocksize, -(-stop // blocksize))


def _quantize_piece(flat: Any, quant_type: str, blocksize: int, rounding: str, *, xp: Any) -> tuple[Any, Any]:
    """Packed bytes and stored absmax of float32 `flat`: whole blocks, except that the weight's last
    piece may end in a partial block (padded with zeros) and an odd element."""
    n = flat.shape[0]
    partial = n % blocksize != 0
    blocks = split_blocks(flat, blocksize, xp=xp)                                         # (nb, bs)
    absmax = _row_max(xp.abs(blocks), xp=xp)                                              # (nb,)
    # Even elements go to the high nibble, odd ones to the low: coding the two halves apart keeps
    # both code arrays contiguous for the packing.
    high, low = (_codes(blocks[:, k::2], absmax, quant_type, rounding, partial=partial, xp=xp) for k in (0, 1))
    packed = xp.reshape(high * 16 + low, (-1,))[: (n + 1) // 2]
    if rounding == "bnb-cpu" and partial:  # bnb's remainder path keeps the clamped absmax
        absmax = xp.concat([absmax[:-1], _cpu_clamped(absmax[-1:], xp=xp)])
    return packed, absmax


def _codes(blocks: Any, absmax: Any, quant_type: str, rounding: str, *, partial: bool, xp: Any) -> Any:
    """Codes (uint8) of `blocks`: some columns of the blocks whose maxima are `absmax`."""
    if rounding == "bnb-cuda":
        return _codes_cuda(blocks, absmax, quant_type, xp=xp)
    return _codes_cpu(blocks, absmax, quant_type, partial=partial, xp=xp)


def _codes_cuda(blocks: Any, absmax: Any, quant_type: str, *, xp: Any) -> Any:
    overflow = absmax <= RECIPROCAL_OVERFLOW                                   # (nb,) includes absmax == 0
    reciprocal = 1.0 / xp.where(overflow, xp.ones_like(absmax), absmax)      # f32(1 / absmax)
    codes = _decide(blocks * reciprocal[:, None], quant_type, "bnb-cuda", xp=xp)
    if not bool(xp.any(overflow)):
        return codes
    # 1/absmax = inf: x * inf = +-inf for x != 0 (+-2 stands in: beyond every threshold, same
    # sign) and 0 * inf = NaN, which passes no comparison: code 0.
    rows = overflow[:, None]
    infinite = xp.where(blocks > 0, xp.asarray(2.0, dtype=xp.float32), xp.asarray(-2.0, dtype=xp.float32))
    codes = xp.where(rows, _decide(infinite, quant_type, "bnb-cuda", xp=xp), codes)
    return xp.where(rows & (blocks == 0), xp.zeros_like(codes), codes)


def _codes_cpu(blocks: Any, absmax: Any, quant_type: str, *, partial: bool, xp: Any) -> Any:
    clamped = _cpu_clamped(absmax, xp=xp)
    xn = blocks * (1.0 / clamped)[:, None]
    if partial:  # bnb's remainder path: a true division
        xn = xp.concat([xn[:-1, :], blocks[-1:, :] / clamped[-1]], axis=0)
    return _decide(xn, quant_type, "bnb-cpu", xp=xp)


def _cpu_clamped(absmax: Any, *, xp: Any) -> Any:
    return xp.maximum(absmax, xp.asarray(CPU_ABSMAX_FLOOR, dtype=xp.float32))


def _decide(blocks: Any, quant_type: str, rounding: str, *, xp: Any) -> Any:
    """4-bit codes (uint8, blocks' shape) from normalised values |xn| <= 2, see `_rank`."""
    xn = xp.reshape(blocks, (-1,))  # take() wants 1-D indices
    return xp.reshape(_decide_flat(xn, quant_type, rounding, xp=xp), blocks.shape)


def _decide_flat(xn: Any, quant_type: str, rounding: str, *, xp: Any) -> Any:
    if quant_type == "nf4":
        return _rank(xn, thresholds("nf4", rounding), xp=xp)                   # #{t : xn > t}
    if rounding == "bnb-cuda":
        rank = _rank(xp.abs(xn), thresholds("fp4", rounding), xp=xp)
        bits = _lookup(FP4_MAGNITUDE_BITS, rank, xp=xp)
        return bits + xp.astype(xn < 0, xp.uint8) * 8
    return _lookup(FP4_CPU_SORTED_CODES, _rank(xn, thresholds("fp4", rounding), xp=xp), xp=xp)


def _lookup(table: tuple[int, ...], index: Any, *, xp: Any) -> Any:
    """uint8 table[index] (int32 indices: some namespaces take no narrower index type)."""
    return xp.take(xp.asarray(table, dtype=xp.uint8), xp.astype(index, xp.int32))


# The bucket grid of `_rank`: bucket(v) = trunc(f32(v * 2^11 + 2^12)) covers -2 <= v <= 2.
_GRID = 2.0**11


def _rank(v: Any, ascending: tuple[float, ...], *, xp: Any) -> Any:
    """rank(v) = #{t in ascending : v > t} (uint8), for 1-D float32 v with |v| <= 2, exactly.

    Counting 15 thresholds (or a binary search) per element is the definition but costs 15
    passes (or unpredictable branches). Instead, a fine grid: bucket(v) is a monotone function
    of v (an exact scaling, one float32 rounding, truncation), so every threshold t with
    bucket(t) < bucket(v) lies below v and every one with bucket(t) > bucket(v) above it. With at
    most one threshold per bucket (the grid step 2^-11 is finer than any threshold gap), two
    tables finish the count: below[k] = #{t : bucket(t) < k} and inside[k] = the threshold in
    bucket k (or 3, above every v), so rank(v) = below[bucket(v)] + (v > inside[bucket(v)]).
    """
    below, inside = _rank_tables(ascending, xp)
    b = _bucket(v, xp=xp)
    return xp.take(below, b) + xp.astype(v > xp.take(inside, b), xp.uint8)


@functools.cache
def _rank_tables(ascending: tuple[float, ...], xp: Any) -> tuple[Any, Any]:
    """`_rank`'s tables below (uint8) and inside (float32), built once per thresholds and namespace."""
    t = xp.asarray(ascending, dtype=xp.float32)
    bucket_t = _bucket(t, xp=xp)
    if bool(xp.any(bucket_t[1:] == bucket_t[:-1])):
        raise AssertionError("two thresholds share a bucket: refine _GRID")
    k = xp.arange(int(4 * _GRID) + 1, dtype=bucket_t.dtype)                   # every bucket of [-2, 2]
    position = xp.searchsorted(bucket_t, k, side="left")                       # #{t : bucket(t) < k}
    below = xp.astype(position, xp.uint8)
    holder = xp.minimum(position, xp.asarray(t.shape[0] - 1, dtype=position.dtype))
    inside = xp.where(xp.take(bucket_t, holder) == k, xp.take(t, holder), xp.asarray(3.0, dtype=xp.float32))
    return below, inside


def _bucket(v: Any, *, xp: Any) -> Any:
    return xp.astype(v * _GRID + 2 * _GRID, xp.int32)


def _row_max(a: Any, *, xp: Any) -> Any:
    """Maximum along axis 1 (a power-of-two length >= 32) by halving; max is exact in any order.

    NumPy's elementwise maximum runs several times faster than its short-row reduction, and one
    long 1-D loop faster than many short rows: rows are halved into contiguous halves down to 32
    columns, then the flattened array is folded pairwise (max of a[0::2] and a[1::2]) five times,
    which leaves the maximum of each aligned run of 32, i.e. of each row."""
    while a.shape[1] > 32:
        half = a.shape[1] // 2
        a = xp.maximum(a[:, :half], a[:, half:])
    folded = xp.reshape(a, (-1,))
    while folded.shape[0] > a.shape[0]:
        folded = xp.maximum(folded[0::2], folded[1::2])
    return folded


def pack_nibbles(codes: Any, *, xp: Any) -> Any:
    """(2m,) codes in 0..15 -> (m, 1) uint8 bytes, code[2j] in the high nibble."""
    pairs = xp.reshape(xp.astype(codes, xp.uint8), (-1, 2))
    return xp.reshape(pairs[:, 0] * 16 + pairs[:, 1], (-1, 1))


def unpack_nibbles(packed: Any, *, xp: Any) -> Any:
    """(m, 1) or (m,) uint8 bytes -> (2m,) uint8 codes, high nibble first."""
    flat = xp.reshape(packed, (-1,))
    return xp.reshape(xp.stack([flat // 16, flat % 16], axis=1), (-1,))


def dequantize_blockwise_4bit(packed: Any, absmax: Any, *, shape: tuple[int, ...], quant_type: str = "nf4",
                              blocksize: int = 64) -> Any:
    """float32 values f32(LUT[code] * absmax[block]) of shape `shape` (cast them to the stored dtype)."""
    xp = namespace(packed, absmax)
    check_options(quant_type=quant_type, blocksize=blocksize)
    n = math.prod(shape)
    n_blocks = -(-n // blocksize)
    if packed.dtype != xp.uint8:
        raise DTypeError(f"packed has dtype {packed.dtype}, expected uint8")
    if absmax.dtype != xp.float32:
        raise DTypeError(f"absmax has dtype {absmax.dtype}, expected float32")
    if math.prod(packed.shape) != (n + 1) // 2:
        raise ShapeError(f"packed has {math.prod(packed.shape)} bytes; shape {tuple(shape)} needs {(n + 1) // 2}")
    require_shape("absmax", absmax, (n_blocks,))
    # One gather per byte: the 256-entry table of (LUT[hi], LUT[lo]) pairs.
    lut = code_values(quant_type)
    pairs = xp.asarray([[lut[b // 16], lut[b % 16]] for b in range(256)], dtype=xp.float32)  # (256, 2)
    flat = xp.reshape(packed, (-1,))
    out = xp.empty((n,), dtype=xp.float32)
    for elements, nbytes, blocks in _pieces(n, blocksize):
        m = elements.stop - elements.start
        values = xp.reshape(xp.take(pairs, xp.astype(flat[nbytes], xp.int64), axis=0), (-1,))[:m]
        scaled = split_blocks(values, blocksize, xp=xp) * absmax[blocks][:, None]             # (nb, bs)
        out[elements] = xp.reshape(scaled, (-1,))[:m]
    return xp.reshape(out, tuple(shape))
