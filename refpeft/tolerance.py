"""Forward error bounds: how far a correct implementation in a given precision may be from the exact result.

A conformance check compares a peer's result `y_hat` (computed in float32, say) with refpeft's
float64 result `y`, and must decide whether the difference is rounding or a bug. refpeft answers
with a per-element bound `beta` derived from the computation itself (Higham, *Accuracy and
Stability of Numerical Algorithms*, 2nd ed. 2002, ch. 2-3) and reports `max |y_hat - y| / beta`:
a pass is <= 1, and the number says how much of the rounding budget was used.

The model
---------
Each quantity is carried as a `Bounded(value, error)`: `value` is its exact value (evaluated in
float64) and `error` an elementwise bound on |computed - value|. Inputs are exact (golden vectors
hold inputs already representable in the target dtype) or are rounded once when stored.
With u the unit roundoff of the format results are stored in (refpeft.backend.UNIT_ROUNDOFF),
and u_a that of the format dot products accumulate in:

    gamma_n   = n u_a / (1 - n u_a)                          (Higham Lemma 3.1; needs n u_a < 1)
    fl(a o b) = (a o b)(1 + delta), |delta| <= u               for o in + - * / and sqrt

Every rule below is an elementwise inequality for inputs P_hat = P + dP, |dP| <= eP (same for Q):

matmul    C = s * (P Q) + b, the sum over n products plus the bias term in *any* order (a BLAS
          with any blocking, FMA or not; torch's addmm puts b inside the sum), the scalar s
          applied before or after the product (PEFT scales after, autograd before):
              |C_hat - C| <= |s| (eP |Q| + |P| eQ + eP eQ)                      propagated
                           + |s| gamma_m (|P| + eP)(|Q| + eQ) + gamma_m |b|      this product's own
                           + ds (1 + gamma_m)(|P| + eP)(|Q| + eQ)                s rounded to the format
          with m = n + [bias] + [s != 1] (one more rounding per extra term or scaling) and
          ds = |fl(s) - s|. When u_a < u (half formats accumulating in float32), the result is
          rounded once more to the storage format: + u (|C| + that error).
          The matrices |P||Q| are formed explicitly, so the bound is per element: an output whose
          terms cancel gets a bound scaled by its own |P||Q|, not by a norm of the whole matrix.
add       |(P + Q)_hat - (P + Q)| <= eP + eQ + u (|P + Q| + eP + eQ)
multiply  |(P Q)_hat - P Q| <= |P| eQ + eP |Q| + eP eQ + u (|P| + eP)(|Q| + eQ)      elementwise
divide    |(P / Q)_hat - P / Q| <= (eP + |P / Q| eQ) / (|Q| - eQ) + u (|P / Q| + that)   (|Q| > eQ)
sqrt      |sqrt(P_hat) - sqrt(P)| <= min(sqrt(eP), eP / sqrt(P)) + u (sqrt(P) + that)
row sums  sum over n terms: gamma_{n-1} sum |P| + sum eP
norms     ||p|| = sqrt(sum p_j^2): the squares are products, their sum a dot product, then sqrt.

The reference is itself float64 arithmetic, so a comparison uses the bound of the peer's precision
plus the same bound in float64: |y_hat - y| <= |y_hat - y_exact| + |y - y_exact|. The float64 term
is ~1e-9 of the float32 one; it matters only when a float64 peer is checked.

Quantisation adds no rounding model of its own: 4-bit codes and absmaxes are compared bit for bit,
and the dequantised weight `f32(code_value * absmax)` is an exact function of them. A matmul on a
dequantised weight is a matmul whose weight is exact in float32 and rounded once more when the
compute dtype is narrower (`weight_rounded=True` in `quantized_linear_bound`).

Precision models
----------------
"rigorous" (default) is the worst-case bound above: it holds for every summation order.
"probabilistic" replaces gamma_n by Higham & Mary's (SIAM J. Sci. Comput. 41(5), 2019, Thm 3.1)
gamma~_n(lam) = exp(lam sqrt(n) u_a + n u_a^2 / (1 - u_a)) - 1, which holds with probability at
least 1 - 2n exp(-lam^2 (1 - u_a)^2 / 2) per dot product when rounding errors are independent and
mean zero; lam = 6 here (failure probability below 3e-8 n). It is about sqrt(n)/6 times tighter
and is offered to see how much of the worst case a peer uses; conformance passes use "rigorous".

Accumulation: float64 and float32 accumulate in their own format. float16 and bfloat16 default to
float32 accumulation with one rounding of each result (what torch's CPU and CUDA matmuls and every
tensor-core path do); accumulating in the half format itself gives n u_a >= 1 for n >= 256 in
bfloat16, where no bound exists.

Tightness: for random data the worst observed error over a matrix sits about sqrt(n) to n times
below gamma_n |P||Q| (blocked and FMA sums grow errors like sqrt(n) u); docs/tolerance.md has the
measured figures for PEFT.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from refpeft.backend import FLOAT_NAMES, UNIT_ROUNDOFF, namespace, to_numpy
from refpeft.errors import ConfigError, ShapeError

MODELS = ("rigorous", "probabilistic")
PROBABILISTIC_LAMBDA = 6.0


@dataclass(frozen=True)
class Precision:
    """Where a computation rounds: the storage format of each result and the dot-product accumulator."""

    storage: str = "float32"
    accumulation: str | None = None  # None: storage for float32/float64, float32 for float16/bfloat16
    model: str = "rigorous"

    def __post_init__(self) -> None:
        for name, value in (("storage", self.storage), ("accumulation", self.accumulation)):
            if value is not None and value not in FLOAT_NAMES:
                raise ConfigError(f"unknown {name} format {value!r}; choose one of {', '.join(FLOAT_NAMES)}")
        if self.model not in MODELS:
            raise ConfigError(f"unknown error model {self.model!r}; choose one of {', '.join(MODELS)}")

    @property
    def u(self) -> float:
        """Unit roundoff of the storage format."""
        return UNIT_ROUNDOFF[self.storage]

    @property
    def u_accumulate(self) -> float:
        if self.accumulation is not None:
            return UNIT_ROUNDOFF[self.accumulation]
        return UNIT_ROUNDOFF["float32" if self.storage in ("float16", "bfloat16") else self.storage]

    def gamma(self, n: int) -> float:
        """gamma_n of the accumulation format (rigorous or probabilistic, per `model`)."""
        if n <= 0:
            return 0.0
        ua = self.u_accumulate
        if self.model == "probabilistic":
            return math.expm1(PROBABILISTIC_LAMBDA * math.sqrt(n) * ua + n * ua * ua / (1.0 - ua))
        if n * ua >= 1.0:
            raise ConfigError(f"no rounding-error bound for a sum of {n} terms with unit roundoff {ua:.3g} (n u >= 1)")
        return n * ua / (1.0 - n * ua)

    def scalar_error(self, s: float) -> float:
        """|fl(s) - s|: how far the float64 scalar s moves when a peer rounds it to the storage format."""
        return abs(float(_round_scalar(s, self.storage)) - s)


FLOAT64 = Precision("float64")


def _round_scalar(s: float, name: str) -> float:
    """A Python float rounded to format `name` (host-side scalar work, not array math)."""
    if name == "bfloat16":
        import ml_dtypes

        return float(np.asarray(s, dtype=np.float32).astype(ml_dtypes.bfloat16).astype(np.float64))
    return float(np.asarray(s, dtype=np.float64).astype(name).astype(np.float64))


@dataclass(frozen=True)
class Bounded:
    """A quantity's exact value (float64) and an elementwise bound on |computed - value|."""

    value: Any
    error: Any


