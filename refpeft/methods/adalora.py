"""AdaLoRA for a linear layer: an SVD-shaped low-rank update whose rank is pruned during training (Zhang et al. 2023).

AdaLoRA (ICLR 2023, openreview lq62uWRJjiY) as HF PEFT 0.21.2 computes it (`tuners/adalora/layer.py`
SVDLinear, PyTorch's layout: A is (r, k), E is (r, 1), B is (d, r)):

    delta = c / (ranknum + 1e-5) * B (A ⊙ E)      # (d, k);  P = B, Λ = diag(E), Q = A in the paper
    c     = lora_alpha if lora_alpha > 0 else r    # PEFT's `scaling`: alpha itself, not alpha / r
    s     = c / (ranknum + 1e-5)                   # ranknum = init_r, fixed (pruning zeroes E, not r)

Forward (rows of x flattened to n; xd = dropout(x) = x * mask, the mask holding 0 or 1/(1-p)):

    u = xd A^T                                    # (n, r)   cached
    v = u ⊙ E^T                                   # (n, r)   x (A ⊙ E)^T: E scales each of the r directions
    y = x W0^T + b + s * (v B^T)                  # (n, d)   PEFT: ((xd (A ⊙ E)^T) B^T) * c / (ranknum + eps)

Backward, for dy = dL/dy (n, d):

    g       = s * dy B                            # (n, r)   dL/dv
    dB      = s * dy^T v                          # (d, r)
    dE      = sum_n (g ⊙ u), as (r, 1)            # (r, 1)
    gu      = g ⊙ E^T                             # (n, r)   dL/du
    dA      = gu^T xd                             # (r, k)
    dx      = dy W0 + (gu A) * mask               # (n, k)
    dranknum = -sum(g ⊙ v) / (ranknum + 1e-5)     # (1,)     see below
    dbias   = sum_n dy                            # (d,)     only when the bias is trainable

PEFT 0.21.2 creates ranknum with requires_grad=False, but `set_adapter` then marks every tensor of
the adapter trainable, ranknum included: torch computes `dranknum` and an optimiser over
`requires_grad` parameters moves it. refpeft returns dranknum so a trainer can reproduce that; the
paper (and PEFT's intent) keeps ranknum fixed, and `adalora_parameter_count` counts r (k + d + 1),
without it (PEFT's `print_trainable_parameters` counts one more per layer).

The orthogonality regulariser (`tuners/adalora/model.py` AdaLoraModel.forward), added to the loss:

    R = w / N * sum_modules ( ||A A^T - I_r||_F + ||B^T B - I_r||_F )    # N = 2 * modules: one per A and B
    dR/dA = w / N * 2 (A A^T - I) A / ||A A^T - I||_F                    # (r, k)
    dR/dB = w / N * 2 B (B^T B - I) / ||B^T B - I||_F                    # (d, r)

The Frobenius norm itself, not its square (the paper writes the square); at ||.||_F = 0 the gradient
is taken as 0, torch's choice for the norm's subgradient. Masked triplets stay in A A^T and B^T B.

Init (PEFT's init_lora_weights=True): E = 0, A and B ~ N(0, 0.02^2), so delta = 0. refpeft draws them
from NumPy's generator: PEFT's torch.randn stream is not reproduced (the values differ, the law not).
The rank allocator (importance scores, budget schedule, masks) is refpeft.methods.adalora_allocator;
PEFT's files are refpeft.adalora_format. Conv layers (SVDConv2d) are not supported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from refpeft.adapter import ModuleAdapter
from refpeft.backend import check_float_array, dtype_name, namespace
from refpeft.errors import ConfigError, ShapeError
from refpeft.init import as_parameter, normal
from refpeft.methods.linear import base_forward, base_input_grad, check_linear_inputs, dropped_rows, flatten_rows, \
    linear_shape
from refpeft.methods.lora import check_dropout_mask
from refpeft.methods.spec import Method
from refpeft.tolerance import Bounded, Precision, add, column, either, exact, exact_or_none, gradient_bounds, \
    matmul, multiply, output_bound, row_sum, rows, transpose, with_reference

RANKNUM_EPS = 1e-5            # PEFT adds it to ranknum in forward and get_delta_weight
INIT_STD = 0.02               # PEFT's reset_lora_parameters: A, B ~ N(0, 0.02^2), E = 0
TENSOR_NAMES = ("lora_A", "lora_E", "lora_B")


def adalora_scaling(alpha: float, ranknum: float, r: int) -> float:
    """s = c / (ranknum + 1e-5), c = alpha when alpha > 0 else r (PEFT's `scaling` and its division)."""
    if not (math.isfinite(alpha) and math.isfinite(ranknum)):
        raise ConfigError(f"alpha and ranknum must be finite, got alpha={alpha}, ranknum={ranknum}")
    if ranknum + RANKNUM_EPS == 0:
        raise ConfigError(f"ranknum = {ranknum} makes ranknum + {RANKNUM_EPS} zero")
    return (alpha if alpha > 0 else float(r)) / (ranknum + RANKNUM_EPS)


def adalora_init(k: int, d: int, r: int, *, seed: int = 0, dtype: str = "float64",
                 xp: Any = None) -> tuple[Any, Any, Any]:
    """(A (r, k), E (r, 1), B (d, r)): A, B ~ N(0, 0.02^2) from PCG64 seeds seed, seed + 1; E = 0."""
    if r < 0:
        raise ConfigError(f"AdaLoRA's init_r must be 0 or more (PEFT allows 0), got {r}")
    A = as_parameter(normal((r, k), INIT_STD, seed=seed), dtype=dtype, xp=xp)
    B = as_parameter(normal((d, r), INIT_STD, seed=seed + 1), dtype=dtype, xp=xp)
    return A, as_parameter(np.zeros((r, 1)), dtype=dtype, xp=xp), B


@dataclass(frozen=True)
class AdaloraCache:
    """What `adalora_backward` needs: the input, the dropout mask, u = xd A^T, and the parameters."""

    x: Any                 # (..., k)
    dropout_mask: Any      # (..., k) or None
    u: Any                 # (n, r)   dropout(x) A^T, rows flattened
    W0: Any
    A: Any
    E: Any
    B: Any
    scaling: float
    ranknum: float
    fan_in_fan_out: bool
    bias_trainable: bool


@dataclass(frozen=True)
class AdaloraGrads:
    """Gradients of the loss with respect to the input and each tensor (named after PEFT's tensors)."""

    dx: Any          # (..., k)
    dlora_A: Any     # (r, k)
    dlora_E: Any     # (r, 1)
    dlora_B: Any     # (d, r)
    dranknum: Any    # (1,)  PEFT 0.21.2 trains ranknum too (module docstring)
    dbias: Any       # (d,) or None when the bias is frozen or absent


def adalora_forward(x: Any, W0: Any, A: Any, E: Any, B: Any, *, scaling: float, ranknum: float, bias: Any = None,
                    dropout_mask: Any = None, fan_in_fan_out: bool = False,
                    bias_trainable: bool = False) -> tuple[Any, AdaloraCache]:
    """y = x W0^T + b + s ((dropout(x) A^T) ⊙ E^T) B^T, and the cache for `adalora_backward`.

    `scaling` is s = c / (ranknum + 1e-5) (`adalora_scaling`); ranknum is passed again for dranknum."""
    xp, shape = check_linear_inputs(x, W0, bias=bias, fan_in_fan_out=fan_in_fan_out, lora_A=A, lora_E=E, lora_B=B,
                                    dropout_mask=dropout_mask)
    check_adalora_factors(A, E, B, d=shape.d, k=shape.k)
    check_dropout_mask(dropout_mask, x)
    if bias_trainable and bias is None:
        raise ConfigError("bias_trainable=True needs a bias")
    x2, _, xd = dropped_rows(x, dropout_mask, xp=xp)                # (n, k) each
    u = xp.matmul(xd, xp.matrix_transpose(A))                            # (n, r)
    v = u * xp.matrix_transpose(E)                                       # (n, r)
    y = base_forward(x2, W0, bias, fan_in_fan_out=fan_in_fan_out, xp=xp) + \
        xp.matmul(v, xp.matrix_transpose(B)) * scaling                   # (n, d)
    cache = AdaloraCache(x=x, dropout_mask=dropout_mask, u=u, W0=W0, A=A, E=E, B=B, scaling=scaling,
                         ranknum=ranknum, fan_in_fan_out=fan_in_fan_out, bias_trainable=bias_trainable)
    return xp.reshape(y, (*x.shape[:-1], shape.d)), cache


def adalora_backward(dy: Any, cache: AdaloraCache) -> AdaloraGrads:
    """dx, dA, dE, dB, dranknum (and dbias when trainable) from dy = dL/dy; v and xd are recomputed."""
    xp = namespace(dy, cache.x)
    d = cache.B.shape[0]
    check_float_array("dy", dy, xp=xp, shape=(*cache.x.shape[:-1], d))
    s = cache.scaling
    g2 = flatten_rows(dy, xp=xp)                                         # (n, d)
    x2, mask, xd = dropped_rows(cache.x, cache.dropout_mask, xp=xp)    # xd recomputed, not cached
    v = cache.u * xp.matrix_transpose(cache.E)                           # (n, r)
    g = s * xp.matmul(g2, cache.B)                                       # (n, r)  dL/dv
    dB = s * xp.matmul(xp.matrix_transpose(g2), v)                       # (d, r)
    dE = xp.reshape(xp.sum(g * cache.u, axis=0), (-1, 1))                # (r, 1)
    gu = g * xp.matrix_transpose(cache.E)                                # (n, r)  dL/du
    dA = xp.matmul(xp.matrix_transpose(gu), xd)                          # (r, k)
    dx_adapter = xp.matmul(gu, cache.A)                                  # (n, k)
    if mask is not None:
        dx_adapter = dx_adapter * mask
    dx = base_input_grad(g2, cache.W0, fan_in_fan_out=cache.fan_in_fan_out, xp=xp) + dx_adapter
    dranknum = xp.reshape(-xp.sum(g * v) / (cache.ranknum + RANKNUM_EPS), (1,))
    dbias = xp.sum(g2, axis=0) if cache.bias_trainable else None
    return AdaloraGrads(dx=xp.reshape(dx, cache.x.shape), dlora_A=dA, dlora_E=dE, dlora_B=dB, dranknum=dranknum,
                        dbias=dbias)


def adalora_delta_weight(A: Any, E: Any, B: Any, *, scaling: float, fan_in_fan_out: bool = False) -> Any:
    """s B (A ⊙ E), (d, k), or (k, d) with fan_in_fan_out (PEFT's get_delta_weight). Forms d x k."""
    xp = namespace(A, E, B)
    for name, a in zip(TENSOR_NAMES, (A, E, B)):
        check_float_array(name, a, xp=xp)
    check_adalora_factors(A, E, B, d=B.shape[0], k=A.shape[-1])
    delta = xp.matmul(B, A * E) * scaling
    return xp.matrix_transpose(delta) if fan_in_fan_out else delta


def adalora_merge(W0: Any, A: Any, E: Any, B: Any, *, scaling: float, fan_in_fan_out: bool = False) -> Any:
    """W0 + delta in W0's layout."""
    return W0 + _checked_delta(W0, A, E, B, scaling=scaling, fan_in_fan_out=fan_in_fan_out)


def adalora_unmerge(W: Any, A: Any, E: Any, B: Any, *, scaling: float, fan_in_fan_out: bool = False) -> Any:
    """W - delta: the frozen weight back (exact up to one rounding per entry)."""
    return W - _checked_delta(W, A, E, B, scaling=scaling, fan_in_fan_out=fan_in_fan_out)


def adalora_parameter_count(k: int, d: int, r: int, *, bias: bool = False) -> int:
    """Trainable entries of one layer: r (k + d + 1), A, B and the r singular values (plus d for a bias)."""
    return r * (k + d + 1) + (d if bias else 0)


def check_adalora_factors(A: Any, E: Any, B: Any, *, d: int, k: int) -> None:
    """A must be (r, k), E (r, 1) and B (d, r), one r >= 0 (PEFT allows a layer pruned to rank 0)."""
    for name, a in zip(TENSOR_NAMES, (A, E, B)):
        if len(a.shape) != 2:
            raise ShapeError(f"{name} must be 2-D, got shape {tuple(a.shape)}")
    r = A.shape[0]
    for name, a, want in zip(TENSOR_NAMES, (A, E, B), ((r, k), (r, 1), (d, r))):
        if tuple(a.shape) != want:
            raise ShapeError(f"{name} has shape {tuple(a.shape)}, expected {want} (d = {d}, k = {k}, r = {r} "
                             "from lora_A)")


def _checked_delta(W: Any, A: Any, E: Any, B: Any, *, scaling: float, fan_in_fan_out: bool) -> Any:
    delta = adalora_delta_weight(A, E, B, scaling=scaling, fan_in_fan_out=fan_in_fan_out)
    check_float_array("W", W, xp=namespace(W, delta), shape=tuple(delta.shape))
    return delta


# --- the orthogonality regulariser ----------------------------------------------------------------


@dataclass(frozen=True)
class OrthogonalityGrads:
    """dR/dA and dR/dB of every module, by module path."""

    dlora_A: dict[str, Any]   # (r, k) each
    dlora_B: dict[str, Any]   # (d, r) each


def adalora_orthogonality(factors: Mapping[str, tuple[Any, Any]], *, weight: float) -> tuple[Any, OrthogonalityGrads]:
    """(R, its gradients) for the (A, B) of each module: R = w / N * sum ||P^T P - I||_F (module docstring).

    A's Gram matrix is A A^T (rows), B's is B^T B (columns); N counts every A and every B."""
    if not (math.isfinite(weight) and weight >= 0):
        raise ConfigError(f"orth_reg_weight must be finite and >= 0 (PEFT refuses a negative one), got {weight}")
    if not factors:
        return 0.0, OrthogonalityGrads({}, {})
    N = 2 * len(factors)
    total, dA, dB = 0.0, {}, {}
    for path, (A, B) in factors.items():
        xp = namespace(A, B)
        for name, P, rows_side in (("lora_A", A, True), ("lora_B", B, False)):
            check_float_array(f"{path}.{name}", P, xp=xp)
            Pr = P if rows_side else xp.matrix_transpose(P)                   # the side whose Gram is r x r
            M = xp.matmul(Pr, xp.matrix_transpose(Pr)) - xp.eye(Pr.shape[0], dtype=P.dtype)  # (r, r), symmetric
            norm = xp.sqrt(xp.sum(M * M))
            total = total + norm
            coeff = 0.0 if float(norm) == 0.0 else weight / N * 2.0 / norm
            grad = xp.matmul(M, Pr) * coeff                                     # (r, k) or (r, d)
            (dA if rows_side else dB)[path] = grad if rows_side else xp.matrix_transpose(grad)
    return total * (weight / N), OrthogonalityGrads(dA, dB)


# --- error bounds (composed from refpeft.tolerance's algebra; docs/tolerance.md) ---------------


def adalora_forward_bound(x: Any, W0: Any, A: Any, E: Any, B: Any, *, scaling: float, bias: Any = None,
                          dropout_mask: Any = None, fan_in_fan_out: bool = False, dtype: str = "float32",
                          accumulation: str | None = None, model: str = "rigorous") -> Any:
    """Per-element bound on |y_peer - y_refpeft|, whichever order the peer uses: refpeft's ((xd A^T) ⊙ E^T) B^T
    or PEFT's (xd (A ⊙ E)^T) B^T; s is applied after the product in both."""
    def chain(p: Precision) -> Bounded:
        x2 = rows(exact(x))
        xd = x2 if dropout_mask is None else multiply(x2, rows(exact(dropout_mask)), p)
        base = matmul(x2, exact(W0) if fan_in_fan_out else transpose(exact(W0)), p, bias=exact_or_none(bias))
        v_ours = multiply(matmul(xd, transpose(exact(A)), p), transpose(exact(E)), p)
        v_peft = matmul(xd, transpose(multiply(exact(A), exact(E), p)), p)
        return either(*(add(base, matmul(v, transpose(exact(B)), p, scale=scaling), p) for v in (v_ours, v_peft)))

    return output_bound(chain, Precision(dtype, accumulation, model), x_shape=tuple(x.shape))


def adalora_backward_bound(dy: Any, x: Any, W0: Any, A: Any, E: Any, B: Any, *, scaling: float,
                           dropout_mask: Any = None, fan_in_fan_out: bool = False, bias_trainable: bool = False,
                           dtype: str = "float32", accumulation: str | None = None,
                           model: str = "rigorous") -> dict[str, Any]:
    """Per-element bounds on dx, dlora_A, dlora_E, dlora_B (and dbias) of `adalora_backward`, each the larger
    of refpeft's order (u = xd A^T kept, dE = sum_n g ⊙ u) and PEFT's autograd through A ⊙ E
    (d(A ⊙ E) = g^T xd, dA = d(A ⊙ E) ⊙ E, dE = sum_k d(A ⊙ E) ⊙ A); s before or after each product."""
    def chain(p: Precision) -> dict[str, Bounded]:
        x2, g2, Ab, Eb, Bb = rows(exact(x)), rows(exact(dy)), exact(A), exact(E), exact(B)
        mask = None if dropout_mask is None else rows(exact(dropout_mask))
        xd = x2 if mask is None else multiply(x2, mask, p)                           # (n, k)
        g = matmul(g2, Bb, p, scale=scaling)                                         # (n, r)  dL/dv
        u = matmul(xd, transpose(Ab), p)                                             # (n, r)
        gu = multiply(g, transpose(Eb), p)                                           # (n, r)
        ours = {"dlora_A": matmul(transpose(gu), xd, p), "dlora_E": column(row_sum(multiply(g, u, p), p)),
                "dlora_B": matmul(transpose(g2), multiply(u, transpose(Eb), p), p, scale=scaling),
                "dx": matmul(gu, Ab, p)}
        AE = multiply(Ab, Eb, p)                                                     # (r, k)
        dAE = matmul(transpose(g), xd, p)                                            # (r, k)
        peft = {"dlora_A": multiply(dAE, Eb, p), "dlora_E": column(row_sum(transpose(multiply(dAE, Ab, p)), p)),
                "dlora_B": matmul(transpose(g2), matmul(xd, transpose(AE), p), p, scale=scaling),
                "dx": matmul(g, AE, p)}
        grads = {name: either(ours[name], peft[name]) for name in ours}
        if mask is not None:
            grads["dx"] = multiply(grads["dx"], mask, p)
        W0_rows = transpose(exact(W0)) if fan_in_fan_out else exact(W0)             # (d, k)
        grads["dx"] = add(matmul(g2, W0_rows, p), grads["dx"], p)
        if bias_trainable:
            grads["dbias"] = row_sum(g2, p)
        return grads

    return gradient_bounds(chain, Precision(dtype, accumulation, model), x_shape=tuple(x.shape))


def adalora_merge_bound(W0: Any, A: Any, E: Any, B: Any, *, scaling: float, fan_in_fan_out: bool = False,
                        dtype: str = "float32", accumulation: str | None = None, model: str = "rigorous",
                        unmerge: bool = False) -> Any:
    """Per-element bound on W0 + s B (A ⊙ E) (or W - delta with unmerge=True), W0's layout."""
    def chain(p: Precision) -> Bounded:
        delta = matmul(exact(B), multiply(exact(A), exact(E), p), p, scale=-scaling if unmerge else scaling)
        return add(exact(W0), transpose(delta) if fan_in_fan_out else delta, p)

    return with_reference(chain, Precision(dtype, accumulation, model))


# --- the method table's row (refpeft.methods.spec) ---------------------------------------------


def _factors(m: Any) -> tuple[Any, Any, Any]:
    return m.lora_A, m.lora_E, m.lora_B


def module_ranknum(m: Any) -> float:
    """A module's ranknum: its config init_r (`rank`), which pruning in a file does not change; else its rank."""
    return float(m.rank if m.rank is not None else m.lora_A.shape[0])


def _module_scaling(m: Any) -> float:
    """c / (ranknum + eps); c = r when alpha <= 0 is the layer's current (possibly pruned) rank, as in PEFT."""
    return adalora_scaling(m.alpha, module_ranknum(m), int(m.lora_A.shape[0]))


def _module_forward(x: Any, W0: Any, m: Any, *, shared: Any = None, bias: Any = None, dropout_mask: Any = None,
                    bias_trainable: bool = False) -> tuple[Any, AdaloraCache]:
    return adalora_forward(x, W0, *_factors(m), scaling=_module_scaling(m), ranknum=module_ranknum(m), bias=bias,
                           dropout_mask=dropout_mask, fan_in_fan_out=m.fan_in_fan_out, bias_trainable=bias_trainable)


def _module_branch(W0: Any, m: Any, *, shared: Any = None) -> tuple[Any, ...]:
    """The exporter's "low-rank" branch ((x A'^T) s) B^T with A' = A ⊙ E: inputs A'^T, B^T, s."""
    xp = namespace(m.lora_A)
    return (xp.matrix_transpose(m.lora_A * m.lora_E), xp.matrix_transpose(m.lora_B),
            xp.asarray([_module_scaling(m)], dtype=m.lora_A.dtype))


def _module_init(W0s: Mapping[str, Any], *, ranks: Mapping[str, int], alphas: Mapping[str, float], seed: int = 0,
                 generator: str = "numpy") -> tuple[dict, dict, dict]:
    """Fresh AdaLoRA modules (E = 0, A, B ~ N(0, 0.02^2)) on the layers W0s (d, k): layer i from seeds
    seed + 2i, seed + 2i + 1."""
    if generator != "numpy":
        raise ConfigError(f"AdaLoRA's init draws from NumPy's generator only (PEFT's torch.randn stream is not "
                          f"reproduced), got generator={generator!r}")
    modules = {}
    for i, (path, W0) in enumerate(W0s.items()):
        xp = namespace(W0)
        shape = linear_shape(W0, fan_in_fan_out=False)
        tensors = adalora_init(shape.k, shape.d, ranks[path], seed=seed + 2 * i, dtype=dtype_name(W0.dtype, xp=xp),
                               xp=xp)
        modules[path] = AdaloraModule("adalora", dict(zip(TENSOR_NAMES, tensors)), alpha=float(alphas[path]),
                                      rank=ranks[path])
    return modules, {}, {}


# Not in refpeft.methods.METHODS yet: the generic PEFT reader (refpeft.peft_config) does not parse
# AdaLoRA's rank_pattern (boolean masks, not ranks); refpeft.adalora_format reads and writes its files.
ADALORA = Method(
    name="adalora", summary="SVD-shaped update s B (A ⊙ E) with rank pruned by importance (Zhang et al. 2023)",
    peft_type="ADALORA", peft_flags={}, tensors={name: name for name in TENSOR_NAMES},
    trainable=TENSOR_NAMES, per_output=("lora_B",), scaled=True, mergeable=True, onnx_branch="low-rank",
    rank=lambda m: int(m.lora_A.shape[0]), out_features=lambda m: int(m.lora_B.shape[0]),
    in_features=lambda m: int(m.lora_A.shape[1]),
    forward=_module_forward, backward=adalora_backward,
    delta_weight=lambda W0, m, *, shared=None: adalora_delta_weight(*_factors(m), scaling=_module_scaling(m),
                                                                    fan_in_fan_out=m.fan_in_fan_out),
    merge=lambda W0, m, *, shared=None: adalora_merge(W0, *_factors(m), scaling=_module_scaling(m),
                                                      fan_in_fan_out=m.fan_in_fan_out),
    unmerge=lambda W, m, *, shared=None: adalora_unmerge(W, *_factors(m), scaling=_module_scaling(m),
                                                         fan_in_fan_out=m.fan_in_fan_out),
    parameter_count=lambda k, d, m: adalora_parameter_count(k, d, m.r),
    branch_values=_module_branch, init_modules=_module_init,
)


class AdaloraModule(ModuleAdapter):
    """An AdaLoRA layer: a ModuleAdapter that carries AdaLoRA's row itself (the row is not in METHODS,
    see above), so everything that asks a module for its `spec` gets the row without a name lookup."""

    @property
    def spec(self) -> Any:
        return ADALORA

    def replace(self, **tensors: Any) -> "AdaloraModule":
        return AdaloraModule(self.method, {**self.tensors, **tensors}, alpha=self.alpha,
                             fan_in_fan_out=self.fan_in_fan_out, rank=self.rank)
