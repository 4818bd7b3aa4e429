"""VeRA for a linear layer: shared frozen projections, two trainable vectors (Kopiczko et al. 2024).

VeRA ("Vector-based Random Matrix Adaptation", arXiv 2310.11454) freezes one random pair of
projections shared by every adapted layer and trains only two scaling vectors per layer:

    vera_A (r, k_max), vera_B (d_max, r)   frozen, drawn once, sized to the largest layer adapted
    A = vera_A[:, :k],  B = vera_B[:d, :]    the slices a layer with k inputs and d outputs uses
    lambda_d (r,)  init d_initial (0.1),   lambda_b (d,)  init 0      the trainable vectors

Forward (HF PEFT `tuners/vera/layer.py`; layout and letters as in refpeft.methods.linear, n rows):

    xd = dropout(x) = x * mask                   # (n, k)
    xa = xd A^T                                   # (n, r)   the only adapter activation cached
    h  = lambda_d * xa                            # (n, r)
    y  = x W0^T + b + lambda_b * (h B^T)          # (n, d)   no alpha / scaling

Backward, for dy = dL/dy (n, d):

    dlambda_b = sum_n dy * (h B^T) = sum_j B * (dy^T h)          # (d,)   via the (d, r) product
    gh        = (lambda_b * dy) B                                # (n, r)  dL/dh
    dlambda_d = sum_n gh * xa                                    # (r,)
    dx        = dy W0 + ((lambda_d * gh) A) * mask               # (n, k)
    dbias     = sum_n dy                                         # (d,)

dlambda_b is computed as the row sums of B * (dy^T h): an (n d r) product and a (d, r) temporary,
where sum_n dy * (h B^T) would recompute or cache an (n, d) array. The projections are frozen, so
they get no gradient. With lambda_b = 0 at init the adapter adds exactly zero, and dlambda_d = 0
at that point (only lambda_b moves on the first step), as in PEFT.

The rank is not limited by the layer: VeRA's r is the width of random projections (PEFT's default
is 256), and r > min(d, k) is allowed, as PEFT allows it.

Merge: W = W0 + (lambda_b B)(lambda_d A), i.e. diag(lambda_b) B diag(lambda_d) A, PEFT's order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import numpy as np

from refpeft.adapter import ModuleAdapter
from refpeft.backend import check_float_array, dtype_name, namespace
from refpeft.errors import ConfigError, RankError, ShapeError
from refpeft.init import GENERATORS, as_parameter, kaiming_uniform_bound, torch_cpu_generator, torch_cpu_uniform, uniform
from refpeft.methods.linear import LinearShape, base_forward, base_input_grad, check_linear_inputs, dropped_rows, \
    flatten_rows, linear_shape
from refpeft.methods.lora import check_dropout_mask
from refpeft.methods.spec import Method
from refpeft.tolerance import Bounded, Precision, add, column, either, exact, exact_or_none, gradient_bounds, \
    matmul, multiply, output_bound, row_sum, rows, subtract, transpose, with_reference


def largest_layer(shapes: Iterable[LinearShape]) -> LinearShape:
    """The (k_max, d_max) the shared projections must cover: the largest of each size, as PEFT's `_find_dim`."""
    shapes = list(shapes)
    if not shapes:
        raise ConfigError("VeRA needs at least one layer to size its shared projections")
    return LinearShape(k=max(s.k for s in shapes), d=max(s.d for s in shapes))


