"""Causal grouped-query attention as transformers' eager Llama attention computes it: forward, backward.

Shapes (b = batch, h = query heads, g = h / kv heads, sq = queries, sk = keys, D = head_dim):
q (b, h, sq, D) and k, v (b, h / g, sk, D) come already projected and rotated. Query i sits at key
position i + sk - sq (the queries are the last sq positions, as with a KV cache).

Forward. kv head j serves query heads jg .. jg + g - 1 (transformers' repeat_kv copies it g times);
stacking those heads' rows, xg = x viewed as (b, h / g, g sq, .) for x = q, P, dO, dS, makes each
group one product with its kv head, and no copy of k or v is made:

    allowed[b, i, j] = (j <= i + sk - sq) and mask[b, j] = 1        # (b, 1, sq, sk)  causal and padding
    M = 0 where allowed, else finfo(dtype).min          # (b, 1, sq, sk)  transformers' eager_mask
    S = (qg k^T) * D^-0.5 + M                           # (b, h, sq, sk)  q repeat_kv(k)^T D^-0.5 + M
    mx = max(S), l = sum(exp(S - mx)) over the last axis            # (b, h, sq, 1)   cached
    P = exp(S - mx) / l                                 # (b, h, sq, sk)  softmax(S)
    O = Pg v                                            # (b, h, sq, D)   P repeat_kv(v)

Backward, for dO = dL/dO (b, h, sq, D), with P recomputed from qg, k and the cached mx, l (the
same operations on the same numbers, so the forward's P bit for bit; as in flash attention, no
(b, h, sq, sk) array is kept between the passes):

    dv = Pg^T dOg                                       # (b, h / g, sk, D)  sums the g heads of each group
    dP = dOg v^T                                        # (b, h, sq, sk)
    dS = P * (dP - sum(dP * P, axis=-1))  where allowed, else 0     # (b, h, sq, sk)
    dq = dSg k * D^-0.5                                 # (b, h, sq, D)
    dk = dSg^T qg * D^-0.5                              # (b, h / g, sk, D)  sums the g heads of each group

The grouped products give repeat_kv's adjoint (the sum over each group of g heads) for free: Pg^T dOg
adds the g heads' P^T dO, and dSg^T qg their dS^T q. Both passes run one (batch row, kv head) block
at a time, rows (g sq) by keys (sk): each product is one 2-D matmul, and every temporary is one
block's (g sq, sk), never a (b, h, sq, sk) array.

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
    """What `attention_backward` needs: the inputs (by reference; q grouped), each row's softmax max and
    sum (P is recomputed from them, `attention_probs`), and where scores were allowed."""

    qg: Any         # (b, h / g, g sq, D)   q, each kv head's g query heads stacked row-wise
    k: Any          # (b, h / g, sk, D)
    v: Any          # (b, h / g, sk, D)
    row_max: Any    # (b, h / g, g sq, 1)   mx
    row_sum: Any    # (b, h / g, g sq, 1)   l = sum(exp(S - mx))
    allowed: Any    # (b, 1, sq, sk)        bool
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
    _check_shapes(q, k, v)
    b, h, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    scaling = d**-0.5 if scaling is None else scaling
    allowed = _allowed(attention_mask, b, sq, sk, xp=xp, device=q.device)            # (b, 1, sq, sk)
    additive = _additive(allowed, q.dtype, xp=xp)                                    # (b, 1, sq, sk)  M
    qg = _grouped(q, hkv, xp=xp)                                                     # (b, h / g, g sq, D)
    out = xp.empty(qg.shape, dtype=q.dtype, device=q.device)
    row_max = xp.empty((*qg.shape[:3], 1), dtype=q.dtype, device=q.device)
    row_sum = xp.empty((*qg.shape[:3], 1), dtype=q.dtype, device=q.device)
    for i, j in _blocks(b, hkv):
        scores = _block_scores(qg[i, j, ...], k[i, j, ...], additive[i, ...], scaling, xp=xp)   # (g sq, sk)
        mx = xp.max(scores, axis=-1, keepdims=True)
        e = xp.exp(scores - mx)
        total = xp.sum(e, axis=-1, keepdims=True)
        out[i, j, ...] = xp.matmul(e / total, v[i, j, ...])                        # P v   (g sq, D)
        row_max[i, j, ...], row_sum[i, j, ...] = mx, total
    cache = AttentionCache(qg=qg, k=k, v=v, row_max=row_max, row_sum=row_sum, allowed=allowed, scaling=scaling)
    return _ungrouped(out, h, xp=xp), cache


def attention_probs(cache: AttentionCache) -> Any:
    """P = softmax(S) (b, h, sq, sk) of a forward pass, recomputed from its cache bit for bit."""
    xp = namespace(cache.qg)
    b, hkv, rows, _ = cache.qg.shape
    additive = _additive(cache.allowed, cache.qg.dtype, xp=xp)
    P = xp.empty((b, hkv, rows, cache.k.shape[2]), dtype=cache.qg.dtype, device=cache.qg.device)
    for i, j in _blocks(b, hkv):
        P[i, j, ...] = _block_probs(cache, additive, i, j, xp=xp)
    return _ungrouped(P, hkv * (rows // cache.allowed.shape[2]), xp=xp)


def attention_backward(dout: Any, cache: AttentionCache) -> AttentionGrads:
    """dq, dk, dv from dout = dL/dO (b, h, sq, D); see the module docstring."""
    xp = namespace(dout, cache.qg)
    b, hkv, rows, d = cache.qg.shape
    sq, sk = cache.allowed.shape[2], cache.k.shape[2]
    h = hkv * (rows // sq)
    check_float_array("dout", dout, xp=xp, shape=(b, h, sq, d))
    additive = _additive(cache.allowed, cache.qg.dtype, xp=xp)
    dout_g = _grouped(dout, hkv, xp=xp)                                              # (b, h / g, g sq, D)
    dq = xp.empty(cache.qg.shape, dtype=dout.dtype, device=dout.device)
    dk = xp.empty(cache.k.shape, dtype=dout.dtype, device=dout.device)
    dv = xp.empty(cache.v.shape, dtype=dout.dtype, device=dout.device)
    for i, j in _blocks(b, hkv):
        P = _block_probs(cache, additive, i, j, xp=xp)                               # (g sq, sk)
        dO = dout_g[i, j, ...]                                                       # (g sq, D)
        dv[i, j, ...] = xp.matmul(xp.matrix_transpose(P), dO)                        # (sk, D)
        dP = xp.matmul(dO, xp.matrix_transpose(cache.v[i, j, ...]))                  # (g sq, sk)
        dS = xp.reshape(P * (dP - xp.sum(dP * P, axis=-1, keepdims=True)), (rows // sq, sq, sk))
        dS = xp.reshape(xp.where(cache.allowed[i, ...], dS, xp.zeros_like(dS)), (rows, sk))   # masked: constant
        dq[i, j, ...] = xp.matmul(dS, cache.k[i, j, ...]) * cache.scaling           # (g sq, D)
        dk[i, j, ...] = xp.matmul(xp.matrix_transpose(dS), cache.qg[i, j, ...]) * cache.scaling   # (sk, D)
    return AttentionGrads(dq=_ungrouped(dq, h, xp=xp), dk=dk, dv=dv)


def _blocks(b: int, hkv: int) -> list[tuple[int, int]]:
    """The (batch row, kv head) pairs: attention runs one such block at a time, so each temporary is a
    (g sq, sk) block's (for SmolLM2 at 256 tokens, 768 KiB in float32) rather than a (b, h, sq, sk) array."""
    return [(i, j) for i in range(b) for j in range(hkv)]


