"""LoRA on a stack of expert weights (MoE): HF PEFT's `target_parameters` on a 3-D parameter.

A mixture-of-experts layer keeps E experts' weights in one parameter; PEFT (0.21, `lora.ParamWrapper`)
adapts it with one low-rank pair per expert, stored as two ordinary nn.Linear weights:

    A   (r*E, in)    expert-major:  A_e = A[e*r:(e+1)*r, :]        = A.reshape(E, r, in)[e]
    B   (out, r*E)   expert-minor:  B_e = B[:, e::E]               = B.reshape(out, r, E)[:, :, e]
    s   alpha / r (or alpha / sqrt(r) with rsLoRA)

so column j*E + e of B pairs with row e*r + j of A. A kernel that reads B expert-major (B[:, e*r:(e+1)*r])
pairs the wrong columns and rows: the classic MoE-LoRA layout bug this module's cases catch.

Per-expert delta (PEFT's get_delta_weight, einsum "o r e, e r i -> e o i"):

    dW_e = s * B_e A_e                                  # (out, in)

The parameter's layout decides how dW is stored. PEFT reads the base module's `is_transposed`
attribute (transformers' `@use_experts_implementation` sets it; absent means False):

    "out_in"  (E, out, in)   is_transposed False: Qwen3-MoE, Mixtral, OLMoE (`down_proj` (E, H, I))
    "in_out"  (E, in, out)   is_transposed True: GPT-OSS; dW stored as dW_e^T ("-> e i o")

(PEFT names shape[1] "in" and shape[2] "out" first, then swaps them when is_transposed is False.)

Forward, for routed tokens (legend: n tokens, K experts per token, slot q = t*K + k, e_q its expert):

    z_q = x_t W_e^T + s (x_t A_e^T) B_e^T               # (out,)   W_e in the (out, in) orientation
    y_t = sum_k g_{t,k} z_{t*K+k}                       # (out,)   g = top_k_weights (n, K)

PEFT computes z_q with the patched parameter, x_t (W_e + dW_e)^T (a torch parametrization that
folds `baddbmm(W, B_e, A_e, alpha=s)` for one adapter); the refpeft forward keeps the two paths
apart (refpeft.methods.lora per expert) and the bounds cover both orders. An expert's tokens are
gathered, so per expert this is exactly LoRA's forward on the rows routed to it.

Backward, for dy = dL/dy (n, out):

    dz_q     = g_{t,k} dy_t                             # (out,)
    dg_{t,k} = dy_t . z_q                               # routing weights' gradient
    dx_t     = sum_k [dz_q W_e + s (dz_q B_e) A_e]      # (in,)
    dA_e     = s sum_{q: e_q = e} (dz_q B_e)^T x_t      # (r, in)   into A's rows e*r..
    dB_e     = s sum_{q: e_q = e} dz_q^T (x_t A_e^T)    # (out, r)  into B's columns e, e+E, ..

(the per-expert lines are refpeft.methods.lora's backward on the expert's gathered rows; an expert
no token chose gets zero gradients). Merge is W_e + dW_e per expert, unmerge W_e - dW_e.

Routing is given (`top_k_index`, `top_k_weights`), as transformers passes it to its experts
module; `route_top_k` is the router of Qwen3-MoE for callers that start from logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from refpeft.backend import check_float_array, namespace, same_dtype
from refpeft.errors import ConfigError, ShapeError
from refpeft.methods.lora import LoraCache, lora_backward, lora_forward
from refpeft.model.checks import require_in_range, require_integer
from refpeft.tolerance import Bounded, Precision, add, either, exact, matmul, multiply, row_sum, transpose, \
    with_reference

LAYOUTS = ("out_in", "in_out")


@dataclass(frozen=True)
class MoeLoraCache:
    """What `moe_lora_backward` needs: each used expert's LoRA cache and slots, z, the routing."""

    x: Any                                   # (n, in)
    z: Any                                   # (n*K, out)  per-slot expert outputs, before weighting
    top_k_weights: Any                       # (n, K)
    experts: tuple[tuple[int, Any, LoraCache], ...]   # (e, slots of e, LoRA cache on those rows)
    A_shape: tuple[int, int]
    B_shape: tuple[int, int]
    rank: int


@dataclass(frozen=True)
class MoeLoraGrads:
    dx: Any                 # (n, in)
    dA: Any                 # (r*E, in)  PEFT's storage
    dB: Any                 # (out, r*E)
    dtop_k_weights: Any     # (n, K)


