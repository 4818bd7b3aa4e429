"""LoKr for a linear layer: a Kronecker product of two small factors (Edalati et al. 2022, KronA / LyCORIS).

LoKr as HF PEFT 0.21 computes it (`tuners/lokr/layer.py`), for a layer with k inputs, d outputs:

    (d1, d2) = factorization(d, f),  (k1, k2) = factorization(k, f)      # d = d1 d2, k = k1 k2
    w1 (d1, k1) = lokr_w1,  or lokr_w1_a (d1, r) @ lokr_w1_b (r, k1)     # low-rank when decompose_both
    w2 (d2, k2) = lokr_w2,  or lokr_w2_a (d2, r) @ lokr_w2_b (r, k2)     #   and r < max(d1, k1) / 2 (w1),
                                                                       #   r < max(d2, k2) / 2 (w2)
    delta = s * kron(w1, w2)                     # (d, k);  s = alpha / r
    y = x W0^T + b + x delta^T                   # (n, d); no input dropout in PEFT

`factorization(n, f)` (`lokr_factorization`, PEFT's): with f > 0 dividing n, (f, n / f); otherwise
the divisor pair m <= n' of n closest to sqrt(n) with m <= f (f = -1: no limit), searched upward.

The Kronecker product is never formed: kron(w1, w2) x = vec(w1 X w2^T) for x = vec(X), X the
(k1, k2) row-major view of one row of x (k = i k2 + j). Rows flattened to n:

    X = reshape(x, (n, k1, k2))
    Z = X w2^T                                    # (n, k1, d2)   cached
    Y = w1 Z                                      # (n, d1, d2)   = X_n -> w1 X_n w2^T
    y = x W0^T + b + s * reshape(Y, (n, d))       # (n, d)

Backward, dY = s * reshape(dy, (n, d1, d2)):

    U   = w1^T dY                                 # (n, k1, d2)
    dX  = U w2                                    # (n, k1, k2)   dx = dy W0 + reshape(dX, (n, k))
    dw1 = sum_n dY_n Z_n^T                        # (d1, k1)      one (d1, n d2) x (n d2, k1) product
    dw2 = sum_n U_n^T X_n                         # (d2, k2)      one (d2, n k1) x (n k1, k2) product
    dw1_a = dw1 w1_b^T,  dw1_b = w1_a^T dw1       # when w1 is low-rank (the same for w2)
    dbias = sum_n dy                              # only when the bias is trainable

The cost is n (k1 k2 d2 + k1 d1 d2) = n (k d2 + d k1) multiply-adds per product instead of n d k, and
w1, w2 (d1 x k1, d2 x k2: about sqrt(d k) entries each) are the only matrices formed.
`lokr_delta_weight` forms kron(w1, w2), PEFT's order, for merging.

PEFT's `rank_dropout`, `rank_dropout_scale` and `module_dropout` act only in training mode and are not
modelled (treated as 0); conv layers (lokr_t2, `use_effective_conv2d`) are not supported.
Init (PEFT's init_weights=True): w1 = 0 (or w1_a = 0, w1_b Kaiming-uniform a = sqrt(5)); w2 (or
w2_a and w2_b) Kaiming-uniform, so delta = 0. ("lycoris" init is not reproduced.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from refpeft.adapter import ModuleAdapter
from refpeft.backend import check_float_array, dtype_name, namespace
from refpeft.errors import ConfigError, RankError, ShapeError
from refpeft.init import GENERATORS, as_parameter, kaiming_uniform_bound, torch_cpu_generator, torch_cpu_uniform, uniform
from refpeft.methods.linear import base_forward, base_input_grad, check_linear_inputs, flatten_rows, linear_shape
from refpeft.methods.spec import Method
from refpeft.tolerance import Bounded, Precision, add, either, exact, exact_or_none, gradient_bounds, matmul, \
    multiply, output_bound, row_sum, rows, scale, transpose, with_reference

FACTOR_NAMES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")


def lokr_factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m n = dimension, m <= n: PEFT's `factorization` (module docstring), step for step."""
    if dimension < 1:
        raise ShapeError(f"a layer dimension must be positive, got {dimension}")
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    if factor == -1:
        factor = dimension
    m, n = 1, dimension
    while m < n:
        new_m = m + 1
        while dimension % new_m != 0:
            new_m += 1
        new_n = dimension // new_m
        if new_m + new_n > m + n or new_m > factor:
            break
        m, n = new_m, new_n
    return (n, m) if m > n else (m, n)