def exact(a: Any) -> Bounded:
    """An input that is exact in the format the peer computes in (golden vectors are)."""
    xp = namespace(a)
    v = xp.astype(a, xp.float64)
    return Bounded(v, xp.zeros_like(v))


def stored(a: Any, precision: Precision) -> Bounded:
    """An exact value rounded once to the storage format (say a float32 weight cast to bfloat16)."""
    xp = namespace(a)
    v = xp.astype(a, xp.float64)
    return Bounded(v, precision.u * xp.abs(v))


def _widen(P: Bounded, *, xp: Any) -> Any:
    """|P| + eP: the largest magnitude the computed P can have."""
    return xp.abs(P.value) + P.error


def _round_result(value: Any, error: Any, precision: Precision, *, xp: Any) -> Any:
    """The error after one more rounding of the result: error + u (|value| + error)."""
    return error + precision.u * (xp.abs(value) + error)


def matmul(P: Bounded, Q: Bounded, precision: Precision, *, scale: float = 1.0, bias: Bounded | None = None) -> Bounded:
    """s * (P @ Q) + bias in any summation order (see the module docstring, rule `matmul`)."""
    xp = namespace(P.value, Q.value)
    n = P.value.shape[-1]
    if Q.value.shape[0] != n:
        raise ShapeError(f"cannot multiply shapes {tuple(P.value.shape)} and {tuple(Q.value.shape)}")
    s = abs(scale)
    m = n + (bias is not None) + (scale != 1.0)
    gamma = precision.gamma(m)
    value = xp.matmul(P.value, Q.value) * scale
    absolute = xp.matmul(_widen(P, xp=xp), _widen(Q, xp=xp))                  # (|P| + eP)(|Q| + eQ)
    propagated = xp.matmul(P.error, _widen(Q, xp=xp)) + xp.matmul(xp.abs(P.value), Q.error)  # eP(|Q|+eQ) + |P|eQ
    error = s * propagated + (s * gamma + precision.scalar_error(scale) * (1.0 + gamma)) * absolute
    if bias is not None:
        value = value + bias.value
        error = error + bias.error + gamma * _widen(bias, xp=xp)
    if precision.u_accumulate < precision.u:
        # a half-format result is rounded to storage after the sum, and again after a separate
        # scaling or bias add when the peer does those as their own ops
        for _ in range(1 + (bias is not None) + (scale != 1.0)):
            error = _round_result(value, error, precision, xp=xp)
    return Bounded(value, error)


def add(P: Bounded, Q: Bounded, precision: Precision) -> Bounded:
    """P + Q, one rounding."""
    xp = namespace(P.value, Q.value)
    value = P.value + Q.value
    return Bounded(value, _round_result(value, P.error + Q.error, precision, xp=xp))


def subtract(P: Bounded, Q: Bounded, precision: Precision) -> Bounded:
    """P - Q, one rounding."""
    return add(P, Bounded(-Q.value, Q.error), precision)


