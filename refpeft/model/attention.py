"""Causal grouped-query attention as transformers' eager Llama attention computes it: forward, backward.

Shapes (b = batch, h = query heads, g = h / kv heads, sq = queries, sk = keys, D = head_dim):
q (b, h, sq, D) and k, v (b, h / g, sk, D) come already projected and rotated. Query i sits at key
position i + sk - sq (the queries are the last sq positions, as with a KV cache).

Forward:

    kr = repeat_kv(k), vr = repeat_kv(v)                # (b, h, sk, D)  kv head j serves heads jg..jg+g-1
    allowed[b, i, j] = (j <= i + sk - sq) and mask[b, j] = 1        # (b, 1, sq, sk)  causal and padding
    M = 0 where allowed, else finfo(dtype).min          # (b, 1, sq, sk)  transformers' eager_mask
    S = (q kr^T) * D^-0.5 + M                           # (b, h, sq, sk)
    P = softmax(S) over the last axis                   # (b, h, sq, sk)  cached
    O = P vr                                            # (b, h, sq, D)

Backward, for dO = dL/dO (b, h, sq, D):

    dvr = P^T dO                                        # (b, h, sk, D)
    dP  = dO vr^T                                       # (b, h, sq, sk)
    dS  = P * (dP - sum(dP * P, axis=-1))  where allowed, else 0     # (b, h, sq, sk)
    dq  = dS kr * D^-0.5                                # (b, h, sq, D)
    dkr = dS^T q * D^-0.5                               # (b, h, sk, D)
    dk, dv = the sums of dkr, dvr over each group of g query heads  # (b, h / g, sk, D)

A masked score is S = s + min, and |s| is far below half an ulp of min (2^970 in float64, 2^103 in
float32), so the sum rounds to min whatever s is: the computed S does not depend on s there, and
dS = 0 at masked entries is the derivative of the forward as computed. Where a row has any allowed
entry, P is exactly 0 at its masked entries, so this changes nothing.

A fully masked row (a left-padding query: every key at or before it is padding) has S = min in every
entry, so softmax gives 1 / sk to every key, padding and future keys included, and O is the plain
mean of v over all sk keys; its dq is 0 and its dO reaches v evenly. That is what transformers'
eager attention does in float32 (eager_mask fills finfo(float32).min, not -inf; the softmax of a
constant row is uniform). In float64 eager gives NaN instead: its softmax runs in float32
(`softmax(..., dtype=torch.float32)`), and the cast sends finfo(float64).min to -inf, so a fully
masked row is exp(-inf - (-inf)). transformers' default "sdpa" attention gives a third answer, a
zero row (torch's scaled_dot_product_attention zeroes fully masked rows). Here every dtype gets
eager's float32 answer, the uniform row. Such rows only feed padding positions, whose outputs a
causal-LM loss ignores (their labels are -100 and later queries mask them).

Precision: eager computes the softmax in float32 and casts P back to q's dtype; here P is computed
in q's dtype (float64 in the oracle). The max-subtracted softmax never overflows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from refpeft.backend import check_float_array, namespace, same_dtype
from refpeft.errors import ShapeError
from refpeft.model.checks import require_in_range, require_integer


@dataclass(frozen=True)
class AttentionCache:
    """What `attention_backward` needs: the inputs (by reference), P, and where scores were allowed."""

    q: Any          # (b, h, sq, D)
    k: Any          # (b, h / g, sk, D)
    v: Any          # (b, h / g, sk, D)
    probs: Any      # (b, h, sq, sk)   P
    allowed: Any    # (b, 1, sq, sk)   bool
    scaling: float


@dataclass(frozen=True)
class AttentionGrads:
    """Gradients of the loss with respect to the (projected, rotated) queries, keys and values."""

    dq: Any   # (b, h, sq, D)
    dk: Any   # (b, h / g, sk, D)
    dv: Any   # (b, h / g, sk, D)


def attention_forward(q: Any, k: Any, v: Any, *, attention_mask: Any = None,
                      scaling: float | None = None) -> tuple[Any, AttentionCache]:
    """O = softmax(q repeat_kv(k)^T * scaling + M) repeat_kv(v), (b, h, sq, D), and the cache.

    attention_mask: (b, sk) of 0/1 (or bool), 1 for a real token, as transformers takes it; None
    means no padding. scaling defaults to head_dim^-0.5. The output keeps the head axis second;
    transformers' eager function returns it transposed to (b, sq, h, D).
    """
    xp = namespace(q, k, v, attention_mask)
    for name, a in (("q", q), ("k", k), ("v", v)):
        check_float_array(name, a, xp=xp)
    same_dtype({"q": q, "k": k, "v": v})
    group = _check_shapes(q, k, v)
    b, _, sq, d = q.shape
    sk = k.shape[2]
    scaling = d**-0.5 if scaling is None else scaling
    allowed = _allowed(attention_mask, b, sq, sk, xp=xp, device=q.device)            # (b, 1, sq, sk)
    additive = xp.where(allowed, xp.asarray(0.0, dtype=q.dtype, device=q.device),
                        xp.asarray(xp.finfo(q.dtype).min, dtype=q.dtype, device=q.device))
    kr, vr = _repeat_kv(k, group, xp=xp), _repeat_kv(v, group, xp=xp)                 # (b, h, sk, D)
    scores = xp.matmul(q, xp.matrix_transpose(kr)) * scaling + additive              # (b, h, sq, sk)
    shifted = scores - xp.max(scores, axis=-1, keepdims=True)
    e = xp.exp(shifted)
    probs = e / xp.sum(e, axis=-1, keepdims=True)                                    # (b, h, sq, sk)
    out = xp.matmul(probs, vr)                                                       # (b, h, sq, D)
    return out, AttentionCache(q=q, k=k, v=v, probs=probs, allowed=allowed, scaling=scaling)


def attention_backward(dout: Any, cache: AttentionCache) -> AttentionGrads:
    """dq, dk, dv from dout = dL/dO (b, h, sq, D); see the module docstring."""
    xp = namespace(dout, cache.q)
    check_float_array("dout", dout, xp=xp, shape=tuple(cache.q.shape))
    group = cache.q.shape[1] // cache.k.shape[1]
    kr, vr = _repeat_kv(cache.k, group, xp=xp), _repeat_kv(cache.v, group, xp=xp)   # recomputed
    P = cache.probs
    dvr = xp.matmul(xp.matrix_transpose(P), dout)                                    # (b, h, sk, D)
    dP = xp.matmul(dout, xp.matrix_transpose(vr))                                    # (b, h, sq, sk)
    dS = P * (dP - xp.sum(dP * P, axis=-1, keepdims=True))
    dS = xp.where(cache.allowed, dS, xp.zeros_like(dS))                              # masked: constant
    dq = xp.matmul(dS, kr) * cache.scaling                                           # (b, h, sq, D)
    dkr = xp.matmul(xp.matrix_transpose(dS), cache.q) * cache.scaling                # (b, h, sk, D)
    return AttentionGrads(dq=dq, dk=_sum_groups(dkr, group, xp=xp), dv=_sum_groups(dvr, group, xp=xp))


def _repeat_kv(x: Any, group: int, *, xp: Any) -> Any:
    """(b, hkv, s, D) -> (b, hkv * group, s, D), each kv head repeated `group` times in a row."""
    b, hkv, s, d = x.shape
    if group == 1:
        return x
    return xp.reshape(xp.broadcast_to(x[:, :, None, ...], (b, hkv, group, s, d)), (b, hkv * group, s, d))


def _sum_groups(x: Any, group: int, *, xp: Any) -> Any:
    """The adjoint of `_repeat_kv`: (b, hkv * group, s, D) -> (b, hkv, s, D), summing each group."""
    b, h, s, d = x.shape
    if group == 1:
        return x
    return xp.sum(xp.reshape(x, (b, h // group, group, s, d)), axis=2)


def _allowed(attention_mask: Any, b: int, sq: int, sk: int, *, xp: Any, device: Any) -> Any:
    """allowed[b, 0, i, j] = (j <= i + sk - sq) and attention_mask[b, j] = 1, as a bool (b, 1, sq, sk)."""
    query_position = xp.arange(sq, device=device) + (sk - sq)
    causal = xp.arange(sk, device=device)[None, :] <= query_position[:, None]        # (sq, sk)
    if attention_mask is None:
        return xp.broadcast_to(causal[None, None, ...], (b, 1, sq, sk))
    if tuple(attention_mask.shape) != (b, sk):
        raise ShapeError(f"attention_mask has shape {tuple(attention_mask.shape)}, expected (batch, seq_k) = "
                         f"({b}, {sk})")
    if xp.isdtype(attention_mask.dtype, "bool"):
        real = attention_mask
    else:
        require_integer("attention_mask", attention_mask, xp=xp)
        require_in_range("attention_mask", attention_mask, 0, 2, xp=xp)
        real = attention_mask == 1
    return causal[None, None, ...] & real[:, None, None, :]


def _check_shapes(q: Any, k: Any, v: Any) -> int:
    """The group size h / hkv, after checking the three shapes agree."""
    for name, a in (("q", q), ("k", k), ("v", v)):
        if len(a.shape) != 4:
            raise ShapeError(f"{name} has shape {tuple(a.shape)}, expected (batch, heads, seq, head_dim)")
    if tuple(k.shape) != tuple(v.shape):
        raise ShapeError(f"k has shape {tuple(k.shape)} but v has {tuple(v.shape)}")
    b, h, sq, d = q.shape
    if k.shape[0] != b or k.shape[3] != d:
        raise ShapeError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch or head_dim")
    hkv, sk = k.shape[1], k.shape[2]
    if hkv == 0 or h % hkv:
        raise ShapeError(f"{h} query heads cannot be shared evenly by {hkv} key/value heads")
    if sq > sk:
        raise ShapeError(f"{sq} queries but only {sk} keys; queries are the last positions of the keys")
    return h // hkv
