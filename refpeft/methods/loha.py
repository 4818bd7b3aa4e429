"""LoHa for a linear layer: a Hadamard product of two low-rank products (Hyeon-Woo et al. 2022, FedPara).

LoHa (LyCORIS's "LoRA with Hadamard product", arXiv 2108.06098) as HF PEFT 0.21 computes it
(`tuners/loha/layer.py`, PEFT's layout: the `_a` factors are (d, r), the `_b` factors (r, k)):

    W1 = w1a w1b,  W2 = w2a w2b                  # (d, k) each, rank <= r
    delta = s * (W1 ⊙ W2)                        # (d, k), rank <= r^2;  s = alpha / r
    y = x W0^T + b + x delta^T                   # (n, d); no input dropout in PEFT

The Hadamard product of two rank-r products is itself a product of two rank-r^2 factors (the
face-splitting / Khatri-Rao identity (u1 v1^T) ⊙ (u2 v2^T) = (u1 ⊙ u2)(v1 ⊙ v2)^T, summed over
the r x r pairs of columns):

    P[:, (i, j)] = w1a[:, i] ⊙ w2a[:, j]         # (d, r^2)
    Q[(i, j), :] = w1b[i, :] ⊙ w2b[j, :]         # (r^2, k)
    delta = s * P Q

so LoHa is LoRA with factors P, Q, and this module never forms the d x k delta in forward or
backward (PEFT does): the cache holds x and xq = x Q^T (n, r^2); for d = k = 4096, r = 8 that is
n r^2 (k + d) = 0.5M multiply-adds per row instead of d k = 16.8M. `loha_delta_weight` forms it,
for merging.

Forward:
    xq = x Q^T                                    # (n, r^2)  cached
    y  = x W0^T + b + s * (xq P^T)                # (n, d)

Backward, for dy = dL/dy (n, d), P3 and Q3 the (d, r, r) / (r, r, k) views of P and Q:

    dP   = s * dy^T xq                            # (d, r^2)
    gq   = s * dy P                               # (n, r^2)  dL/d(xq)
    dQ   = gq^T x                                 # (r^2, k)
    dw1a[:, i] = sum_j dP3[:, i, j] ⊙ w2a[:, j]   # (d, r)    through P's Khatri-Rao product
    dw2a[:, j] = sum_i dP3[:, i, j] ⊙ w1a[:, i]   # (d, r)
    dw1b[i, :] = sum_j dQ3[i, j, :] ⊙ w2b[j, :]   # (r, k)
    dw2b[j, :] = sum_i dQ3[i, j, :] ⊙ w1b[i, :]   # (r, k)
    dx   = dy W0 + gq Q                           # (n, k)
    dbias = sum_n dy                              # (d,)  only when the bias is trainable

(With G = s dy^T x these are PEFT's HadaWeight.backward: dw1a = (G ⊙ W2) w1b^T, dw1b = w1a^T (G ⊙ W2),
and the same with 1 and 2 swapped; the sums over j above are those products taken factor by factor.)

PEFT's scale: `HadaWeight` multiplies by `torch.tensor(alpha / r)`, a float32 tensor, so PEFT's s is
alpha / r rounded to float32 even for float64 weights (a relative 3e-8 off for alpha = 4, r = 3);
`loha_scaling` returns that value, so refpeft matches PEFT to the last bits in float64.
PEFT's `rank_dropout` and `module_dropout` act only in training mode and are not modelled (they
are accepted in files and treated as 0); conv layers (hada_t1 / hada_t2, `use_effective_conv2d`)
are not supported: linear layers only.
Init (PEFT's init_weights=True): w1a, w1b, w2a Kaiming-uniform with a = sqrt(5), w2b = 0, so delta = 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from refpeft.adapter import ModuleAdapter
from refpeft.backend import check_float_array, dtype_name, namespace
from refpeft.errors import ConfigError, ShapeError
from refpeft.init import GENERATORS, as_parameter, kaiming_uniform_bound, torch_cpu_generator, torch_cpu_uniform, uniform
from refpeft.methods.linear import LinearShape, base_forward, base_input_grad, check_linear_inputs, check_rank, \
    flatten_rows, linear_shape
from refpeft.methods.lora import lora_scaling
from refpeft.methods.spec import Method
from refpeft.tolerance import Bounded, Precision, add, either, exact, exact_or_none, gradient_bounds, matmul, \
    multiply, output_bound, row_sum, rows, scale, transpose, with_reference

FACTOR_NAMES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


def loha_scaling(alpha: float, r: int) -> float:
    """PEFT's s: alpha / r rounded to float32 (it multiplies by `torch.tensor(alpha / r)`)."""
    return float(np.float32(lora_scaling(alpha, r)))