def multiply(P: Bounded, Q: Bounded, precision: Precision) -> Bounded:
    """P * Q elementwise (broadcasting), one rounding."""
    xp = namespace(P.value, Q.value)
    value = P.value * Q.value
    error = xp.abs(P.value) * Q.error + P.error * xp.abs(Q.value) + P.error * Q.error
    return Bounded(value, _round_result(value, error, precision, xp=xp))


def scale(P: Bounded, s: float, precision: Precision, *, divide: bool = False) -> Bounded:
    """s * P for a float64 scalar s that the peer first rounds to its format (P / s with divide=True)."""
    xp = namespace(P.value)
    if divide:
        rounded = _round_scalar(s, precision.storage)
        s, ds = 1.0 / s, abs(1.0 / rounded - 1.0 / s)   # |1/fl(s) - 1/s|: the divisor is what rounds
    else:
        ds = precision.scalar_error(s)
    value = P.value * s
    error = abs(s) * P.error + ds * _widen(P, xp=xp)
    return Bounded(value, _round_result(value, error, precision, xp=xp) if s not in (1.0, -1.0) else error)


def divide(P: Bounded, Q: Bounded, precision: Precision) -> Bounded:
    """P / Q elementwise; infinite bound where Q's error could reach zero (|Q| <= eQ)."""
    xp = namespace(P.value, Q.value)
    value = P.value / Q.value
    margin = xp.abs(Q.value) - Q.error
    safe = margin > 0
    propagated = (P.error + xp.abs(value) * Q.error) / xp.where(safe, margin, xp.ones_like(margin))
    error = xp.where(safe, propagated, xp.full_like(margin, math.inf))
    return Bounded(value, _round_result(value, error, precision, xp=xp))


def sqrt(P: Bounded, precision: Precision) -> Bounded:
    """sqrt(P) for P >= 0: |sqrt(a) - sqrt(b)| <= min(sqrt|a - b|, |a - b| / sqrt(b))."""
    xp = namespace(P.value)
    value = xp.sqrt(P.value)
    positive = value > 0
    relative = P.error / xp.where(positive, value, xp.ones_like(value))
    error = xp.where(positive, xp.minimum(xp.sqrt(P.error), relative), xp.sqrt(P.error))
    return Bounded(value, _round_result(value, error, precision, xp=xp))


def row_sum(P: Bounded, precision: Precision) -> Bounded:
    """Sum over axis 0 (rows) of a 2-D P, any order: gamma_{n-1} sum |P| + sum eP."""
    xp = namespace(P.value)
    n = P.value.shape[0]
    gamma = precision.gamma(n - 1)
    value = xp.sum(P.value, axis=0)
    error = xp.sum(P.error, axis=0) + gamma * xp.sum(_widen(P, xp=xp), axis=0)
    if precision.u_accumulate < precision.u:
        error = _round_result(value, error, precision, xp=xp)
    return Bounded(value, error)


def row_norm(P: Bounded, precision: Precision) -> Bounded:
    """||p_i|| over the last axis of a 2-D P: sqrt of a dot product of each row with itself."""
    xp = namespace(P.value)
    ones = exact(xp.ones((P.value.shape[-1], 1), dtype=xp.float64))
    squares = multiply(P, P, precision)
    sums = matmul(squares, ones, precision)          # a sum of n terms: gamma_n as for any dot
    return sqrt(Bounded(sums.value[:, 0], sums.error[:, 0]), precision)


def transpose(P: Bounded) -> Bounded:
    """P^T (no rounding)."""
    xp = namespace(P.value)
    return Bounded(xp.matrix_transpose(P.value), xp.matrix_transpose(P.error))


def rows(P: Bounded) -> Bounded:
    """(..., n) -> (rows, n), as refpeft.methods.linear.flatten_rows (no rounding)."""
    xp = namespace(P.value)
    return Bounded(xp.reshape(P.value, (-1, P.value.shape[-1])), xp.reshape(P.error, (-1, P.error.shape[-1])))


def column(P: Bounded) -> Bounded:
    """A (d,) vector as a (d, 1) column, to scale rows (no rounding)."""
    return Bounded(P.value[:, None], P.error[:, None])


def either(*candidates: Bounded) -> Bounded:
    """One quantity computed in any of several orders: the elementwise largest error bound.

    Used where refpeft and a peer (say PEFT's autograd) associate the same expression differently."""
    xp = namespace(candidates[0].value)
    error = candidates[0].error
    for c in candidates[1:]:
        error = xp.maximum(error, c.error)
    return Bounded(candidates[0].value, error)


def with_reference(chain: Callable[[Precision], Bounded | dict[str, Bounded]], precision: Precision) -> Any:
    """The comparison bound: the peer's error in `precision` plus refpeft's own float64 error.

    `chain(precision)` evaluates the computation's error model; returns an array, or a dict of
    arrays when the chain yields several named results.
    """
    peer, reference = chain(precision), chain(FLOAT64)
    if isinstance(peer, dict):
        return {name: peer[name].error + reference[name].error for name in peer}
    return peer.error + reference.error


def _precision(dtype: str, accumulation: str | None, model: str) -> Precision:
    return Precision(storage=dtype, accumulation=accumulation, model=model)


def _gradient_bounds(chain: Callable[[Precision], dict[str, Bounded]], precision: Precision, *,
                     x_shape: tuple[int, ...]) -> dict[str, Any]:
    """The bounds of a backward chain's gradients, dx reshaped back to x's (..., k) shape."""
    bounds = with_reference(chain, precision)
    xp = namespace(bounds["dx"])
    bounds["dx"] = xp.reshape(bounds["dx"], x_shape)
    return bounds


