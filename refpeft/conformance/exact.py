"""Machine-independent float64: refpeft's own functions run with every reduction correctly rounded.

Golden vectors must come out byte for byte the same on any machine, but a float64 matmul or sum
depends on the BLAS, its blocking and the CPU's SIMD width: the last bits move. Elementwise
+ - * / and sqrt do not (IEEE 754 rounds each correctly). So the generator runs refpeft's own
code on `ExactArray`, a NumPy array subclass that keeps every elementwise operation as NumPy does
it and replaces each reduction by its correctly rounded value:

    matmul:  (P Q)_ij = fl( sum_l P_il Q_lj )     each product split exactly, p + e = P_il Q_lj
                                                   (Dekker's TwoProduct), then math.fsum (Shewchuk)
    sum:     fl( sum_i p_i )                       math.fsum
    norm:    fl( sqrt( fl( sum_i p_i^2 ) ) )      vector 2-norm: squares exact as above, then fsum

A correctly rounded result is unique, hence the same everywhere. Any other NumPy function that
would reduce through BLAS (dot, einsum, tensordot, vdot, inner, linalg other than vector_norm) is
refused, so a refpeft change that introduces one is caught rather than silently machine-dependent.
Inputs must keep |values| well inside the float64 range (TwoProduct needs no overflow or underflow).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from refpeft.errors import ConfigError

_SPLITTER = 134217729.0  # 2^27 + 1: Veltkamp's constant for float64 (53 = 26 + 27 bits)
_REFUSED = {"dot", "einsum", "tensordot", "vdot", "inner", "vecdot", "matrix_norm", "norm_nd", "det", "svd",
            "qr", "eigh", "solve", "inv", "lstsq", "cholesky", "trace"}


def _split(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    c = _SPLITTER * a
    high = c - (c - a)
    return high, a - high


def two_product(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """p = fl(a b) and e with p + e = a b exactly (Dekker 1971), elementwise, broadcasting."""
    p = a * b
    ah, al = _split(a)
    bh, bl = _split(b)
    e = ((ah * bh - p) + ah * bl + al * bh) + al * bl
    return p, e


def _fsum_last(a: np.ndarray) -> np.ndarray:
    """math.fsum over the last axis (through Python lists: much faster than apply_along_axis)."""
    lead = a.shape[:-1]
    rows = a.reshape(-1, a.shape[-1]).tolist()
    return np.array([math.fsum(row) for row in rows], dtype=np.float64).reshape(lead)


def exact_matmul(P: np.ndarray, Q: np.ndarray) -> np.ndarray:
    """The correctly rounded float64 matrix product of 2-D (or batched) P and Q."""
    P, Q = np.asarray(P, dtype=np.float64), np.asarray(Q, dtype=np.float64)
    vector_left, vector_right = P.ndim == 1, Q.ndim == 1
    P = P[None, :] if vector_left else P
    Q = Q[:, None] if vector_right else Q
    p, e = two_product(P[..., :, None, :], np.swapaxes(Q, -1, -2)[..., None, :, :])   # (..., n, m, k)
    out = _fsum_last(np.concatenate([p, e], axis=-1))                                   # (..., n, m)
    out = out[..., 0, :] if vector_left else out
    return out[..., 0] if vector_right else out


def exact_sum(a: np.ndarray, axis: Any = None, keepdims: bool = False) -> np.ndarray:
    """The correctly rounded float64 sum over `axis` (None: all elements)."""
    a = np.asarray(a, dtype=np.float64)
    if axis is None:
        out = np.asarray(math.fsum(a.ravel()))
        return out.reshape((1,) * a.ndim) if keepdims else out
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    axes = tuple(ax % a.ndim for ax in axes)
    moved = np.moveaxis(a, axes, tuple(range(a.ndim - len(axes), a.ndim)))
    flat = moved.reshape(moved.shape[: a.ndim - len(axes)] + (-1,))
    out = _fsum_last(flat)
    return np.expand_dims(out, axes) if keepdims else out


def exact_vector_norm(a: np.ndarray, axis: Any = None, keepdims: bool = False) -> np.ndarray:
    """fl(sqrt(fl(sum a_i^2))) with the squares' sum correctly rounded."""
    a = np.asarray(a, dtype=np.float64)
    p, e = two_product(a, a)
    axes_all = tuple(range(a.ndim)) if axis is None else ((axis,) if isinstance(axis, int) else tuple(axis))
    both = np.concatenate([p, e], axis=axes_all[-1] % a.ndim)
    return np.sqrt(exact_sum(both, axis=axis, keepdims=keepdims))


class ExactArray(np.ndarray):
    """float64 NumPy array whose matmul, sum and vector norm are correctly rounded (see module doc)."""

    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Any:
        args = [np.asarray(a) if isinstance(a, ExactArray) else a for a in inputs]
        if "out" in kwargs:   # NumPy's own mean divides in place: elementwise, fine
            kwargs["out"] = tuple(None if o is None else plain(o) for o in kwargs["out"])
        floating = any(isinstance(a, np.ndarray) and a.dtype.kind == "f" for a in args)
        if ufunc is np.matmul and method == "__call__" and floating:
            return _wrap(exact_matmul(*args))
        if ufunc is np.add and method == "reduce" and floating:
            defaults = {"where": True, "initial": np._NoValue}
            unsupported = [k for k, v in kwargs.items() if k not in ("axis", "keepdims", "dtype")
                           and not (k == "out" and all(o is None for o in v)) and v is not defaults.get(k)]
            if unsupported:
                raise ConfigError(f"ExactArray sum does not support {sorted(unsupported)}")
            return _wrap(exact_sum(args[0], axis=kwargs.get("axis", 0), keepdims=kwargs.get("keepdims", False)))
        order_dependent = method in ("accumulate", "reduceat") or (
            method == "reduce" and ufunc not in (np.maximum, np.minimum, np.logical_and, np.logical_or))
        if floating and order_dependent:
            raise ConfigError(f"ExactArray refuses {ufunc.__name__}.{method}: not reproducible across machines")
        return _wrap(getattr(ufunc, method)(*args, **kwargs))

    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        if func.__name__ == "vector_norm" or (func.__name__ == "norm" and kwargs.get("ord") in (None, 2)
                                              and isinstance(kwargs.get("axis"), int)):
            if kwargs.get("ord", 2) not in (None, 2):
                raise ConfigError("ExactArray supports only the 2-norm")
            return _wrap(exact_vector_norm(args[0], axis=kwargs.get("axis"), keepdims=kwargs.get("keepdims", False)))
        if func.__name__ in _REFUSED or func.__name__ == "norm":
            raise ConfigError(f"ExactArray refuses numpy.{func.__name__}: not reproducible across machines")
        return super().__array_function__(func, types, args, kwargs)


def _wrap(result: Any) -> Any:
    if isinstance(result, tuple):
        return tuple(_wrap(r) for r in result)
    if isinstance(result, np.ndarray) and not isinstance(result, ExactArray):
        return result.view(ExactArray)
    return result


def exact_array(a: np.ndarray) -> ExactArray:
    """A float64 copy of `a` whose reductions are correctly rounded."""
    return np.array(a, dtype=np.float64, copy=True).view(ExactArray)


def plain(a: Any) -> np.ndarray:
    """Back to an ordinary NumPy array (None stays None)."""
    return None if a is None else np.asarray(a).view(np.ndarray)