def expert_factors(A: Any, B: Any, *, num_experts: int) -> tuple[Any, Any]:
    """(A_e stacked (E, r, in), B_e stacked (E, out, r)) from PEFT's storage; see the module docstring."""
    xp = namespace(A, B)
    E = num_experts
    if len(A.shape) != 2 or len(B.shape) != 2 or E < 1 or A.shape[0] % E or A.shape[0] != B.shape[1]:
        raise ShapeError(f"A {tuple(A.shape)} and B {tuple(B.shape)} are not PEFT's (r*E, in) and (out, r*E) "
                         f"for E = {num_experts} experts")
    r = A.shape[0] // E
    A_e = xp.reshape(A, (E, r, A.shape[1]))                                       # (E, r, in)   expert-major
    B_e = xp.permute_dims(xp.reshape(B, (B.shape[0], r, E)), (2, 0, 1))           # (E, out, r)  expert-minor
    return A_e, B_e


def _check_layout(W: Any, A: Any, B: Any, layout: str) -> tuple[int, int, int]:
    """(E, out, in) of a 3-D expert weight W in `layout`, checked against A and B."""
    if layout not in LAYOUTS:
        raise ConfigError(f"unknown expert weight layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    if len(W.shape) != 3:
        raise ShapeError(f"the expert weight must be 3-D (experts, ...), got shape {tuple(W.shape)}")
    E, d1, d2 = W.shape
    out, inn = (d1, d2) if layout == "out_in" else (d2, d1)
    if A.shape[-1] != inn or B.shape[0] != out:
        raise ShapeError(f"W {tuple(W.shape)} ({layout}) has in = {inn}, out = {out}, but A is {tuple(A.shape)} "
                         f"and B {tuple(B.shape)}")
    return E, out, inn


def moe_lora_delta_weight(A: Any, B: Any, *, num_experts: int, scaling: float, layout: str = "out_in") -> Any:
    """s B_e A_e for every expert, (E, out, in), or (E, in, out) for layout "in_out"."""
    xp = namespace(A, B)
    check_float_array("A", A, xp=xp)
    check_float_array("B", B, xp=xp)
    if layout not in LAYOUTS:
        raise ConfigError(f"unknown expert weight layout {layout!r}; choose one of {', '.join(LAYOUTS)}")
    A_e, B_e = expert_factors(A, B, num_experts=num_experts)
    delta = xp.matmul(B_e, A_e) * scaling                                         # (E, out, in)
    return delta if layout == "out_in" else xp.matrix_transpose(delta)


def moe_lora_merge(W: Any, A: Any, B: Any, *, scaling: float, layout: str = "out_in") -> Any:
    """W + dW in W's layout (PEFT's merge_adapter on the expert parameter)."""
    E, _, _ = _check_layout(W, A, B, layout)
    check_float_array("W", W, xp=namespace(W))
    return W + moe_lora_delta_weight(A, B, num_experts=E, scaling=scaling, layout=layout)


def moe_lora_unmerge(W: Any, A: Any, B: Any, *, scaling: float, layout: str = "out_in") -> Any:
    """W - dW: the frozen expert weights back from merged ones."""
    E, _, _ = _check_layout(W, A, B, layout)
    check_float_array("W", W, xp=namespace(W))
    return W - moe_lora_delta_weight(A, B, num_experts=E, scaling=scaling, layout=layout)


def check_routing(top_k_index: Any, top_k_weights: Any, *, n: int, num_experts: int) -> None:
    """top_k_index (n, K) integers in [0, E) and top_k_weights (n, K) floats."""
    xp = namespace(top_k_index, top_k_weights)
    require_integer("top_k_index", top_k_index, xp=xp, ndim=2)
    if top_k_index.shape[0] != n:
        raise ShapeError(f"top_k_index has shape {tuple(top_k_index.shape)}, expected ({n}, K) for {n} tokens")
    require_in_range("top_k_index", top_k_index, 0, num_experts, xp=xp)
    check_float_array("top_k_weights", top_k_weights, xp=xp, shape=tuple(top_k_index.shape))


def expert_slots(top_k_index: Any, num_experts: int) -> list[tuple[int, list[int]]]:
    """For each expert chosen at least once, the slots q = t*K + k routed to it (ascending)."""
    flat = [int(e) for e in namespace(top_k_index).reshape(top_k_index, (-1,))]
    return [(e, [q for q, f in enumerate(flat) if f == e]) for e in range(num_experts) if e in flat]


def moe_lora_forward(x: Any, W: Any, A: Any, B: Any, *, top_k_index: Any, top_k_weights: Any, scaling: float,
                     layout: str = "out_in") -> tuple[Any, MoeLoraCache]:
    """y_t = sum_k g_{t,k} (x_t W_e^T + s (x_t A_e^T) B_e^T), and the cache for `moe_lora_backward`."""
    xp = namespace(x, W, A, B)
    E, out, inn = _check_layout(W, A, B, layout)
    check_float_array("x", x, xp=xp, shape=(None, inn))
    same_dtype({"x": x, "W": W, "A": A, "B": B, "top_k_weights": top_k_weights})
    n, K = x.shape[0], top_k_index.shape[-1] if len(top_k_index.shape) == 2 else 0
    check_routing(top_k_index, top_k_weights, n=n, num_experts=E)
    A_e, B_e = expert_factors(A, B, num_experts=E)
    token_of_slot = xp.asarray([q // K for q in range(n * K)], dtype=xp.int64)
    x_slots = xp.take(x, token_of_slot, axis=0)                                   # (n*K, in)
    blocks, experts, order = [], [], []
    for e, slots in expert_slots(top_k_index, E):
        rows = xp.take(x_slots, xp.asarray(slots, dtype=xp.int64), axis=0)      # (m_e, in)
        z_e, cache = lora_forward(rows, W[e, ...], A_e[e, ...], B_e[e, ...], scaling=scaling,
                                  fan_in_fan_out=layout == "in_out")              # (m_e, out)
        blocks.append(z_e)
        experts.append((e, slots, cache))
        order += slots
    z = _unpermute(xp.concat(blocks, axis=0), order, xp=xp)                      # (n*K, out)
    weighted = xp.reshape(z, (n, K, out)) * top_k_weights[:, :, None]           # (n, K, out)
    y = xp.sum(weighted, axis=1)                                                 # (n, out)
    return y, MoeLoraCache(x=x, z=z, top_k_weights=top_k_weights, experts=tuple(experts),
                           A_shape=tuple(A.shape), B_shape=tuple(B.shape), rank=A.shape[0] // E)


def moe_lora_backward(dy: Any, cache: MoeLoraCache) -> MoeLoraGrads:
    """dx, dA, dB (PEFT's storage layout) and dtop_k_weights from dy = dL/dy; see the module docstring."""
    xp = namespace(dy, cache.x)
    n, K = cache.top_k_weights.shape
    out = cache.z.shape[-1]
    check_float_array("dy", dy, xp=xp, shape=(n, out))
    g = cache.top_k_weights
    dz = xp.reshape(dy[:, None, :] * g[:, :, None], (n * K, out))               # (n*K, out)
    dg = xp.reshape(xp.sum(xp.reshape(cache.z, (n, K, out)) * dy[:, None, :], axis=2), (n, K))
    E, r, inn = cache.A_shape[0] // cache.rank, cache.rank, cache.A_shape[1]
    dA_e = [xp.zeros((r, inn), dtype=dy.dtype) for _ in range(E)]
    dB_e = [xp.zeros((out, r), dtype=dy.dtype) for _ in range(E)]
    dx_blocks, order = [], []
    for e, slots, lora_cache in cache.experts:
        grads = lora_backward(xp.take(dz, xp.asarray(slots, dtype=xp.int64), axis=0), lora_cache)
        dA_e[e], dB_e[e] = grads.dA, grads.dB
        dx_blocks.append(grads.dx)
        order += slots
    dx_slots = _unpermute(xp.concat(dx_blocks, axis=0), order, xp=xp)          # (n*K, in)
    dx = xp.sum(xp.reshape(dx_slots, (n, K, inn)), axis=1)                       # (n, in)
    dA = xp.concat(dA_e, axis=0)                                                 # (E*r, in)   expert-major
    dB = xp.reshape(xp.stack(dB_e, axis=2), (out, r * E))                        # (out, r*E)  expert-minor
    return MoeLoraGrads(dx=dx, dA=dA, dB=dB, dtop_k_weights=dg)


def _unpermute(stacked: Any, order: list[int], *, xp: Any) -> Any:
    """Rows of `stacked` (row i belongs to slot order[i]) back in slot order."""
    inverse = [0] * len(order)
    for i, q in enumerate(order):
        inverse[q] = i
    return xp.take(stacked, xp.asarray(inverse, dtype=xp.int64), axis=0)


def route_top_k(router_logits: Any, *, top_k: int, normalize: bool = True) -> tuple[Any, Any]:
    """Qwen3-MoE's router: p = softmax(logits), the top_k largest (ties: the lower expert index first,
    a stable descending sort), renormalised to sum 1 when `normalize` (config.norm_topk_prob).
    Returns (top_k_index (n, K) int64, top_k_weights (n, K)). transformers takes the softmax in
    float32 for every input dtype; this one is in the logits' dtype."""
    xp = namespace(router_logits)
    check_float_array("router_logits", router_logits, xp=xp, shape=(None, None))
    if not 1 <= top_k <= router_logits.shape[-1]:
        raise ConfigError(f"top_k = {top_k} must be in [1, {router_logits.shape[-1]}] (the number of experts)")
    shifted = router_logits - xp.max(router_logits, axis=-1, keepdims=True)
    p = xp.exp(shifted) / xp.sum(xp.exp(shifted), axis=-1, keepdims=True)      # (n, E)
    index = xp.argsort(-p, axis=-1, stable=True)[:, :top_k]                      # (n, K)
    weights = xp.take_along_axis(p, index, axis=-1)
    if normalize:
        weights = weights / xp.sum(weights, axis=-1, keepdims=True)
    return xp.astype(index, xp.int64), weights


# --- error bounds (composed from refpeft.tolerance's algebra; docs/tolerance.md) ---------------
# Per expert, z's rows are LoRA's forward (the adapter path apart) or PEFT's patched weight
# x (W_e + s B_e A_e)^T, the fold a baddbmm (a product plus W_e in any order): `either` takes the
# larger bound. The weighting g z is one multiply, y's sum over K any order (row_sum).


def _expert_chains(x: Any, W: Any, A: Any, B: Any, top_k_index: Any, *, scaling: float, layout: str,
                   p: Precision) -> list[tuple[list[int], dict[str, Bounded]]]:
    """Per used expert: its slots and the Bounded xs (rows), xa, z, W (out, in) and merged W'."""
    xp = namespace(x, W)
    E = W.shape[0]
    K = top_k_index.shape[-1]
    A_e, B_e = expert_factors(A, B, num_experts=E)
    chains = []
    for e, slots in expert_slots(top_k_index, E):
        xs = exact(xp.take(x, xp.asarray([q // K for q in slots], dtype=xp.int64), axis=0))   # (m, in)
        W_oi = W[e, ...] if layout == "out_in" else xp.matrix_transpose(W[e, ...])           # (out, in)
        a, b = exact(A_e[e, ...]), exact(B_e[e, ...])
        xa = matmul(xs, transpose(a), p)                                                       # (m, r)
        apart = add(matmul(xs, transpose(exact(W_oi)), p), matmul(xa, transpose(b), p, scale=scaling), p)
        merged = matmul(b, a, p, scale=scaling, bias=exact(W_oi))                              # (out, in)
        z = either(apart, matmul(xs, transpose(merged), p))
        chains.append((slots, {"xs": xs, "xa": xa, "z": z, "a": a, "b": b, "W": exact(W_oi), "merged": merged}))
    return chains


def _gather(blocks: list[tuple[list[int], Bounded]], *, xp: Any) -> Bounded:
    """Per-expert row blocks back in slot order."""
    order = [q for slots, _ in blocks for q in slots]
    return Bounded(_unpermute(xp.concat([b.value for _, b in blocks], axis=0), order, xp=xp),
                   _unpermute(xp.concat([b.error for _, b in blocks], axis=0), order, xp=xp))


def _sum_over_k(P: Bounded, n: int, K: int, p: Precision) -> Bounded:
    """(n*K, c) -> (n, c): each token's K slot rows summed in any order."""
    xp = namespace(P.value)
    c = P.value.shape[-1]
    to_k = lambda a: xp.reshape(xp.permute_dims(xp.reshape(a, (n, K, c)), (1, 0, 2)), (K, n * c))  # noqa: E731
    s = row_sum(Bounded(to_k(P.value), to_k(P.error)), p)
    return Bounded(xp.reshape(s.value, (n, c)), xp.reshape(s.error, (n, c)))


def _weights_column(top_k_weights: Any) -> Bounded:
    """g as a (n*K, 1) column, exact."""
    xp = namespace(top_k_weights)
    return exact(xp.reshape(top_k_weights, (-1, 1)))


def moe_lora_forward_bound(x: Any, W: Any, A: Any, B: Any, *, top_k_index: Any, top_k_weights: Any,
                           scaling: float, layout: str = "out_in", dtype: str = "float32",
                           accumulation: str | None = None, model: str = "rigorous") -> Any:
    """Per-element bound on |y_peer - y_refpeft| of `moe_lora_forward`, (n, out), float64."""
    xp = namespace(x, W)
    _check_layout(W, A, B, layout)
    n, K = top_k_index.shape

    def chain(p: Precision) -> Bounded:
        z = _gather([(slots, c["z"]) for slots, c in
                     _expert_chains(x, W, A, B, top_k_index, scaling=scaling, layout=layout, p=p)], xp=xp)
        return _sum_over_k(multiply(z, _weights_column(top_k_weights), p), n, K, p)

    return with_reference(chain, Precision(dtype, accumulation, model))


def moe_lora_backward_bound(dy: Any, x: Any, W: Any, A: Any, B: Any, *, top_k_index: Any, top_k_weights: Any,
                            scaling: float, layout: str = "out_in", dtype: str = "float32",
                            accumulation: str | None = None, model: str = "rigorous") -> dict[str, Any]:
    """Per-element bounds on dx, dA, dB and dtop_k_weights of `moe_lora_backward`.

    dz = g dy is rounded once. Per expert, refpeft's order (LoRA's backward) or autograd through
    PEFT's patched weight: dW' = dz^T x, dA_e = s B_e^T dW', dB_e = s dW' A_e^T, dx = dz W'.
    dtop_k_weights is a dot product of dy_t with the forward's z (its error carried in).
    """
    xp = namespace(dy, x, W)
    _check_layout(W, A, B, layout)
    n, K = top_k_index.shape
    E, r = W.shape[0], A.shape[0] // W.shape[0]
    out, inn = B.shape[0], A.shape[1]

    def chain(p: Precision) -> dict[str, Bounded]:
        dy_slots = exact(xp.take(dy, xp.asarray([q // K for q in range(n * K)], dtype=xp.int64), axis=0))
        dz_all = multiply(dy_slots, _weights_column(top_k_weights), p)                         # (n*K, out)
        zeros = lambda shape: exact(xp.zeros(shape, dtype=xp.float64))  # noqa: E731
        dA_e, dB_e, dx_blocks, z_blocks = [zeros((r, inn))] * E, [zeros((out, r))] * E, [], []
        for slots, c in _expert_chains(x, W, A, B, top_k_index, scaling=scaling, layout=layout, p=p):
            e = int(xp.reshape(top_k_index, (-1,))[slots[0]])
            dz = Bounded(*(xp.take(v, xp.asarray(slots, dtype=xp.int64), axis=0) for v in (dz_all.value, dz_all.error)))
            g = matmul(dz, c["b"], p, scale=scaling)                                             # s dz B_e
            dW = matmul(transpose(dz), c["xs"], p)                                               # dz^T x (out, in)
            dA_e[e] = either(matmul(transpose(g), c["xs"], p), matmul(transpose(c["b"]), dW, p, scale=scaling))
            dB_e[e] = either(matmul(transpose(dz), c["xa"], p, scale=scaling),
                             matmul(dW, transpose(c["a"]), p, scale=scaling))
            dx_blocks.append((slots, either(add(matmul(dz, c["W"], p), matmul(g, c["a"], p), p),
                                            matmul(dz, c["merged"], p))))
            z_blocks.append((slots, c["z"]))
        z = _gather(z_blocks, xp=xp)
        dg = row_sum(transpose(multiply(z, dy_slots, p)), p)                                  # (n*K,)
        stack = lambda parts, f: Bounded(f([q.value for q in parts]), f([q.error for q in parts]))  # noqa: E731
        return {"dx": _sum_over_k(_gather(dx_blocks, xp=xp), n, K, p),
                "dA": stack(dA_e, lambda a: xp.concat(a, axis=0)),
                "dB": stack(dB_e, lambda a: xp.reshape(xp.stack(a, axis=2), (out, r * E))),
                "dtop_k_weights": Bounded(xp.reshape(dg.value, (n, K)), xp.reshape(dg.error, (n, K)))}

    return with_reference(chain, Precision(dtype, accumulation, model))


def moe_lora_merge_bound(W: Any, A: Any, B: Any, *, scaling: float, layout: str = "out_in", dtype: str = "float32",
                         accumulation: str | None = None, model: str = "rigorous", unmerge: bool = False) -> Any:
    """Per-element bound on W +- s B_e A_e in W's layout (PEFT: the delta rounded, then added)."""
    xp = namespace(W, A)
    E, _, _ = _check_layout(W, A, B, layout)
    A_e, B_e = expert_factors(A, B, num_experts=E)

    def chain(p: Precision) -> Bounded:
        parts = []
        for e in range(E):
            delta = matmul(exact(B_e[e, ...]), exact(A_e[e, ...]), p, scale=-scaling if unmerge else scaling)
            parts.append(add(exact(W[e, ...]), delta if layout == "out_in" else transpose(delta), p))
        return Bounded(xp.stack([q.value for q in parts]), xp.stack([q.error for q in parts]))

    return with_reference(chain, Precision(dtype, accumulation, model))
