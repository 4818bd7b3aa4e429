"""(IA)^3 for a linear layer: one learned vector rescales the layer's outputs or its inputs (Liu et al. 2022).

(IA)^3 ("Infused Adapter by Inhibiting and Amplifying Inner Activations", arXiv 2205.05638) trains
one vector l per adapted layer and nothing else. HF PEFT (`tuners/ia3/layer.py`) stores l in a
shape that says which side of the layer it scales, and refpeft keeps that shape:

    l (d, 1)   output scaling: every target not in `feedforward_modules` (the paper's l_k, l_v)
    l (1, k)   input scaling: `feedforward_modules` (the paper's l_ff, before the FFN's second layer)
    init: ones (PEFT's init_ia3_weights=True), so a fresh adapter is the identity

Forward (PEFT's `Linear.forward`; layout and letters as in refpeft.methods.linear, n rows):

    output scaling:  z  = x W0^T + b                  # (n, d)
                     y  = z * l^T                      # (n, d)   the bias is scaled too
    input scaling:   xl = x * l                        # (n, k)
                     y  = xl W0^T + b                  # (n, d)   the bias is not

Backward, for dy = dL/dy (n, d):

    output scaling:  dl    = (sum_n dy * z)^T          # (d, 1)
                     dz    = dy * l^T                  # (n, d)
                     dx    = dz W0                     # (n, k)
                     dbias = sum_n dz                  # (d,)
    input scaling:   g     = dy W0                     # (n, k)   dL/dxl
                     dl    = sum_n g * x               # (1, k)
                     dx    = g * l                     # (n, k)
                     dbias = sum_n dy                  # (d,)

The cache holds z (n, d) for output scaling (dl needs it; recomputing it from x would cost a
second n d k product) and x for input scaling. PEFT's IA3 has no dropout.

Merge, W0 in its (d, k) layout (with fan_in_fan_out W0 is (k, d) and l is transposed, as PEFT's
merge does): both sides are the one broadcast product W0 * l in PEFT's shapes,

    output scaling:  W = diag(l) W0 = W0 * l      and the bias b' = l * b   (`ia3_merge_bias`)
    input scaling:   W = W0 diag(l) = W0 * l      the bias unchanged
    delta:           W - W0 = W0 * (l - 1)

Unmerge divides: W0 = W / l (b = b' / l). An entry l_i = 0 erased row (column) i of W0 for good,
so refpeft refuses to unmerge it (NonFiniteError naming the entries). PEFT divides by l + 1e-8
instead: its unmerge is off by a relative 1e-8 / l_i for every l_i, and returns zeros, not W0,
where l_i = 0 (docs/ia3.md).

Which side a module scales is read from l's shape against the layer's (`ia3_feedforward`): only
a 1 x 1 layer is ambiguous (l (1, 1) either way; the two differ only in whether the bias is
scaled), and refpeft reads it as output scaling unless told `feedforward=True`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from refpeft.adapter import ModuleAdapter
from refpeft.backend import check_float_array, dtype_name, namespace
from refpeft.errors import ConfigError, NonFiniteError, ShapeError
from refpeft.init import as_parameter
from refpeft.methods.linear import LinearShape, base_forward, base_input_grad, check_linear_inputs, flatten_rows, \
    linear_shape
from refpeft.methods.spec import Method
from refpeft.tolerance import Bounded, Precision, divide, exact, exact_or_none, gradient_bounds, matmul, multiply, \
    output_bound, row_sum, rows, transpose, with_reference

# PEFT's feedforward_modules for the decoders refpeft runs (TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING
# for llama, mistral, qwen2, qwen3): the default of `refpeft train --method ia3`.
DEFAULT_FEEDFORWARD = ("down_proj",)


def ia3_l_shape(shape: LinearShape, *, feedforward: bool) -> tuple[int, int]:
    """PEFT's shape of l: (1, k) for input scaling (a feedforward module), (d, 1) for output scaling."""
    return (1, shape.k) if feedforward else (shape.d, 1)