@dataclass(frozen=True)
class LokrLayout:
    """The Kronecker factors' shapes PEFT builds for one layer, and which of them are low-rank."""

    w1: tuple[int, int]    # (d1, k1)
    w2: tuple[int, int]    # (d2, k2)
    w1_low_rank: bool
    w2_low_rank: bool


def lokr_layout(k: int, d: int, r: int, *, decompose_both: bool = False, decompose_factor: int = -1) -> LokrLayout:
    """PEFT's choice (LoKrLayer.update_layer): factor sizes, and w1 / w2 low-rank or full for rank r."""
    if r < 1:
        raise RankError(f"rank r must be at least 1, got {r}")
    d1, d2 = lokr_factorization(d, decompose_factor)
    k1, k2 = lokr_factorization(k, decompose_factor)
    return LokrLayout(w1=(d1, k1), w2=(d2, k2), w1_low_rank=decompose_both and r < max(d1, k1) / 2,
                      w2_low_rank=r < max(d2, k2) / 2)


def lokr_init(k: int, d: int, r: int, *, decompose_both: bool = False, decompose_factor: int = -1, seed: int = 0,
              generator: str = "numpy", dtype: str = "float64", xp: Any = None) -> dict[str, Any]:
    """Initial tensors by PEFT name for the layout `lokr_layout` picks (PEFT's init_weights=True).

    Kaiming-uniform (a = sqrt(5), fan_in = the second axis) for lokr_w1_b, lokr_w2 or lokr_w2_a and
    lokr_w2_b, in that order; zeros for lokr_w1 or lokr_w1_a. generator "torch-cpu" reproduces PEFT's
    draws after `torch.manual_seed(seed)` for one layer; "numpy" draws each from seed, seed + 1, ..."""
    if generator not in GENERATORS:
        raise ConfigError(f"unknown generator {generator!r}; choose one of {', '.join(GENERATORS)}")
    lay = lokr_layout(k, d, r, decompose_both=decompose_both, decompose_factor=decompose_factor)
    zeros = {"lokr_w1_a": (lay.w1[0], r)} if lay.w1_low_rank else {"lokr_w1": lay.w1}
    drawn = {"lokr_w1_b": (r, lay.w1[1])} if lay.w1_low_rank else {}
    drawn.update({"lokr_w2_a": (lay.w2[0], r), "lokr_w2_b": (r, lay.w2[1])} if lay.w2_low_rank else {"lokr_w2": lay.w2})
    stream = torch_cpu_generator(seed) if generator == "torch-cpu" else None
    tensors = {name: np.zeros(shape) for name, shape in zeros.items()}
    for i, (name, shape) in enumerate(drawn.items()):
        bound = kaiming_uniform_bound(shape[1])
        tensors[name] = uniform(shape, bound, seed=seed + i) if stream is None else \
            torch_cpu_uniform(shape, -bound, bound, bit_generator=stream)
    return {name: as_parameter(tensors[name], dtype=dtype, xp=xp) for name in FACTOR_NAMES if name in tensors}


def lokr_factors(tensors: Mapping[str, Any]) -> tuple[Any, Any]:
    """(w1, w2) from a module's tensors: each the full factor or its low-rank product; checks the combination."""
    xp = namespace(*(tensors[n] for n in FACTOR_NAMES if tensors.get(n) is not None))
    found = []
    for i in ("1", "2"):
        full, a, b = (tensors.get(f"lokr_w{i}{s}") for s in ("", "_a", "_b"))
        if (full is None) == (a is None and b is None) or (a is None) != (b is None):
            raise ConfigError(f"LoKr needs lokr_w{i}, or lokr_w{i}_a and lokr_w{i}_b (not both, not one of the pair)")
        for name, t in ((f"lokr_w{i}", full), (f"lokr_w{i}_a", a), (f"lokr_w{i}_b", b)):
            if t is not None:
                check_float_array(name, t, xp=xp)
                if len(t.shape) != 2:
                    raise ShapeError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
        if full is None and a.shape[1] != b.shape[0]:
            raise RankError(f"lokr_w{i}_a {tuple(a.shape)} and lokr_w{i}_b {tuple(b.shape)} disagree on the rank")
        found.append(full if full is not None else xp.matmul(a, b))
    return found[0], found[1]