def loha_init(k: int, d: int, r: int, *, seed: int = 0, generator: str = "numpy", dtype: str = "float64",
              xp: Any = None) -> tuple[Any, Any, Any, Any]:
    """Initial (w1a (d, r), w1b (r, k), w2a (d, r), w2b (r, k)): the first three Kaiming-uniform with
    a = sqrt(5) (bound 1 / sqrt(fan_in), fan_in = the second axis), w2b = 0 (PEFT's init_weights=True).

    generator "torch-cpu" reproduces PEFT's draws after `torch.manual_seed(seed)` for one layer
    (w1a, w1b, w2a from one stream, in that order; float32 values); "numpy" draws each from PCG64
    with seeds seed, seed + 1, seed + 2."""
    check_rank(r, LinearShape(k=k, d=d))
    if generator not in GENERATORS:
        raise ConfigError(f"unknown generator {generator!r}; choose one of {', '.join(GENERATORS)}")
    shapes = ((d, r), (r, k), (d, r))
    if generator == "numpy":
        drawn = [uniform(shape, kaiming_uniform_bound(shape[1]), seed=seed + i) for i, shape in enumerate(shapes)]
    else:
        stream = torch_cpu_generator(seed)
        drawn = [torch_cpu_uniform(shape, -kaiming_uniform_bound(shape[1]), kaiming_uniform_bound(shape[1]),
                                   bit_generator=stream) for shape in shapes]
    w1a, w1b, w2a = (as_parameter(a, dtype=dtype, xp=xp) for a in drawn)
    return w1a, w1b, w2a, as_parameter(np.zeros((r, k)), dtype=dtype, xp=xp)


def loha_khatri_rao(w1a: Any, w1b: Any, w2a: Any, w2b: Any, *, xp: Any) -> tuple[Any, Any]:
    """(P (d, r^2), Q (r^2, k)) with (w1a w1b) ⊙ (w2a w2b) = P Q; column / row (i, j) at i r + j."""
    d, r = w1a.shape
    k = w1b.shape[1]
    P = xp.reshape(w1a[:, :, None] * w2a[:, None, :], (d, r * r))
    Q = xp.reshape(w1b[:, None, :] * w2b[None, :, :], (r * r, k))
    return P, Q


@dataclass(frozen=True)
class LohaCache:
    """What `loha_backward` needs: the input, xq = x Q^T, and the parameters (by reference)."""

    x: Any                 # (..., k)
    xq: Any                # (n, r^2)
    W0: Any
    w1a: Any
    w1b: Any
    w2a: Any
    w2b: Any
    scaling: float
    fan_in_fan_out: bool
    bias_trainable: bool


@dataclass(frozen=True)
class LohaGrads:
    """Gradients of the loss with respect to the input and each factor (named after PEFT's tensors)."""

    dx: Any           # (..., k)
    dhada_w1_a: Any   # (d, r)
    dhada_w1_b: Any   # (r, k)
    dhada_w2_a: Any   # (d, r)
    dhada_w2_b: Any   # (r, k)
    dbias: Any        # (d,) or None when the bias is frozen or absent