def vera_projections(shape: LinearShape, r: int, *, seed: int = 0, generator: str = "torch-cpu",
                     dtype: str = "float64", xp: Any = None) -> tuple[Any, Any]:
    """The shared frozen (vera_A (r, k_max), vera_B (d_max, r)) for layers up to `shape` (see largest_layer).

    Kaiming-uniform with gain sqrt(2): vera_A ~ U(+-sqrt(6 / k_max)), vera_B ~ U(+-sqrt(6 / r)).
    generator "torch-cpu" (the default) reproduces PEFT bit for bit with seed = projection_prng_key:
    `torch.Generator("cpu").manual_seed(seed)`, vera_A drawn first, then vera_B from the same
    stream, float32 values (cast to `dtype` afterwards). "numpy" draws each from PCG64 (float64),
    vera_A with `seed` and vera_B with `seed + 1`.
    """
    if r < 1:
        raise RankError(f"VeRA rank r must be at least 1, got {r}")
    if shape.k < 1 or shape.d < 1:
        raise ShapeError(f"layer sizes must be positive, got k = {shape.k}, d = {shape.d}")
    if generator not in GENERATORS:
        raise ConfigError(f"unknown generator {generator!r}; choose one of {', '.join(GENERATORS)}")
    # PEFT's `_kaiming_init` computes sqrt(3) * (sqrt(2) / sqrt(fan)); this float64 bound can differ
    # from it in the last bit, but float32(2 bound) and float32(-bound), all the torch draw uses, were
    # checked equal for every fan_in up to 3e5 (and the draws against PEFT in tests/test_vera.py).
    bound_a, bound_b = kaiming_uniform_bound(shape.k, a=0.0), kaiming_uniform_bound(r, a=0.0)
    if generator == "numpy":
        vera_A = uniform((r, shape.k), bound_a, seed=seed)
        vera_B = uniform((shape.d, r), bound_b, seed=seed + 1)
    else:
        stream = torch_cpu_generator(seed)
        vera_A = torch_cpu_uniform((r, shape.k), -bound_a, bound_a, bit_generator=stream)
        vera_B = torch_cpu_uniform((shape.d, r), -bound_b, bound_b, bit_generator=stream)
    return as_parameter(vera_A, dtype=dtype, xp=xp), as_parameter(vera_B, dtype=dtype, xp=xp)


def vera_init(d: int, r: int, *, d_initial: float = 0.1, dtype: str = "float64", xp: Any = None) -> tuple[Any, Any]:
    """Initial (lambda_d, lambda_b) of shapes (r,), (d,): lambda_d = d_initial, lambda_b = 0 (PEFT's)."""
    if r < 1:
        raise RankError(f"VeRA rank r must be at least 1, got {r}")
    if not math.isfinite(d_initial):
        raise ConfigError(f"d_initial must be finite, got {d_initial}")
    return (as_parameter(np.full((r,), d_initial), dtype=dtype, xp=xp),
            as_parameter(np.zeros((d,)), dtype=dtype, xp=xp))


def vera_slices(vera_A: Any, vera_B: Any, *, k: int, d: int) -> tuple[Any, Any]:
    """A = vera_A[:, :k] (r, k) and B = vera_B[:d, :] (d, r): one layer's view of the shared projections."""
    check_projections(vera_A, vera_B, k=k, d=d)
    return vera_A[:, :k], vera_B[:d, :]


@dataclass(frozen=True)
class VeraCache:
    """What `vera_backward` needs: the input, the mask, xa, and the parameters (by reference)."""

    x: Any                 # (..., k)
    dropout_mask: Any      # (..., k) or None
    xa: Any                # (n, r)  dropout(x) A^T
    W0: Any
    A: Any                 # (r, k)  slice of vera_A (a view)
    B: Any                 # (d, r)  slice of vera_B (a view)
    lambda_d: Any
    lambda_b: Any
    fan_in_fan_out: bool
    bias_trainable: bool


@dataclass(frozen=True)
class VeraGrads:
    """Gradients of the loss with respect to the input and each trainable tensor."""

    dx: Any          # (..., k)
    dlambda_d: Any   # (r,)
    dlambda_b: Any   # (d,)
    dbias: Any       # (d,) or None when the bias is frozen or absent


