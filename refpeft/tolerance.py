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
          ds = |fl(s) - s|. When u_a < u (half formats accumulating in float32), the product is
          rounded to the storage format (+ u (|s P Q| + that error), once more for a separate
          scaling) and, with a bias added as its own op, the sum once more (+ u (|C| + error)):
          the product's rounding is relative to |s P Q|, not to |C|, which can be far smaller.
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
compute dtype is narrower (`weight_rounded=True` in refpeft.methods.qlora.quantized_linear_bound).

Where the bounds live
---------------------
This module is the algebra only. Each computation composes its bound from these rules next to
the code it bounds, in the "error bounds" section of its module, so a reordering of the math is
visible in one file: `lora_forward_bound`, `lora_backward_bound`, `lora_merge_bound` in
refpeft.methods.lora; the `dora_*`, `vera_*` and `qlora_*` bounds in their method modules;
`adam_update_bound` in refpeft.optim. `output_bound` and `gradient_bounds` turn a chain into
the comparison bound (`with_reference`) in the caller's shapes.

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
    half = precision.u_accumulate < precision.u
    if half:
        # a half-format result is rounded to storage after the sum, and again after a separate
        # scaling when the peer does it as its own op: each rounding of the product s P Q ...
        for _ in range(1 + (scale != 1.0)):
            error = _round_result(value, error, precision, xp=xp)
    if bias is not None:
        value = value + bias.value
        error = error + bias.error + gamma * _widen(bias, xp=xp)
        if half:   # ... and once more after a separate bias add, of the sum s P Q + b
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


def exact_or_none(a: Any) -> Bounded | None:
    """An optional exact input (a bias that may be absent)."""
    return None if a is None else exact(a)


def to_storage(P: Bounded, precision: Precision) -> Bounded:
    """A cast of a wider result to `precision`'s storage format: one rounding."""
    xp = namespace(P.value)
    return Bounded(P.value, _round_result(P.value, P.error, precision, xp=xp))


def output_bound(chain: Callable[[Precision], Bounded], precision: Precision, *, x_shape: tuple[int, ...]) -> Any:
    """The comparison bound of a forward chain's 2-D output (rows, d), reshaped to x's (..., d)."""
    bound = with_reference(chain, precision)
    xp = namespace(bound)
    return xp.reshape(bound, (*x_shape[:-1], bound.shape[-1]))


def gradient_bounds(chain: Callable[[Precision], dict[str, Bounded]], precision: Precision, *,
                    x_shape: tuple[int, ...]) -> dict[str, Any]:
    """The comparison bounds of a backward chain's gradients, dx reshaped back to x's (..., k) shape."""
    bounds = with_reference(chain, precision)
    xp = namespace(bounds["dx"])
    bounds["dx"] = xp.reshape(bounds["dx"], x_shape)
    return bounds


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