def loha_forward(x: Any, W0: Any, w1a: Any, w1b: Any, w2a: Any, w2b: Any, *, scaling: float, bias: Any = None,
                 fan_in_fan_out: bool = False, bias_trainable: bool = False) -> tuple[Any, LohaCache]:
    """y = x W0^T + b + s x ((w1a w1b) ⊙ (w2a w2b))^T, computed as s (x Q^T) P^T (module docstring)."""
    xp, shape = check_linear_inputs(x, W0, bias=bias, fan_in_fan_out=fan_in_fan_out, hada_w1_a=w1a, hada_w1_b=w1b,
                                    hada_w2_a=w2a, hada_w2_b=w2b)
    check_loha_factors(w1a, w1b, w2a, w2b, d=shape.d, k=shape.k)
    if bias_trainable and bias is None:
        raise ConfigError("bias_trainable=True needs a bias")
    x2 = flatten_rows(x, xp=xp)                                        # (n, k)
    P, Q = loha_khatri_rao(w1a, w1b, w2a, w2b, xp=xp)                  # (d, r^2), (r^2, k)
    xq = xp.matmul(x2, xp.matrix_transpose(Q))                         # (n, r^2)
    y = base_forward(x2, W0, bias, fan_in_fan_out=fan_in_fan_out, xp=xp) + \
        xp.matmul(xq, xp.matrix_transpose(P)) * scaling                # (n, d)
    cache = LohaCache(x=x, xq=xq, W0=W0, w1a=w1a, w1b=w1b, w2a=w2a, w2b=w2b, scaling=scaling,
                      fan_in_fan_out=fan_in_fan_out, bias_trainable=bias_trainable)
    return xp.reshape(y, (*x.shape[:-1], shape.d)), cache


def loha_backward(dy: Any, cache: LohaCache) -> LohaGrads:
    """dx and the four factor gradients (and dbias when trainable); P and Q are recomputed, not cached."""
    xp = namespace(dy, cache.x)
    (d, r), k = cache.w1a.shape, cache.w1b.shape[1]
    check_float_array("dy", dy, xp=xp, shape=(*cache.x.shape[:-1], d))
    s = cache.scaling
    g2 = flatten_rows(dy, xp=xp)                                       # (n, d)
    x2 = flatten_rows(cache.x, xp=xp)                                  # (n, k)
    P, Q = loha_khatri_rao(cache.w1a, cache.w1b, cache.w2a, cache.w2b, xp=xp)
    dP = xp.reshape(s * xp.matmul(xp.matrix_transpose(g2), cache.xq), (d, r, r))   # (d, r, r)
    gq = s * xp.matmul(g2, P)                                          # (n, r^2)
    dQ = xp.reshape(xp.matmul(xp.matrix_transpose(gq), x2), (r, r, k))             # (r, r, k)
    dw1a = xp.sum(dP * cache.w2a[:, None, :], axis=2)                  # sum over j
    dw2a = xp.sum(dP * cache.w1a[:, :, None], axis=1)                  # sum over i
    dw1b = xp.sum(dQ * cache.w2b[None, :, :], axis=1)
    dw2b = xp.sum(dQ * cache.w1b[:, None, :], axis=0)
    dx = base_input_grad(g2, cache.W0, fan_in_fan_out=cache.fan_in_fan_out, xp=xp) + xp.matmul(gq, Q)
    dbias = xp.sum(g2, axis=0) if cache.bias_trainable else None
    return LohaGrads(dx=xp.reshape(dx, cache.x.shape), dhada_w1_a=dw1a, dhada_w1_b=dw1b, dhada_w2_a=dw2a,
                     dhada_w2_b=dw2b, dbias=dbias)


def loha_delta_weight(w1a: Any, w1b: Any, w2a: Any, w2b: Any, *, scaling: float, fan_in_fan_out: bool = False) -> Any:
    """s (w1a w1b) ⊙ (w2a w2b), (d, k), or (k, d) with fan_in_fan_out: PEFT's order. Forms d x k."""
    xp = namespace(w1a, w1b, w2a, w2b)
    for name, a in zip(FACTOR_NAMES, (w1a, w1b, w2a, w2b)):
        check_float_array(name, a, xp=xp)
    check_loha_factors(w1a, w1b, w2a, w2b, d=w1a.shape[0], k=w1b.shape[-1])
    delta = (xp.matmul(w1a, w1b) * xp.matmul(w2a, w2b)) * scaling
    return xp.matrix_transpose(delta) if fan_in_fan_out else delta


