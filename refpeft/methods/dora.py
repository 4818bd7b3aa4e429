"""DoRA for a linear layer: magnitude init, forward, detached and exact backward, merge (Liu et al. 2024).

DoRA ("Weight-Decomposed Low-Rank Adaptation", arXiv 2402.09353) splits the adapted weight into a
trainable per-row magnitude m and a direction V = W0 + s B A whose rows are normalised:

    W' = diag(m / nu) V,       nu_i = ||V_i|| = ||W0_i + s (B A)_i||      (norm over the input axis)

Layout as in refpeft.methods.lora (A is (r, k), B is (d, r), W0 is (d, k) or (k, d) with fan_in_fan_out;
shapes at line ends, n rows after flattening the batch). Forward, in HF PEFT's form (base output
plus a correction; `tuners/lora/dora.py`):

    xd = dropout(x) = x * mask                  # (n, k)
    xa = xd A^T                                  # (n, r)
    u  = xd W0^T                                 # (n, d)   = x W0^T (the base product) without dropout
    v  = xa B^T                                  # (n, d)
    g  = m / nu                                  # (d,)     nu computed here from the current A, B
    y  = x W0^T + b + (g - 1) * u + (g * v) * s  # (n, d)

Without dropout this is y = g * (x V^T) + b. With dropout PEFT recomputes u on the dropped input, so
the base term keeps the full x and only the correction sees the mask; refpeft does the same. Without
dropout PEFT takes u as fl(fl(x W0^T + b) - b), losing bits where |b| >> |x W0^T|; refpeft uses
x W0^T itself and gives PEFT's order as base_output="peft" (docs/dora.md measures both).

Backward, for dy = dL/dy (n, d). Let xv = u + s v = xd V^T (the direction's output before g):

    dg     = sum_n dy * xv                                           # (d,)
    dm     = dg / nu                                                 # (d,)
    gy     = s * (g * dy)                                            # (n, d)  dL/dv
    dB     = gy^T xa                                                 # (d, r)
    gb     = gy B                                                    # (n, r)  dL/d(xa)
    dA     = gb^T xd                                                 # (r, k)
    dx     = dy W0 + mask * (((g - 1) * dy) W0 + gb A)               # (n, k)
           = (g * dy) W0 + gb A                                      # without dropout
    dbias  = sum_n dy                                                # (d,)

That is the whole gradient in the default `gradient="detached"` mode: nu is treated as a constant,
as section 4.3 of the paper suggests and as PEFT does (`weight_norm.detach()`). The `"exact"` mode
also differentiates nu(A, B). With dL/dnu = dg * dg/dnu = -dg * g / nu and dnu_i/dV_i = V_i / nu_i,

    w      = -(dg * g) / nu^2                                        # (d,)    dL/dV = diag(w) V
    dB    += s * diag(w) V A^T = s * diag(w) (W0 A^T + s B (A A^T))  # (d, r)
    dA    += s * B^T diag(w) V = s * ((w B)^T W0 + s ((w B)^T B) A)   # (r, k)

(dm, dx and dbias are the same in both modes: m and x do not enter nu). The exact extra terms are
written with W0 A^T (d, r) and A A^T (r, r), so even the exact backward never forms B A.
docs/dora.md derives all of this and shows what the detached form drops.

The norm nu. refpeft forms V = W0 + s B A exactly as PEFT does, but in blocks of rows
(`NORM_BLOCK_ELEMENTS` entries at a time): O(block) memory instead of d x k, and each row's norm
from the same values PEFT sums. The expansion ||W0_i||^2 + 2 s (W0 A^T)_i . B_i + ... avoids B A
but loses accuracy where W0_i and s (B A)_i nearly cancel, for no fewer flops (docs/dora.md
measures it). A zero norm row has no direction: PEFT returns NaN/inf, refpeft raises NonFiniteError.

Merge: W' = diag(g) (W0 + s B A), with g = m / nu and nu computed from W0 (in W0's layout: with
fan_in_fan_out the columns are scaled). Unmerge needs that same nu: the merged weight's rows all
have norm |m_i| whatever nu was, so W0 cannot be recovered from W', m, A, B alone. PEFT caches nu at
merge time; here `dora_weight_norm` gives it and `dora_unmerge` takes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from refpeft.adapter import ModuleAdapter
from refpeft.backend import check_float_array, namespace
from refpeft.errors import ConfigError, NonFiniteError
from refpeft.methods.linear import base_forward, base_input_grad, check_linear_inputs, dropped_rows, flatten_rows, \
    linear_shape, weight_rows
from refpeft.methods.lora import LORA, check_dropout_mask, check_factors, lora_delta_weight, lora_init_factors, \
    lora_parameter_count, lora_scaling
from refpeft.methods.spec import Method
from refpeft.tolerance import Bounded, Precision, add, column, divide, either, exact, gradient_bounds, matmul, \
    multiply, output_bound, row_norm, row_sum, rows, scale, subtract, transpose, with_reference

GRADIENTS = ("detached", "exact")
BASE_OUTPUTS = ("exact", "peft")   # u = x W0^T, or PEFT's fl(fl(x W0^T + b) - b)

# Rows of V = W0 + s B A are formed this many entries at a time (at least one row): 4 MiB in float32,
# never d x k for large layers, and few enough blocks to cost nothing measurable (2^16 was slower).
NORM_BLOCK_ELEMENTS = 2**20


def dora_weight_norm(W0: Any, A: Any, B: Any, *, scaling: float, fan_in_fan_out: bool = False) -> Any:
    """nu = the row norms ||W0_i + s (B A)_i|| over the input axis, (d,), V formed blockwise; refuses a zero row."""
    xp = namespace(W0, A, B)
    shape = linear_shape(W0, fan_in_fan_out=fan_in_fan_out)
    for name, array in (("W0", W0), ("A", A), ("B", B)):
        check_float_array(name, array, xp=xp)
    check_factors(A, B, d=shape.d, k=shape.k)
    return _weight_norm(W0, A, B, scaling=scaling, fan_in_fan_out=fan_in_fan_out, xp=xp)


def dora_init(W0: Any, A: Any, B: Any, *, scaling: float, fan_in_fan_out: bool = False) -> Any:
    """m0 = ||W0 + s B A|| row-wise (d,), so that g = m / nu = 1 and DoRA starts as the LoRA it wraps
    (call it after lora_init; with B = 0, m0 = ||W0_i||)."""
    return dora_weight_norm(W0, A, B, scaling=scaling, fan_in_fan_out=fan_in_fan_out)


@dataclass(frozen=True)
class DoraCache:
    """What `dora_backward` needs: x, the mask, xa, xv = dropout(x) V^T, the norm, the parameters."""

    x: Any                 # (..., k)
    dropout_mask: Any      # (..., k) or None
    xa: Any                # (n, r)  dropout(x) A^T
    xv: Any                # (n, d)  dropout(x) (W0 + s B A)^T, built as u + s v (B A never formed)
    weight_norm: Any       # (d,)    nu
    magnitude: Any         # (d,)    m
    W0: Any
    A: Any
    B: Any
    scaling: float
    fan_in_fan_out: bool
    gradient: str
    bias_trainable: bool


@dataclass(frozen=True)
class DoraGrads:
    """Gradients of the loss with respect to the input and each trainable tensor."""

    dx: Any          # (..., k)
    dA: Any          # (r, k)
    dB: Any          # (d, r)
    dmagnitude: Any  # (d,)
    dbias: Any       # (d,) or None when the bias is frozen or absent


def dora_forward(x: Any, W0: Any, A: Any, B: Any, magnitude: Any, *, scaling: float, bias: Any = None,
                 dropout_mask: Any = None, fan_in_fan_out: bool = False, gradient: str = "detached",
                 weight_norm: Any = None, bias_trainable: bool = False,
                 base_output: str = "exact") -> tuple[Any, DoraCache]:
    """y = x W0^T + b + (g - 1) * (xd W0^T) + (g * (xd A^T) B^T) * s, g = m / ||W0 + s B A||.

    gradient: "detached" (default, PEFT's) treats the norm as a constant in `dora_backward`;
      "exact" differentiates it too.
    weight_norm: None computes nu from the current A and B (training). A given (d,) array is used
      as nu instead, frozen (PEFT's cached eval norm, or an exported fixed scale); it cannot be
      combined with gradient="exact", which needs nu to follow A and B.
    base_output: "exact" (default) or "peft", how u is formed without dropout (module docstring).
    """
    xp, shape = check_linear_inputs(x, W0, bias=bias, fan_in_fan_out=fan_in_fan_out, A=A, B=B,
                                    magnitude=magnitude, dropout_mask=dropout_mask, weight_norm=weight_norm)
    check_factors(A, B, d=shape.d, k=shape.k)
    check_dropout_mask(dropout_mask, x)
    check_float_array("magnitude", magnitude, xp=xp, shape=(shape.d,))
    if gradient not in GRADIENTS:
        raise ConfigError(f"unknown DoRA gradient mode {gradient!r}; choose one of {', '.join(GRADIENTS)}")
    if base_output not in BASE_OUTPUTS:
        raise ConfigError(f"unknown DoRA base_output {base_output!r}; choose one of {', '.join(BASE_OUTPUTS)}")
    if bias_trainable and bias is None:
        raise ConfigError("bias_trainable=True needs a bias")
    if weight_norm is None:
        nu = _weight_norm(W0, A, B, scaling=scaling, fan_in_fan_out=fan_in_fan_out, xp=xp)  # (d,)
    elif gradient == "exact":
        raise ConfigError("a given (frozen) weight_norm has no gradient; use gradient='detached' with it")
    else:
        check_float_array("weight_norm", weight_norm, xp=xp, shape=(shape.d,))
        _refuse_zero_rows(weight_norm, xp=xp)
        nu = weight_norm
    g = magnitude / nu                                                 # (d,)
    x2, _, xd = dropped_rows(x, dropout_mask, xp=xp)                # (n, k) each
    xw = base_forward(x2, W0, None, fan_in_fan_out=fan_in_fan_out, xp=xp)          # (n, d)
    u = xw if dropout_mask is None else base_forward(xd, W0, None, fan_in_fan_out=fan_in_fan_out, xp=xp)
    xa = xp.matmul(xd, xp.matrix_transpose(A))                         # (n, r)
    v = xp.matmul(xa, xp.matrix_transpose(B))                          # (n, d)
    base = xw if bias is None else xw + bias
    if base_output == "peft" and dropout_mask is None and bias is not None:
        u = base - bias                                                # PEFT: base_result - bias
    y = base + ((g - 1) * u + (g * v) * scaling)                      # (n, d)  PEFT's order
    cache = DoraCache(x=x, dropout_mask=dropout_mask, xa=xa, xv=u + v * scaling, weight_norm=nu,
                      magnitude=magnitude, W0=W0, A=A, B=B, scaling=scaling, fan_in_fan_out=fan_in_fan_out,
                      gradient=gradient, bias_trainable=bias_trainable)
    return xp.reshape(y, (*x.shape[:-1], shape.d)), cache


def dora_backward(dy: Any, cache: DoraCache) -> DoraGrads:
    """dx, dA, dB, dmagnitude (and dbias when trainable) from dy; see the module docstring."""
    xp = namespace(dy, cache.x)
    d = cache.B.shape[0]
    check_float_array("dy", dy, xp=xp, shape=(*cache.x.shape[:-1], d))
    s, nu, A, B = cache.scaling, cache.weight_norm, cache.A, cache.B
    g = cache.magnitude / nu                                           # (d,)
    g2 = flatten_rows(dy, xp=xp)                                       # (n, d)
    x2, mask, xd = dropped_rows(cache.x, cache.dropout_mask, xp=xp)    # xd recomputed, not cached
    dg = xp.sum(g2 * cache.xv, axis=0)                                 # (d,)
    dmagnitude = dg / nu                                               # (d,)
    gy = (g2 * g) * s                                                  # (n, d)
    dB = xp.matmul(xp.matrix_transpose(gy), cache.xa)                  # (d, r)
    gb = xp.matmul(gy, B)                                              # (n, r)
    dA = xp.matmul(xp.matrix_transpose(gb), xd)                        # (r, k)
    ffo = cache.fan_in_fan_out
    if mask is None:
        dx = base_input_grad(g2 * g, cache.W0, fan_in_fan_out=ffo, xp=xp)
        dx += xp.matmul(gb, A)                                         # in place into the fresh (n, k) product
    else:
        dxd = base_input_grad(g2 * (g - 1), cache.W0, fan_in_fan_out=ffo, xp=xp) + xp.matmul(gb, A)
        dx = base_input_grad(g2, cache.W0, fan_in_fan_out=ffo, xp=xp) + dxd * mask
    if cache.gradient == "exact":
        W = weight_rows(cache.W0, fan_in_fan_out=ffo, xp=xp)           # (d, k)
        w = -(dg * g) / (nu * nu)                                      # (d,)  dL/dV = diag(w) V
        wB = w[:, None] * B                                            # (d, r)
        WAt = xp.matmul(W, xp.matrix_transpose(A))                     # (d, r)  W0 A^T
        AAt = xp.matmul(A, xp.matrix_transpose(A))                     # (r, r)
        dB = dB + s * (w[:, None] * WAt + s * xp.matmul(wB, AAt))      # s diag(w) V A^T
        wBt = xp.matrix_transpose(wB)                                  # (r, d)
        dA = dA + s * (xp.matmul(wBt, W) + s * xp.matmul(xp.matmul(wBt, B), A))   # s B^T diag(w) V
    dbias = xp.sum(g2, axis=0) if cache.bias_trainable else None
    return DoraGrads(dx=xp.reshape(dx, cache.x.shape), dA=dA, dB=dB, dmagnitude=dmagnitude, dbias=dbias)


def dora_delta_weight(W0: Any, A: Any, B: Any, magnitude: Any, *, scaling: float,
                      fan_in_fan_out: bool = False) -> Any:
    """W' - W0 = diag(g) (W0 + s B A) - W0 in W0's layout, g = m / nu. Forms the d x k product."""
    return dora_merge(W0, A, B, magnitude, scaling=scaling, fan_in_fan_out=fan_in_fan_out) - W0


def dora_merge(W0: Any, A: Any, B: Any, magnitude: Any, *, scaling: float, fan_in_fan_out: bool = False) -> Any:
    """W' = diag(m / nu) (W0 + s B A) in W0's layout: the merged layer computes x W'^T + b."""
    xp, g = _merge_scale(W0, A, B, magnitude, scaling=scaling, fan_in_fan_out=fan_in_fan_out, weight_norm=None)
    V = W0 + lora_delta_weight(A, B, scaling=scaling, fan_in_fan_out=fan_in_fan_out)
    return _per_row(g, fan_in_fan_out=fan_in_fan_out) * V


def dora_unmerge(W: Any, A: Any, B: Any, magnitude: Any, *, scaling: float, weight_norm: Any,
                 fan_in_fan_out: bool = False) -> Any:
    """W0 = diag(nu / m) W' - s B A, with nu = `dora_weight_norm` of the unmerged W0 (taken before merging).

    Exact up to a few roundings per entry; a zero magnitude m_i erased row i and is refused.
    """
    xp, g = _merge_scale(W, A, B, magnitude, scaling=scaling, fan_in_fan_out=fan_in_fan_out,
                         weight_norm=weight_norm)
    zero = magnitude == 0
    if bool(xp.any(zero)):
        rows = [int(i) for i in xp.nonzero(zero)[0][:8]]
        raise NonFiniteError(f"magnitude is zero in row(s) {rows}: the merge erased them, W0 cannot be recovered")
    V = W / _per_row(g, fan_in_fan_out=fan_in_fan_out)               # PEFT: W / dora_factor
    return V - lora_delta_weight(A, B, scaling=scaling, fan_in_fan_out=fan_in_fan_out)


def dora_parameter_count(k: int, d: int, r: int, *, bias: bool = False) -> int:
    """Trainable parameters of one DoRA layer: LoRA's r (d + k) plus the d magnitudes (plus d for a bias)."""
    return lora_parameter_count(k, d, r, bias=bias) + d


def _weight_norm(W0: Any, A: Any, B: Any, *, scaling: float, fan_in_fan_out: bool, xp: Any) -> Any:
    """Row norms of V = W0 + s B A, V formed NORM_BLOCK_ELEMENTS at a time; refuses zero rows."""
    W = weight_rows(W0, fan_in_fan_out=fan_in_fan_out, xp=xp)         # (d, k)
    d, k = W.shape
    rows = max(1, NORM_BLOCK_ELEMENTS // k)
    norms = []
    for start in range(0, d, rows):
        stop = min(start + rows, d)
        V = W[start:stop, :] + scaling * xp.matmul(B[start:stop, :], A)   # (rows, k)  PEFT's W + s * (B A)
        norms.append(xp.linalg.vector_norm(V, axis=1))
    nu = norms[0] if len(norms) == 1 else xp.concat(norms)             # (d,)
    if not bool(xp.all(xp.isfinite(nu))):
        raise NonFiniteError("the DoRA weight norm ||W0 + s B A|| overflowed in this dtype")
    _refuse_zero_rows(nu, xp=xp)
    return nu


def _refuse_zero_rows(nu: Any, *, xp: Any) -> None:
    zero = nu == 0
    if bool(xp.any(zero)):
        count = int(xp.sum(xp.astype(zero, xp.int64)))
        rows = [int(i) for i in xp.nonzero(zero)[0][:8]]
        raise NonFiniteError(
            f"the DoRA weight norm ||W0 + s B A|| is zero in {count} row(s), first {rows}: such a row has no "
            "direction to normalise (m / 0); give W0 (or the adapter) a non-zero value there")


def _merge_scale(W: Any, A: Any, B: Any, magnitude: Any, *, scaling: float, fan_in_fan_out: bool,
                 weight_norm: Any) -> tuple[Any, Any]:
    """Check a merge's inputs; return the namespace and g = m / nu (nu computed from W when not given)."""
    xp = namespace(W, A, B, magnitude, weight_norm)
    shape = linear_shape(W, fan_in_fan_out=fan_in_fan_out)
    for name, array in (("W", W), ("A", A), ("B", B)):
        check_float_array(name, array, xp=xp)
    check_factors(A, B, d=shape.d, k=shape.k)
    check_float_array("magnitude", magnitude, xp=xp, shape=(shape.d,))
    if weight_norm is None:
        weight_norm = _weight_norm(W, A, B, scaling=scaling, fan_in_fan_out=fan_in_fan_out, xp=xp)
    else:
        check_float_array("weight_norm", weight_norm, xp=xp, shape=(shape.d,))
        _refuse_zero_rows(weight_norm, xp=xp)
    return xp, magnitude / weight_norm


def _per_row(g: Any, *, fan_in_fan_out: bool) -> Any:
    """g (d,) shaped to broadcast over the rows of the (d, k) view: (d, 1), or (d,) when W is stored (k, d)."""
    return g if fan_in_fan_out else g[:, None]


# --- error bounds (composed from refpeft.tolerance's algebra; docs/tolerance.md) ---------------


def _dora_norm(W0: Any, A: Any, B: Any, *, scaling: float, fan_in_fan_out: bool, p: Precision) -> tuple[Bounded, Bounded]:
    """V = W0 + s B A (d, k) and its row norms n (d,), each with its error."""
    W_rows = transpose(exact(W0)) if fan_in_fan_out else exact(W0)
    V = add(W_rows, matmul(exact(B), exact(A), p, scale=scaling), p)
    return V, row_norm(V, p)


def dora_error_chain(x: Any, W0: Any, A: Any, B: Any, magnitude: Any, *, scaling: float, bias: Any, dropout_mask: Any,
                     fan_in_fan_out: bool, p: Precision) -> dict[str, Bounded]:
    """y = x W0^T + b + (g - 1) * u + (g * v) * s with g = m / n, u = xd W0^T, v = (xd A^T) B^T;
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
    return {"y": add(base, correction, p), "g": g, "g_minus_1": g_minus_1, "n": n, "u": u, "v": v, "xa": xa, "xd": xd}


def dora_forward_bound(x: Any, W0: Any, A: Any, B: Any, magnitude: Any, *, scaling: float, bias: Any = None,
                       dropout_mask: Any = None, fan_in_fan_out: bool = False, dtype: str = "float32",
                       accumulation: str | None = None, model: str = "rigorous") -> Any:
    """Per-element bound on DoRA's y (`dora_forward`, PEFT's order), (..., d)."""
    chain = lambda p: dora_error_chain(x, W0, A, B, magnitude, scaling=scaling, bias=bias, dropout_mask=dropout_mask,  # noqa: E731
                                  fan_in_fan_out=fan_in_fan_out, p=p)["y"]
    return output_bound(chain, Precision(dtype, accumulation, model), x_shape=tuple(x.shape))


def dora_backward_bound(dy: Any, x: Any, W0: Any, A: Any, B: Any, magnitude: Any, *, scaling: float,
                        bias: Any = None, dropout_mask: Any = None, fan_in_fan_out: bool = False,
                        gradient: str = "detached", bias_trainable: bool = False, dtype: str = "float32",
                        accumulation: str | None = None, model: str = "rigorous") -> dict[str, Any]:
    """Per-element bounds on dx, dA, dB, dmagnitude (dbias) of `dora_backward`.

    Covers PEFT's autograd order where it differs: dg as one sum of dy * (u + s v) or as two sums,
    g * dy * s in either association, and the base path as (g dy) W0 or (dy + (g - 1) dy) W0."""
    def chain(p: Precision) -> dict[str, Bounded]:
        f = dora_error_chain(x, W0, A, B, magnitude, scaling=scaling, bias=bias, dropout_mask=dropout_mask,
                        fan_in_fan_out=fan_in_fan_out, p=p)
        g, g_minus_1, n, u, v, xa, xd = f["g"], f["g_minus_1"], f["n"], f["u"], f["v"], f["xa"], f["xd"]
        g2 = rows(exact(dy))
        sv = scale(v, scaling, p)
        dg = either(row_sum(multiply(g2, add(u, sv, p), p), p),
                    add(row_sum(multiply(g2, u, p), p), row_sum(multiply(g2, sv, p), p), p))
        gy = either(scale(multiply(g2, g, p), scaling, p), multiply(scale(g2, scaling, p), g, p))
        dB = matmul(transpose(gy), xa, p)
        gb = matmul(gy, exact(B), p)
        dA = matmul(transpose(gb), xd, p)
        W0_rows = transpose(exact(W0)) if fan_in_fan_out else exact(W0)            # (d, k)
        if dropout_mask is None:
            base = either(matmul(multiply(g2, g, p), W0_rows, p),
                          matmul(add(g2, multiply(g2, g_minus_1, p), p), W0_rows, p))
            dx = add(base, matmul(gb, exact(A), p), p)
        else:
            dxd = add(matmul(multiply(g2, g_minus_1, p), W0_rows, p), matmul(gb, exact(A), p), p)
            dx = add(matmul(g2, W0_rows, p), multiply(dxd, rows(exact(dropout_mask)), p), p)
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
        grads = {"dx": dx, "dmagnitude": divide(dg, n, p), "dA": dA, "dB": dB}
        if bias_trainable:
            grads["dbias"] = row_sum(g2, p)
        return grads

    return gradient_bounds(chain, Precision(dtype, accumulation, model), x_shape=tuple(x.shape))


def dora_merge_bound(W0: Any, A: Any, B: Any, magnitude: Any, *, scaling: float, fan_in_fan_out: bool = False,
                     dtype: str = "float32", accumulation: str | None = None, model: str = "rigorous") -> Any:
    """Per-element bound on W' = diag(m / n) (W0 + s B A), in W0's layout."""
    def chain(p: Precision) -> Bounded:
        V, n = _dora_norm(W0, A, B, scaling=scaling, fan_in_fan_out=fan_in_fan_out, p=p)
        merged = multiply(column(divide(exact(magnitude), n, p)), V, p)
        return transpose(merged) if fan_in_fan_out else merged

    return with_reference(chain, Precision(dtype, accumulation, model))


def dora_unmerge_bound(W: Any, A: Any, B: Any, magnitude: Any, weight_norm: Any, *, scaling: float,
                       fan_in_fan_out: bool = False, dtype: str = "float32", accumulation: str | None = None,
                       model: str = "rigorous") -> Any:
    """Per-element bound on W0 = W / (m / n) - s B A with the cached norm n given (PEFT's unmerge)."""
    def chain(p: Precision) -> Bounded:
        g = divide(exact(magnitude), exact(weight_norm), p)                          # (d,)
        W_rows = transpose(exact(W)) if fan_in_fan_out else exact(W)                 # (d, k)
        W0 = subtract(divide(W_rows, column(g), p), matmul(exact(B), exact(A), p, scale=scaling), p)
        return transpose(W0) if fan_in_fan_out else W0

    return with_reference(chain, Precision(dtype, accumulation, model))


# --- the method table's row (refpeft.methods.spec) ---------------------------------------------


def _module_forward(x: Any, W0: Any, module: Any, *, shared: Any = None, **options: Any) -> tuple[Any, DoraCache]:
    return dora_forward(x, W0, module.A, module.B, module.magnitude, scaling=module.scaling,
                        fan_in_fan_out=module.fan_in_fan_out, **options)


def _module_init(W0s: Mapping[str, Any], *, ranks: Mapping[str, int], alphas: Mapping[str, float], seed: int = 0,
                 generator: str = "numpy", rslora: bool = False) -> tuple[dict, dict, dict]:
    modules = {}                           # LoRA's fresh factors and m = ||W0 + s B A|| (= ||W0||, B = 0)
    for path, (A, B) in lora_init_factors(W0s, ranks=ranks, seed=seed, generator=generator).items():
        s = lora_scaling(alphas[path], ranks[path], rslora=rslora)
        modules[path] = ModuleAdapter("dora", {"A": A, "B": B, "magnitude": dora_init(W0s[path], A, B, scaling=s)},
                                      alpha=alphas[path], rslora=rslora)
    return modules, {}, {}


def _module_branch(W0: Any, module: Any, *, shared: Any = None) -> tuple[Any, ...]:
    """LoRA's branch inputs, plus the fixed per-row scale g = m / ||W0 + s B A||: y = g (x W0^T + s (x A^T) B^T)."""
    nu = dora_weight_norm(W0, module.A, module.B, scaling=module.scaling, fan_in_fan_out=module.fan_in_fan_out)
    return (*LORA.branch_values(W0, module), module.magnitude / nu)


DORA = Method(
    name="dora", summary="magnitude m times the normalised direction W0 + s B A (Liu et al. 2024)",
    peft_type="LORA", peft_flags={"use_dora": True},
    tensors={"A": "lora_A.weight", "B": "lora_B.weight", "magnitude": "lora_magnitude_vector"},
    trainable=("A", "B", "magnitude"), per_output=("B", "magnitude"), scaled=True, mergeable=True,
    onnx_branch="low-rank-rescaled",
    rank=LORA.rank, out_features=LORA.out_features, in_features=LORA.in_features,
    forward=_module_forward, backward=dora_backward,
    delta_weight=lambda W0, m, *, shared=None: dora_delta_weight(W0, m.A, m.B, m.magnitude, scaling=m.scaling,
                                                                 fan_in_fan_out=m.fan_in_fan_out),
    merge=lambda W0, m, *, shared=None: dora_merge(W0, m.A, m.B, m.magnitude, scaling=m.scaling,
                                                   fan_in_fan_out=m.fan_in_fan_out),
    unmerge=lambda W, m, *, shared=None, weight_norm: dora_unmerge(W, m.A, m.B, m.magnitude, scaling=m.scaling,
                                                                   weight_norm=weight_norm,
                                                                   fan_in_fan_out=m.fan_in_fan_out),
    parameter_count=lambda k, d, m: dora_parameter_count(k, d, m.r),
    branch_values=_module_branch, init_modules=_module_init,
)