def ia3_feedforward(l: Any, shape: LinearShape, *, feedforward: bool | None = None) -> bool:
    """Whether l scales the inputs of a layer of `shape`, read from l's shape (module docstring);
    `feedforward` decides a 1 x 1 layer's (1, 1) l and, when given, must agree with the shape."""
    found = tuple(l.shape)
    sides = [f for f in (False, True) if found == ia3_l_shape(shape, feedforward=f)]
    if not sides:
        raise ShapeError(f"ia3_l has shape {found}; a layer of k = {shape.k} inputs and d = {shape.d} outputs takes "
                         f"({shape.d}, 1) (output scaling) or (1, {shape.k}) (input scaling, feedforward_modules)")
    if feedforward is None:
        return sides[0]
    if feedforward not in sides:
        raise ShapeError(f"ia3_l has shape {found}, which scales the layer's "
                         f"{'outputs' if sides[0] is False else 'inputs'}, but feedforward={feedforward} was asked")
    return feedforward


def ia3_init(shape: LinearShape, *, feedforward: bool, dtype: str = "float64", xp: Any = None) -> Any:
    """The initial l: ones of `ia3_l_shape` (PEFT's init_ia3_weights=True), an identity adapter."""
    if shape.k < 1 or shape.d < 1:
        raise ShapeError(f"layer sizes must be positive, got k = {shape.k}, d = {shape.d}")
    return as_parameter(np.ones(ia3_l_shape(shape, feedforward=feedforward)), dtype=dtype, xp=xp)


@dataclass(frozen=True)
class Ia3Cache:
    """What `ia3_backward` needs: x (input scaling) or z = x W0^T + b (output scaling), and the parameters."""

    x: Any                 # (..., k)  kept for its shape; read only by input scaling's dl
    z: Any                 # (n, d)    the unscaled output, output scaling only (None otherwise)
    W0: Any
    l: Any                 # (d, 1) or (1, k)
    feedforward: bool
    fan_in_fan_out: bool
    bias_trainable: bool


@dataclass(frozen=True)
class Ia3Grads:
    """Gradients of the loss with respect to the input and each trainable tensor."""

    dx: Any          # (..., k)
    dl: Any          # l's shape: (d, 1) or (1, k)
    dbias: Any       # (d,) or None when the bias is frozen or absent


def ia3_forward(x: Any, W0: Any, l: Any, *, bias: Any = None, fan_in_fan_out: bool = False,
                feedforward: bool | None = None, bias_trainable: bool = False) -> tuple[Any, Ia3Cache]:
    """y = (x W0^T + b) * l^T for l (d, 1), or y = (x * l) W0^T + b for l (1, k); see the module docstring."""
    xp, shape = check_linear_inputs(x, W0, bias=bias, fan_in_fan_out=fan_in_fan_out, ia3_l=l)
    feedforward = ia3_feedforward(l, shape, feedforward=feedforward)
    if bias_trainable and bias is None:
        raise ConfigError("bias_trainable=True needs a bias")
    x2 = flatten_rows(x, xp=xp)                                                        # (n, k)
    if feedforward:
        y = base_forward(x2 * l, W0, bias, fan_in_fan_out=fan_in_fan_out, xp=xp)      # (n, d)
        z = None
    else:
        z = base_forward(x2, W0, bias, fan_in_fan_out=fan_in_fan_out, xp=xp)          # (n, d)
        y = z * xp.matrix_transpose(l)                                                 # (n, d)
    cache = Ia3Cache(x=x, z=z, W0=W0, l=l, feedforward=feedforward, fan_in_fan_out=fan_in_fan_out,
                     bias_trainable=bias_trainable)
    return xp.reshape(y, (*x.shape[:-1], shape.d)), cache


