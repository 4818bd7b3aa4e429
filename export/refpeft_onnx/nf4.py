"""NF4 frozen weights in ONNX: the 4-bit codes stored as bytes, computed two ways.

The weight W (d, k) is quantised by refpeft.quant (bitsandbytes' NF4, blocks of `bs` consecutive
elements of W flattened row-major, first element of each byte in the high nibble) and stored as
initializers, at ~4.127 bits per parameter with double quantisation (bs = 64):

    {layer}.weight.nf4             uint8 ((d k + 1) / 2,)   the packed codes, bitsandbytes' bytes
    {layer}.weight.absmax          float32 (n_blocks,)      without double quantisation, or
    {layer}.weight.absmax_codes    uint8 (n_blocks,)        the nested 8-bit codes,
    {layer}.weight.nested_absmax   float32 (n_nested, 1)    one scale per 256 codes,
    {layer}.weight.absmax_offset   float32 (1,)             and the mean subtracted before quantising
    nf4.dynamic_map, nf4.code      float32 (256,), (16,)    shared tables, once per model

Both variants first rebuild the float32 absmax exactly as refpeft.quant.double.dequantize_absmax:

    absmax = f32(f32(map[codes] * nested_absmax[block // 256]) + offset)      # Gather, Mul, Add

"bnb4" (ONNX Runtime): base = com.microsoft.MatMulBnb4(h, packed, absmax; K = k, N = d,
    block_size = bs, quant_type = 1 (NF4), transB = 1), which computes h (f32(code * absmax))^T.
    Its CPU kernel takes float32 only and block sizes 16..256: a float16 graph casts h to float32
    and the result back.
"standard" (any runtime, standard ops only):
    hi, lo = BitShift(bytes, 4, RIGHT), BitwiseAnd(bytes, 15)       # the two codes of each byte
    codes  = Reshape(Concat(hi, lo), (2m,)) padded to n_blocks * bs
    W      = Reshape(Gather(code, codes) as (n_blocks, bs) * absmax[:, None], (-1,))[:d k] as (d, k)
    base   = MatMul(h, Transpose(W))           # W cast to float16 in a float16 graph (round to nearest)
Every node of the dequantisation has constant inputs, so a runtime may fold it at load time.
Both reproduce f32(code * absmax) bit for bit; the tests check it against refpeft's dequantisation.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from refpeft.errors import ConfigError
from refpeft.quant import QuantState4bit, quantize_4bit
from refpeft.quant.codebooks import code_values, dynamic_map
from refpeft.quant.double import NESTED_BLOCKSIZE

from refpeft_onnx.builder import MICROSOFT_DOMAIN, GraphBuilder
from refpeft_onnx.stack import BaseLinear, LinearStack, with_nf4

NF4_OPS = ("bnb4", "standard")
BNB4_CPU_BLOCKSIZES = (16, 32, 64, 128, 256)   # MatMulBnb4's CPU kernel (see the module docstring)
NF4_QUANT_TYPE = 1                             # MatMulBnb4's quant_type: 0 FP4, 1 NF4
STORED_SUFFIXES = ("nf4", "absmax", "absmax_codes", "nested_absmax", "absmax_offset")  # {layer}.weight.*


def quantize_layer(layer: BaseLinear, *, blocksize: int = 64, double_quant: bool = True,
                   rounding: str = "bnb-cuda") -> BaseLinear:
    """The layer with its weight stored as NF4 (refpeft.quant) and `weight` its dequantised values."""
    if layer.fan_in_fan_out:
        raise ConfigError(f"{layer.name}: a fan_in_fan_out (Conv1D) weight is not quantised by bitsandbytes; "
                          "store it as (d, k) first")
    W32 = np.ascontiguousarray(layer.weight, dtype=np.float32)      # the weight bitsandbytes would hold
    state = quantize_4bit(W32, quant_type="nf4", blocksize=blocksize, double_quant=double_quant, rounding=rounding)
    return with_nf4(layer, state)


def quantize_stack(stack: LinearStack, *, blocksize: int = 64, double_quant: bool = True,
                   rounding: str = "bnb-cuda") -> LinearStack:
    """Every layer's weight stored as NF4 (see `quantize_layer`)."""
    return replace(stack, layers=tuple(quantize_layer(layer, blocksize=blocksize, double_quant=double_quant,
                                                      rounding=rounding) for layer in stack.layers))