def vera_forward(x: Any, W0: Any, vera_A: Any, vera_B: Any, lambda_d: Any, lambda_b: Any, *, bias: Any = None,
                 dropout_mask: Any = None, fan_in_fan_out: bool = False,
                 bias_trainable: bool = False) -> tuple[Any, VeraCache]:
    """y = x W0^T + b + lambda_b * ((lambda_d * (dropout(x) A^T)) B^T), A and B sliced from the shared pair."""
    xp, shape = check_linear_inputs(x, W0, bias=bias, fan_in_fan_out=fan_in_fan_out, vera_A=vera_A,
                                    vera_B=vera_B, lambda_d=lambda_d, lambda_b=lambda_b,
                                    dropout_mask=dropout_mask)
    A, B = vera_slices(vera_A, vera_B, k=shape.k, d=shape.d)
    _check_vectors(lambda_d, lambda_b, r=A.shape[0], d=shape.d)
    check_dropout_mask(dropout_mask, x)
    if bias_trainable and bias is None:
        raise ConfigError("bias_trainable=True needs a bias")
    x2, _, xd = dropped_rows(x, dropout_mask, xp=xp)                # (n, k) each
    xa = xp.matmul(xd, xp.matrix_transpose(A))                         # (n, r)
    h = lambda_d * xa                                                  # (n, r)
    branch = xp.matmul(h, xp.matrix_transpose(B))                      # (n, d)
    branch *= lambda_b                                                 # in place: one (n, d) temporary, not two
    y = base_forward(x2, W0, bias, fan_in_fan_out=fan_in_fan_out, xp=xp)
    y += branch                                                        # (n, d)
    cache = VeraCache(x=x, dropout_mask=dropout_mask, xa=xa, W0=W0, A=A, B=B, lambda_d=lambda_d,
                      lambda_b=lambda_b, fan_in_fan_out=fan_in_fan_out, bias_trainable=bias_trainable)
    return xp.reshape(y, (*x.shape[:-1], shape.d)), cache


def vera_backward(dy: Any, cache: VeraCache) -> VeraGrads:
    """dx, dlambda_d, dlambda_b (and dbias when trainable) from dy = dL/dy; see the module docstring."""
    xp = namespace(dy, cache.x)
    d = cache.B.shape[0]
    check_float_array("dy", dy, xp=xp, shape=(*cache.x.shape[:-1], d))
    g2 = flatten_rows(dy, xp=xp)                                       # (n, d)
    mask = None if cache.dropout_mask is None else flatten_rows(cache.dropout_mask, xp=xp)
    h = cache.lambda_d * cache.xa                                      # (n, r)  recomputed, not cached
    dlambda_b = xp.sum(cache.B * xp.matmul(xp.matrix_transpose(g2), h), axis=1)   # (d,)
    gh = xp.matmul(g2 * cache.lambda_b, cache.B)                       # (n, r)
    dlambda_d = xp.sum(gh * cache.xa, axis=0)                          # (r,)
    dx_adapter = xp.matmul(gh * cache.lambda_d, cache.A)               # (n, k)
    if mask is not None:
        dx_adapter = dx_adapter * mask
    dx = base_input_grad(g2, cache.W0, fan_in_fan_out=cache.fan_in_fan_out, xp=xp)
    dx += dx_adapter                                                   # in place into the fresh (n, k) product
    dbias = xp.sum(g2, axis=0) if cache.bias_trainable else None
    return VeraGrads(dx=xp.reshape(dx, cache.x.shape), dlambda_d=dlambda_d, dlambda_b=dlambda_b, dbias=dbias)


def vera_delta_weight(vera_A: Any, vera_B: Any, lambda_d: Any, lambda_b: Any, *, k: int,
                      fan_in_fan_out: bool = False) -> Any:
    """(lambda_b B)(lambda_d A), (d, k) with d = len(lambda_b), or (k, d) with fan_in_fan_out. Forms d x k."""
    xp = namespace(vera_A, vera_B, lambda_d, lambda_b)
    for name, array in (("vera_A", vera_A), ("vera_B", vera_B), ("lambda_d", lambda_d), ("lambda_b", lambda_b)):
        check_float_array(name, array, xp=xp)
    if len(lambda_b.shape) != 1:
        raise ShapeError(f"lambda_b must be 1-D (d,), got shape {tuple(lambda_b.shape)}")
    A, B = vera_slices(vera_A, vera_B, k=k, d=lambda_b.shape[0])
    _check_vectors(lambda_d, lambda_b, r=A.shape[0], d=B.shape[0])
    delta = xp.matmul(lambda_b[:, None] * B, lambda_d[:, None] * A)    # (d, k)  PEFT's order
    return xp.matrix_transpose(delta) if fan_in_fan_out else delta


def vera_merge(W0: Any, vera_A: Any, vera_B: Any, lambda_d: Any, lambda_b: Any, *,
               fan_in_fan_out: bool = False) -> Any:
    """W0 + (lambda_b B)(lambda_d A) in W0's layout: the merged layer computes x W^T + b."""
    return W0 + _checked_delta(W0, vera_A, vera_B, lambda_d, lambda_b, fan_in_fan_out=fan_in_fan_out)


