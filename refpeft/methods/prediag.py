"""Pre-Diag for a linear layer: a trained diagonal rescales the frozen weight's rows, beside a LoRA update.

Pre-Diag ("weight conditioning": the frozen weight is conditioned by a learned diagonal before the
low-rank update is added) trains a vector D (d,) together with LoRA's A (r, k) and B (d, r):

    W' = diag(D) W0 + s B A                     # (d, k)   s = alpha / r (alpha / sqrt(r) with rsLoRA)

No library (HF PEFT included) provides it: refpeft's code is checked by float64 finite differences
and properties only (tests/test_prediag.py), and its table row has peft_type None (no PEFT files).
D multiplies W0's rows, i.e. the layer's outputs: the bias is not rescaled (W' x + b).

Forward (PyTorch layout, rows flattened to n; letters as in refpeft.methods.linear):

    xd = dropout(x) = x * mask                  # (n, k)
    z  = x W0^T                                 # (n, d)   the frozen layer's output, cached for dD
    xa = xd A^T                                 # (n, r)
    y  = z * D + b + s (xa B^T)                 # (n, d)

Backward, for dy = dL/dy (n, d):

    dD    = sum_n dy * z                        # (d,)
    dz    = dy * D                              # (n, d)
    dB    = s dy^T xa                           # (d, r)
    g     = s dy B                              # (n, r)   dL/dxa
    dA    = g^T xd                              # (r, k)
    dx    = dz W0 + (g A) * mask                # (n, k)
    dbias = sum_n dy                            # (d,)     only when the bias is trainable

The step from the (conditioned) base output to y, "the head", is shared with SORA
(refpeft.methods.sora), which feeds it z R^T instead of z: `prediag_head` and `prediag_head_backward`.

Merge, in W0's layout: W = diag(D) W0 + s B A (with fan_in_fan_out W0 is (k, d) and D scales its
columns). Unmerge: W0 = (W - s B A) / D, which loses nothing unless D has zeros: a zero D_i erased
row i of W0, so refpeft refuses it (NonFiniteError naming how many), as for IA3.
Init: D = 1, A Kaiming-uniform, B = 0 (refpeft.methods.lora.lora_init), so W' = W0 exactly at start.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from refpeft.adapter import ModuleAdapter
from refpeft.backend import check_float_array, dtype_name, namespace
from refpeft.errors import ConfigError, NonFiniteError, ShapeError
from refpeft.init import as_parameter
from refpeft.methods.linear import base_forward, base_input_grad, check_linear_inputs, dropped_rows, flatten_rows
from refpeft.methods.lora import LORA, check_dropout_mask, check_factors, lora_delta_weight, lora_init, \
    lora_parameter_count
from refpeft.methods.spec import Method
from refpeft.tolerance import Bounded, Precision, add, exact, matmul, multiply, output_bound, rows, transpose, \
    with_reference


def prediag_init(k: int, d: int, r: int, *, seed: int = 0, generator: str = "numpy", dtype: str = "float64",
                 xp: Any = None) -> tuple[Any, Any, Any]:
    """(A, B, D): LoRA's default init for A (r, k) and B = 0 (d, r), and D = 1 (d,): W' = W0 at start."""
    A, B = lora_init(k, d, r, seed=seed, generator=generator, dtype=dtype, xp=xp)
    return A, B, as_parameter(np.ones(d), dtype=dtype, xp=xp)


def check_row_scale(name: str, D: Any, d: int) -> None:
    """A per-output scale (Pre-Diag's D, SORA's s) is a (d,) vector."""
    if tuple(D.shape) != (d,):
        raise ShapeError(f"{name} has shape {tuple(D.shape)}, expected ({d},): one entry per output of the layer")


@dataclass(frozen=True)
class PrediagCache:
    """What `prediag_backward` needs: the input, the mask, z = x W0^T, xa, and the parameters."""

    x: Any                 # (..., k)
    dropout_mask: Any      # (..., k) or None
    z: Any                 # (n, d)  the frozen output before D (SORA: after its rotation)
    xa: Any                # (n, r)
    W0: Any
    A: Any
    B: Any
    D: Any                 # (d,)
    scaling: float
    fan_in_fan_out: bool
    bias_trainable: bool


@dataclass(frozen=True)
class PrediagGrads:
    """Gradients of the loss with respect to the input and each trainable tensor."""

    dx: Any      # (..., k)
    dA: Any      # (r, k)
    dB: Any      # (d, r)
    dprediag_D: Any   # (d,)
    dbias: Any   # (d,) or None when the bias is frozen or absent


def prediag_head(z: Any, x: Any, A: Any, B: Any, D: Any, *, scaling: float, bias: Any, dropout_mask: Any,
                 xp: Any) -> tuple[Any, Any]:
    """y = z * D + b + s (dropout(x) A^T) B^T from a 2-D base output z (n, d); returns (y, xa)."""
    x2, _, xd = dropped_rows(x, dropout_mask, xp=xp)                # (n, k) each
    xa = xp.matmul(xd, xp.matrix_transpose(A))                                   # (n, r)
    branch = xp.matmul(xa, xp.matrix_transpose(B))                               # (n, d)
    branch *= scaling                                                            # in place: one temporary, not two
    y = z * D if bias is None else z * D + bias                                  # (n, d)
    y += branch                                                                  # = z * D + b + (xa B^T) * s
    return y, xa


def prediag_head_backward(g2: Any, cache: PrediagCache, *, xp: Any) -> tuple[Any, Any, Any, Any, Any]:
    """(dz, dD, dA, dB, dx through the adapter branch) from dy (n, d); see the module docstring."""
    s = cache.scaling
    x2, mask, xd = dropped_rows(cache.x, cache.dropout_mask, xp=xp)    # xd recomputed, not cached
    dD = xp.sum(g2 * cache.z, axis=0)                                            # (d,)
    dz = g2 * cache.D                                                            # (n, d)
    dB = s * xp.matmul(xp.matrix_transpose(g2), cache.xa)                        # (d, r)
    g = s * xp.matmul(g2, cache.B)                                               # (n, r)
    dA = xp.matmul(xp.matrix_transpose(g), xd)                                   # (r, k)
    dx_adapter = xp.matmul(g, cache.A)                                           # (n, k)
    return dz, dD, dA, dB, (dx_adapter if mask is None else dx_adapter * mask)


def check_head_inputs(x: Any, W0: Any, A: Any, B: Any, D: Any, *, bias: Any, dropout_mask: Any,
                      fan_in_fan_out: bool, bias_trainable: bool, scale_name: str = "D", **more: Any) -> tuple[Any, Any]:
    """The boundary checks Pre-Diag and SORA share; returns (xp, shape)."""
    xp, shape = check_linear_inputs(x, W0, bias=bias, fan_in_fan_out=fan_in_fan_out, A=A, B=B,
                                    dropout_mask=dropout_mask, **{scale_name: D}, **more)
    check_factors(A, B, d=shape.d, k=shape.k)
    check_row_scale(scale_name, D, shape.d)
    check_dropout_mask(dropout_mask, x)
    if bias_trainable and bias is None:
        raise ConfigError("bias_trainable=True needs a bias")
    return xp, shape


def prediag_forward(x: Any, W0: Any, A: Any, B: Any, D: Any, *, scaling: float, bias: Any = None,
                    dropout_mask: Any = None, fan_in_fan_out: bool = False,
                    bias_trainable: bool = False) -> tuple[Any, PrediagCache]:
    """y = (x W0^T) * D + b + s (dropout(x) A^T) B^T, and the cache for `prediag_backward`."""
    xp, shape = check_head_inputs(x, W0, A, B, D, bias=bias, dropout_mask=dropout_mask,
                                  fan_in_fan_out=fan_in_fan_out, bias_trainable=bias_trainable)
    z = base_forward(flatten_rows(x, xp=xp), W0, None, fan_in_fan_out=fan_in_fan_out, xp=xp)   # (n, d)
    y, xa = prediag_head(z, x, A, B, D, scaling=scaling, bias=bias, dropout_mask=dropout_mask, xp=xp)
    cache = PrediagCache(x=x, dropout_mask=dropout_mask, z=z, xa=xa, W0=W0, A=A, B=B, D=D, scaling=scaling,
                         fan_in_fan_out=fan_in_fan_out, bias_trainable=bias_trainable)
    return xp.reshape(y, (*x.shape[:-1], shape.d)), cache


def prediag_backward(dy: Any, cache: PrediagCache) -> PrediagGrads:
    """dx, dA, dB, dprediag_D (= dD) (and dbias when trainable) from dy = dL/dy; see the module docstring."""
    xp = namespace(dy, cache.x)
    check_float_array("dy", dy, xp=xp, shape=(*cache.x.shape[:-1], cache.D.shape[0]))
    g2 = flatten_rows(dy, xp=xp)                                                 # (n, d)
    dz, dD, dA, dB, dx_adapter = prediag_head_backward(g2, cache, xp=xp)
    dx = base_input_grad(dz, cache.W0, fan_in_fan_out=cache.fan_in_fan_out, xp=xp)
    dx += dx_adapter                                                             # in place into the fresh product
    dbias = xp.sum(g2, axis=0) if cache.bias_trainable else None
    return PrediagGrads(dx=xp.reshape(dx, cache.x.shape), dA=dA, dB=dB, dprediag_D=dD, dbias=dbias)


def in_layout(D: Any, *, fan_in_fan_out: bool) -> Any:
    """A per-output vector broadcastable against W0 in its layout: (d, 1), or (1, d) with fan_in_fan_out."""
    return D[None, :] if fan_in_fan_out else D[:, None]


def refuse_zero_scales(name: str, D: Any, *, xp: Any) -> None:
    """NonFiniteError when a per-output scale has zeros: those rows of W0 are lost in the merged weight."""
    zeros = int(xp.sum(xp.astype(D == 0, xp.int64)))
    if zeros:
        raise NonFiniteError(f"{name} has {zeros} zero entr{'y' if zeros == 1 else 'ies'}: the merged weight lost "
                             "those rows of W0, so unmerging would divide by zero")


def prediag_merge(W0: Any, A: Any, B: Any, D: Any, *, scaling: float, fan_in_fan_out: bool = False) -> Any:
    """W = diag(D) W0 + s B A in W0's layout."""
    delta = lora_delta_weight(A, B, scaling=scaling, fan_in_fan_out=fan_in_fan_out)
    xp = namespace(W0, D)
    check_float_array("W0", W0, xp=xp, shape=tuple(delta.shape))
    check_row_scale("D", D, B.shape[0])
    return W0 * in_layout(D, fan_in_fan_out=fan_in_fan_out) + delta