def lokr_rank(tensors: Mapping[str, Any]) -> int | None:
    """r as the low-rank factors show it; None when w1 and w2 are both full (then only the config tells)."""
    a = next((tensors[n] for n in ("lokr_w1_a", "lokr_w2_a") if tensors.get(n) is not None), None)
    return None if a is None else int(a.shape[1])


@dataclass(frozen=True)
class LokrCache:
    """What `lokr_backward` needs: the input, Z = X w2^T, the factors and w1, w2 (small, by reference)."""

    x: Any                 # (..., k)
    Z: Any                 # (n, k1, d2)
    W0: Any
    tensors: Mapping[str, Any]
    w1: Any                # (d1, k1)
    w2: Any                # (d2, k2)
    scaling: float
    fan_in_fan_out: bool
    bias_trainable: bool


@dataclass(frozen=True)
class LokrGrads:
    """Gradients with respect to the input and each factor the module has (None for those it has not)."""

    dx: Any
    dlokr_w1: Any = None     # (d1, k1)
    dlokr_w1_a: Any = None   # (d1, r)
    dlokr_w1_b: Any = None   # (r, k1)
    dlokr_w2: Any = None     # (d2, k2)
    dlokr_w2_a: Any = None   # (d2, r)
    dlokr_w2_b: Any = None   # (r, k2)
    dbias: Any = None        # (d,) when the bias is trainable


def lokr_forward(x: Any, W0: Any, tensors: Mapping[str, Any], *, scaling: float, bias: Any = None,
                 fan_in_fan_out: bool = False, bias_trainable: bool = False) -> tuple[Any, LokrCache]:
    """y = x W0^T + b + s x kron(w1, w2)^T, as s vec(w1 X w2^T) per row (module docstring)."""
    present = {n: t for n, t in tensors.items() if t is not None}
    xp, shape = check_linear_inputs(x, W0, bias=bias, fan_in_fan_out=fan_in_fan_out, **present)
    w1, w2 = lokr_factors(present)
    (d1, k1), (d2, k2) = w1.shape, w2.shape
    if (d1 * d2, k1 * k2) != (shape.d, shape.k):
        raise ShapeError(f"kron(w1 {tuple(w1.shape)}, w2 {tuple(w2.shape)}) is ({d1 * d2}, {k1 * k2}); the layer "
                         f"has d = {shape.d}, k = {shape.k}")
    if bias_trainable and bias is None:
        raise ConfigError("bias_trainable=True needs a bias")
    x2 = flatten_rows(x, xp=xp)                                        # (n, k)
    X = xp.reshape(x2, (-1, k1, k2))                                   # (n, k1, k2)
    Z = xp.matmul(X, xp.matrix_transpose(w2))                          # (n, k1, d2)
    Y = xp.matmul(w1, Z)                                               # (n, d1, d2)
    y = base_forward(x2, W0, bias, fan_in_fan_out=fan_in_fan_out, xp=xp) + \
        xp.reshape(Y, (-1, shape.d)) * scaling                         # (n, d)
    cache = LokrCache(x=x, Z=Z, W0=W0, tensors=present, w1=w1, w2=w2, scaling=scaling,
                      fan_in_fan_out=fan_in_fan_out, bias_trainable=bias_trainable)
    return xp.reshape(y, (*x.shape[:-1], shape.d)), cache


