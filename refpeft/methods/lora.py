"""LoRA for a linear layer: forward, hand-written backward, merge and unmerge (Hu et al. 2021).

Forward (PyTorch layout: A is (r, k), B is (d, r); shapes at line ends, see refpeft.methods.linear):

    xd = dropout(x) = x * mask                 # (..., k)  mask holds 0 or 1/(1-p), or is absent
    xa = xd A^T                                 # (..., r)  the only adapter activation cached
    y  = x W0^T + b + s * (xa B^T)              # (..., d)
    s  = alpha / r        (LoRA)    or    alpha / sqrt(r)   (rsLoRA, Kalajdzievski 2023)

Backward, for an upstream gradient dy = dL/dy (..., d), with rows flattened to n = prod(...):

    dB    = s * dy^T xa                         # (d, r)
    g     = s * dy B                            # (n, r)   dL/d(xa)
    dA    = g^T xd                              # (r, k)
    dx    = dy W0 + (g A) * mask                # (n, k)   base path + adapter path
    dbias = sum_n dy                            # (d,)     only when the bias is trainable

The product B A (d x k) is never formed in forward or backward: the cache holds x, the mask and
xa, plus references to the parameters. `delta_weight` forms s B A on purpose, for merging.

HF PEFT computes the adapter output as `(xa B^T) * s` and adds it to the base output; the forward
here keeps that order so float32 results round as PEFT's do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from refpeft.adapter import ModuleAdapter
from refpeft.backend import check_float_array, dtype_name, namespace
from refpeft.errors import ConfigError, ShapeError
from refpeft.init import GENERATORS, as_parameter, kaiming_uniform_bound, normal, torch_cpu_generator, torch_cpu_uniform, uniform
from refpeft.methods.linear import (
    LinearShape,
    base_forward,
    base_input_grad,
    check_linear_inputs,
    check_rank,
    dropped_rows,
    flatten_rows,
)
from refpeft.methods.spec import Method
from refpeft.tolerance import Bounded, Precision, add, exact, exact_or_none, gradient_bounds, matmul, multiply, \
    output_bound, row_sum, rows, transpose, with_reference

LORA_INITS = ("default", "gaussian", "zeros")


def lora_scaling(alpha: float, r: int, *, rslora: bool = False) -> float:
    """s = alpha / r, or alpha / sqrt(r) with rsLoRA (rank-stabilised scaling)."""
    if r < 1:
        raise ConfigError(f"rank r must be at least 1, got {r}")
    if not math.isfinite(alpha):
        raise ConfigError(f"alpha must be finite, got {alpha}")
    return alpha / math.sqrt(r) if rslora else alpha / r


def lora_init(k: int, d: int, r: int, *, init: str = "default", seed: int = 0, generator: str = "numpy",
              dtype: str = "float64", xp: Any = None) -> tuple[Any, Any]:
    """Initial (A, B) of shapes (r, k), (d, r).

    init:
      "default"   A ~ U(-1/sqrt(k), 1/sqrt(k)) (Kaiming-uniform, a = sqrt(5): PEFT's `True`), B = 0
      "gaussian"  A ~ N(0, (1/r)^2) (PEFT's "gaussian"), B = 0; numpy generator only
      "zeros"     A = 0, B = 0: an empty adapter to be filled from a file (it cannot learn: both
                  gradients vanish at this point)
    generator "torch-cpu" reproduces PEFT's draw order after `torch.manual_seed(seed)` for one
    freshly created layer: Kaiming for A, Kaiming for B, then A again (the one kept).
    """
    check_rank(r, LinearShape(k=k, d=d))
    if init not in LORA_INITS:
        raise ConfigError(f"unknown LoRA init {init!r}; choose one of {', '.join(LORA_INITS)}")
    if generator not in GENERATORS:
        raise ConfigError(f"unknown generator {generator!r}; choose one of {', '.join(GENERATORS)}")
    B = as_parameter(np.zeros((d, r)), dtype=dtype, xp=xp)
    if init == "zeros":
        return as_parameter(np.zeros((r, k)), dtype=dtype, xp=xp), B
    if init == "gaussian":
        if generator != "numpy":
            raise ConfigError("the gaussian init is only reproducible with the numpy generator")
        return as_parameter(normal((r, k), 1.0 / r, seed=seed), dtype=dtype, xp=xp), B
    bound_a = kaiming_uniform_bound(k)
    if generator == "numpy":
        return as_parameter(uniform((r, k), bound_a, seed=seed), dtype=dtype, xp=xp), B
    stream = torch_cpu_generator(seed)
    for shape, fan_in in (((r, k), k), ((d, r), r)):  # nn.Linear's own inits, then discarded
        bound = kaiming_uniform_bound(fan_in)
        torch_cpu_uniform(shape, -bound, bound, bit_generator=stream)
    A = torch_cpu_uniform((r, k), -bound_a, bound_a, bit_generator=stream)
    return as_parameter(A, dtype=dtype, xp=xp), B


@dataclass(frozen=True)
class LoraCache:
    """What `lora_backward` needs: the input, the dropout mask, xa, and the parameters (by reference)."""

    x: Any                 # (..., k)
    dropout_mask: Any      # (..., k) or None
    xa: Any                # (n, r)   dropout(x) A^T, rows flattened
    W0: Any
    A: Any
    B: Any
    scaling: float
    fan_in_fan_out: bool
    bias_trainable: bool


@dataclass(frozen=True)
class LoraGrads:
    """Gradients of the loss with respect to the input and each trainable tensor."""

    dx: Any      # (..., k)
    dA: Any      # (r, k)
    dB: Any      # (d, r)
    dbias: Any   # (d,) or None when the bias is frozen or absent


def lora_forward(x: Any, W0: Any, A: Any, B: Any, *, scaling: float, bias: Any = None,
                 dropout_mask: Any = None, fan_in_fan_out: bool = False,
                 bias_trainable: bool = False) -> tuple[Any, LoraCache]:
    """y = x W0^T + b + s * (dropout(x) A^T) B^T, and the cache for `lora_backward`."""
    xp, shape = check_linear_inputs(x, W0, bias=bias, fan_in_fan_out=fan_in_fan_out, A=A, B=B,
                                    dropout_mask=dropout_mask)
    check_factors(A, B, d=shape.d, k=shape.k)
    check_dropout_mask(dropout_mask, x)
    if bias_trainable and bias is None:
        raise ConfigError("bias_trainable=True needs a bias")
    x2, _, xd = dropped_rows(x, dropout_mask, xp=xp)                # (n, k) each
    xa = xp.matmul(xd, xp.matrix_transpose(A))                        # (n, r)
    branch = xp.matmul(xa, xp.matrix_transpose(B))                    # (n, d)
    branch *= scaling                                                 # in place: one (n, d) temporary, not two
    y = base_forward(x2, W0, bias, fan_in_fan_out=fan_in_fan_out, xp=xp)
    y += branch                                                       # (n, d)  = base + (xa B^T) * s, PEFT's order
    cache = LoraCache(x=x, dropout_mask=dropout_mask, xa=xa, W0=W0, A=A, B=B, scaling=scaling,
                      fan_in_fan_out=fan_in_fan_out, bias_trainable=bias_trainable)
    return xp.reshape(y, (*x.shape[:-1], shape.d)), cache


def lora_backward(dy: Any, cache: LoraCache) -> LoraGrads:
    """dx, dA, dB (and dbias when trainable) from dy = dL/dy; see the module docstring."""
    xp = namespace(dy, cache.x)
    d = cache.B.shape[0]
    check_float_array("dy", dy, xp=xp, shape=(*cache.x.shape[:-1], d))
    s = cache.scaling
    g2 = flatten_rows(dy, xp=xp)                                       # (n, d)
    x2, mask, xd = dropped_rows(cache.x, cache.dropout_mask, xp=xp)    # xd recomputed, not cached
    dB = s * xp.matmul(xp.matrix_transpose(g2), cache.xa)              # (d, r)
    g = s * xp.matmul(g2, cache.B)                                     # (n, r)
    dA = xp.matmul(xp.matrix_transpose(g), xd)                         # (r, k)
    dx_adapter = xp.matmul(g, cache.A)                                 # (n, k)
    if mask is not None:
        dx_adapter = dx_adapter * mask
    dx = base_input_grad(g2, cache.W0, fan_in_fan_out=cache.fan_in_fan_out, xp=xp)
    dx += dx_adapter                                                   # in place into the fresh (n, k) product
    dbias = xp.sum(g2, axis=0) if cache.bias_trainable else None
    return LoraGrads(dx=xp.reshape(dx, cache.x.shape), dA=dA, dB=dB, dbias=dbias)


def lora_delta_weight(A: Any, B: Any, *, scaling: float, fan_in_fan_out: bool = False) -> Any:
    """The weight change s B A, (d, k), or (k, d) with fan_in_fan_out. Forms the d x k product."""
    xp = namespace(A, B)
    check_float_array("A", A, xp=xp)
    check_float_array("B", B, xp=xp)
    check_factors(A, B, d=B.shape[0], k=A.shape[-1])
    delta = xp.matmul(B, A) * scaling
    return xp.matrix_transpose(delta) if fan_in_fan_out else delta


def lora_merge(W0: Any, A: Any, B: Any, *, scaling: float, fan_in_fan_out: bool = False) -> Any:
    """W0 + s B A in W0's layout: the merged layer computes x W^T + b with no adapter branch."""
    delta = lora_delta_weight(A, B, scaling=scaling, fan_in_fan_out=fan_in_fan_out)
    _check_weight("W0", W0, delta)
    return W0 + delta


def lora_unmerge(W: Any, A: Any, B: Any, *, scaling: float, fan_in_fan_out: bool = False) -> Any:
    """W - s B A: the frozen weight back from a merged one (exact up to one rounding per entry)."""
    delta = lora_delta_weight(A, B, scaling=scaling, fan_in_fan_out=fan_in_fan_out)
    _check_weight("W", W, delta)
    return W - delta


def lora_parameter_count(k: int, d: int, r: int, *, bias: bool = False) -> int:
    """Trainable parameters of one LoRA layer: r (d + k), plus d with a trainable bias."""
    return r * (d + k) + (d if bias else 0)


def full_parameter_count(k: int, d: int, *, bias: bool = False) -> int:
    """Trainable parameters of the same layer fine-tuned in full: d k, plus d with a bias."""
    return d * k + (d if bias else 0)


def check_factors(A: Any, B: Any, *, d: int, k: int) -> None:
    """A must be (r, k) and B (d, r) with 1 <= r <= min(d, k)."""
    if len(A.shape) != 2 or len(B.shape) != 2:
        raise ShapeError(f"A and B must be 2-D, got A {tuple(A.shape)} and B {tuple(B.shape)}")
    r = A.shape[0]
    check_rank(r, LinearShape(k=k, d=d))
    if tuple(A.shape) != (r, k):
        raise ShapeError(f"A has shape {tuple(A.shape)}, expected (r, k) = ({r}, {k})")
    if tuple(B.shape) != (d, r):
        raise ShapeError(f"B has shape {tuple(B.shape)}, expected (d, r) = ({d}, {r}) to match A's rank {r}")


def check_dropout_mask(mask: Any, x: Any) -> None:
    """A dropout mask has exactly x's shape (its dtype and values are checked with x's)."""
    if mask is not None and tuple(mask.shape) != tuple(x.shape):
        raise ShapeError(f"dropout_mask has shape {tuple(mask.shape)}, expected x's shape {tuple(x.shape)}")


def _check_weight(name: str, W: Any, delta: Any) -> None:
    """W must be a finite float array of delta's shape."""
    check_float_array(name, W, xp=namespace(W, delta), shape=tuple(delta.shape))


# --- error bounds (composed from refpeft.tolerance's algebra; docs/tolerance.md) ---------------


def lora_error_chain(x: Any, W0: Any, A: Any, B: Any, *, scaling: float, bias: Any, dropout_mask: Any,
                     fan_in_fan_out: bool, precision: Precision) -> dict[str, Bounded]:
    """Forward intermediates with their errors: xd, xa, y (all 2-D)."""
    x2 = rows(exact(x))                                                         # (n, k)
    xd = x2 if dropout_mask is None else multiply(x2, rows(exact(dropout_mask)), precision)
    W0_t = exact(W0) if fan_in_fan_out else transpose(exact(W0))                # (k, d)
    base = matmul(x2, W0_t, precision, bias=exact_or_none(bias))                # x W0^T + b
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
    chain = lambda p: lora_error_chain(x, W0, A, B, scaling=scaling, bias=bias, dropout_mask=dropout_mask,  # noqa: E731
                                       fan_in_fan_out=fan_in_fan_out, precision=p)["y"]
    return output_bound(chain, Precision(dtype, accumulation, model), x_shape=tuple(x.shape))


def lora_backward_bound(dy: Any, x: Any, W0: Any, A: Any, B: Any, *, scaling: float, dropout_mask: Any = None,
                        fan_in_fan_out: bool = False, bias_trainable: bool = False, dtype: str = "float32",
                        accumulation: str | None = None, model: str = "rigorous") -> dict[str, Any]:
    """Per-element bounds on dx, dA, dB (and dbias when trainable) of `lora_backward`.

    The chain follows the forward's cached xa (with its forward error) into dB, and g = s dy B
    into dA and dx; scaling is allowed before or after each product, so autograd's order is covered.
    """
    def chain(p: Precision) -> dict[str, Bounded]:
        forward = lora_error_chain(x, W0, A, B, scaling=scaling, bias=None, dropout_mask=dropout_mask,
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

    return gradient_bounds(chain, Precision(dtype, accumulation, model), x_shape=tuple(x.shape))


def lora_merge_bound(W0: Any, A: Any, B: Any, *, scaling: float, fan_in_fan_out: bool = False, dtype: str = "float32",
                     accumulation: str | None = None, model: str = "rigorous", unmerge: bool = False) -> Any:
    """Per-element bound on the merged W0 + s B A (or, with unmerge=True, on W - s B A), W0's layout."""
    def chain(p: Precision) -> Bounded:
        delta = matmul(exact(B), exact(A), p, scale=-scaling if unmerge else scaling)   # (d, k)
        return add(exact(W0), transpose(delta) if fan_in_fan_out else delta, p)

    return with_reference(chain, Precision(dtype, accumulation, model))


# --- the method table's row (refpeft.methods.spec) ---------------------------------------------


def _module_forward(x: Any, W0: Any, module: Any, *, shared: Any = None, bias: Any = None, dropout_mask: Any = None,
                    bias_trainable: bool = False) -> tuple[Any, LoraCache]:
    if module.bias is not None:
        raise ConfigError("a LoRA module with its own bias (PEFT's lora_bias=True) has no forward here; merge it "
                          "(refpeft merge) or train without lora_bias")
    return lora_forward(x, W0, module.A, module.B, scaling=module.scaling, bias=bias, dropout_mask=dropout_mask,
                        fan_in_fan_out=module.fan_in_fan_out, bias_trainable=bias_trainable)


def _module_merge(W0: Any, module: Any, *, shared: Any = None) -> Any:
    return lora_merge(W0, module.A, module.B, scaling=module.scaling, fan_in_fan_out=module.fan_in_fan_out)


def _module_unmerge(W: Any, module: Any, *, shared: Any = None) -> Any:
    return lora_unmerge(W, module.A, module.B, scaling=module.scaling, fan_in_fan_out=module.fan_in_fan_out)


def lora_init_factors(W0s: Mapping[str, Any], *, ranks: Mapping[str, int], seed: int = 0,
                      generator: str = "numpy") -> dict[str, tuple[Any, Any]]:
    """(A, B) for each layer W0 (d, k) by path, in W0's dtype and namespace: layer i from seed + i."""
    factors = {}
    for i, (path, W0) in enumerate(W0s.items()):
        xp = namespace(W0)
        factors[path] = lora_init(int(W0.shape[1]), int(W0.shape[0]), ranks[path], seed=seed + i,
                                  generator=generator, dtype=dtype_name(W0.dtype, xp=xp), xp=xp)
    return factors


def _module_init(W0s: Mapping[str, Any], *, ranks: Mapping[str, int], alphas: Mapping[str, float], seed: int = 0,
                 generator: str = "numpy", rslora: bool = False) -> tuple[dict, dict, dict]:
    """Fresh LoRA modules (PEFT's init_lora_weights=True) on the layers W0s."""
    factors = lora_init_factors(W0s, ranks=ranks, seed=seed, generator=generator)
    return ({path: ModuleAdapter("lora", {"A": A, "B": B}, alpha=alphas[path], rslora=rslora)
             for path, (A, B) in factors.items()}, {}, {})


def _module_branch(W0: Any, module: Any, *, shared: Any = None) -> tuple[Any, ...]:
    """The unmerged graph's inputs: A^T (k, r), B^T (r, d) and s (1,), so the branch is ((x A^T) s) B^T."""
    xp = namespace(module.A)
    return (xp.matrix_transpose(module.A), xp.matrix_transpose(module.B),
            xp.asarray([module.scaling], dtype=module.A.dtype))


LORA = Method(
    name="lora", summary="low-rank update s B A (Hu et al. 2021); rsLoRA with rslora=True",
    peft_type="LORA", peft_flags={"use_dora": False},
    tensors={"A": "lora_A.weight", "B": "lora_B.weight"}, optional={"bias": "lora_B.bias"},
    trainable=("A", "B"), per_output=("B", "bias"), scaled=True, mergeable=True, onnx_branch="low-rank",
    rank=lambda m: int(m.A.shape[0]), out_features=lambda m: int(m.B.shape[0]),
    in_features=lambda m: int(m.A.shape[1]),
    forward=_module_forward, backward=lora_backward,
    delta_weight=lambda W0, m, *, shared=None: lora_delta_weight(m.A, m.B, scaling=m.scaling,
                                                                 fan_in_fan_out=m.fan_in_fan_out),
    merge=_module_merge, unmerge=_module_unmerge,
    parameter_count=lambda k, d, m: lora_parameter_count(k, d, m.r, bias=m.bias is not None),
    branch_values=_module_branch, init_modules=_module_init,
)
