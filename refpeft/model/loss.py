"""Causal-LM cross-entropy with transformers' semantics (ForCausalLMLoss): forward and backward.

Shapes: logits z (b, s, V), labels (b, s) integers, ignore_index (default -100). The labels are
shifted inside the loss, so position i predicts token i + 1 and the last position predicts nothing:

    t[b, i] = labels[b, i + 1] for i < s - 1,  ignore_index for i = s - 1      # (b, s)
    c[b, i] = 1 if t[b, i] != ignore_index else 0                               # (b, s)  counted
    logp    = z - (m + log(sum_v exp(z - m))),  m = max_v z                     # (b, s, V)
    L       = -(1 / N) sum_{b, i} c[b, i] logp[b, i, t[b, i]]                   # ()

with N = sum(c) (reduction "mean", the default) or N = num_items_in_batch when that is passed
(transformers then takes the sum and divides by it, so gradient-accumulation steps add up).

Backward, for dL (a scalar), with softmax(z) = exp(logp) recomputed from the logits and the
cached log-sum-exp of each row, lse = m + log(sum_v exp(z - m)) (so logp = z - lse):

    dz[b, i, v] = dL * c[b, i] / N * (softmax(z)[b, i, v] - [v = t[b, i]])      # (b, s, V)

Memory: the logits are the only (n, V) array the loss keeps (by reference; n = b s rows, and the
caller holds them anyway), and backward allocates only its result. Both passes go over the rows
in chunks of about `_CHUNK_ELEMENTS` entries, so every (rows, V) temporary (z - m, its exponential,
the one-hot of the targets) is a chunk's, never another (n, V) array. A row's max, sum and
exponentials do not depend on the chunking, so the numbers are those of the whole-array formulas.

When every label is ignored and no num_items_in_batch is given, transformers' mean is 0 / 0 = NaN
(nn.functional.cross_entropy with reduction "mean" over no counted token). Here that raises an
InputError instead, since a NaN loss would poison the update silently; with num_items_in_batch the
loss is 0 / N = 0 and is returned, as transformers does.

Precision: ForCausalLMLoss upcasts the logits with `logits.float()` (loss/loss_utils.py), which
for float64 logits is a *downcast* to float32; here the loss is computed in the logits' dtype.
The labels that are targets, labels[:, 1:], must be ignore_index or lie in [0, V) (cross_entropy
raises there too); labels[:, 0] is never a target and is not looked at.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from refpeft.backend import check_float_array, namespace
from refpeft.errors import ConfigError, InputError, ShapeError
from refpeft.model.checks import require_in_range, require_integer


_CHUNK_ELEMENTS = 2**16  # entries of a chunk of rows (256 KiB in float32): its temporaries stay in cache


@dataclass(frozen=True)
class CausalLmLossCache:
    """What `causal_lm_loss_backward` needs: the logits, each row's log-sum-exp, the shifted targets,
    which count, N. No (n, V) array of its own: backward recomputes softmax(z) from z and lse."""

    logits: Any       # (n, V)  n = b * s rows, the caller's logits (a view)
    lse: Any          # (n,)    log(sum_v exp(z)), as m + log(sum_v exp(z - m))
    targets: Any      # (n,)    the shifted labels, ignored ones replaced by 0
    counted: Any      # (n,)    bool
    denominator: float
    shape: tuple[int, ...]  # the logits' shape (b, s, V)


def causal_lm_loss_forward(logits: Any, labels: Any, *, ignore_index: int = -100,
                           num_items_in_batch: float | None = None) -> tuple[Any, CausalLmLossCache]:
    """The mean next-token cross-entropy L (a 0-d array) of logits (b, s, V) against labels (b, s)."""
    xp = namespace(logits, labels)
    check_float_array("logits", logits, xp=xp)
    if len(logits.shape) != 3:
        raise ShapeError(f"logits has shape {tuple(logits.shape)}, expected (batch, seq, vocab_size)")
    b, s, V = logits.shape
    require_integer("labels", labels, xp=xp, ndim=2)
    if tuple(labels.shape) != (b, s):
        raise ShapeError(f"labels has shape {tuple(labels.shape)}, expected (batch, seq) = ({b}, {s})")
    require_in_range("labels[:, 1:]", labels[:, 1:], 0, V, xp=xp, allowed=ignore_index)  # labels[:, 0] unused
    if num_items_in_batch is not None and not num_items_in_batch > 0:
        raise ConfigError(f"num_items_in_batch must be positive, got {num_items_in_batch}")
    last = xp.full((b, 1), ignore_index, dtype=labels.dtype, device=labels.device)
    t = xp.reshape(xp.concat([labels[:, 1:], last], axis=1), (-1,))                  # (n,)  shifted
    counted = t != ignore_index                                                       # (n,)
    count = int(xp.sum(xp.astype(counted, xp.int64)))
    if num_items_in_batch is None and count == 0:
        raise InputError("every shifted label is ignore_index, so the mean loss is 0/0 (transformers returns "
                         "NaN); pass num_items_in_batch for a sum-normalised loss")
    denominator = float(count if num_items_in_batch is None else num_items_in_batch)
    targets = xp.where(counted, t, xp.zeros_like(t))                                  # (n,)  safe index
    z = xp.reshape(logits, (-1, V))                                                   # (n, V)
    lse = xp.concat([log_sum_exp(z[rows, :], xp=xp) for rows in row_chunks(b * s, V)])  # (n,)
    rows = xp.arange(b * s, dtype=targets.dtype, device=targets.device)
    picked = xp.take(xp.reshape(z, (-1,)), rows * V + targets)                        # (n,)  z[t]
    nll = xp.where(counted, lse - picked, xp.zeros_like(picked))                      # (n,)  -logp[t]
    loss = xp.sum(nll) / denominator                                                  # ()
    cache = CausalLmLossCache(logits=z, lse=lse, targets=targets, counted=counted, denominator=denominator,
                              shape=(b, s, V))
    return loss, cache


def causal_lm_loss_backward(dloss: Any, cache: CausalLmLossCache) -> Any:
    """dlogits (b, s, V) from dL (a 0-d array or a Python number); see the module docstring."""
    z = cache.logits
    if isinstance(dloss, (int, float)):
        xp = namespace(z)
        dloss = xp.asarray(dloss, dtype=z.dtype, device=z.device)
    else:
        xp = namespace(dloss, z)
        check_float_array("dloss", dloss, xp=xp, shape=())
    n, V = z.shape
    vocab = xp.arange(V, dtype=cache.targets.dtype, device=cache.targets.device)
    weight = xp.astype(cache.counted, z.dtype) / cache.denominator * dloss          # (n,)    dL c / N
    dz = xp.empty((n, V), dtype=z.dtype, device=z.device)
    for rows in row_chunks(n, V):
        probs = xp.exp(z[rows, :] - cache.lse[rows, None])                           # (rows, V)  softmax(z)
        onehot = xp.astype(vocab[None, :] == cache.targets[rows, None], z.dtype)      # (rows, V)  [v = t]
        dz[rows, :] = (probs - onehot) * weight[rows, None]
    return xp.reshape(dz, cache.shape)


def log_sum_exp(z: Any, *, xp: Any) -> Any:
    """m + log(sum_v exp(z - m)) of each row of z (rows, V), m the row's max: no exponential overflows."""
    m = xp.max(z, axis=-1)                                                            # (rows,)
    return m + xp.log(xp.sum(xp.exp(z - m[:, None]), axis=-1))


def row_chunks(n: int, V: int) -> list[slice]:
    """Slices of the n rows, each about _CHUNK_ELEMENTS entries of a (n, V) array (at least one row)."""
    step = max(1, _CHUNK_ELEMENTS // max(V, 1))
    return [slice(start, min(start + step, n)) for start in range(0, n, step)] or [slice(0, 0)]