def prediag_unmerge(W: Any, A: Any, B: Any, D: Any, *, scaling: float, fan_in_fan_out: bool = False) -> Any:
    """W0 = (W - s B A) / D; NonFiniteError when D has zeros (module docstring)."""
    delta = lora_delta_weight(A, B, scaling=scaling, fan_in_fan_out=fan_in_fan_out)
    xp = namespace(W, D)
    check_float_array("W", W, xp=xp, shape=tuple(delta.shape))
    check_row_scale("D", D, B.shape[0])
    refuse_zero_scales("D", D, xp=xp)
    return (W - delta) / in_layout(D, fan_in_fan_out=fan_in_fan_out)


def prediag_delta_weight(W0: Any, A: Any, B: Any, D: Any, *, scaling: float, fan_in_fan_out: bool = False) -> Any:
    """W - W0 = diag(D - 1) W0 + s B A, in W0's layout (forms the d x k product, for summing deltas)."""
    return prediag_merge(W0, A, B, D, scaling=scaling, fan_in_fan_out=fan_in_fan_out) - W0


def prediag_parameter_count(k: int, d: int, r: int, *, bias: bool = False) -> int:
    """Trainable entries: LoRA's r (d + k) plus d for D (plus d with a trainable bias)."""
    return lora_parameter_count(k, d, r, bias=bias) + d