def ia3_backward(dy: Any, cache: Ia3Cache) -> Ia3Grads:
    """dx, dl (and dbias when trainable) from dy = dL/dy; see the module docstring."""
    xp = namespace(dy, cache.x)
    d = linear_shape(cache.W0, fan_in_fan_out=cache.fan_in_fan_out).d
    check_float_array("dy", dy, xp=xp, shape=(*cache.x.shape[:-1], d))
    g2 = flatten_rows(dy, xp=xp)                                                       # (n, d)
    if cache.feedforward:
        g = base_input_grad(g2, cache.W0, fan_in_fan_out=cache.fan_in_fan_out, xp=xp)  # (n, k)  dL/dxl
        dl = xp.sum(g * flatten_rows(cache.x, xp=xp), axis=0, keepdims=True)          # (1, k)
        dx = g * cache.l                                                               # (n, k)
        dbias = xp.sum(g2, axis=0) if cache.bias_trainable else None
    else:
        dl = xp.matrix_transpose(xp.sum(g2 * cache.z, axis=0, keepdims=True))         # (d, 1)
        dz = g2 * xp.matrix_transpose(cache.l)                                         # (n, d)
        dx = base_input_grad(dz, cache.W0, fan_in_fan_out=cache.fan_in_fan_out, xp=xp)
        dbias = xp.sum(dz, axis=0) if cache.bias_trainable else None
    return Ia3Grads(dx=xp.reshape(dx, cache.x.shape), dl=dl, dbias=dbias)


def _scale_in_layout(W: Any, l: Any, *, fan_in_fan_out: bool, feedforward: bool | None) -> tuple[Any, Any]:
    """l broadcastable against W in W's own layout (PEFT's `transpose(ia3_l, fan_in_fan_out)`), and the namespace."""
    xp = namespace(W, l)
    check_float_array("W", W, xp=xp)
    check_float_array("ia3_l", l, xp=xp)
    ia3_feedforward(l, linear_shape(W, fan_in_fan_out=fan_in_fan_out), feedforward=feedforward)
    return (xp.matrix_transpose(l) if fan_in_fan_out else l), xp


def ia3_delta_weight(W0: Any, l: Any, *, fan_in_fan_out: bool = False, feedforward: bool | None = None) -> Any:
    """W - W0 = W0 * (l - 1) in W0's layout: diag(l - 1) W0 (output scaling) or W0 diag(l - 1) (input)."""
    scale, _ = _scale_in_layout(W0, l, fan_in_fan_out=fan_in_fan_out, feedforward=feedforward)
    return W0 * (scale - 1)


def ia3_merge(W0: Any, l: Any, *, fan_in_fan_out: bool = False, feedforward: bool | None = None) -> Any:
    """W = W0 * l (PEFT's merge): rows scaled for l (d, 1), columns for l (1, k); see ia3_merge_bias."""
    scale, _ = _scale_in_layout(W0, l, fan_in_fan_out=fan_in_fan_out, feedforward=feedforward)
    return W0 * scale


def ia3_unmerge(W: Any, l: Any, *, fan_in_fan_out: bool = False, feedforward: bool | None = None) -> Any:
    """W0 = W / l (one rounding per entry); NonFiniteError when l has zeros (their rows/columns are lost)."""
    scale, xp = _scale_in_layout(W, l, fan_in_fan_out=fan_in_fan_out, feedforward=feedforward)
    _refuse_zeros(l, xp=xp)
    return W / scale


def ia3_merge_bias(b: Any, l: Any, *, unmerge: bool = False) -> Any:
    """The merged layer's bias: l * b for output scaling (b / l with unmerge=True), b for input scaling."""
    xp = namespace(b, l)
    if l.shape[1] != 1 or l.shape[0] != b.shape[0]:        # input scaling leaves the bias alone
        return b
    if unmerge:
        _refuse_zeros(l, xp=xp)
    return b / l[:, 0] if unmerge else b * l[:, 0]


def ia3_parameter_count(shape: LinearShape, *, feedforward: bool) -> int:
    """Trainable parameters of one IA3 layer: k for input scaling, d for output scaling."""
    return shape.k if feedforward else shape.d


def _refuse_zeros(l: Any, *, xp: Any) -> None:
    zeros = int(xp.sum(xp.astype(l == 0, xp.int64)))
    if zeros:
        raise NonFiniteError(f"ia3_l has {zeros} zero entr{'y' if zeros == 1 else 'ies'}: the merged weight lost "
                             "those rows (columns) of W0, so unmerging would divide by zero (PEFT divides by "
                             "l + 1e-8 and returns zeros there)")