def loha_merge(W0: Any, w1a: Any, w1b: Any, w2a: Any, w2b: Any, *, scaling: float,
               fan_in_fan_out: bool = False) -> Any:
    """W0 + delta in W0's layout."""
    return W0 + _checked_delta(W0, w1a, w1b, w2a, w2b, scaling=scaling, fan_in_fan_out=fan_in_fan_out)


def loha_unmerge(W: Any, w1a: Any, w1b: Any, w2a: Any, w2b: Any, *, scaling: float,
                 fan_in_fan_out: bool = False) -> Any:
    """W - delta: the frozen weight back (exact up to one rounding per entry)."""
    return W - _checked_delta(W, w1a, w1b, w2a, w2b, scaling=scaling, fan_in_fan_out=fan_in_fan_out)


def loha_parameter_count(k: int, d: int, r: int, *, bias: bool = False) -> int:
    """Trainable parameters of one LoHa layer: 2 r (d + k), twice LoRA's for the same r (plus d for a bias)."""
    return 2 * r * (d + k) + (d if bias else 0)


def check_loha_factors(w1a: Any, w1b: Any, w2a: Any, w2b: Any, *, d: int, k: int) -> None:
    """w1a, w2a must be (d, r) and w1b, w2b (r, k), one r >= 1."""
    for name, a in zip(FACTOR_NAMES, (w1a, w1b, w2a, w2b)):
        if len(a.shape) != 2:
            raise ShapeError(f"{name} must be 2-D, got shape {tuple(a.shape)}")
    r = w1a.shape[1]
    check_rank(r, LinearShape(k=k, d=d))
    for name, a, want in zip(FACTOR_NAMES, (w1a, w1b, w2a, w2b), ((d, r), (r, k), (d, r), (r, k))):
        if tuple(a.shape) != want:
            raise ShapeError(f"{name} has shape {tuple(a.shape)}, expected {want} (d = {d}, k = {k}, r = {r} "
                             "from hada_w1_a)")


def _checked_delta(W: Any, w1a: Any, w1b: Any, w2a: Any, w2b: Any, *, scaling: float, fan_in_fan_out: bool) -> Any:
    delta = loha_delta_weight(w1a, w1b, w2a, w2b, scaling=scaling, fan_in_fan_out=fan_in_fan_out)
    check_float_array("W", W, xp=namespace(W, delta), shape=tuple(delta.shape))
    return delta


# --- error bounds (composed from refpeft.tolerance's algebra; docs/tolerance.md) ---------------


def _loha_chain(x: Any, W0: Any, w1a: Any, w1b: Any, w2a: Any, w2b: Any, *, scaling: float, bias: Any,
                fan_in_fan_out: bool, p: Precision) -> dict[str, Bounded]:
    """refpeft's order (Khatri-Rao factors, then two products) and PEFT's (form delta, then x delta^T)."""
    xp = namespace(exact(w1a).value)
    x2 = rows(exact(x))
    W0_t = exact(W0) if fan_in_fan_out else transpose(exact(W0))
    base = matmul(x2, W0_t, p, bias=exact_or_none(bias))
    P, Q = (Bounded(xp.reshape(t.value, s), xp.reshape(t.error, s)) for t, s in (
        (multiply(exact(w1a[:, :, None]), exact(w2a[:, None, :]), p), (w1a.shape[0], -1)),
        (multiply(exact(w1b[:, None, :]), exact(w2b[None, :, :]), p), (-1, w1b.shape[1]))))
    xq = matmul(x2, transpose(Q), p)
    ours = add(base, matmul(xq, transpose(P), p, scale=scaling), p)
    delta = scale(multiply(matmul(exact(w1a), exact(w1b), p), matmul(exact(w2a), exact(w2b), p), p), scaling, p)
    peft = add(base, matmul(x2, transpose(delta), p), p)
    return {"y": either(ours, peft), "P": P, "Q": Q, "xq": xq, "delta": delta, "x2": x2}


