"""QLoRA: LoRA (or DoRA) adapters on a frozen 4-bit NF4/FP4 base (Dettmers et al. 2023, arXiv 2305.14314).

The base weight is stored as a QuantState4bit (refpeft.quant) and never trained. Every forward
rebuilds it the way bitsandbytes' Linear4bit does, then multiplies:

    W0 = bf16(f32(LUT[code] * absmax))               # (d, k) dequantised straight to bfloat16

Shapes as in refpeft.methods.lora: x (..., k), A (r, k), B (d, r), W0 (d, k), n rows after flattening.
Gradients flow to the adapter and to x only; the base has none (it is frozen and not even stored
in a differentiable form).

Two named precisions:

- "float64", the oracle: W0's values in float64 and the LoRA/DoRA math of refpeft.methods.lora and
  refpeft.methods.dora unchanged (their forward, their backward, DoRA's detached or exact norm gradient).

- "bfloat16": what bitsandbytes' Linear4bit (compute_dtype=bfloat16) under HF PEFT computes on a
  bfloat16 model with float32 adapters (PEFT's default), rounding where they round:

      base = bf16(x W0^T + b)                  # torch's bf16 matmul: float32 sums, one rounding
      xa   = (x * mask) A^T                    # float32: PEFT casts x to the adapter dtype
      out  = bf16(f32(xa B^T) * s)             # lora_B(lora_A(dropout(x))) * scaling, then .to(bf16)
      y    = bf16(base + out)

  and autograd's backward, for dy (bf16 values):

      dt   = f32(dy * s)                       # through "* scaling" (dy cast to float32 exactly)
      dB   = dt^T xa                           # (d, r)  float32
      dxa  = dt B                              # (n, r)  float32
      dA   = dxa^T (x * mask)                  # (r, k)  float32
      dx   = bf16(bf16(dy W0) + bf16((dxa A) * mask))    # base path + adapter path, summed in bf16

  The LoRA algebra is refpeft.methods.lora's; only the rounding points are PEFT's. DoRA is offered at
  "float64" only. x and dy must hold bfloat16 values (float32 arrays on NumPy, see backend).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from refpeft.backend import check_float_array, namespace, round_to, same_dtype
from refpeft.methods.dora import DoraGrads, dora_backward, dora_forward
from refpeft.errors import ConfigError, DTypeError, ShapeError
from refpeft.methods.linear import dropped_rows, flatten_rows
from refpeft.methods.lora import LoraGrads, check_dropout_mask, check_factors, lora_backward, lora_error_chain, \
    lora_forward
from refpeft.quant.state import QuantState4bit, dequantize_4bit, quantize_4bit
from refpeft.tolerance import Bounded, Precision, add, exact, exact_or_none, gradient_bounds, matmul, multiply, \
    output_bound, rows, scale, stored, to_storage, transpose

PRECISIONS = ("bfloat16", "float64")


@dataclass(frozen=True)
class QLoraCache:
    """What `qlora_backward` needs. At "float64" the LoRA/DoRA cache; at "bfloat16" the rest."""

    precision: str
    inner: Any = None          # LoraCache or DoraCache ("float64")
    x: Any = None              # (..., k) bf16 values
    dropout_mask: Any = None   # (n, k) or None
    xa: Any = None             # (n, r) float32
    W0: Any = None             # (d, k) bf16 values
    A: Any = None
    B: Any = None
    scaling: float = 1.0


def quantize_base(W: Any, *, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
                  dtype: str = "bfloat16", rounding: str = "bnb-cuda") -> QuantState4bit:
    """The frozen 4-bit base of a QLoRA layer: W rounded to the checkpoint dtype, then quantised
    (QLoRA's recipe: NF4, block 64, double quantisation)."""
    xp = namespace(W)
    check_float_array("W", W, xp=xp, shape=(None, None))
    if dtype == "float16":
        return quantize_4bit(xp.astype(W, xp.float16), quant_type=quant_type, blocksize=blocksize,
                             double_quant=double_quant, rounding=rounding)
    stored = xp.astype(W, xp.float32)
    if dtype == "bfloat16":
        stored = round_to(stored, "bfloat16", xp=xp)
    return quantize_4bit(stored, quant_type=quant_type, blocksize=blocksize, double_quant=double_quant,
                         rounding=rounding, dtype=dtype)


def base_weight(state: QuantState4bit, *, precision: str = "bfloat16") -> Any:
    """W0 as the layer multiplies by it: dequantised to bfloat16 (kept in float64 at "float64")."""
    _check_precision(precision)
    if len(state.shape) != 2:
        raise ShapeError(f"a QLoRA base weight is 2-D (d, k), got shape {state.shape}")
    W0 = dequantize_4bit(state, dtype="bfloat16")
    xp = namespace(W0)
    return xp.astype(W0, xp.float64) if precision == "float64" else W0


def qlora_forward(x: Any, state: QuantState4bit, A: Any, B: Any, *, scaling: float, bias: Any = None,
                  dropout_mask: Any = None, magnitude: Any = None, precision: str = "bfloat16",
                  dora_gradient: str = "detached") -> tuple[Any, QLoraCache]:
    """y = x W0^T + b + adapter(x) on the dequantised base; `magnitude` given makes it DoRA."""
    W0 = base_weight(state, precision=precision)
    if precision == "float64":
        if magnitude is None:
            y, inner = lora_forward(x, W0, A, B, scaling=scaling, bias=bias, dropout_mask=dropout_mask)
        else:
            y, inner = dora_forward(x, W0, A, B, magnitude, scaling=scaling, bias=bias,
                                    dropout_mask=dropout_mask, gradient=dora_gradient)
        return y, QLoraCache(precision=precision, inner=inner)
    if magnitude is not None:
        raise ConfigError("DoRA on a 4-bit base is offered at precision='float64' only")
    xp = namespace(x, A, B, bias, dropout_mask)
    for name, array in {"x": x, "A": A, "B": B, "bias": bias, "dropout_mask": dropout_mask}.items():
        if array is not None:
            check_float_array(name, array, xp=xp)
    same_dtype({"x": x, "A": A, "B": B, "bias": bias, "dropout_mask": dropout_mask, "W0": W0})
    d, k = W0.shape
    if x.shape[-1] != k:
        raise ShapeError(f"x has shape {tuple(x.shape)}; its last axis must be the {k} input features of the base")
    check_factors(A, B, d=d, k=k)
    check_dropout_mask(dropout_mask, x)
    _require_bf16_values("x", x, xp=xp)
    x2 = flatten_rows(x, xp=xp)                                                  # (n, k)
    base = xp.matmul(x2, xp.matrix_transpose(W0))                                # (n, d) float32 sums
    if bias is not None:
        base = base + round_to(bias, "bfloat16", xp=xp)
    base = round_to(base, "bfloat16", xp=xp)
    _, mask, xd = dropped_rows(x, dropout_mask, xp=xp)
    xa = xp.matmul(xd, xp.matrix_transpose(A))                                   # (n, r)
    out = round_to(xp.matmul(xa, xp.matrix_transpose(B)) * scaling, "bfloat16", xp=xp)
    y = round_to(base + out, "bfloat16", xp=xp)                                  # (n, d)
    cache = QLoraCache(precision=precision, x=x, dropout_mask=mask, xa=xa, W0=W0, A=A, B=B, scaling=scaling)
    return xp.reshape(y, (*x.shape[:-1], d)), cache


def qlora_backward(dy: Any, cache: QLoraCache) -> LoraGrads | DoraGrads:
    """dx and the adapter's gradients (dA, dB, and dmagnitude for DoRA); the base gets none."""
    if cache.precision == "float64":
        if hasattr(cache.inner, "magnitude"):
            return dora_backward(dy, cache.inner)
        return lora_backward(dy, cache.inner)
    xp = namespace(dy, cache.x)
    d = cache.W0.shape[0]
    check_float_array("dy", dy, xp=xp, shape=(*cache.x.shape[:-1], d))
    _require_bf16_values("dy", dy, xp=xp)
    g2 = flatten_rows(dy, xp=xp)                                                 # (n, d)
    x2 = flatten_rows(cache.x, xp=xp)                                            # (n, k)
    xd = x2 if cache.dropout_mask is None else x2 * cache.dropout_mask           # recomputed
    dt = g2 * cache.scaling                                                      # (n, d) float32
    dB = xp.matmul(xp.matrix_transpose(dt), cache.xa)                            # (d, r)
    dxa = xp.matmul(dt, cache.B)                                                 # (n, r)
    dA = xp.matmul(xp.matrix_transpose(dxa), xd)                                 # (r, k)
    dx_adapter = xp.matmul(dxa, cache.A)                                         # (n, k)
    if cache.dropout_mask is not None:
        dx_adapter = dx_adapter * cache.dropout_mask
    dx_base = round_to(xp.matmul(g2, cache.W0), "bfloat16", xp=xp)              # (n, k)
    dx = round_to(dx_base + round_to(dx_adapter, "bfloat16", xp=xp), "bfloat16", xp=xp)
    return LoraGrads(dx=xp.reshape(dx, cache.x.shape), dA=dA, dB=dB, dbias=None)


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def _require_bf16_values(name: str, a: Any, *, xp: Any) -> None:
    if not bool(xp.all(round_to(a, "bfloat16", xp=xp) == a)):
        raise DTypeError(f"{name} must hold bfloat16 values at precision='bfloat16' (round it first: "
                         "refpeft.backend.round_to)")


# --- error bounds (composed from refpeft.tolerance's algebra; docs/tolerance.md) ---------------


def _qlora_chain(x: Any, W0: Any, A: Any, B: Any, *, scaling: float, bias: Any, dropout_mask: Any,
                 storage: str, model: str) -> dict[str, Bounded]:
    """bnb Linear4bit + PEFT: base = half(x W0^T + b), out = half(f32(xa B^T) * s) with xa in float32,
    y = half(base + out); W0 holds the dequantised half-format values (exact)."""
    half, single = Precision(storage, model=model), Precision("float32", model=model)
    x2 = rows(exact(x))
    xd = x2 if dropout_mask is None else multiply(x2, rows(exact(dropout_mask)), single)
    base = matmul(x2, transpose(exact(W0)), half, bias=exact_or_none(bias))
    xa = matmul(xd, transpose(exact(A)), single)
    out = to_storage(matmul(xa, transpose(exact(B)), single, scale=scaling), half)
    return {"y": add(base, out, half), "xa": xa, "xd": xd}


def qlora_forward_bound(x: Any, W0: Any, A: Any, B: Any, *, scaling: float, bias: Any = None, dropout_mask: Any = None,
                        dtype: str = "bfloat16", model: str = "rigorous") -> Any:
    """Bound on y of a half-precision QLoRA layer with float32 adapters (`qlora_forward`, precision="bfloat16").

    Mixed precision: the base product and every sum with it in `dtype` (float32 accumulation), the
    adapter branch in float32 and cast once. W0 is the dequantised weight (exact given the codes).
    The float64 reference term is the same chain in float64 (`with_reference`)."""
    def chain(p: Precision) -> Bounded:
        if p.storage == "float64":
            return lora_error_chain(x, W0, A, B, scaling=scaling, bias=bias, dropout_mask=dropout_mask,
                                    fan_in_fan_out=False, precision=p)["y"]
        return _qlora_chain(x, W0, A, B, scaling=scaling, bias=bias, dropout_mask=dropout_mask, storage=dtype,
                            model=model)["y"]

    return output_bound(chain, Precision(dtype, None, model), x_shape=tuple(x.shape))


def qlora_backward_bound(dy: Any, x: Any, W0: Any, A: Any, B: Any, *, scaling: float, dropout_mask: Any = None,
                         dtype: str = "bfloat16", model: str = "rigorous") -> dict[str, Any]:
    """Bounds on dx, dA, dB of the half-precision QLoRA layer (`qlora_backward`, PEFT's autograd):
    dt = f32(dy s); dB = dt^T xa, dA = (dt B)^T xd in float32; dx = half(half(dy W0) + half((dt B A) * mask))."""
    def chain(p: Precision) -> dict[str, Bounded]:
        if p.storage == "float64":
            f = lora_error_chain(x, W0, A, B, scaling=scaling, bias=None, dropout_mask=dropout_mask,
                                 fan_in_fan_out=False, precision=p)
            half = single = p
        else:
            f = _qlora_chain(x, W0, A, B, scaling=scaling, bias=None, dropout_mask=dropout_mask, storage=dtype,
                             model=model)
            half, single = Precision(dtype, model=model), Precision("float32", model=model)
        g2 = rows(exact(dy))
        dt = scale(g2, scaling, single)
        dxa = matmul(dt, exact(B), single)
        adapter = matmul(dxa, exact(A), single)
        if dropout_mask is not None:
            adapter = multiply(adapter, rows(exact(dropout_mask)), single)
        dx = add(matmul(g2, exact(W0), half), to_storage(adapter, half), half)
        return {"dx": dx, "dA": matmul(transpose(dxa), f["xd"], single), "dB": matmul(transpose(dt), f["xa"], single)}

    return gradient_bounds(chain, Precision(dtype, None, model), x_shape=tuple(x.shape))


def quantized_linear_bound(x: Any, W_dequantized: Any, *, bias: Any = None, dtype: str = "float32",
                           weight_rounded: bool = False, accumulation: str | None = None,
                           model: str = "rigorous") -> Any:
    """Bound on x W^T + b for a dequantised 4-bit weight W (exact in float32 given codes and absmax).

    `weight_rounded=True` when the peer casts the float32 dequantised weight to a narrower compute
    dtype (bitsandbytes dequantises to the input's dtype) before the matmul: one rounding each.
    """
    def chain(p: Precision) -> Bounded:
        W = stored(W_dequantized, p) if weight_rounded else exact(W_dequantized)
        return matmul(rows(exact(x)), transpose(W), p, bias=exact_or_none(bias))

    return output_bound(chain, Precision(dtype, accumulation, model), x_shape=tuple(x.shape))