# --- error bounds (composed from refpeft.tolerance's algebra; docs/tolerance.md) ---------------


def _lifted(P: Bounded, *, feedforward: bool) -> Bounded:
    """A (d,) or (k,) row sum in l's shape: (d, 1) or (1, k)."""
    if feedforward:
        return Bounded(P.value[None, :], P.error[None, :])
    return Bounded(P.value[:, None], P.error[:, None])


def _ia3_chain(x: Any, W0: Any, l: Any, *, bias: Any, fan_in_fan_out: bool, feedforward: bool,
               p: Precision) -> dict[str, Bounded]:
    x2 = rows(exact(x))
    W0_t = exact(W0) if fan_in_fan_out else transpose(exact(W0))
    if feedforward:
        return {"y": matmul(multiply(x2, exact(l), p), W0_t, p, bias=exact_or_none(bias)), "x2": x2}
    z = matmul(x2, W0_t, p, bias=exact_or_none(bias))
    return {"y": multiply(z, transpose(exact(l)), p), "z": z, "x2": x2}


def ia3_forward_bound(x: Any, W0: Any, l: Any, *, bias: Any = None, fan_in_fan_out: bool = False,
                      feedforward: bool | None = None, dtype: str = "float32", accumulation: str | None = None,
                      model: str = "rigorous") -> Any:
    """Per-element bound on IA3's y (either side)."""
    ff = ia3_feedforward(l, linear_shape(W0, fan_in_fan_out=fan_in_fan_out), feedforward=feedforward)
    chain = lambda p: _ia3_chain(x, W0, l, bias=bias, fan_in_fan_out=fan_in_fan_out, feedforward=ff, p=p)["y"]  # noqa: E731
    return output_bound(chain, Precision(dtype, accumulation, model), x_shape=tuple(x.shape))


def ia3_backward_bound(dy: Any, x: Any, W0: Any, l: Any, *, bias: Any = None, fan_in_fan_out: bool = False,
                       feedforward: bool | None = None, bias_trainable: bool = False, dtype: str = "float32",
                       accumulation: str | None = None, model: str = "rigorous") -> dict[str, Any]:
    """Per-element bounds on dx, dl (dbias) of `ia3_backward`; PEFT's autograd takes the same order."""
    ff = ia3_feedforward(l, linear_shape(W0, fan_in_fan_out=fan_in_fan_out), feedforward=feedforward)

    def chain(p: Precision) -> dict[str, Bounded]:
        f = _ia3_chain(x, W0, l, bias=bias, fan_in_fan_out=fan_in_fan_out, feedforward=ff, p=p)
        g2 = rows(exact(dy))
        W0_rows = transpose(exact(W0)) if fan_in_fan_out else exact(W0)
        if ff:
            g = matmul(g2, W0_rows, p)
            grads = {"dx": multiply(g, exact(l), p), "dl": _lifted(row_sum(multiply(g, f["x2"], p), p), feedforward=True)}
            dbias = row_sum(g2, p)
        else:
            dz = multiply(g2, transpose(exact(l)), p)
            grads = {"dx": matmul(dz, W0_rows, p),
                     "dl": _lifted(row_sum(multiply(g2, f["z"], p), p), feedforward=False)}
            dbias = row_sum(dz, p)
        if bias_trainable:
            grads["dbias"] = dbias
        return grads

    return gradient_bounds(chain, Precision(dtype, accumulation, model), x_shape=tuple(x.shape))


def ia3_merge_bound(W0: Any, l: Any, *, fan_in_fan_out: bool = False, feedforward: bool | None = None,
                    dtype: str = "float32", accumulation: str | None = None, model: str = "rigorous",
                    unmerge: bool = False) -> Any:
    """Per-element bound on W0 * l (one rounding per entry), in W0's layout; with unmerge=True on
    W / l (pass the merged W as W0). The same bound covers l * b and b / l for the bias."""
    ia3_feedforward(l, linear_shape(W0, fan_in_fan_out=fan_in_fan_out), feedforward=feedforward)
    scale = exact(l)
    scale = transpose(scale) if fan_in_fan_out else scale
    op = divide if unmerge else multiply
    return with_reference(lambda p: op(exact(W0), scale, p), Precision(dtype, accumulation, model))