def vera_unmerge(W: Any, vera_A: Any, vera_B: Any, lambda_d: Any, lambda_b: Any, *,
                 fan_in_fan_out: bool = False) -> Any:
    """W - (lambda_b B)(lambda_d A): the frozen weight back (exact up to one rounding per entry)."""
    return W - _checked_delta(W, vera_A, vera_B, lambda_d, lambda_b, fan_in_fan_out=fan_in_fan_out)


def vera_parameter_count(d: int, r: int, *, bias: bool = False) -> int:
    """Trainable parameters of one VeRA layer: r + d (plus d for a trainable bias); k does not enter."""
    return r + d + (d if bias else 0)


def vera_projection_size(shape: LinearShape, r: int) -> int:
    """Frozen entries of the shared projections, stored once for all layers: r (k_max + d_max)."""
    return r * (shape.k + shape.d)


def check_projections(vera_A: Any, vera_B: Any, *, k: int, d: int) -> None:
    """vera_A (r, k_max >= k) and vera_B (d_max >= d, r) with one rank r >= 1."""
    if len(vera_A.shape) != 2 or len(vera_B.shape) != 2:
        raise ShapeError(f"vera_A and vera_B must be 2-D, got {tuple(vera_A.shape)} and {tuple(vera_B.shape)}")
    r = vera_A.shape[0]
    if r < 1:
        raise RankError(f"VeRA rank r must be at least 1, got {r}")
    if vera_B.shape[1] != r:
        raise ShapeError(f"vera_B has shape {tuple(vera_B.shape)}, expected (d_max, r) with r = {r} from vera_A")
    if vera_A.shape[1] < k:
        raise ShapeError(f"vera_A has shape {tuple(vera_A.shape)}: it covers {vera_A.shape[1]} inputs, "
                         f"the layer has k = {k}; size the projections with largest_layer")
    if vera_B.shape[0] < d:
        raise ShapeError(f"vera_B has shape {tuple(vera_B.shape)}: it covers {vera_B.shape[0]} outputs, "
                         f"the layer has d = {d}; size the projections with largest_layer")


def _check_vectors(lambda_d: Any, lambda_b: Any, *, r: int, d: int) -> None:
    if tuple(lambda_d.shape) != (r,):
        raise ShapeError(f"lambda_d has shape {tuple(lambda_d.shape)}, expected (r,) = ({r},)")
    if tuple(lambda_b.shape) != (d,):
        raise ShapeError(f"lambda_b has shape {tuple(lambda_b.shape)}, expected (d,) = ({d},)")


def _checked_delta(W: Any, vera_A: Any, vera_B: Any, lambda_d: Any, lambda_b: Any, *, fan_in_fan_out: bool) -> Any:
    """The delta for W's layer, after checking W is a finite float array of the delta's shape."""
    xp = namespace(W, vera_A, vera_B, lambda_d, lambda_b)
    k = linear_shape(W, fan_in_fan_out=fan_in_fan_out).k
    delta = vera_delta_weight(vera_A, vera_B, lambda_d, lambda_b, k=k, fan_in_fan_out=fan_in_fan_out)
    check_float_array("W", W, xp=xp, shape=tuple(delta.shape))
    return delta


# --- error bounds (composed from refpeft.tolerance's algebra; docs/tolerance.md) ---------------


def _vera_chain(x: Any, W0: Any, A: Any, B: Any, lambda_d: Any, lambda_b: Any, *, bias: Any, dropout_mask: Any,
                fan_in_fan_out: bool, p: Precision) -> dict[str, Bounded]:
    """y = x W0^T + b + lambda_b * ((lambda_d * xa) B^T), A and B the layer's slices."""
    x2 = rows(exact(x))
    xd = x2 if dropout_mask is None else multiply(x2, rows(exact(dropout_mask)), p)
    W0_t = exact(W0) if fan_in_fan_out else transpose(exact(W0))
    base = matmul(x2, W0_t, p, bias=exact_or_none(bias))
    xa = matmul(xd, transpose(exact(A)), p)
    h = multiply(xa, exact(lambda_d), p)
    y = add(base, multiply(exact(lambda_b), matmul(h, transpose(exact(B)), p), p), p)
    return {"y": y, "xa": xa, "xd": xd, "h": h}


