"""Gradients of one optimiser step: summing micro-batches, and clipping by the global norm as torch does.

Accumulation. A step of G micro-batches sums their gradients, each taken of a scaled loss, so the
step's gradient is the gradient of one combined loss (the sum runs in micro-batch order, as
`p.grad += ...` does in torch). Two scalings, by name (`ACCUMULATIONS`):

    "mean"    L = sum_j L_j / G       L_j the micro-batch's mean token loss; each micro-batch's
                                      backward starts from dL_j = 1 / G. This is `(loss / G).backward()`,
                                      transformers' Trainer when the loss does not take
                                      num_items_in_batch, and the definition the reference test uses.
    "tokens"  L = sum_j S_j / N       S_j the micro-batch's summed token loss, N the counted tokens of
                                      all G micro-batches (labels[:, 1:] != -100); transformers 5's
                                      Trainer default for causal LMs (`_get_num_items_in_batch`,
                                      then no division by G). Every token weighs the same.

The two agree when every micro-batch counts the same number of tokens (packed text).

Clipping (`torch.nn.utils.clip_grad_norm_`, norm_type 2):

    n_i   = ||g_i||_2                       per tensor (torch's _foreach_norm)
    total = ||(n_1, ..., n_m)||_2           the norm of the stacked norms
    c     = min(max_norm / (total + 1e-6), 1)
    g_i   = g_i * c                         applied even when c = 1 (an exact no-op)

computed in the gradients' dtype; the 1e-6 is torch's, so a gradient exactly at max_norm is
scaled by slightly less than 1. The returned total is the pre-clipping norm, as torch returns it.
"""

from __future__ import annotations

from typing import Any, Mapping

from refpeft.backend import namespace
from refpeft.errors import ConfigError

ACCUMULATIONS = ("mean", "tokens")
CLIP_EPS = 1e-6  # torch's clip_grad_norm_: max_norm / (total_norm + 1e-6)


def add_gradients(total: Mapping[str, Any] | None, grads: Mapping[str, Any]) -> dict[str, Any]:
    """total + grads by name (a micro-batch's gradients added to the step's sum); total None starts it."""
    if total is None:
        return dict(grads)
    if set(total) != set(grads):
        raise ConfigError(f"micro-batches disagree on the trained tensors: {sorted(set(total) ^ set(grads))[:3]}")
    return {name: total[name] + g for name, g in grads.items()}


def global_norm(grads: Mapping[str, Any]) -> Any:
    """||(||g_1||, ..., ||g_m||)||_2, a 0-d array in the gradients' dtype (torch's total norm)."""
    if not grads:
        raise ConfigError("no gradients to take the norm of")
    xp = namespace(*grads.values())
    return xp.linalg.vector_norm(xp.stack([xp.linalg.vector_norm(g) for g in grads.values()]))


def clip_by_global_norm(grads: Mapping[str, Any], max_norm: float) -> tuple[dict[str, Any], Any]:
    """(grads * min(max_norm / (total + 1e-6), 1), total): `clip_grad_norm_`'s result and return value."""
    if not max_norm > 0.0:
        raise ConfigError(f"max_norm must be positive, got {max_norm}")
    total = global_norm(grads)
    xp = namespace(total)
    coefficient = xp.clip(float(max_norm) / (total + CLIP_EPS), max=1.0)          # ()  clamped to 1
    return {name: g * coefficient for name, g in grads.items()}, total


def check_accumulation(accumulation: str) -> None:
    if accumulation not in ACCUMULATIONS:
        raise ConfigError(f"unknown accumulation {accumulation!r}; choose one of {', '.join(ACCUMULATIONS)}")