def lokr_backward(dy: Any, cache: LokrCache) -> LokrGrads:
    """dx and each present factor's gradient (and dbias when trainable); see the module docstring."""
    xp = namespace(dy, cache.x)
    (d1, k1), (d2, k2) = cache.w1.shape, cache.w2.shape
    check_float_array("dy", dy, xp=xp, shape=(*cache.x.shape[:-1], d1 * d2))
    g2 = flatten_rows(dy, xp=xp)                                       # (n, d)
    dY = xp.reshape(g2, (-1, d1, d2)) * cache.scaling                  # (n, d1, d2)
    X = xp.reshape(flatten_rows(cache.x, xp=xp), (-1, k1, k2))         # (n, k1, k2)  a view, recomputed
    U = xp.matmul(xp.matrix_transpose(cache.w1), dY)                   # (n, k1, d2)
    dX = xp.matmul(U, cache.w2)                                        # (n, k1, k2)
    dw1 = xp.matmul(xp.reshape(xp.permute_dims(dY, (1, 0, 2)), (d1, -1)),
                    xp.matrix_transpose(xp.reshape(xp.permute_dims(cache.Z, (1, 0, 2)), (k1, -1))))   # (d1, k1)
    dw2 = xp.matmul(xp.matrix_transpose(xp.reshape(U, (-1, d2))), xp.reshape(X, (-1, k2)))           # (d2, k2)
    grads: dict[str, Any] = {}
    for i, dw in (("1", dw1), ("2", dw2)):
        t = cache.tensors
        if f"lokr_w{i}" in t:
            grads[f"dlokr_w{i}"] = dw
        else:
            grads[f"dlokr_w{i}_a"] = xp.matmul(dw, xp.matrix_transpose(t[f"lokr_w{i}_b"]))
            grads[f"dlokr_w{i}_b"] = xp.matmul(xp.matrix_transpose(t[f"lokr_w{i}_a"]), dw)
    dx = base_input_grad(g2, cache.W0, fan_in_fan_out=cache.fan_in_fan_out, xp=xp) + xp.reshape(dX, (-1, k1 * k2))
    dbias = xp.sum(g2, axis=0) if cache.bias_trainable else None
    return LokrGrads(dx=xp.reshape(dx, cache.x.shape), dbias=dbias, **grads)


def lokr_delta_weight(tensors: Mapping[str, Any], *, scaling: float, fan_in_fan_out: bool = False) -> Any:
    """s kron(w1, w2), (d, k) or (k, d) with fan_in_fan_out: PEFT's `make_kron`. Forms d x k."""
    w1, w2 = lokr_factors({n: t for n, t in tensors.items() if t is not None})
    xp = namespace(w1, w2)
    (d1, k1), (d2, k2) = w1.shape, w2.shape
    kron = xp.reshape(w1[:, None, :, None] * w2[None, :, None, :], (d1 * d2, k1 * k2))
    delta = kron * scaling
    return xp.matrix_transpose(delta) if fan_in_fan_out else delta


def lokr_merge(W0: Any, tensors: Mapping[str, Any], *, scaling: float, fan_in_fan_out: bool = False) -> Any:
    """W0 + s kron(w1, w2) in W0's layout."""
    return W0 + _checked_delta(W0, tensors, scaling=scaling, fan_in_fan_out=fan_in_fan_out)


def lokr_unmerge(W: Any, tensors: Mapping[str, Any], *, scaling: float, fan_in_fan_out: bool = False) -> Any:
    """W - s kron(w1, w2): the frozen weight back (exact up to one rounding per entry)."""
    return W - _checked_delta(W, tensors, scaling=scaling, fan_in_fan_out=fan_in_fan_out)


def lokr_parameter_count(layout: LokrLayout, r: int, *, bias: bool = False) -> int:
    """Trainable entries of one LoKr layer: each factor full (d_i k_i) or low-rank (r (d_i + k_i))."""
    return sum(r * (di + ki) if low else di * ki
               for (di, ki), low in ((layout.w1, layout.w1_low_rank), (layout.w2, layout.w2_low_rank))) + \
        (layout.w1[0] * layout.w2[0] if bias else 0)


def _checked_delta(W: Any, tensors: Mapping[str, Any], *, scaling: float, fan_in_fan_out: bool) -> Any:
    delta = lokr_delta_weight(tensors, scaling=scaling, fan_in_fan_out=fan_in_fan_out)
    check_float_array("W", W, xp=namespace(W, delta), shape=tuple(delta.shape))
    return delta