def vera_forward_bound(x: Any, W0: Any, A: Any, B: Any, lambda_d: Any, lambda_b: Any, *, bias: Any = None,
                       dropout_mask: Any = None, fan_in_fan_out: bool = False, dtype: str = "float32",
                       accumulation: str | None = None, model: str = "rigorous") -> Any:
    """Per-element bound on VeRA's y; A (r, k) and B (d, r) are the layer's slices of the shared pair."""
    chain = lambda p: _vera_chain(x, W0, A, B, lambda_d, lambda_b, bias=bias, dropout_mask=dropout_mask,  # noqa: E731
                                  fan_in_fan_out=fan_in_fan_out, p=p)["y"]
    return output_bound(chain, Precision(dtype, accumulation, model), x_shape=tuple(x.shape))


def vera_backward_bound(dy: Any, x: Any, W0: Any, A: Any, B: Any, lambda_d: Any, lambda_b: Any, *,
                        dropout_mask: Any = None, fan_in_fan_out: bool = False, bias_trainable: bool = False,
                        dtype: str = "float32", accumulation: str | None = None, model: str = "rigorous") -> dict[str, Any]:
    """Per-element bounds on dx, dlambda_d, dlambda_b (dbias) of `vera_backward`.

    dlambda_b is bounded both as refpeft forms it (row sums of B * (dy^T h)) and as autograd does
    (column sums of dy * (h B^T)), keeping the larger error."""
    def chain(p: Precision) -> dict[str, Bounded]:
        f = _vera_chain(x, W0, A, B, lambda_d, lambda_b, bias=None, dropout_mask=dropout_mask,
                        fan_in_fan_out=fan_in_fan_out, p=p)
        g2 = rows(exact(dy))
        h, xa = f["h"], f["xa"]
        by_refpeft = row_sum(transpose(multiply(exact(B), matmul(transpose(g2), h, p), p)), p)
        by_autograd = row_sum(multiply(g2, matmul(h, transpose(exact(B)), p), p), p)
        gh = matmul(multiply(g2, exact(lambda_b), p), exact(B), p)
        dx_adapter = matmul(multiply(gh, exact(lambda_d), p), exact(A), p)
        if dropout_mask is not None:
            dx_adapter = multiply(dx_adapter, rows(exact(dropout_mask)), p)
        W0_rows = transpose(exact(W0)) if fan_in_fan_out else exact(W0)
        grads = {"dx": add(matmul(g2, W0_rows, p), dx_adapter, p), "dlambda_d": row_sum(multiply(gh, xa, p), p),
                 "dlambda_b": either(by_refpeft, by_autograd)}
        if bias_trainable:
            grads["dbias"] = row_sum(g2, p)
        return grads

    return gradient_bounds(chain, Precision(dtype, accumulation, model), x_shape=tuple(x.shape))


def vera_merge_bound(W0: Any, A: Any, B: Any, lambda_d: Any, lambda_b: Any, *, fan_in_fan_out: bool = False,
                     dtype: str = "float32", accumulation: str | None = None, model: str = "rigorous",
                     unmerge: bool = False) -> Any:
    """Per-element bound on W0 + (lambda_b B)(lambda_d A) (PEFT's order), in W0's layout; with
    unmerge=True on W - (lambda_b B)(lambda_d A) (pass the merged W as W0)."""
    def chain(p: Precision) -> Bounded:
        lb, ld = column(exact(lambda_b)), column(exact(lambda_d))
        delta = matmul(multiply(lb, exact(B), p), multiply(ld, exact(A), p), p)
        delta = transpose(delta) if fan_in_fan_out else delta
        return subtract(exact(W0), delta, p) if unmerge else add(exact(W0), delta, p)

    return with_reference(chain, Precision(dtype, accumulation, model))


# --- the method table's row (refpeft.methods.spec) ---------------------------------------------


def _projections(shared: Any) -> tuple[Any, Any]:
    """VeRA's shared (vera_A, vera_B) from the adapter's shared tensors; refused when absent."""
    if not shared or shared.get("vera_A") is None or shared.get("vera_B") is None:
        raise ConfigError("VeRA needs its shared projections vera_A and vera_B (saved in the adapter, or "
                          "regenerated from projection_prng_key with the base's layer sizes)")
    return shared["vera_A"], shared["vera_B"]