# ---------------------------------------------------------------- LoRA (refpeft.methods.lora's computation)

def _optional(a: Any) -> Bounded | None:
    return None if a is None else exact(a)


def _lora_chain(x: Any, W0: Any, A: Any, B: Any, *, scaling: float, bias: Any, dropout_mask: Any,
                fan_in_fan_out: bool, precision: Precision) -> dict[str, Bounded]:
    """Forward intermediates with their errors: xd, xa, y (all 2-D)."""
    x2 = rows(exact(x))                                                         # (n, k)
    xd = x2 if dropout_mask is None else multiply(x2, rows(exact(dropout_mask)), precision)
    W0_t = exact(W0) if fan_in_fan_out else transpose(exact(W0))                # (k, d)
    base = matmul(x2, W0_t, precision, bias=_optional(bias))                    # x W0^T + b
    xa = matmul(xd, transpose(exact(A)), precision)                              # (n, r)
    adapter = matmul(xa, transpose(exact(B)), precision, scale=scaling)         # s (xa B^T)
    return {"xd": xd, "xa": xa, "y": add(base, adapter, precision)}


def lora_forward_bound(x: Any, W0: Any, A: Any, B: Any, *, scaling: float, bias: Any = None,
                       dropout_mask: Any = None, fan_in_fan_out: bool = False, dtype: str = "float32",
                       accumulation: str | None = None, model: str = "rigorous") -> Any:
    """Per-element bound on |y_peer - y_refpeft| for LoRA's y = x W0^T + b + s (dropout(x) A^T) B^T.

    Arguments are the exact inputs (any float dtype; read as float64) and the format the peer
    computes in. Returns an array of y's shape, (..., d), in float64.
    """
    chain = lambda p: _lora_chain(x, W0, A, B, scaling=scaling, bias=bias, dropout_mask=dropout_mask,  # noqa: E731
                                  fan_in_fan_out=fan_in_fan_out, precision=p)["y"]
    bound = with_reference(chain, _precision(dtype, accumulation, model))
    xp = namespace(bound)
    return xp.reshape(bound, (*x.shape[:-1], bound.shape[-1]))


def lora_backward_bound(dy: Any, x: Any, W0: Any, A: Any, B: Any, *, scaling: float, dropout_mask: Any = None,
                        fan_in_fan_out: bool = False, bias_trainable: bool = False, dtype: str = "float32",
                        accumulation: str | None = None, model: str = "rigorous") -> dict[str, Any]:
    """Per-element bounds on dx, dA, dB (and dbias when trainable) of `refpeft.methods.lora.lora_backward`.

    The chain follows the forward's cached xa (with its forward error) into dB, and g = s dy B
    into dA and dx; scaling is allowed before or after each product, so autograd's order is covered.
    """
    def chain(p: Precision) -> dict[str, Bounded]:
        forward = _lora_chain(x, W0, A, B, scaling=scaling, bias=None, dropout_mask=dropout_mask,
                              fan_in_fan_out=fan_in_fan_out, precision=p)
        g2 = rows(exact(dy))                                                    # (n, d)
        dB = matmul(transpose(g2), forward["xa"], p, scale=scaling)             # s dy^T xa
        g = matmul(g2, exact(B), p, scale=scaling)                              # s dy B
        dA = matmul(transpose(g), forward["xd"], p)                             # g^T xd
        dx_adapter = matmul(g, exact(A), p)                                     # g A
        if dropout_mask is not None:
            dx_adapter = multiply(dx_adapter, rows(exact(dropout_mask)), p)
        W0_rows = transpose(exact(W0)) if fan_in_fan_out else exact(W0)         # (d, k)
        grads = {"dx": add(matmul(g2, W0_rows, p), dx_adapter, p), "dA": dA, "dB": dB}
        if bias_trainable:
            grads["dbias"] = row_sum(g2, p)
        return grads

    return _gradient_bounds(chain, _precision(dtype, accumulation, model), x_shape=tuple(x.shape))


def merge_bound(W0: Any, A: Any, B: Any, *, scaling: float, fan_in_fan_out: bool = False, dtype: str = "float32",
                accumulation: str | None = None, model: str = "rigorous", unmerge: bool = False) -> Any:
    """Per-element bound on the merged W0 + s B A (or, with unmerge=True, on W - s B A), W0's layout."""
    def chain(p: Precision) -> Bounded:
        delta = matmul(exact(B), exact(A), p, scale=-scaling if unmerge else scaling)   # (d, k)
        return add(exact(W0), transpose(delta) if fan_in_fan_out else delta, p)

    return with_reference(chain, _precision(dtype, accumulation, model))


def quantized_linear_bound(x: Any, W_dequantized: Any, *, bias: Any = None, dtype: str = "float32",
                           weight_rounded: bool = False, accumulation: str | None = None,
                           model: str = "rigorous") -> Any:
    """Bound on x W^T + b for a dequantised 4-bit weight W (exact in float32 given codes and absmax).

    `weight_rounded=True` when the peer casts the float32 dequantised weight to a narrower compute
    dtype (bitsandbytes dequantises to the input's dtype) before the matmul: one rounding each.
    """
    def chain(p: Precision) -> Bounded:
        W = stored(W_dequantized, p) if weight_rounded else exact(W_dequantized)
        return matmul(rows(exact(x)), transpose(W), p, bias=_optional(bias))

    bound = with_reference(chain, _precision(dtype, accumulation, model))
    xp = namespace(bound)
    return xp.reshape(bound, (*x.shape[:-1], bound.shape[-1]))