# --- error bounds (composed from refpeft.tolerance's algebra; docs/tolerance.md) ---------------


def _factor_bound(tensors: Mapping[str, Any], i: str, p: Precision) -> Bounded:
    if tensors.get(f"lokr_w{i}") is not None:
        return exact(tensors[f"lokr_w{i}"])
    return matmul(exact(tensors[f"lokr_w{i}_a"]), exact(tensors[f"lokr_w{i}_b"]), p)


def _permuted(P: Bounded, order: tuple[int, ...]) -> Bounded:
    xp = namespace(P.value)
    return Bounded(xp.permute_dims(P.value, order), xp.permute_dims(P.error, order))


def _reshaped(P: Bounded, shape: tuple[int, ...]) -> Bounded:
    xp = namespace(P.value)
    return Bounded(xp.reshape(P.value, shape), xp.reshape(P.error, shape))


def _lokr_delta_bound(tensors: Mapping[str, Any], scaling: float, p: Precision) -> Bounded:
    w1, w2 = _factor_bound(tensors, "1", p), _factor_bound(tensors, "2", p)
    (d1, k1), (d2, k2) = w1.value.shape, w2.value.shape
    outer = multiply(_reshaped(w1, (d1, 1, k1, 1)), _reshaped(w2, (1, d2, 1, k2)), p)
    return scale(_reshaped(outer, (d1 * d2, k1 * k2)), scaling, p)


def lokr_forward_bound(x: Any, W0: Any, tensors: Mapping[str, Any], *, scaling: float, bias: Any = None,
                       fan_in_fan_out: bool = False, dtype: str = "float32", accumulation: str | None = None,
                       model: str = "rigorous") -> Any:
    """Per-element bound on LoKr's y, refpeft's reshaped order or PEFT's (form delta, then x delta^T)."""
    tensors = {n: t for n, t in tensors.items() if t is not None}

    def chain(p: Precision) -> Bounded:
        x2 = rows(exact(x))
        base = matmul(x2, exact(W0) if fan_in_fan_out else transpose(exact(W0)), p, bias=exact_or_none(bias))
        w1, w2 = _factor_bound(tensors, "1", p), _factor_bound(tensors, "2", p)
        (d1, k1), (d2, k2) = w1.value.shape, w2.value.shape
        Z = matmul(_reshaped(x2, (-1, k1, k2)), transpose(w2), p)                        # (n, k1, d2)
        Yt = matmul(_permuted(Z, (0, 2, 1)), transpose(w1), p, scale=scaling)            # (n, d2, d1)
        ours = add(base, _reshaped(_permuted(Yt, (0, 2, 1)), (-1, d1 * d2)), p)
        peft = add(base, matmul(x2, transpose(_lokr_delta_bound(tensors, scaling, p)), p), p)
        return either(ours, peft)

    return output_bound(chain, Precision(dtype, accumulation, model), x_shape=tuple(x.shape))