def nf4_absmax(g: GraphBuilder, layer: BaseLinear) -> str:
    """The float32 absmax (n_blocks,) of the layer's weight, rebuilt in the graph from its stored form."""
    state, name = layer.nf4, f"{layer.name}.weight"
    if not state.nested:
        return g.const(f"{name}.absmax", np.asarray(state.absmax, dtype=np.float32), cast=False)
    nested = state.absmax
    n_blocks = nested.codes.shape[0]
    n_nested = -(-n_blocks // NESTED_BLOCKSIZE)
    codes = g.const(f"{name}.absmax_codes", np.asarray(nested.codes, dtype=np.uint8), cast=False)
    padded = _pad_to(g, codes, n_blocks, n_nested * NESTED_BLOCKSIZE, f"{name}.absmax_codes_padded")
    index = g.op("Cast", [padded], f"{name}.absmax_index", to=TensorProto.INT32)
    values = g.op("Gather", [g.shared("nf4.dynamic_map", np.asarray(dynamic_map(), dtype=np.float32)), index],
                  f"{name}.absmax_values")
    blocks = g.op("Reshape", [values, _i64(g, f"{name}.nested_shape", [n_nested, NESTED_BLOCKSIZE])],
                  f"{name}.absmax_blocks")
    scale = g.const(f"{name}.nested_absmax", np.asarray(nested.nested_absmax, dtype=np.float32)[:, None], cast=False)
    scaled = g.op("Mul", [blocks, scale], f"{name}.absmax_scaled")                  # f32(map[q] * absmax2)
    flat = _flat_prefix(g, scaled, n_blocks, n_nested * NESTED_BLOCKSIZE, f"{name}.absmax_flat")
    offset = g.const(f"{name}.absmax_offset", np.asarray([nested.offset], dtype=np.float32), cast=False)
    return g.op("Add", [flat, offset], f"{name}.absmax_dequantized")               # + offset, rounded again


def nf4_matmul(g: GraphBuilder, h: str, layer: BaseLinear, *, ops: str) -> str:
    """h W^T (no bias) for the layer's NF4 weight, in the graph's dtype."""
    state, name = layer.nf4, layer.name
    d, k = state.shape
    packed = g.const(f"{name}.weight.nf4", np.asarray(state.packed, dtype=np.uint8).reshape(-1), cast=False)
    absmax = nf4_absmax(g, layer)
    if ops == "bnb4":
        if state.blocksize not in BNB4_CPU_BLOCKSIZES:
            raise ConfigError(f"{name}: MatMulBnb4's CPU kernel takes block sizes {BNB4_CPU_BLOCKSIZES}, the weight "
                              f"uses {state.blocksize}; export with the standard-ops variant")
        x32 = h if g.dtype == "float32" else g.op("Cast", [h], f"{name}.x_float32", to=TensorProto.FLOAT)
        out = g.op("MatMulBnb4", [x32, packed, absmax], f"{name}.base_float32" if g.dtype != "float32" else f"{name}.base",
                   domain=MICROSOFT_DOMAIN, K=k, N=d, block_size=state.blocksize, quant_type=NF4_QUANT_TYPE)
        return out if g.dtype == "float32" else g.op("Cast", [out], f"{name}.base", to=g.onnx_dtype)
    W = dequantize_graph(g, packed, absmax, state, name=f"{name}.weight")
    wt = g.op("Transpose", [W], f"{name}.weight_t_float32", perm=[1, 0])                  # (k, d)
    if g.dtype != "float32":
        wt = g.op("Cast", [wt], f"{name}.weight_t", to=g.onnx_dtype)
    return g.op("MatMul", [h, wt], f"{name}.base")


def dequantize_graph(g: GraphBuilder, packed: str, absmax: str, state: QuantState4bit, *, name: str) -> str:
    """The float32 weight (d, k) = f32(code * absmax) from the packed bytes, standard ops only."""
    d, k = state.shape
    n, bs = d * k, state.blocksize
    n_blocks = -(-n // bs)
    m = (n + 1) // 2
    hi = g.op("BitShift", [packed, g.const(f"{name}.four", np.asarray([4], dtype=np.uint8), cast=False)],
              f"{name}.high", direction="RIGHT")
    lo = g.op("BitwiseAnd", [packed, g.const(f"{name}.fifteen", np.asarray([15], dtype=np.uint8), cast=False)],
              f"{name}.low")
    axis1 = _i64(g, f"{name}.axis1", [1])
    pairs = g.op("Concat", [g.op("Unsqueeze", [hi, axis1], f"{name}.high_col"),
                            g.op("Unsqueeze", [lo, axis1], f"{name}.low_col")], f"{name}.pairs", axis=1)  # (m, 2)
    codes = g.op("Reshape", [pairs, _i64(g, f"{name}.flat", [-1])], f"{name}.codes")                    # (2m,)
    codes = _pad_to(g, codes, 2 * m, n_blocks * bs, f"{name}.codes_padded")
    index = g.op("Cast", [codes], f"{name}.index", to=TensorProto.INT32)
    values = g.op("Gather", [g.shared("nf4.code", np.asarray(code_values("nf4"), dtype=np.float32)), index],
                  f"{name}.values")
    blocks = g.op("Reshape", [values, _i64(g, f"{name}.block_shape", [n_blocks, bs])], f"{name}.blocks")
    column = g.op("Unsqueeze", [absmax, g.const(f"{name}.axis1_absmax", np.asarray([1], dtype=np.int64), cast=False)],
                  f"{name}.absmax_column")
    scaled = g.op("Mul", [blocks, column], f"{name}.dequantized_blocks")               # f32(code * absmax)
    flat = _flat_prefix(g, scaled, n, n_blocks * bs, f"{name}.dequantized_flat")
    return g.op("Reshape", [flat, _i64(g, f"{name}.shape", [d, k])], f"{name}.dequantized")


def _i64(g: GraphBuilder, name: str, values: list[int]) -> str:
    return g.const(name, np.asarray(values, dtype=np.int64), cast=False)


def _pad_to(g: GraphBuilder, x: str, size: int, target: int, name: str) -> str:
    """x (size,) padded with zeros at the end to `target` entries (unchanged when equal)."""
    if target == size:
        return x
    return g.op("Pad", [x, _i64(g, f"{name}.pads", [0, target - size])], name)


def _flat_prefix(g: GraphBuilder, x: str, size: int, total: int, name: str) -> str:
    """x flattened to (total,) and cut to its first `size` entries."""
    flat = g.op("Reshape", [x, _i64(g, f"{name}.shape", [-1])], f"{name}.all")
    if size == total:
        return flat
    return g.op("Slice", [flat, _i64(g, f"{name}.start", [0]), _i64(g, f"{name}.stop", [size])], name)


def weight_bytes(model: onnx.ModelProto, layer: str) -> int:
    """Bytes of the initializers that store one layer's weight (the shared tables excluded)."""
    names = {f"{layer}.weight.{suffix}" for suffix in STORED_SUFFIXES}
    return sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer if t.name in names)


def bits_per_parameter(model: onnx.ModelProto, layer: BaseLinear) -> float:
    """8 * (stored weight bytes) / (d k): ~4.127 for NF4 with double quantisation at block 64."""
    return 8 * weight_bytes(model, layer.name) / (layer.d * layer.k)


# ---------------------------------------------------------------- what MatMulBnb4's storage loses

MATMULBNB4_STORAGES = ("nf4-double-quant", "nf4-float32-absmax", "matmulbnb4-float16-absmax",
                       "matmulbnb4-float16-from-double-quant")


@dataclass(frozen=True)
class StorageError:
    """One storage of a weight: stored bits per parameter and the dequantised weight's error against W."""

    storage: str
    bits_per_parameter: float       # codes + absmax (+ nested absmax and offset), per weight element
    relative_error: float           # ||W - W_hat|| / ||W||, Frobenius, float64
    rms_error: float
    max_abs_error: float


def matmulbnb4_storage_errors(W: np.ndarray, *, blocksize: int = 64) -> dict[str, StorageError]:
    """Bits per parameter and dequantisation error of W (d, k) in each NF4 storage an export meets.

    - nf4-double-quant: bitsandbytes' NF4 with double quantisation (refpeft's default, what the
      exporter stores): 4 + 8/bs + 32/(256 bs) bits; the graph rebuilds the float32 absmax.
    - nf4-float32-absmax: NF4 with the float32 absmax of every block: 4 + 32/bs bits.
    - matmulbnb4-float16-absmax: ONNX Runtime's MatMulBnb4 in a float16 graph stores the absmax in
      the activation dtype and has no double quantisation: the same codes with f16(absmax),
      4 + 16/bs bits; W_hat = f32(code * f16(absmax)) (the product's own rounding to float16 in
      the kernel is the graph's compute precision, not storage, and is left out).
    - matmulbnb4-float16-from-double-quant: a bitsandbytes double-quantised checkpoint converted to
      MatMulBnb4: its dequantised float32 absmax rounded to float16 (both losses).
    The codes are bitsandbytes' "bnb-cuda" rounding against the float32 absmax in every storage.
    """
    from refpeft.quant.state import absmax_values, bits_per_parameter as state_bits

    W32 = np.ascontiguousarray(W, dtype=np.float32)
    plain = quantize_4bit(W32, quant_type="nf4", blocksize=blocksize)
    double = quantize_4bit(W32, quant_type="nf4", blocksize=blocksize, double_quant=True)
    f16 = np.float16
    storages = {
        "nf4-double-quant": (double, state_bits(double)),
        "nf4-float32-absmax": (plain, state_bits(plain)),
        "matmulbnb4-float16-absmax": (replace(plain, absmax=np.asarray(plain.absmax).astype(f16).astype(np.float32)),
                                      4 + 16 * len(plain.absmax) / plain.numel),
        "matmulbnb4-float16-from-double-quant": (
            replace(plain, packed=double.packed, absmax=np.asarray(absmax_values(double)).astype(f16).astype(np.float32)),
            4 + 16 * len(plain.absmax) / plain.numel),
    }
    W64 = W32.astype(np.float64)
    norm = float(np.linalg.norm(W64))
    out = {}
    for name, (state, bits) in storages.items():
        err = np.asarray(dequantize_4bit_float32(state), dtype=np.float64).reshape(W64.shape) - W64
        sq = float(np.sum(err * err))
        out[name] = StorageError(name, float(bits), float(np.sqrt(sq)) / norm if norm else 0.0,
                                 float(np.sqrt(sq / err.size)), float(np.max(np.abs(err))))
    return out


def dequantize_4bit_float32(state: QuantState4bit) -> np.ndarray:
    """f32(code * absmax) of a state (refpeft.quant's dequantisation, kept in float32)."""
    from refpeft.quant.state import dequantize_4bit

    return dequantize_4bit(state, dtype="float32")
