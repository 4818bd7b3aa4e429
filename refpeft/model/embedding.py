"""Token embedding: a row lookup forward, a scatter-add backward (transformers' nn.Embedding).

Forward (b = batch, s = sequence, V = vocabulary, H = hidden; shapes at line ends):

    out[b, s, :] = W[ids[b, s], :]                       # (b, s, H)   W is (V, H)

Backward, for dout = dL/dout (b, s, H): each token adds its output gradient to its own row,

    dW[v, :] = sum_{(b, s): ids[b, s] = v} dout[b, s, :]  # (V, H)     zero for ids never seen
    dW[padding_idx, :] = 0                                #            torch's padding_idx rule

How dW is formed without a scatter (the array API has no indexed add): with u the sorted distinct
ids of the batch and j(t) the position of token t's id in u,

    onehot[i, t] = [j(t) = i]                             # (u, n)     n = b * s tokens, in chunks
    sums         = onehot dout                            # (u, H)     one row per distinct id
    dW[v, :]     = sums[position of v in u] or 0          # (V, H)     a gather from [0; sums]

so the largest temporary is a chunk of the one-hot matrix (bounded by `_CHUNK_ELEMENTS`), never a
(tokens, vocabulary) array. Each row of `sums` is an exact sum of that id's gradient rows (the
one-hot weights are 0 and 1, so the matmul adds the same terms a scatter-add would, in some order).

nn.Embedding with `padding_idx` (LlamaModel passes config.pad_token_id) never accumulates a gradient
into the padding row; `padding_idx=` reproduces that. The forward does not depend on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from refpeft.backend import check_float_array, namespace
from refpeft.errors import ConfigError, ShapeError
from refpeft.model.checks import require_in_range, require_integer

_CHUNK_ELEMENTS = 2**22  # entries of one one-hot chunk (32 MiB in float64)


@dataclass(frozen=True)
class EmbeddingCache:
    """What `embedding_backward` needs: the ids, the table's shape and dtype, the padding row."""

    ids: Any                  # (b, s) integers in [0, V)
    vocab_size: int
    padding_idx: int | None
    weight: Any               # (V, H)  by reference, for the dtype, device and namespace


def embedding_forward(ids: Any, weight: Any, *, padding_idx: int | None = None) -> tuple[Any, EmbeddingCache]:
    """out = W[ids]: the (b, s, H) embeddings of integer ids (b, s) from the (V, H) table W."""
    xp = namespace(ids, weight)
    check_float_array("weight", weight, xp=xp)
    if len(weight.shape) != 2:
        raise ShapeError(f"weight has shape {tuple(weight.shape)}, expected (vocab_size, hidden_size)")
    vocab_size, hidden = weight.shape
    require_integer("ids", ids, xp=xp, ndim=2)
    require_in_range("ids", ids, 0, vocab_size, xp=xp)
    if padding_idx is not None and not 0 <= padding_idx < vocab_size:
        raise ConfigError(f"padding_idx {padding_idx} is outside [0, {vocab_size})")
    rows = xp.take(weight, xp.reshape(ids, (-1,)), axis=0)             # (n, H)
    out = xp.reshape(rows, (*ids.shape, hidden))                        # (b, s, H)
    return out, EmbeddingCache(ids=ids, vocab_size=vocab_size, padding_idx=padding_idx, weight=weight)


def embedding_backward(dout: Any, cache: EmbeddingCache) -> Any:
    """dW (V, H): each token's output gradient added into its id's row (see the module docstring)."""
    xp = namespace(dout, cache.weight)
    hidden = cache.weight.shape[1]
    check_float_array("dout", dout, xp=xp, shape=(*cache.ids.shape, hidden))
    g = xp.reshape(dout, (-1, hidden))                                  # (n, H)
    distinct = xp.unique_inverse(xp.reshape(cache.ids, (-1,)))
    u = distinct.values.shape[0]
    if u == 0:                                                          # an empty batch
        return xp.zeros(cache.weight.shape, dtype=g.dtype, device=g.device)
    sums = _segment_sums(g, distinct.inverse_indices, u, xp=xp)         # (u, H)
    vocab = xp.arange(cache.vocab_size, dtype=distinct.values.dtype)    # (V,)
    position = xp.searchsorted(distinct.values, vocab)                  # (V,)  where v would sit in u
    seen = xp.take(distinct.values, xp.clip(position, 0, u - 1)) == vocab
    if cache.padding_idx is not None:
        seen = seen & (vocab != cache.padding_idx)
    row = xp.where(seen, position + 1, xp.zeros_like(position))         # (V,)  0 picks the zero row
    table = xp.concat([xp.zeros((1, hidden), dtype=g.dtype, device=g.device), sums], axis=0)
    return xp.take(table, row, axis=0)                                  # (V, H)


def _segment_sums(g: Any, segment: Any, count: int, *, xp: Any) -> Any:
    """sums[i] = sum of the rows g[t] with segment[t] = i, for i < count, by one-hot matmuls in chunks."""
    n = g.shape[0]
    chunk = max(1, _CHUNK_ELEMENTS // max(n, 1))
    parts = [xp.zeros((0, g.shape[1]), dtype=g.dtype, device=g.device)]
    for start in range(0, count, chunk):
        stop = min(start + chunk, count)
        ids = xp.arange(start, stop, dtype=segment.dtype)               # (c,)
        onehot = xp.astype(ids[:, None] == segment[None, :], g.dtype)   # (c, n)
        parts.append(xp.matmul(onehot, g))                              # (c, H)
    return xp.concat(parts, axis=0)