def lokr_backward_bound(dy: Any, x: Any, W0: Any, tensors: Mapping[str, Any], *, scaling: float,
                        fan_in_fan_out: bool = False, bias_trainable: bool = False, dtype: str = "float32",
                        accumulation: str | None = None, model: str = "rigorous") -> dict[str, Any]:
    """Per-element bounds on `lokr_backward`'s gradients, each the larger of refpeft's reshaped order and
    PEFT's autograd (dDelta = s dy^T x formed, then torch.kron's backward: dw1[i, j] = sum_pq dDelta
    block (i, j) ⊙ w2, dw2 = sum_ij of the blocks times w1[i, j]; dx = dy W0 + dy Delta)."""
    tensors = {n: t for n, t in tensors.items() if t is not None}

    def chain(p: Precision) -> dict[str, Bounded]:
        x2, g2 = rows(exact(x)), rows(exact(dy))
        w1, w2 = _factor_bound(tensors, "1", p), _factor_bound(tensors, "2", p)
        (d1, k1), (d2, k2) = w1.value.shape, w2.value.shape
        X = _reshaped(x2, (-1, k1, k2))
        dY = _reshaped(scale(g2, scaling, p), (-1, d1, d2))                                   # (n, d1, d2)
        Z = matmul(X, transpose(w2), p)                                                       # (n, k1, d2)
        Ut = matmul(_permuted(dY, (0, 2, 1)), w1, p)                                          # (n, d2, k1)  U^T
        ours = {"dx": _reshaped(matmul(_permuted(Ut, (0, 2, 1)), w2, p), (-1, k1 * k2)),
                "w1": matmul(_reshaped(_permuted(dY, (1, 0, 2)), (d1, -1)),
                             transpose(_reshaped(_permuted(Z, (1, 0, 2)), (k1, -1))), p),
                "w2": matmul(transpose(_reshaped(_permuted(Ut, (0, 2, 1)), (-1, d2))), _reshaped(X, (-1, k2)), p)}
        D = _reshaped(matmul(transpose(g2), x2, p, scale=scaling), (d1, d2, k1, k2))          # s dy^T x
        blocks = _reshaped(_permuted(D, (1, 3, 0, 2)), (d2 * k2, d1 * k1))                    # [(p, q), (i, j)]
        peft = {"dx": matmul(g2, _lokr_delta_bound(tensors, scaling, p), p),
                "w1": _reshaped(row_sum(multiply(blocks, _reshaped(w2, (-1, 1)), p), p), (d1, k1)),
                "w2": _reshaped(row_sum(multiply(transpose(blocks), _reshaped(w1, (-1, 1)), p), p), (d2, k2))}
        W0_rows = transpose(exact(W0)) if fan_in_fan_out else exact(W0)
        grads = {"dx": add(matmul(g2, W0_rows, p), either(ours["dx"], peft["dx"]), p)}
        for i in ("1", "2"):
            dw = either(ours[f"w{i}"], peft[f"w{i}"])
            if f"lokr_w{i}" in tensors:
                grads[f"dlokr_w{i}"] = dw
            else:
                grads[f"dlokr_w{i}_a"] = matmul(dw, transpose(exact(tensors[f"lokr_w{i}_b"])), p)
                grads[f"dlokr_w{i}_b"] = matmul(transpose(exact(tensors[f"lokr_w{i}_a"])), dw, p)
        if bias_trainable:
            grads["dbias"] = row_sum(g2, p)
        return grads

    return gradient_bounds(chain, Precision(dtype, accumulation, model), x_shape=tuple(x.shape))


def lokr_merge_bound(W0: Any, tensors: Mapping[str, Any], *, scaling: float, fan_in_fan_out: bool = False,
                     dtype: str = "float32", accumulation: str | None = None, model: str = "rigorous",
                     unmerge: bool = False) -> Any:
    """Per-element bound on W0 + s kron(w1, w2) (or W - ... with unmerge=True), PEFT's order, W0's layout."""
    tensors = {n: t for n, t in tensors.items() if t is not None}

    def chain(p: Precision) -> Bounded:
        delta = _lokr_delta_bound(tensors, -scaling if unmerge else scaling, p)
        return add(exact(W0), transpose(delta) if fan_in_fan_out else delta, p)

    return with_reference(chain, Precision(dtype, accumulation, model))


# --- the method table's row (refpeft.methods.spec) ---------------------------------------------


def _module_rank(m: Any) -> int:
    r = lokr_rank(m.tensors)
    if r is None:
        r = m.rank
    if r is None:
        raise ConfigError("a LoKr module with full lokr_w1 and lokr_w2 does not show its rank; give it rank=r")
    return r


def _module_size(m: Any, axis: int) -> int:
    w1, w2 = lokr_factors(m.tensors)
    return int(w1.shape[axis] * w2.shape[axis])


def _module_forward(x: Any, W0: Any, m: Any, *, shared: Any = None, bias: Any = None, dropout_mask: Any = None,
                    bias_trainable: bool = False) -> tuple[Any, LokrCache]:
    if dropout_mask is not None:
        raise ConfigError("LoKr has no input dropout in PEFT (its rank_dropout / module_dropout are not modelled); "
                          "pass dropout_mask=None")
    return lokr_forward(x, W0, m.tensors, scaling=m.scaling, bias=bias, fan_in_fan_out=m.fan_in_fan_out,
                        bias_trainable=bias_trainable)