def _module_forward(x: Any, W0: Any, module: Any, *, shared: Any = None, bias: Any = None, dropout_mask: Any = None,
                    bias_trainable: bool = False) -> tuple[Any, VeraCache]:
    vera_A, vera_B = _projections(shared)
    return vera_forward(x, W0, vera_A, vera_B, module.lambda_d, module.lambda_b, bias=bias, dropout_mask=dropout_mask,
                        fan_in_fan_out=module.fan_in_fan_out, bias_trainable=bias_trainable)


def _module_delta(W0: Any, module: Any, *, shared: Any = None) -> Any:
    vera_A, vera_B = _projections(shared)
    k = linear_shape(W0, fan_in_fan_out=module.fan_in_fan_out).k
    return vera_delta_weight(vera_A, vera_B, module.lambda_d, module.lambda_b, k=k,
                             fan_in_fan_out=module.fan_in_fan_out)


def _module_merge(W0: Any, module: Any, *, shared: Any = None) -> Any:
    vera_A, vera_B = _projections(shared)
    return vera_merge(W0, vera_A, vera_B, module.lambda_d, module.lambda_b, fan_in_fan_out=module.fan_in_fan_out)


def _module_unmerge(W: Any, module: Any, *, shared: Any = None) -> Any:
    vera_A, vera_B = _projections(shared)
    return vera_unmerge(W, vera_A, vera_B, module.lambda_d, module.lambda_b, fan_in_fan_out=module.fan_in_fan_out)


def _module_init(W0s: Mapping[str, Any], *, ranks: Mapping[str, int], alphas: Mapping[str, float], seed: int = 0,
                 generator: str = "torch-cpu", projection_prng_key: int = 0,
                 d_initial: float = 0.1) -> tuple[dict, dict, dict]:
    """PEFT's VeRA init: one projection pair sized to the largest layer, drawn from projection_prng_key
    (bit for bit PEFT's with the torch-cpu generator); lambda_d = d_initial, lambda_b = 0 per layer."""
    if len(set(ranks.values())) != 1:
        raise ConfigError("VeRA has one rank for all layers (its projections are shared): a rank_pattern does not apply")
    r = next(iter(ranks.values()))
    first = next(iter(W0s.values()))
    xp = namespace(first)
    dtype = dtype_name(first.dtype, xp=xp)
    largest = largest_layer(LinearShape(k=int(W.shape[1]), d=int(W.shape[0])) for W in W0s.values())
    vera_A, vera_B = vera_projections(largest, r, seed=projection_prng_key, generator=generator, dtype=dtype, xp=xp)
    modules = {}
    for path, W0 in W0s.items():
        lambda_d, lambda_b = vera_init(int(W0.shape[0]), r, d_initial=d_initial, dtype=dtype, xp=xp)
        modules[path] = ModuleAdapter("vera", {"lambda_d": lambda_d, "lambda_b": lambda_b})
    return (modules, {"vera_A": vera_A, "vera_B": vera_B},
            {"projection_prng_key": projection_prng_key, "d_initial": d_initial})


VERA = Method(
    name="vera", summary="two trained scaling vectors on shared frozen random projections (Kopiczko et al. 2024)",
    peft_type="VERA", peft_flags={},
    tensors={"lambda_d": "vera_lambda_d", "lambda_b": "vera_lambda_b"},
    shared={"vera_A": "base_model.vera_A", "vera_B": "base_model.vera_B"},
    trainable=("lambda_d", "lambda_b"), per_output=("lambda_b", "vera_B"), scaled=False, mergeable=True,
    onnx_branch="shared-projections",
    rank=lambda m: int(m.lambda_d.shape[0]), out_features=lambda m: int(m.lambda_b.shape[0]),
    in_features=lambda m: None,
    forward=_module_forward, backward=vera_backward, delta_weight=_module_delta,
    merge=_module_merge, unmerge=_module_unmerge,
    parameter_count=lambda k, d, m: vera_parameter_count(d, m.r),
    branch_values=lambda W0, m, *, shared=None: (m.lambda_d, m.lambda_b), init_modules=_module_init,
)
