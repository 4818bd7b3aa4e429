"""How far a lower-precision run of a whole computation may drift: Monte Carlo arithmetic in NumPy.

A decoder of 30 layers is too deep for worst-case error algebra (refpeft.tolerance): composing
gamma_k |A||B| bounds through every residual layer multiplies by the norm of |W| at each matmul
and is vacuous by many orders of magnitude. So the bound of a float32 (or float16) evaluation is
derived from the probabilistic rounding model of Higham & Mary (SIAM J. Sci. Comput. 41(5), 2019),
to first order, and measured by noise injection (Monte Carlo arithmetic; Parker, Pierce & Eggert
2000):

1. Model. Rounding errors are independent and mean zero. A dot product of length k in unit roundoff
   u (any summation order) errs by sum_i x_i w_i theta_i, theta_i a sum of at most k roundings of
   size <= u: its variance is at most u^2 (k / 3) (sum_i |x_i w_i|)^2. A sum or mean of n terms
   likewise with |x|; an elementwise op (+ - * /, sqrt, exp, sin, cos, a cast) errs by at most one
   ulp, 2u |result|.
2. Injection. The computation runs in float64 on `Noisy` arrays: every rounding op's float64 result
   gets independent noise u w xi, xi ~ U(-1, 1), of width w = sqrt(k) |x| |w| (matmul),
   sqrt(n) sum|x| + |result| (sums and means) or 2 |result| (elementwise ufuncs), whose variance
   u^2 w^2 / 3 is at least that of step 1, source by source. Exact ops (reshapes, indexing,
   concatenation, where, max, min, negation, abs, comparisons) get none.
3. First order, the output error is the sum over sources of (Jacobian x error), so entry by entry
   the low-precision error has at most the variance of the injected deviation. The bound is twice
   the largest deviation of `runs` injected runs from the plain float64 run, over all outputs:

       B(u) = 2 max_j |y_noisy - y64|_j,     and, errors being linear in u to first order,
       B(u') = B(u) u' / u for any other unit roundoff u'.

   This is the probabilistic step: the maximum of many near-Gaussian deviations sits several
   standard deviations out, so B is about twice that again. The injected widths are worst-order
   (recursive) sums; blocked BLAS sums err far less, hence the usual margin of 10-100x.

A stored constant rounded to the working precision (a weight cast to float16, a cos/sin table)
errs by one rounding per entry, which the width of the op consuming it already covers (sqrt(k) >= 1
rounding per term, 2u per elementwise op).
"""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from refpeft.backend import UNIT_ROUNDOFF
from refpeft.errors import ConfigError

# ufuncs that round nothing: sign changes, selection, comparisons, logic.
EXACT_UFUNCS = {"negative", "positive", "absolute", "fabs", "maximum", "minimum", "fmax", "fmin", "sign",
                "greater", "greater_equal", "less", "less_equal", "equal", "not_equal", "logical_and",
                "logical_or", "logical_not", "isnan", "isinf", "isfinite", "floor", "ceil", "trunc", "rint"}


class Noisy(np.ndarray):
    """A float64 array whose rounding ufuncs add noise of unit roundoff `u` (module docstring, step 2)."""

    u: float = UNIT_ROUNDOFF["float32"]
    rng: np.random.Generator = np.random.default_rng(0)

    def __array_ufunc__(self, ufunc: np.ufunc, method: str, *inputs: Any, **kwargs: Any) -> Any:
        plain = [np.asarray(a) if isinstance(a, Noisy) else a for a in inputs]
        out = kwargs.pop("out", None)
        result = getattr(ufunc, method)(*plain, **kwargs)
        if isinstance(result, np.ndarray) and result.dtype == np.float64 and ufunc.__name__ not in EXACT_UFUNCS:
            result = result + Noisy.u * _width(ufunc, method, plain, kwargs, result) * \
                Noisy.rng.uniform(-1.0, 1.0, size=result.shape)
        if out is not None:
            np.asarray(out[0])[...] = result
            return out[0]
        return result.view(Noisy) if isinstance(result, np.ndarray) else result


def _width(ufunc: np.ufunc, method: str, inputs: list[Any], kwargs: dict, result: np.ndarray) -> np.ndarray:
    """w of step 2: the noise width of one op's result (finite results only; the rest get none)."""
    with np.errstate(over="ignore", invalid="ignore"):
        if ufunc.__name__ == "matmul" and method == "__call__":
            a, b = (np.asarray(x) for x in inputs)
            width = math.sqrt(a.shape[-1]) * np.matmul(np.abs(a), np.abs(b))
        elif method == "reduce":
            x = np.asarray(inputs[0])
            n = x.size // max(result.size, 1)
            width = math.sqrt(n) * ufunc.reduce(np.abs(x), **kwargs) + np.abs(result)
        else:
            width = 2.0 * np.abs(result)
    # finfo.min (an attention mask's "minus infinity") and overflowed widths get no noise
    return np.where(np.isfinite(width) & (np.abs(result) < 1e300), width, 0.0)


def noisy(a: Any) -> Any:
    """`a` as a Noisy view (float64 arrays only; others are returned as they are)."""
    return a.view(Noisy) if isinstance(a, np.ndarray) and a.dtype == np.float64 else a


def rounding_bound(run: Callable[[Callable[[Any], Any]], Any], *, dtype: str = "float32", runs: int = 2,
                   seed: int = 0) -> float:
    """B(u) of the module docstring for the unit roundoff of `dtype`.

    run(wrap) evaluates the computation in float64 with every input array passed through `wrap`
    (identity for the plain run, `noisy` for the injected ones) and returns the output array.
    """
    if dtype not in UNIT_ROUNDOFF:
        raise ConfigError(f"no unit roundoff for dtype {dtype!r}; choose one of {', '.join(UNIT_ROUNDOFF)}")
    plain = np.asarray(run(lambda a: a), dtype=np.float64)
    saved = Noisy.u, Noisy.rng
    Noisy.u, Noisy.rng = UNIT_ROUNDOFF["float32"], np.random.default_rng(seed)
    try:
        deviation = max(float(np.max(np.abs(np.asarray(run(noisy)) - plain))) for _ in range(runs))
    finally:
        Noisy.u, Noisy.rng = saved
    return 2.0 * deviation * UNIT_ROUNDOFF[dtype] / UNIT_ROUNDOFF["float32"]