def _module_init(W0s: Mapping[str, Any], *, ranks: Mapping[str, int], alphas: Mapping[str, float], seed: int = 0,
                 generator: str = "numpy", decompose_both: bool = False,
                 decompose_factor: int = -1) -> tuple[dict, dict, dict]:
    """Fresh LoKr modules (PEFT's init_weights=True) on the layers W0s (d, k): layer i from seed + i."""
    modules = {}
    for i, (path, W0) in enumerate(W0s.items()):
        xp = namespace(W0)
        shape = linear_shape(W0, fan_in_fan_out=False)
        tensors = lokr_init(shape.k, shape.d, ranks[path], decompose_both=decompose_both,
                            decompose_factor=decompose_factor, seed=seed + i, generator=generator,
                            dtype=dtype_name(W0.dtype, xp=xp), xp=xp)
        modules[path] = ModuleAdapter("lokr", tensors, alpha=alphas[path], rank=ranks[path])
    return modules, {}, {"decompose_both": decompose_both, "decompose_factor": decompose_factor}


def lokr_config_options(modules: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any]:
    """decompose_both and decompose_factor with which PEFT rebuilds exactly these modules' factor shapes;
    ConfigError when no such setting exists (decompose_factor from `config`, default -1)."""
    factor = int(config.get("decompose_factor", -1))
    low_rank_w1 = {p: m.lokr_w1_a is not None for p, m in modules.items()}
    decompose_both = any(low_rank_w1.values())
    for path, m in modules.items():
        w1, w2 = lokr_factors(m.tensors)
        k, d = w1.shape[1] * w2.shape[1], w1.shape[0] * w2.shape[0]
        lay = lokr_layout(k, d, m.r, decompose_both=decompose_both, decompose_factor=factor)
        ours = LokrLayout(w1=tuple(w1.shape), w2=tuple(w2.shape), w1_low_rank=low_rank_w1[path],
                          w2_low_rank=m.lokr_w2_a is not None)
        if ours != lay:
            raise ConfigError(f"LoKr module {path!r} has factors {ours}, but PEFT builds {lay} for k = {k}, d = {d}, "
                              f"r = {m.r}, decompose_both = {decompose_both}, decompose_factor = {factor}")
    return {"decompose_both": decompose_both, "decompose_factor": factor}


def _module_branch(W0: Any, m: Any, *, shared: Any = None) -> tuple[Any, Any, Any]:
    """The exporter's "kronecker" inputs: w1 (d1, k1), w2^T (k2, d2) (low-rank factors multiplied out) and s (1,)."""
    w1, w2 = lokr_factors(m.tensors)
    xp = namespace(w1, w2)
    return w1, xp.matrix_transpose(w2), xp.asarray([m.scaling], dtype=w1.dtype)


LOKR = Method(
    name="lokr", summary="Kronecker product of two small factors, s kron(w1, w2), each full or low-rank (LyCORIS)",
    peft_type="LOKR", peft_flags={}, tensors={}, optional={name: name for name in FACTOR_NAMES},
    trainable=FACTOR_NAMES, per_output=(), scaled=True, mergeable=True, onnx_branch="kronecker",
    rank=_module_rank, out_features=lambda m: _module_size(m, 0), in_features=lambda m: _module_size(m, 1),
    forward=_module_forward, backward=lokr_backward,
    delta_weight=lambda W0, m, *, shared=None: lokr_delta_weight(m.tensors, scaling=m.scaling,
                                                                 fan_in_fan_out=m.fan_in_fan_out),
    merge=lambda W0, m, *, shared=None: lokr_merge(W0, m.tensors, scaling=m.scaling, fan_in_fan_out=m.fan_in_fan_out),
    unmerge=lambda W, m, *, shared=None: lokr_unmerge(W, m.tensors, scaling=m.scaling,
                                                      fan_in_fan_out=m.fan_in_fan_out),
    parameter_count=lambda k, d, m: sum(int(np.prod(t.shape)) for t in m.tensors.values()),
    branch_values=_module_branch, init_modules=_module_init,
    config_options=lokr_config_options,
)