def _block_scores(qg: Any, k: Any, additive: Any, scaling: float, *, xp: Any) -> Any:
    """S = (qg k^T) * scaling + M for one block: qg (g sq, D), k (sk, D), M (1, sq, sk) -> (g sq, sk)."""
    rows, sk = qg.shape[0], k.shape[0]
    sq = additive.shape[-2]
    s = xp.reshape(xp.matmul(qg, xp.matrix_transpose(k)), (rows // sq, sq, sk))     # (g, sq, sk)
    return xp.reshape(s * scaling + additive, (rows, sk))


def _block_probs(cache: AttentionCache, additive: Any, i: int, j: int, *, xp: Any) -> Any:
    """P of block (i, j), (g sq, sk): exp(S - mx) / l with the forward's S, mx and l, so its very bits."""
    scores = _block_scores(cache.qg[i, j, ...], cache.k[i, j, ...], additive[i, ...], cache.scaling, xp=xp)
    return xp.exp(scores - cache.row_max[i, j, ...]) / cache.row_sum[i, j, ...]


def _additive(allowed: Any, dtype: Any, *, xp: Any) -> Any:
    """M = 0 where allowed, finfo(dtype).min elsewhere (transformers' eager_mask), (b, 1, sq, sk)."""
    neg = xp.asarray(xp.finfo(dtype).min, dtype=dtype, device=allowed.device)
    return xp.where(allowed, xp.zeros_like(neg), neg)


def _grouped(x: Any, hkv: int, *, xp: Any) -> Any:
    """(b, h, s, n) -> (b, hkv, g s, n): the g = h / hkv query heads of each kv head stacked row-wise."""
    b, h, s, n = x.shape
    return xp.reshape(x, (b, hkv, (h // hkv) * s, n))


def _ungrouped(x: Any, h: int, *, xp: Any) -> Any:
    """The inverse of `_grouped`: (b, hkv, g s, n) -> (b, h, s, n)."""
    b, hkv, rows, n = x.shape
    return xp.reshape(x, (b, h, rows // (h // hkv), n))


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