# ---------------------------------------------------------------- DoRA (refpeft.methods.dora's computation, and PEFT's)

def _dora_norm(W0: Any, A: Any, B: Any, *, scaling: float, fan_in_fan_out: bool, p: Precision) -> tuple[Bounded, Bounded]:
    """V = W0 + s B A (d, k) and its row norms n (d,), each with its error."""
    W_rows = transpose(exact(W0)) if fan_in_fan_out else exact(W0)
    V = add(W_rows, matmul(exact(B), exact(A), p, scale=scaling), p)
    return V, row_norm(V, p)


def _dora_chain(x: Any, W0: Any, A: Any, B: Any, magnitude: Any, *, scaling: float, bias: Any, dropout_mask: Any,
                fan_in_fan_out: bool, p: Precision) -> dict[str, Bounded]:
    """y = x W0^T + b + (g - 1) * u + (g * v) * s with g = m / n, u = xd W0^T, v = (xd A^T) B^T.

    PEFT without dropout takes u as (x W0^T + b) - b (its base output minus the bias): both ways of
    forming u are bounded and the larger error kept."""
    _, n = _dora_norm(W0, A, B, scaling=scaling, fan_in_fan_out=fan_in_fan_out, p=p)
    g = divide(exact(magnitude), n, p)                                          # (d,)
    x2 = rows(exact(x))
    xd = x2 if dropout_mask is None else multiply(x2, rows(exact(dropout_mask)), p)
    W0_t = exact(W0) if fan_in_fan_out else transpose(exact(W0))               # (k, d)
    xw = matmul(x2, W0_t, p)
    base = xw if bias is None else add(xw, exact(bias), p)
    u = matmul(xd, W0_t, p)
    if dropout_mask is None and bias is not None:
        u = either(u, subtract(base, exact(bias), p))
    xa = matmul(xd, transpose(exact(A)), p)
    v = matmul(xa, transpose(exact(B)), p)
    g_minus_1 = subtract(g, exact(g.value * 0 + 1), p)
    correction = add(multiply(g_minus_1, u, p), scale(multiply(g, v, p), scaling, p), p)
    return {"y": add(base, correction, p), "g": g, "n": n, "u": u, "v": v, "xa": xa, "xd": xd}


def dora_forward_bound(x: Any, W0: Any, A: Any, B: Any, magnitude: Any, *, scaling: float, bias: Any = None,
                       dropout_mask: Any = None, fan_in_fan_out: bool = False, dtype: str = "float32",
                       accumulation: str | None = None, model: str = "rigorous") -> Any:
    """Per-element bound on DoRA's y (refpeft.methods.dora.dora_forward, PEFT's order), (..., d)."""
    chain = lambda p: _dora_chain(x, W0, A, B, magnitude, scaling=scaling, bias=bias, dropout_mask=dropout_mask,  # noqa: E731
                                  fan_in_fan_out=fan_in_fan_out, p=p)["y"]
    bound = with_reference(chain, _precision(dtype, accumulation, model))
    xp = namespace(bound)
    return xp.reshape(bound, (*x.shape[:-1], bound.shape[-1]))


def dora_backward_bound(dy: Any, x: Any, W0: Any, A: Any, B: Any, magnitude: Any, *, scaling: float,
                        bias: Any = None, dropout_mask: Any = None, fan_in_fan_out: bool = False,
                        gradient: str = "detached", bias_trainable: bool = False, dtype: str = "float32",
                        accumulation: str | None = None, model: str = "rigorous") -> dict[str, Any]:
    """Per-element bounds on dx, dA, dB, dmagnitude (dbias) of refpeft.methods.dora.dora_backward.

    Covers PEFT's autograd order where it differs: dg as one sum of dy * (u + s v) or as two sums,
    g * dy * s in either association, and the base path as (g dy) W0 or (dy + (g - 1) dy) W0.
    """
    def chain(p: Precision) -> dict[str, Bounded]:
        f = _dora_chain(x, W0, A, B, magnitude, scaling=scaling, bias=bias, dropout_mask=dropout_mask,
                        fan_in_fan_out=fan_in_fan_out, p=p)
        g, n, u, v, xa, xd = f["g"], f["n"], f["u"], f["v"], f["xa"], f["xd"]
        g2 = rows(exact(dy))
        sv = scale(v, scaling, p)
        dg = either(row_sum(multiply(g2, add(u, sv, p), p), p),
                    add(row_sum(multiply(g2, u, p), p), row_sum(multiply(g2, sv, p), p), p))
        gy = either(scale(multiply(g2, g, p), scaling, p), multiply(scale(g2, scaling, p), g, p))
        dB = matmul(transpose(gy), xa, p)
        gb = matmul(gy, exact(B), p)
        dA = matmul(transpose(gb), xd, p)
        W0_rows = transpose(exact(W0)) if fan_in_fan_out else exact(W0)            # (d, k)
        g_minus_1 = subtract(g, exact(g.value * 0 + 1), p)
        if dropout_mask is None:
            base = either(matmul(multiply(g2, g, p), W0_rows, p),
                          matmul(add(g2, multiply(g2, g_minus_1, p), p), W0_rows, p))
            dx = add(base, matmul(gb, exact(A), p), p)
        else:
            dxd = add(matmul(multiply(g2, g_minus_1, p), W0_rows, p), matmul(gb, exact(A), p), p)
            dx = add(matmul(g2, W0_rows, p), multiply(dxd, rows(exact(dropout_mask)), p), p)
        grads = {"dx": dx, "dmagnitude": divide(dg, n, p)}
        if gradient == "exact":
            w = scale(divide(multiply(dg, g, p), multiply(n, n, p), p), -1.0, p)   # -(dg g) / n^2
            wB = multiply(column(w), exact(B), p)                                    # (d, r)
            WAt = matmul(W0_rows, transpose(exact(A)), p)                            # (d, r)
            AAt = matmul(exact(A), transpose(exact(A)), p)                           # (r, r)
            extra_B = scale(add(multiply(column(w), WAt, p), scale(matmul(wB, AAt, p), scaling, p), p), scaling, p)
            dB = add(dB, extra_B, p)
            wBt = transpose(wB)
            extra_A = add(matmul(wBt, W0_rows, p), scale(matmul(matmul(wBt, exact(B), p), exact(A), p), scaling, p), p)
            dA = add(dA, scale(extra_A, scaling, p), p)
        grads.update(dA=dA, dB=dB)
        if bias_trainable:
            grads["dbias"] = row_sum(g2, p)
        return grads

    return _gradient_bounds(chain, _precision(dtype, accumulation, model), x_shape=tuple(x.shape))