def loha_forward_bound(x: Any, W0: Any, w1a: Any, w1b: Any, w2a: Any, w2b: Any, *, scaling: float, bias: Any = None,
                       fan_in_fan_out: bool = False, dtype: str = "float32", accumulation: str | None = None,
                       model: str = "rigorous") -> Any:
    """Per-element bound on |y_peer - y_refpeft| for LoHa's y, whichever of the two orders the peer uses."""
    chain = lambda p: _loha_chain(x, W0, w1a, w1b, w2a, w2b, scaling=scaling, bias=bias,  # noqa: E731
                                  fan_in_fan_out=fan_in_fan_out, p=p)["y"]
    return output_bound(chain, Precision(dtype, accumulation, model), x_shape=tuple(x.shape))


def loha_backward_bound(dy: Any, x: Any, W0: Any, w1a: Any, w1b: Any, w2a: Any, w2b: Any, *, scaling: float,
                        fan_in_fan_out: bool = False, bias_trainable: bool = False, dtype: str = "float32",
                        accumulation: str | None = None, model: str = "rigorous") -> dict[str, Any]:
    """Per-element bounds on `loha_backward`'s gradients, following refpeft's factored order."""
    def chain(p: Precision) -> dict[str, Bounded]:
        f = _loha_chain(x, W0, w1a, w1b, w2a, w2b, scaling=scaling, bias=None, fan_in_fan_out=fan_in_fan_out, p=p)
        xp = namespace(f["x2"].value)
        g2 = rows(exact(dy))
        d, r = w1a.shape
        dP = matmul(transpose(g2), f["xq"], p, scale=scaling)                       # (d, r^2)
        gq = matmul(g2, f["P"], p, scale=scaling)                                   # (n, r^2)
        dQ = matmul(transpose(gq), f["x2"], p)                                      # (r^2, k)
        dP3 = Bounded(xp.reshape(dP.value, (d, r, r)), xp.reshape(dP.error, (d, r, r)))
        dQ3 = Bounded(xp.reshape(dQ.value, (r, r, -1)), xp.reshape(dQ.error, (r, r, -1)))

        def summed(P3: Bounded, other: Any, axis: int) -> Bounded:   # sum over one r-axis of P3 ⊙ other
            prod = multiply(P3, exact(other), p)
            order = (axis, *(a for a in range(3) if a != axis))           # the summed axis first
            v, e = (xp.permute_dims(t, order) for t in (prod.value, prod.error))
            out = row_sum(Bounded(xp.reshape(v, (r, -1)), xp.reshape(e, (r, -1))), p)
            return Bounded(xp.reshape(out.value, v.shape[1:]), xp.reshape(out.error, v.shape[1:]))

        W0_rows = transpose(exact(W0)) if fan_in_fan_out else exact(W0)
        grads = {"dx": add(matmul(g2, W0_rows, p), matmul(gq, f["Q"], p), p),
                 "dhada_w1_a": summed(dP3, w2a[:, None, :], 2), "dhada_w2_a": summed(dP3, w1a[:, :, None], 1),
                 "dhada_w1_b": summed(dQ3, w2b[None, :, :], 1), "dhada_w2_b": summed(dQ3, w1b[:, None, :], 0)}
        if bias_trainable:
            grads["dbias"] = row_sum(g2, p)
        return grads

    return gradient_bounds(chain, Precision(dtype, accumulation, model), x_shape=tuple(x.shape))


def loha_merge_bound(W0: Any, w1a: Any, w1b: Any, w2a: Any, w2b: Any, *, scaling: float, fan_in_fan_out: bool = False,
                     dtype: str = "float32", accumulation: str | None = None, model: str = "rigorous",
                     unmerge: bool = False) -> Any:
    """Per-element bound on W0 + delta (or W - delta with unmerge=True), PEFT's order, W0's layout."""
    def chain(p: Precision) -> Bounded:
        delta = scale(multiply(matmul(exact(w1a), exact(w1b), p), matmul(exact(w2a), exact(w2b), p), p),
                      -scaling if unmerge else scaling, p)
        return add(exact(W0), transpose(delta) if fan_in_fan_out else delta, p)

    return with_reference(chain, Precision(dtype, accumulation, model))


