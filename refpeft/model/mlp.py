"""The SwiGLU activation of a Llama MLP (Shazeer 2020): h = silu(gate) * up, forward and backward.

LlamaMLP computes down_proj(silu(gate_proj(x)) * up_proj(x)); the three projections are linear
layers (possibly adapted) that the decoder applies, so this op is only the gated product between them.

Forward (I = intermediate size; "..." any leading axes):

    sig = 1 / (1 + exp(-gate))                          # (..., I)   the logistic sigmoid
    h   = gate * sig * up                               # (..., I)   silu(gate) = gate * sig

Backward, for dh = dL/dh (..., I), with sig recomputed from the cached gate (one (..., I) array
fewer kept per layer). With silu'(z) = sig + z sig (1 - sig) = sig (1 + z (1 - sig)),

    dgate = dh * up * sig * (1 + gate * (1 - sig))      # (..., I)
    dup   = dh * gate * sig                             # (..., I)

The sigmoid is evaluated from e = exp(-|gate|) <= 1 (sig = 1 / (1 + e) for gate >= 0, e / (1 + e)
otherwise, computed for both signs at once as exp(min(gate, 0)) / (1 + e)), so no exponential
overflows for large |gate|.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from refpeft.backend import check_float_array, namespace, same_dtype
from refpeft.errors import ShapeError


@dataclass(frozen=True)
class SwigluCache:
    """What `swiglu_backward` needs: both inputs (by reference); the sigmoid is recomputed from gate."""

    gate: Any   # (..., I)
    up: Any     # (..., I)


@dataclass(frozen=True)
class SwigluGrads:
    """Gradients of the loss with respect to the gate and up projections' outputs."""

    dgate: Any  # (..., I)
    dup: Any    # (..., I)


def swiglu_forward(gate: Any, up: Any) -> tuple[Any, SwigluCache]:
    """h = silu(gate) * up, elementwise, and the cache for `swiglu_backward`."""
    xp = namespace(gate, up)
    check_float_array("gate", gate, xp=xp)
    check_float_array("up", up, xp=xp)
    same_dtype({"gate": gate, "up": up})
    if tuple(gate.shape) != tuple(up.shape):
        raise ShapeError(f"gate has shape {tuple(gate.shape)} but up has {tuple(up.shape)}")
    sig = _sigmoid(gate, xp=xp)                                        # (..., I)
    h = gate * sig * up                                                # (..., I)
    return h, SwigluCache(gate=gate, up=up)


def swiglu_backward(dh: Any, cache: SwigluCache) -> SwigluGrads:
    """dgate and dup from dh = dL/dh; see the module docstring."""
    xp = namespace(dh, cache.gate)
    check_float_array("dh", dh, xp=xp, shape=tuple(cache.gate.shape))
    gate = cache.gate
    sig = _sigmoid(gate, xp=xp)                                        # (..., I)   as in forward
    dgate = dh * cache.up * sig * (1.0 + gate * (1.0 - sig))           # (..., I)
    dup = dh * gate * sig                                              # (..., I)
    return SwigluGrads(dgate=dgate, dup=dup)


def _sigmoid(z: Any, *, xp: Any) -> Any:
    """1 / (1 + exp(-z)) as exp(min(z, 0)) / (1 + e), e = exp(-|z|) <= 1: that is 1 / (1 + e) for z >= 0
    and e / (1 + e) otherwise, so no exponential overflows, and no branch (`where`) is taken per entry."""
    zero = xp.asarray(0.0, dtype=z.dtype, device=z.device)
    return xp.exp(xp.minimum(z, zero)) / (1.0 + xp.exp(-xp.abs(z)))