def dora_merge_bound(W0: Any, A: Any, B: Any, magnitude: Any, *, scaling: float, fan_in_fan_out: bool = False,
                     dtype: str = "float32", accumulation: str | None = None, model: str = "rigorous") -> Any:
    """Per-element bound on W' = diag(m / n) (W0 + s B A), in W0's layout."""
    def chain(p: Precision) -> Bounded:
        V, n = _dora_norm(W0, A, B, scaling=scaling, fan_in_fan_out=fan_in_fan_out, p=p)
        merged = multiply(column(divide(exact(magnitude), n, p)), V, p)
        return transpose(merged) if fan_in_fan_out else merged

    return with_reference(chain, _precision(dtype, accumulation, model))


def dora_unmerge_bound(W: Any, A: Any, B: Any, magnitude: Any, weight_norm: Any, *, scaling: float,
                       fan_in_fan_out: bool = False, dtype: str = "float32", accumulation: str | None = None,
                       model: str = "rigorous") -> Any:
    """Per-element bound on W0 = W / (m / n) - s B A with the cached norm n given (PEFT's unmerge)."""
    def chain(p: Precision) -> Bounded:
        g = divide(exact(magnitude), exact(weight_norm), p)                          # (d,)
        W_rows = transpose(exact(W)) if fan_in_fan_out else exact(W)                 # (d, k)
        W0 = subtract(divide(W_rows, column(g), p), matmul(exact(B), exact(A), p, scale=scaling), p)
        return transpose(W0) if fan_in_fan_out else W0

    return with_reference(chain, _precision(dtype, accumulation, model))


# ---------------------------------------------------------------- VeRA (refpeft.methods.vera's computation)

def _vera_chain(x: Any, W0: Any, A: Any, B: Any, lambda_d: Any, lambda_b: Any, *, bias: Any, dropout_mask: Any,
                fan_in_fan_out: bool, p: Precision) -> dict[str, Bounded]:
    """y = x W0^T + b + lambda_b * ((lambda_d * xa) B^T), A and B the layer's slices."""
    x2 = rows(exact(x))
    xd = x2 if dropout_mask is None else multiply(x2, rows(exact(dropout_mask)), p)
    W0_t = exact(W0) if fan_in_fan_out else transpose(exact(W0))
    base = matmul(x2, W0_t, p, bias=_optional(bias))
    xa = matmul(xd, transpose(exact(A)), p)
    h = multiply(xa, exact(lambda_d), p)
    y = add(base, multiply(exact(lambda_b), matmul(h, transpose(exact(B)), p), p), p)
    return {"y": y, "xa": xa, "xd": xd, "h": h}


def vera_forward_bound(x: Any, W0: Any, A: Any, B: Any, lambda_d: Any, lambda_b: Any, *, bias: Any = None,
                       dropout_mask: Any = None, fan_in_fan_out: bool = False, dtype: str = "float32",
                       accumulation: str | None = None, model: str = "rigorous") -> Any:
    """Per-element bound on VeRA's y; A (r, k) and B (d, r) are the layer's slices of the shared pair."""
    chain = lambda p: _vera_chain(x, W0, A, B, lambda_d, lambda_b, bias=bias, dropout_mask=dropout_mask,  # noqa: E731
                                  fan_in_fan_out=fan_in_fan_out, p=p)["y"]
    bound = with_reference(chain, _precision(dtype, accumulation, model))
    xp = namespace(bound)
    return xp.reshape(bound, (*x.shape[:-1], bound.shape[-1]))