# --- the method table's row (refpeft.methods.spec) ---------------------------------------------


def _factors(m: Any) -> tuple[Any, Any, Any, Any]:
    return m.hada_w1_a, m.hada_w1_b, m.hada_w2_a, m.hada_w2_b


def _module_forward(x: Any, W0: Any, m: Any, *, shared: Any = None, bias: Any = None, dropout_mask: Any = None,
                    bias_trainable: bool = False) -> tuple[Any, LohaCache]:
    if dropout_mask is not None:
        raise ConfigError("LoHa has no input dropout in PEFT (its rank_dropout / module_dropout are not modelled); "
                          "pass dropout_mask=None")
    return loha_forward(x, W0, *_factors(m), scaling=loha_scaling(m.alpha, m.r), bias=bias,
                        fan_in_fan_out=m.fan_in_fan_out, bias_trainable=bias_trainable)


def _module_delta(W0: Any, m: Any, *, shared: Any = None) -> Any:
    return loha_delta_weight(*_factors(m), scaling=loha_scaling(m.alpha, m.r), fan_in_fan_out=m.fan_in_fan_out)


def _module_branch(W0: Any, m: Any, *, shared: Any = None) -> tuple[Any, ...]:
    """The exporter's "low-rank" branch ((x A^T) s) B^T with A = Q (r^2, k), B = P (d, r^2): inputs Q^T, P^T, s."""
    xp = namespace(m.hada_w1_a)
    P, Q = loha_khatri_rao(*_factors(m), xp=xp)
    return xp.matrix_transpose(Q), xp.matrix_transpose(P), xp.asarray([loha_scaling(m.alpha, m.r)], dtype=P.dtype)


def _module_init(W0s: Mapping[str, Any], *, ranks: Mapping[str, int], alphas: Mapping[str, float], seed: int = 0,
                 generator: str = "numpy") -> tuple[dict, dict, dict]:
    """Fresh LoHa modules (PEFT's init_weights=True) on the layers W0s (d, k): layer i from seed + i."""
    modules = {}
    for i, (path, W0) in enumerate(W0s.items()):
        xp = namespace(W0)
        shape = linear_shape(W0, fan_in_fan_out=False)
        tensors = loha_init(shape.k, shape.d, ranks[path], seed=seed + i, generator=generator,
                            dtype=dtype_name(W0.dtype, xp=xp), xp=xp)
        modules[path] = ModuleAdapter("loha", dict(zip(FACTOR_NAMES, tensors)), alpha=alphas[path])
    return modules, {}, {}


LOHA = Method(
    name="loha", summary="Hadamard product of two low-rank products, s (w1a w1b) ⊙ (w2a w2b) (FedPara / LyCORIS)",
    peft_type="LOHA", peft_flags={}, tensors={name: name for name in FACTOR_NAMES},
    trainable=FACTOR_NAMES, per_output=("hada_w1_a", "hada_w2_a"), scaled=True, mergeable=True,
    onnx_branch="low-rank",
    rank=lambda m: int(m.hada_w1_a.shape[1]), out_features=lambda m: int(m.hada_w1_a.shape[0]),
    in_features=lambda m: int(m.hada_w1_b.shape[1]),
    forward=_module_forward, backward=loha_backward, delta_weight=_module_delta,
    merge=lambda W0, m, *, shared=None: loha_merge(W0, *_factors(m), scaling=loha_scaling(m.alpha, m.r),
                                                   fan_in_fan_out=m.fan_in_fan_out),
    unmerge=lambda W, m, *, shared=None: loha_unmerge(W, *_factors(m), scaling=loha_scaling(m.alpha, m.r),
                                                      fan_in_fan_out=m.fan_in_fan_out),
    parameter_count=lambda k, d, m: loha_parameter_count(k, d, m.r),
    branch_values=_module_branch, init_modules=_module_init,
)