# --- the method table's row (refpeft.methods.spec) ---------------------------------------------


def _side(m: Any) -> tuple[int | None, int | None]:
    """(k, d) as far as l alone tells: (1, k) gives k, (d, 1) gives d, (1, 1) neither (module docstring)."""
    rows_, cols = (int(n) for n in m.l.shape)
    if (rows_, cols) == (1, 1):
        return None, None
    return (cols, None) if rows_ == 1 else (None, rows_)


def _module_forward(x: Any, W0: Any, module: Any, *, shared: Any = None, bias: Any = None, dropout_mask: Any = None,
                    bias_trainable: bool = False) -> tuple[Any, Ia3Cache]:
    if dropout_mask is not None:
        raise ConfigError("IA3 has no dropout (PEFT's IA3Config has none): pass no dropout_mask")
    return ia3_forward(x, W0, module.l, bias=bias, fan_in_fan_out=module.fan_in_fan_out,
                       bias_trainable=bias_trainable)


def _module_init(W0s: Mapping[str, Any], *, ranks: Mapping[str, int], alphas: Mapping[str, float],
                 feedforward_modules: tuple[str, ...] = DEFAULT_FEEDFORWARD, **unused: Any) -> tuple[dict, dict, dict]:
    """PEFT's IA3 init on the layers W0s: l = ones, (1, k) on the layers whose path ends in a
    `feedforward_modules` entry (PEFT's list rule), (d, 1) on the others. Seeds and ranks do not enter."""
    modules = {}
    for path, W0 in W0s.items():
        xp = namespace(W0)
        ff = any(path == f or path.endswith("." + f) for f in feedforward_modules)
        shape = LinearShape(k=int(W0.shape[1]), d=int(W0.shape[0]))
        modules[path] = ModuleAdapter("ia3", {"l": ia3_init(shape, feedforward=ff, dtype=dtype_name(W0.dtype, xp=xp),
                                                            xp=xp)})
    return modules, {}, {}


def _module_branch(W0: Any, m: Any, *, shared: Any = None) -> tuple[Any, Any]:
    """The exporter's "ia3-scaling" inputs (l_in (k,), l_out (d,)), y = ((x * l_in) W0^T + b) * l_out:
    l on its own side, ones (an exact factor) on the other."""
    xp = namespace(m.l)
    shape = linear_shape(W0, fan_in_fan_out=m.fan_in_fan_out)
    if ia3_feedforward(m.l, shape):
        return m.l[0, :], xp.ones(shape.d, dtype=m.l.dtype)
    return xp.ones(shape.k, dtype=m.l.dtype), m.l[:, 0]


IA3 = Method(
    name="ia3", summary="one learned vector scales each layer's outputs, or its inputs on feed-forward layers "
                        "(Liu et al. 2022)",
    peft_type="IA3", peft_flags={}, tensors={"l": "ia3_l"},
    trainable=("l",), per_output=("l",), scaled=False, mergeable=True,
    onnx_branch="ia3-scaling",
    rank=lambda m: 1, out_features=lambda m: _side(m)[1], in_features=lambda m: _side(m)[0],
    forward=_module_forward, backward=ia3_backward,
    delta_weight=lambda W0, m, *, shared=None: ia3_delta_weight(W0, m.l, fan_in_fan_out=m.fan_in_fan_out),
    merge=lambda W0, m, *, shared=None: ia3_merge(W0, m.l, fan_in_fan_out=m.fan_in_fan_out),
    unmerge=lambda W, m, *, shared=None: ia3_unmerge(W, m.l, fan_in_fan_out=m.fan_in_fan_out),
    merge_bias=lambda b, m, *, unmerge=False: ia3_merge_bias(b, m.l, unmerge=unmerge),
    parameter_count=lambda k, d, m: int(m.l.shape[0]) * int(m.l.shape[1]),
    branch_values=_module_branch, init_modules=_module_init,
)
