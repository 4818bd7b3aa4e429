"""Distillation from the frozen base: KL(base || adapted) of temperature-softened next-token distributions.

The base is the model with its adapter disabled, so its logits come from the same weights (learning
without forgetting: the adapted model is pulled towards what the base predicted). For logits
z (adapted) and zb (base), both (b, s, V), a temperature T > 0 and the rows that count
c[b, i] (1 for a real token, 0 for padding; N = sum(c)):

    p  = softmax(z / T),  pb = softmax(zb / T)                                   # (b, s, V)
    L  = T^2 (1 / N) sum_{b, i} c[b, i] sum_v pb (log pb - log p)                # ()

which is torch's `kl_div(log_softmax(z / T), log_softmax(zb / T), log_target=True, reduction="sum")
* T^2 / N` over the counted rows (Hinton et al. 2015's T^2 keeps the gradient's scale as T varies).
The base's logits are constants (no gradient flows into the frozen base). Backward, for dL:

    dz[b, i, v] = dL c[b, i] T / N (p - pb)[b, i, v]                             # (b, s, V)

(d log p_v / dz_u = ([u = v] - p_u) / T, and sum_v pb_v = 1.) Like refpeft.model.loss, the cache
keeps both logits by reference and one log-sum-exp per row of each; both passes go over the rows
in chunks, so no (n, V) array is made but the result.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from refpeft.backend import check_float_array, namespace
from refpeft.errors import ConfigError, InputError, ShapeError
from refpeft.model.loss import log_sum_exp, row_chunks


@dataclass(frozen=True)
class DistillationCache:
    logits: Any          # (n, V) z / T
    base: Any            # (n, V) zb / T
    lse: Any             # (n,)
    base_lse: Any        # (n,)
    weight: Any          # (n,)   c T / N
    shape: tuple[int, ...]


def distillation_forward(logits: Any, base_logits: Any, *, temperature: float = 1.0,
                         counted: Any = None) -> tuple[Any, DistillationCache]:
    """L (a 0-d array) of the module docstring; counted (b, s) of 0/1 or bool (None: every row)."""
    xp = namespace(logits, base_logits)
    check_float_array("logits", logits, xp=xp)
    check_float_array("base_logits", base_logits, xp=xp, shape=tuple(logits.shape))
    if len(logits.shape) != 3:
        raise ShapeError(f"logits has shape {tuple(logits.shape)}, expected (batch, seq, vocab_size)")
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ConfigError(f"the distillation temperature must be a positive number, got {temperature!r}")
    b, s, V = logits.shape
    c = xp.ones((b * s,), dtype=logits.dtype) if counted is None else xp.reshape(xp.astype(counted, logits.dtype), (-1,))
    if tuple(c.shape) != (b * s,):
        raise ShapeError(f"counted has {c.shape[0]} entries, the logits {b} x {s} rows")
    count = float(xp.sum(c))
    if count == 0:
        raise InputError("no row counts in the distillation loss (every entry of `counted` is 0)")
    z, zb = xp.reshape(logits, (-1, V)) / temperature, xp.reshape(base_logits, (-1, V)) / temperature
    lse = xp.concat([log_sum_exp(z[rows, :], xp=xp) for rows in row_chunks(b * s, V)])
    base_lse = xp.concat([log_sum_exp(zb[rows, :], xp=xp) for rows in row_chunks(b * s, V)])
    total = xp.asarray(0.0, dtype=logits.dtype)
    for rows in row_chunks(b * s, V):
        log_pb = zb[rows, :] - base_lse[rows, None]                                    # (rows, V)
        log_p = z[rows, :] - lse[rows, None]
        total = total + xp.sum(c[rows] * xp.sum(xp.exp(log_pb) * (log_pb - log_p), axis=-1))
    loss = temperature**2 * total / count
    return loss, DistillationCache(z, zb, lse, base_lse, c * temperature / count, (b, s, V))


def distillation_backward(dloss: Any, cache: DistillationCache) -> Any:
    """dlogits (b, s, V) from dL; see the module docstring."""
    xp = namespace(cache.logits)
    n, V = cache.logits.shape
    dz = xp.empty((n, V), dtype=cache.logits.dtype)
    for rows in row_chunks(n, V):
        p = xp.exp(cache.logits[rows, :] - cache.lse[rows, None])
        pb = xp.exp(cache.base[rows, :] - cache.base_lse[rows, None])
        dz[rows, :] = (p - pb) * (cache.weight[rows, None] * dloss)
    return xp.reshape(dz, cache.shape)