# --- error bounds (composed from refpeft.tolerance's algebra; docs/tolerance.md) ---------------


def prediag_head_bound(z: Bounded, x: Any, A: Any, B: Any, D: Any, *, scaling: float, bias: Any, dropout_mask: Any,
                       p: Precision) -> Bounded:
    """The head's y = z * D + b + s (xd A^T) B^T with its error, from a bounded z (n, d)."""
    x2 = rows(exact(x))
    xd = x2 if dropout_mask is None else multiply(x2, rows(exact(dropout_mask)), p)
    base = multiply(z, exact(D[None, :]), p)
    if bias is not None:
        base = add(base, exact(bias[None, :]), p)
    adapter = matmul(matmul(xd, transpose(exact(A)), p), transpose(exact(B)), p, scale=scaling)
    return add(base, adapter, p)


def prediag_forward_bound(x: Any, W0: Any, A: Any, B: Any, D: Any, *, scaling: float, bias: Any = None,
                          dropout_mask: Any = None, fan_in_fan_out: bool = False, dtype: str = "float32",
                          accumulation: str | None = None, model: str = "rigorous") -> Any:
    """Per-element bound on |y_computed - y| for Pre-Diag's forward in `dtype` (inputs exact in it)."""
    def chain(p: Precision) -> Bounded:
        z = matmul(rows(exact(x)), exact(W0) if fan_in_fan_out else transpose(exact(W0)), p)
        return prediag_head_bound(z, x, A, B, D, scaling=scaling, bias=bias, dropout_mask=dropout_mask, p=p)

    return output_bound(chain, Precision(dtype, accumulation, model), x_shape=tuple(x.shape))