def vera_backward_bound(dy: Any, x: Any, W0: Any, A: Any, B: Any, lambda_d: Any, lambda_b: Any, *,
                        dropout_mask: Any = None, fan_in_fan_out: bool = False, bias_trainable: bool = False,
                        dtype: str = "float32", accumulation: str | None = None, model: str = "rigorous") -> dict[str, Any]:
    """Per-element bounds on dx, dlambda_d, dlambda_b (dbias) of refpeft.methods.vera.vera_backward.

    dlambda_b is bounded both as refpeft forms it (row sums of B * (dy^T h)) and as autograd does
    (column sums of dy * (h B^T)), keeping the larger error."""
    def chain(p: Precision) -> dict[str, Bounded]:
        f = _vera_chain(x, W0, A, B, lambda_d, lambda_b, bias=None, dropout_mask=dropout_mask,
                        fan_in_fan_out=fan_in_fan_out, p=p)
        g2 = rows(exact(dy))
        h, xa, xd = f["h"], f["xa"], f["xd"]
        by_refpeft = row_sum(transpose(multiply(exact(B), matmul(transpose(g2), h, p), p)), p)
        by_autograd = row_sum(multiply(g2, matmul(h, transpose(exact(B)), p), p), p)
        gh = matmul(multiply(g2, exact(lambda_b), p), exact(B), p)
        dx_adapter = matmul(multiply(gh, exact(lambda_d), p), exact(A), p)
        if dropout_mask is not None:
            dx_adapter = multiply(dx_adapter, rows(exact(dropout_mask)), p)
        W0_rows = transpose(exact(W0)) if fan_in_fan_out else exact(W0)
        grads = {"dx": add(matmul(g2, W0_rows, p), dx_adapter, p), "dlambda_d": row_sum(multiply(gh, xa, p), p),
                 "dlambda_b": either(by_refpeft, by_autograd)}
        if bias_trainable:
            grads["dbias"] = row_sum(g2, p)
        return grads

    return _gradient_bounds(chain, _precision(dtype, accumulation, model), x_shape=tuple(x.shape))


def vera_merge_bound(W0: Any, A: Any, B: Any, lambda_d: Any, lambda_b: Any, *, fan_in_fan_out: bool = False,
                     dtype: str = "float32", accumulation: str | None = None, model: str = "rigorous",
                     unmerge: bool = False) -> Any:
    """Per-element bound on W0 + (lambda_b B)(lambda_d A) (PEFT's order), in W0's layout; with
    unmerge=True on W - (lambda_b B)(lambda_d A) (pass the merged W as W0)."""
    def chain(p: Precision) -> Bounded:
        lb, ld = column(exact(lambda_b)), column(exact(lambda_d))
        delta = matmul(multiply(lb, exact(B), p), multiply(ld, exact(A), p), p)
        delta = transpose(delta) if fan_in_fan_out else delta
        return subtract(exact(W0), delta, p) if unmerge else add(exact(W0), delta, p)

    return with_reference(chain, _precision(dtype, accumulation, model))


# ---------------------------------------------------------------- QLoRA in bfloat16 (refpeft.methods.qlora's "bfloat16")

def _to_storage(P: Bounded, precision: Precision) -> Bounded:
    """A cast of a wider result to `precision`'s storage format: one rounding."""
    xp = namespace(P.value)
    return Bounded(P.value, _round_result(P.value, P.error, precision, xp=xp))


def _qlora_chain(x: Any, W0: Any, A: Any, B: Any, *, scaling: float, bias: Any, dropout_mask: Any,
                 storage: str, model: str) -> dict[str, Bounded]:
    """bnb Linear4bit + PEFT: base = half(x W0^T + b), out = half(f32(xa B^T) * s) with xa in float32,
    y = half(base + out); W0 holds the dequantised half-format values (exact)."""
    half, single = Precision(storage, model=model), Precision("float32", model=model)
    x2 = rows(exact(x))
    xd = x2 if dropout_mask is None else multiply(x2, rows(exact(dropout_mask)), single)
    base = matmul(x2, transpose(exact(W0)), half, bias=_optional(bias))
    xa = matmul(xd, transpose(exact(A)), single)
    out = _to_storage(matmul(xa, transpose(exact(B)), single, scale=scaling), half)
    return {"y": add(base, out, half), "xa": xa, "xd": xd}


def qlora_forward_bound(x: Any, W0: Any, A: Any, B: Any, *, scaling: float, bias: Any = None, dropout_mask: Any = None,
                        dtype: str = "bfloat16", model: str = "rigorous") -> Any:
    """Bound on y of a half-precision QLoRA layer with float32 adapters (refpeft.methods.qlora, precision="bfloat16").

    Mixed precision: the base product and every sum with it in `dtype` (float32 accumulation), the
    adapter branch in float32 and cast once. W0 is the dequantised weight (exact given the codes).
    The float64 reference term is the same chain in float64 (`with_reference`)."""
    def chain(p: Precision) -> Bounded:
        if p.storage == "float64":
            return _lora_chain(x, W0, A, B, scaling=scaling, bias=bias, dropout_mask=dropout_mask,
                               fan_in_fan_out=False, precision=p)["y"]
        return _qlora_chain(x, W0, A, B, scaling=scaling, bias=bias, dropout_mask=dropout_mask, storage=dtype,
                            model=model)["y"]

    bound = with_reference(chain, _precision(dtype, None, model))
    xp = namespace(bound)
    return xp.reshape(bound, (*x.shape[:-1], bound.shape[-1]))


