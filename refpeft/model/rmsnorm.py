"""RMSNorm (Zhang & Sennrich 2019) as transformers' LlamaRMSNorm computes it: forward and backward.

Forward over the last axis of size H (shapes at line ends; "..." is any leading axes):

    r    = 1 / sqrt(mean(x^2) + eps)                    # (..., 1)   the reciprocal RMS
    xhat = x * r                                        # (..., H)
    y    = w * xhat                                     # (..., H)   w is (H,)

Backward, for dy = dL/dy (..., H). Since dr/dx_j = -r^3 x_j / H,

    dw    = sum_... dy * xhat                           # (H,)       over every leading axis
    dxhat = dy * w                                      # (..., H)
    dx    = r * (dxhat - xhat * mean(dxhat * xhat))     # (..., H)   mean over the last axis

Qwen3's q/k norm is the same op over the head dimension: call it on (..., heads, head_dim) with a
(head_dim,) weight, and dw sums over the heads too.

Precision: this computes in the input's dtype (refpeft's dtype policy). LlamaRMSNorm instead casts
the input to float32, normalises there, casts xhat back to the input dtype and only then multiplies
by w. For float32 inputs the two agree op for op; for float16/bfloat16 transformers normalises in
float32; for float64 inputs transformers *lowers* the normalisation to float32
(modeling_llama.py, LlamaRMSNorm.forward: `hidden_states.to(torch.float32)`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from refpeft.backend import check_float_array, namespace, same_dtype
from refpeft.errors import ConfigError, ShapeError


@dataclass(frozen=True)
class RmsNormCache:
    """What `rms_norm_backward` needs: the normalised input, the reciprocal RMS, the weight."""

    xhat: Any      # (..., H)
    rstd: Any      # (..., 1)
    weight: Any    # (H,)  by reference


@dataclass(frozen=True)
class RmsNormGrads:
    """Gradients of the loss with respect to the input and the weight."""

    dx: Any        # (..., H)
    dweight: Any   # (H,)


def rms_norm_forward(x: Any, weight: Any, *, eps: float) -> tuple[Any, RmsNormCache]:
    """y = w * x / sqrt(mean(x^2) + eps) over the last axis, and the cache for `rms_norm_backward`."""
    xp = namespace(x, weight)
    check_float_array("x", x, xp=xp)
    check_float_array("weight", weight, xp=xp)
    same_dtype({"x": x, "weight": weight})
    if len(x.shape) == 0:
        raise ShapeError("x is a 0-d array; RMSNorm normalises over its last axis")
    if tuple(weight.shape) != (x.shape[-1],):
        raise ShapeError(f"weight has shape {tuple(weight.shape)}, expected ({x.shape[-1]},) for x of shape "
                         f"{tuple(x.shape)}")
    if not eps >= 0.0:
        raise ConfigError(f"eps must be a non-negative number, got {eps}")
    rstd = 1.0 / xp.sqrt(xp.mean(x * x, axis=-1, keepdims=True) + eps)  # (..., 1)
    xhat = x * rstd                                                        # (..., H)
    y = weight * xhat                                                      # (..., H)
    return y, RmsNormCache(xhat=xhat, rstd=rstd, weight=weight)


def rms_norm_backward(dy: Any, cache: RmsNormCache) -> RmsNormGrads:
    """dx and dweight from dy = dL/dy; see the module docstring."""
    xp = namespace(dy, cache.xhat)
    check_float_array("dy", dy, xp=xp, shape=tuple(cache.xhat.shape))
    leading = tuple(range(len(dy.shape) - 1))
    dweight = xp.sum(dy * cache.xhat, axis=leading) if leading else dy * cache.xhat   # (H,)
    dxhat = dy * cache.weight                                                         # (..., H)
    dx = cache.rstd * (dxhat - cache.xhat * xp.mean(dxhat * cache.xhat, axis=-1, keepdims=True))
    return RmsNormGrads(dx=dx, dweight=dweight)