def prediag_merge_bound(W0: Any, A: Any, B: Any, D: Any, *, scaling: float, fan_in_fan_out: bool = False,
                        dtype: str = "float32", accumulation: str | None = None, model: str = "rigorous") -> Any:
    """Per-element bound on the merged diag(D) W0 + s B A in `dtype`, W0's layout."""
    def chain(p: Precision) -> Bounded:
        delta = matmul(exact(B), exact(A), p, scale=scaling)                      # (d, k)
        rowsD = multiply(exact(W0), exact(in_layout(D, fan_in_fan_out=fan_in_fan_out)), p)
        return add(rowsD, transpose(delta) if fan_in_fan_out else delta, p)

    return with_reference(chain, Precision(dtype, accumulation, model))


# --- the method table's row (refpeft.methods.spec): refpeft-only, no PEFT files ------------------


def _module_forward(x: Any, W0: Any, m: Any, *, shared: Any = None, bias: Any = None, dropout_mask: Any = None,
                    bias_trainable: bool = False) -> tuple[Any, PrediagCache]:
    return prediag_forward(x, W0, m.A, m.B, m.prediag_D, scaling=m.scaling, bias=bias, dropout_mask=dropout_mask,
                           fan_in_fan_out=m.fan_in_fan_out, bias_trainable=bias_trainable)


def _module_init(W0s: Mapping[str, Any], *, ranks: Mapping[str, int], alphas: Mapping[str, float], seed: int = 0,
                 generator: str = "numpy", **unused: Any) -> tuple[dict, dict, dict]:
    """Fresh Pre-Diag modules on the layers W0s (d, k): layer i from seed + i, as LoRA's."""
    modules = {}
    for i, (path, W0) in enumerate(W0s.items()):
        xp = namespace(W0)
        A, B, D = prediag_init(int(W0.shape[1]), int(W0.shape[0]), ranks[path], seed=seed + i, generator=generator,
                               dtype=dtype_name(W0.dtype, xp=xp), xp=xp)
        modules[path] = ModuleAdapter("prediag", {"A": A, "B": B, "prediag_D": D}, alpha=alphas[path])
    return modules, {}, {}


def _module_branch(W0: Any, m: Any, *, shared: Any = None) -> tuple[Any, ...]:
    """The exporter's "row-scaled-low-rank" inputs: LoRA's A^T, B^T, s and D, y = (x W0^T) * D + ((x A^T) s) B^T + b."""
    return (*LORA.branch_values(W0, m), m.prediag_D)


PREDIAG = Method(
    name="prediag", summary="a trained diagonal rescales W0's rows beside a LoRA update: diag(D) W0 + s B A "
                            "(refpeft only)",
    peft_type=None, peft_flags={}, tensors={"A": "lora_A.weight", "B": "lora_B.weight", "prediag_D": "prediag_D"},
    trainable=("A", "B", "prediag_D"), per_output=("B", "prediag_D"), scaled=True, mergeable=True,
    onnx_branch="row-scaled-low-rank",
    rank=lambda m: int(m.A.shape[0]), out_features=lambda m: int(m.B.shape[0]), in_features=lambda m: int(m.A.shape[1]),
    forward=_module_forward, backward=prediag_backward,
    delta_weight=lambda W0, m, *, shared=None: prediag_delta_weight(W0, m.A, m.B, m.prediag_D, scaling=m.scaling,
                                                                    fan_in_fan_out=m.fan_in_fan_out),
    merge=lambda W0, m, *, shared=None: prediag_merge(W0, m.A, m.B, m.prediag_D, scaling=m.scaling,
                                                      fan_in_fan_out=m.fan_in_fan_out),
    unmerge=lambda W, m, *, shared=None: prediag_unmerge(W, m.A, m.B, m.prediag_D, scaling=m.scaling,
                                                         fan_in_fan_out=m.fan_in_fan_out),
    parameter_count=lambda k, d, m: prediag_parameter_count(k, d, m.r),
    branch_values=_module_branch, init_modules=_module_init,
)