def qlora_backward_bound(dy: Any, x: Any, W0: Any, A: Any, B: Any, *, scaling: float, dropout_mask: Any = None,
                         dtype: str = "bfloat16", model: str = "rigorous") -> dict[str, Any]:
    """Bounds on dx, dA, dB of the half-precision QLoRA layer (refpeft.methods.qlora's backward, PEFT's autograd):
    dt = f32(dy s); dB = dt^T xa, dA = (dt B)^T xd in float32; dx = half(half(dy W0) + half((dt B A) * mask))."""
    def chain(p: Precision) -> dict[str, Bounded]:
        if p.storage == "float64":
            f = _lora_chain(x, W0, A, B, scaling=scaling, bias=None, dropout_mask=dropout_mask,
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
        dx = add(matmul(g2, exact(W0), half), _to_storage(adapter, half), half)
        return {"dx": dx, "dA": matmul(transpose(dxa), f["xd"], single), "dB": matmul(transpose(dt), f["xa"], single)}

    return _gradient_bounds(chain, _precision(dtype, None, model), x_shape=tuple(x.shape))


# ---------------------------------------------------------------- Adam (refpeft.optim.adam_update's chain)

def adam_update_bound(p: Any, g: Any, m: Any, v: Any, *, t: int, lr: float, betas: tuple[float, float],
                      eps: float, weight_decay: float = 0.0, decoupled_weight_decay: bool = False,
                      dtype: str = "float32", model: str = "rigorous") -> dict[str, Any]:
    """Per-element bounds on the updated p, m, v of one Adam/AdamW step (amsgrad off).

    Every scalar (1 - lr wd, 1 - beta1, beta2, 1 - beta2, sqrt(1 - beta2^t), lr / (1 - beta1^t),
    eps) is a float64 number the peer rounds to its format; each elementwise op rounds once. A fused
    multiply-add or lerp rounds less, which the bound covers.
    """
    beta1, beta2 = betas

    def chain(prec: Precision) -> dict[str, Bounded]:
        P, G, M, V = exact(p), exact(g), exact(m), exact(v)
        if weight_decay != 0.0:
            if decoupled_weight_decay:
                P = scale(P, 1.0 - lr * weight_decay, prec)
            else:
                G = add(G, scale(P, weight_decay, prec), prec)
        weight = 1.0 - beta1
        if weight < 0.5:
            M = add(M, scale(subtract(G, M, prec), weight, prec), prec)
        else:
            M = subtract(G, scale(subtract(G, M, prec), 1.0 - weight, prec), prec)
        V = add(scale(V, beta2, prec), scale(multiply(G, G, prec), 1.0 - beta2, prec), prec)
        root = scale(sqrt(V, prec), (1.0 - beta2**t) ** 0.5, prec, divide=True)
        xp = namespace(root.value)
        denom = add(root, exact(xp.full(root.value.shape, eps, dtype=xp.float64)), prec)
        step = scale(divide(M, denom, prec), -lr / (1.0 - beta1**t), prec)
        return {"p": add(P, step, prec), "m": M, "v": V}

    return with_reference(chain, _precision(dtype, None, model))


# ---------------------------------------------------------------- comparing

@dataclass(frozen=True)
class Comparison:
    """One result checked against the reference within its bound."""

    ratio: float        # max |actual - expected| / bound; <= 1 passes (0/0 counts as 0, x/0 as inf)
    max_error: float    # max |actual - expected|
    bound_at_worst: float
    passed: bool
    worst_index: tuple[int, ...] = ()   # where error / bound is largest
    actual_at_worst: float = 0.0
    expected_at_worst: float = 0.0

    def describe(self) -> str:
        """One line for a report: the worst element, its values and its bound."""
        return (f"worst at {list(self.worst_index)}: {self.actual_at_worst!r} vs expected {self.expected_at_worst!r}, "
                f"error {abs(self.actual_at_worst - self.expected_at_worst):.3e}, bound {self.bound_at_worst:.3e} "
                f"(error/bound {self.ratio:.3g})")


def compare(actual: Any, expected: Any, bound: Any) -> Comparison:
    """Worst error / bound of `actual` against `expected` (any namespaces; compared in float64 on the host)."""
    a = np.asarray(to_numpy(actual), dtype=np.float64)
    e = np.asarray(to_numpy(expected), dtype=np.float64)
    b = np.broadcast_to(np.asarray(to_numpy(bound), dtype=np.float64), e.shape)
    if a.shape != e.shape:
        raise ShapeError(f"result has shape {a.shape}, expected {e.shape}")
    if a.size == 0:
        return Comparison(0.0, 0.0, 0.0, True)
    err = np.abs(a - e)
    err = np.where(np.isnan(a) != np.isnan(e), np.inf, np.where(np.isnan(err), 0.0, err))
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = np.where(err == 0.0, 0.0, err / b)
    worst = int(np.argmax(ratios))
    ratio = float(ratios.flat[worst])
    return Comparison(ratio=ratio, max_error=float(err.max()), bound_at_worst=float(b.flat[worst]), passed=ratio <= 1.0,
                      worst_index=tuple(int(i) for i in np.unravel_index(worst, e.shape)),
                      actual_at_worst=float(a.flat[worst]), expected_at_worst=float(e.flat[worst]))


def ratio(actual: Any, expected: Any, bound: Any) -> float:
    """max |actual - expected| / bound: the fraction of the rounding budget used (a pass is <= 1)."""
    return compare(actual, expected, bound).ratio
